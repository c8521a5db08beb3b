"""Does GCT's gradient constraint earn its keep? GCT with constraint_lambda 0 vs a few values.

    python tools/bench_constraint.py --out build/bench_constraint   # a few minutes, 2 cores

2 gloo ranks (ggspeed.testing's harness) train the small GPT (ggspeed.models.nanogpt, the
configuration of tools/bench_gct.py) on the embedded corpus with DDP, GCT as its comm hook and
the constraint as a step pre-hook of the optimizer on the averaged gradients (as
``ggspeed.gct.install`` attaches it), one setting after another in one run: same initial weights
and the same batches for every setting, plus an fp32 all-reduce without GCT as the loss
reference. Reported per setting: training loss (mean of the last 10 steps, both ranks),
validation loss at the end, GCT bits per element on the wire (whole run and second half, where
a constraint that steers toward cheap gradients should show), the constraint term's size
relative to the gradient (mean over steps) and the median step time. ``--quantizer`` adds GCT
runs without the constraint at other quantizer settings: the price in loss of the same bit
savings by the quantizer's own knobs.

Results go to <out>/results.json; ``--report`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _gpt_config():
    from ggspeed.models.nanogpt import GPTConfig

    return GPTConfig(vocab_size=4096, seq_len=128, n_layer=4, n_head=4, d_model=128)


def _gct_config(args: argparse.Namespace, lam: float, **overrides: float):
    from ggspeed.config import GCTConfig

    kw: dict[str, Any] = {
        "enabled": True,
        "quant_step": args.quant_step,
        "rdoq_mu": args.rdoq_mu,
        "block_size": args.block_size,
        "constraint_lambda": lam,
        "constraint_warmup_steps": args.warmup if lam > 0 else 0,
    }
    return GCTConfig(**{**kw, **overrides})


def _settings(args: argparse.Namespace) -> list[tuple[str, float | None, dict[str, float]]]:
    """(name, lambda or None for the fp32 reference, quantizer overrides) in run order."""
    out: list[tuple[str, float | None, dict[str, float]]] = []
    if not args.no_fp32:
        out.append(("fp32", None, {}))
    out += [(f"lambda={lam:g}", lam, {}) for lam in map(float, args.lambdas.split(","))]
    for point in filter(None, args.quantizer.split(";")):
        key, value = point.split("=")
        out.append((point, 0.0, {key: float(value)}))
    return out


def _rank(args: argparse.Namespace) -> dict[str, Any]:
    """One rank: every setting in turn, from the same seed and batches."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.gct import GCTState, apply_constraint, gct_hook
    from ggspeed.models.nanogpt import GPT

    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = load_corpus_tokens(vocab_size=4096)
    valid = random_batches(corpus.valid, args.batch, 128, seed=12345)
    valid_batches = [next(valid) for _ in range(args.valid_batches)]
    out: dict[str, Any] = {}
    for name, lam, overrides in _settings(args):
        torch.manual_seed(args.seed)
        model = GPT(_gpt_config())
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        gct = None
        if lam is None:
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        else:
            gct = GCTState(_gct_config(args, lam, **overrides))
            ddp.register_comm_hook(gct, gct_hook)
            if lam > 0:
                named = list(model.named_parameters())
                opt.register_step_pre_hook(lambda *_, s=gct, nm=named: apply_constraint(s, nm))
        batches = random_batches(corpus.train, args.batch, 128, seed=rank + 10 * args.seed)
        losses, times = [], []
        half = (0, 0.0)
        for step in range(args.steps):
            if gct is not None and step == args.steps // 2:
                half = (gct.stats.bytes_sent, gct.stats.wire_elements)
            x, y = next(batches)
            t0 = time.perf_counter()
            loss = ddp(x, y)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if gct is not None:
                gct.on_step(step + 1)
            lt = loss.detach().clone()
            dist.all_reduce(lt)  # logging only
            losses.append(float(lt) / world)
        with torch.no_grad():
            val = statistics.mean(float(model(x, y)[1]) for x, y in valid_batches)
        r: dict[str, Any] = {
            "losses": losses,
            "train_loss": statistics.mean(losses[-10:]),
            "valid_loss": val,
            "step_time_s": statistics.median(times[2:]),
        }
        if gct is not None:
            st = gct.stats
            r["bits"] = float(st.bits_per_element)
            r["bits_second_half"] = 8.0 * (st.bytes_sent - half[0]) / (st.wire_elements - half[1])
            r["constraint_rel"] = float(gct.scalars().get("constraint_rel", 0.0))
        out[name] = r
        if rank == 0:
            print(name, {k: v for k, v in r.items() if k != "losses"}, flush=True)
    return out


def report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    base = runs["lambda=0"]
    lines = [
        "| setting | train loss (last 10) | valid loss | vs lambda 0 (valid) | bits/element "
        "(run) | vs lambda 0 (bits) | bits/element (2nd half) | constraint / gradient | step (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        rel = f"{100 * (r['valid_loss'] / base['valid_loss'] - 1):+.2f}%"
        bits = f"{r['bits']:.3f}" if "bits" in r else "32"
        brel = f"{100 * (r['bits'] / base['bits'] - 1):+.2f}%" if "bits" in r else "-"
        bits2 = f"{r['bits_second_half']:.3f}" if "bits" in r else "32"
        cr = f"{r['constraint_rel']:.3g}" if r.get("constraint_rel") else "-"
        lines.append(
            f"| {name} | {r['train_loss']:.4f} | {r['valid_loss']:.4f} | {rel} | {bits} | {brel} | "
            f"{bits2} | {cr} | {1e3 * r['step_time_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="build/bench_constraint")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lambdas", default="0,1e-6,1e-5,1e-4,1e-3", help="constraint_lambda values")
    p.add_argument("--warmup", type=int, default=40, help="constraint_warmup_steps when lambda > 0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--quant-step", type=float, default=1.0)
    p.add_argument("--rdoq-mu", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--valid-batches", type=int, default=8)
    p.add_argument(
        "--quantizer",
        default="",
        help="';'-separated GCT settings without the constraint, e.g. 'quant_step=1.2;rdoq_mu=0.2': "
        "what the quantizer's own knobs pay in loss for the same bits",
    )
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 all-reduce reference")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--report", action="store_true", help="print the table of <out>/results.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.report:
        print(report(json.loads((out / "results.json").read_text())))
        return
    if "0" not in [f"{float(v):g}" for v in args.lambdas.split(",")]:
        p.error("--lambdas must include 0 (the reference)")
    from ggspeed.testing import run_ranks

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = run_ranks(_rank, 2, args, timeout=3600)
    results = {
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.time() - t0,
        "runs": res[0],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
