"""GG Init benchmarks: sampler speed against ``normal_`` and a small-GPT pretraining comparison.

speed:  GG Init of every weight tensor of a ~1B-parameter GPT (d_model 2048, 20 layers, vocab
        50304) against ``torch.nn.init.normal_`` on the same tensors, interleaved tensor by
        tensor, medians of repeats. ``--small`` uses a ~50M-parameter GPT for a quick check.
train:  nanogpt on the embedded corpus (Python stdlib): GG Init shapes 0.5, 1.0, 1.5 (Megatron
        std rule) against Megatron's normal(0, 0.02) with 1/sqrt(2L) output layers, 3 seeds each,
        identical batches. Reports loss at step budgets, steps to a target loss (the baseline's
        mean loss at 60% of the budget, fixed before comparing), validation loss, and Exp-Golomb
        bits per weight of the trained weights at a fixed quantization step.

    python tools/bench_init.py speed [--small] [--repeats 3] [--threads 1]
    python tools/bench_init.py train [--steps 300] [--workers 2] [--json out.json]
    python tools/bench_init.py report out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ggspeed import gg  # noqa: E402
from ggspeed.init import GGInitMethod  # noqa: E402
from launch.pretrain_gpt import lr_scheduler  # noqa: E402

# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def gpt_weight_shapes(d: int, layers: int, vocab: int, seq: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (seq, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    return shapes


def bench_speed(small: bool, repeats: int, threads: int, shape: float) -> dict[str, Any]:
    torch.set_num_threads(threads)
    if small:
        shapes = gpt_weight_shapes(512, 12, 50304, 2048)
    else:
        shapes = gpt_weight_shapes(2048, 20, 50304, 2048)
    tensors = [torch.empty(s) for s in shapes]
    n = sum(t.numel() for t in tensors)
    gen = torch.Generator().manual_seed(0)
    init = GGInitMethod(shape, 0.02, generator=gen)
    gg._quantile_table(shape)  # the table is built once per shape: not part of a tensor's init

    def one_pass() -> tuple[float, float]:
        """normal_ then GG on each tensor in turn: load changes on a shared machine hit both."""
        tn = tg = 0.0
        for t in tensors:
            t0 = time.perf_counter()
            torch.nn.init.normal_(t, 0.0, 0.02, generator=gen)
            t1 = time.perf_counter()
            init(t)
            t2 = time.perf_counter()
            tn += t1 - t0
            tg += t2 - t1
        return tn, tg

    times: dict[str, list[float]] = {"normal_": [], "gg": []}
    one_pass()  # warm-up (page faults, table upload)
    for _ in range(repeats):
        tn, tg = one_pass()
        times["normal_"].append(tn)
        times["gg"].append(tg)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [g / m for g, m in zip(times["gg"], times["normal_"])]
    std = float(tensors[-1].std())
    fitted = gg.fit_shape(tensors[-1])[0]
    return {
        "params": n,
        "tensors": len(tensors),
        "threads": threads,
        "shape": shape,
        "seconds": times,
        "median_s": med,
        "ns_per_element": {k: v / n * 1e9 for k, v in med.items()},
        "ratio_median": med["gg"] / med["normal_"],
        "ratio_per_repeat": ratios,
        "check_std": std,
        "check_shape": fitted,
    }


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

ARMS: list[tuple[str, float | None]] = [
    ("megatron-normal", None),
    ("gg-0.5", 0.5),
    ("gg-1.0", 1.0),
    ("gg-1.5", 1.5),
]


def weight_bits(model: torch.nn.Module, step: float) -> dict[str, Any]:
    """EG-0 bits per weight of all 2-D weights quantized with ``step`` (codec if present)."""
    ws = [p.detach().flatten() for n, p in model.named_parameters() if p.dim() == 2]
    w = torch.cat(ws)
    shape, scale = gg.fit_shape(w)
    out: dict[str, Any] = {"fitted_shape": shape, "fitted_scale": scale, "numel": w.numel()}
    try:
        from ggspeed import codec

        q = codec.quantize(w, step)
        out["eg_bits_per_weight"] = codec.eg_code_length(q, k=0) / w.numel()
        out["entropy_bits_per_weight"] = codec.empirical_entropy(q)
        out["source"] = "ggspeed.codec"
    except ImportError:
        out["eg_bits_per_weight"] = None
        out["entropy_bits_per_weight"] = gg.quantized_entropy(shape, scale, step)
        out["source"] = "ggspeed.gg.quantized_entropy of the fitted GG (codec missing)"
    return out


def train_one(arm: str, shape: float | None, seed: int, a: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.init import apply_gg_init
    from ggspeed.models.nanogpt import GPT, GPTConfig

    corpus = load_corpus_tokens(vocab_size=a["vocab"])
    cfg = GPTConfig(
        vocab_size=a["vocab"],
        seq_len=a["seq"],
        n_layer=a["layers"],
        n_head=a["heads"],
        d_model=a["d_model"],
    )
    torch.manual_seed(seed)
    model = GPT(cfg)  # Megatron's normal(0, 0.02), output layers / sqrt(2L)
    if shape is not None:
        torch.manual_seed(seed)
        apply_gg_init(model, {"enabled": True, "shape": shape, "std": cfg.init_std})
    opt = torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    # the trainer's --lr-decay-style cosine (DeepSpeed's WarmupCosineLR), down to 0.1 x lr
    sched = lr_scheduler(opt, "cosine", 0.1 * a["lr"], a["warmup"], a["steps"])
    batches = random_batches(corpus.train, a["batch"], a["seq"], seed=1000)  # same for all arms
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        x, y = next(batches)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        vb = random_batches(corpus.valid, a["batch"], a["seq"], seed=7)
        val = statistics.fmean(float(model(*next(vb))[1]) for _ in range(a["val_batches"]))
    if a.get("save") and seed == 0:
        torch.save(model.state_dict(), Path(a["save"]) / f"{arm}-seed{seed}.pt")
    return {
        "arm": arm,
        "seed": seed,
        "losses": losses,
        "val_loss": val,
        "train_seconds": train_s,
        "weights": weight_bits(model, a["quant_step"]),
    }


def _smooth(losses: list[float], at: int, window: int = 20) -> float:
    return statistics.fmean(losses[max(0, at - window) : at])


def _mean_spread(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(runs: list[dict[str, Any]], a: dict[str, Any]) -> dict[str, Any]:
    steps = a["steps"]
    budgets = [steps // 3, 2 * steps // 3, steps]
    base = [r for r in runs if r["arm"] == ARMS[0][0]]
    target_at = int(0.6 * steps)
    target = statistics.fmean(_smooth(r["losses"], target_at) for r in base)
    out: dict[str, Any] = {"budgets": budgets, "target_loss": target, "target_from_step": target_at}
    for arm, _ in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        reach = []
        for r in rs:
            sm = [_smooth(r["losses"], i + 1) for i in range(steps)]
            hit = next((i + 1 for i, v in enumerate(sm) if i + 1 >= 20 and v <= target), None)
            reach.append(hit)
        out[arm] = {
            "loss_at": {b: _mean_spread([_smooth(r["losses"], b) for r in rs]) for b in budgets},
            "val_loss": _mean_spread([r["val_loss"] for r in rs]),
            "steps_to_target": reach,
            "eg_bits_per_weight": _mean_spread(
                [r["weights"]["eg_bits_per_weight"] or float("nan") for r in rs]
            ),
            "entropy_bits_per_weight": _mean_spread(
                [r["weights"]["entropy_bits_per_weight"] for r in rs]
            ),
            "trained_fitted_shape": _mean_spread([r["weights"]["fitted_shape"] for r in rs]),
            "bits_source": rs[0]["weights"]["source"],
        }
        # Same seed = same data order: the per-seed difference to the baseline is the cleaner test.
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["arm"], r["seed"]): r for r in runs}
        out[arm]["paired_val_diff"] = [
            by[(arm, sd)]["val_loss"] - by[(ARMS[0][0], sd)]["val_loss"] for sd in seeds
        ]
        out[arm]["paired_loss_diff_at_end"] = [
            _smooth(by[(arm, sd)]["losses"], steps) - _smooth(by[(ARMS[0][0], sd)]["losses"], steps)
            for sd in seeds
        ]
    return out


def bench_train(a: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing as mp

    jobs = [(arm, shape, seed, a) for seed in range(a["seeds"]) for arm, shape in ARMS]
    from ggspeed.data.corpus import load_corpus_tokens

    load_corpus_tokens(vocab_size=a["vocab"])  # build the cache once, before the workers
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(a["workers"]) as pool:
        runs = pool.starmap(train_one, jobs)
    wall = time.perf_counter() - t0
    return {"args": a, "wall_seconds": wall, "summary": summarize(runs, a), "runs": runs}


def _print_train(res: dict[str, Any]) -> None:
    s = res["summary"]
    a = res["args"]
    print(
        f"nanogpt d={a['d_model']} L={a['layers']} seq={a['seq']} batch={a['batch']} "
        f"steps={a['steps']} seeds={a['seeds']}  wall {res['wall_seconds']:.0f} s"
    )
    print(f"target loss {s['target_loss']:.4f} (baseline mean at step {s['target_from_step']})")
    cols = [f"loss@{b}" for b in s["budgets"]]
    print(
        f"{'arm':18s}"
        + "".join(f"{c:>16s}" for c in cols)
        + f"{'val loss':>16s}{'steps->target':>20s}{'EG bits/w':>14s}{'H bits/w':>14s}{'shape':>8s}"
    )
    for arm, _ in ARMS:
        r = s[arm]
        cells = "".join(
            f"{r['loss_at'][b]['mean']:>9.4f}±{r['loss_at'][b]['std']:<6.4f}" for b in s["budgets"]
        )
        print(
            f"{arm:18s}{cells}{r['val_loss']['mean']:>9.4f}±{r['val_loss']['std']:<6.4f}"
            f"{r['steps_to_target']!s:>20s}{r['eg_bits_per_weight']['mean']:>9.3f}±"
            f"{r['eg_bits_per_weight']['std']:<4.3f}{r['entropy_bits_per_weight']['mean']:>9.3f}±"
            f"{r['entropy_bits_per_weight']['std']:<4.3f}{r['trained_fitted_shape']['mean']:>8.3f}"
        )
    print("paired (same seed) difference to the baseline, per seed:")
    for arm, _ in ARMS[1:]:
        r = s[arm]
        print(
            f"  {arm:10s} val loss "
            + ", ".join(f"{x:+.4f}" for x in r["paired_val_diff"])
            + "   train loss at end "
            + ", ".join(f"{x:+.4f}" for x in r["paired_loss_diff_at_end"])
        )
    print(f"bits: {s[ARMS[0][0]]['bits_source']}, step {a['quant_step']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed", help="GG Init vs normal_ on a 1B-parameter GPT's tensors")
    sp.add_argument("--small", action="store_true", help="~50M parameters instead of ~1B")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--shape", type=float, default=1.0)
    sp.add_argument("--json", type=Path)
    tp = sub.add_parser("train", help="small-GPT pretraining: GG Init shapes vs Megatron normal")
    tp.add_argument("--steps", type=int, default=300)
    tp.add_argument("--seeds", type=int, default=3)
    tp.add_argument("--workers", type=int, default=2)
    tp.add_argument("--d-model", type=int, default=128)
    tp.add_argument("--layers", type=int, default=4)
    tp.add_argument("--heads", type=int, default=4)
    tp.add_argument("--seq", type=int, default=64)
    tp.add_argument("--batch", type=int, default=16)
    tp.add_argument("--vocab", type=int, default=4096)
    tp.add_argument("--lr", type=float, default=2e-3)
    tp.add_argument("--warmup", type=int, default=20)
    tp.add_argument("--val-batches", type=int, default=8)
    tp.add_argument("--quant-step", type=float, default=1e-3)
    tp.add_argument("--save", type=Path, help="folder for the seed-0 trained state_dicts")
    tp.add_argument("--json", type=Path)
    rp = sub.add_parser("report", help="re-print a saved train result (summary recomputed)")
    rp.add_argument("result", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "report":
        res = json.loads(args.result.read_text())
        res["summary"] = summarize(res["runs"], res["args"])
        _print_train(res)
        return 0
    if args.cmd == "speed":
        res = bench_speed(args.small, args.repeats, args.threads, args.shape)
        print(
            f"{res['params'] / 1e6:.0f}M parameters in {res['tensors']} tensors, "
            f"{res['threads']} thread(s), shape {res['shape']}"
        )
        for k, v in res["median_s"].items():
            print(f"  {k:8s} median {v:7.2f} s  ({res['ns_per_element'][k]:.2f} ns/element)")
        print(
            f"  ratio gg / normal_: median {res['ratio_median']:.2f}x, per repeat "
            + ", ".join(f"{r:.2f}" for r in res["ratio_per_repeat"])
        )
        print(
            f"  check: last tensor std {res['check_std']:.5f}, fitted shape {res['check_shape']:.3f}"
        )
    else:
        a = {
            k: getattr(args, k)
            for k in (
                "steps",
                "seeds",
                "workers",
                "d_model",
                "layers",
                "heads",
                "seq",
                "batch",
                "vocab",
                "lr",
                "warmup",
                "val_batches",
                "quant_step",
            )
        }
        a["save"] = str(args.save) if args.save else None
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
        res = bench_train(a)
        _print_train(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
