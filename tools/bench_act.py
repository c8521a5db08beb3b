"""ACT benchmark (the paper's Figure 4 for ACT): conventional checkpointing vs ACT, one run.

The small GPT (ggspeed.models.nanogpt) trains on the embedded corpus (the Python standard
library) with the same init, data order and optimizer in every variant:

- ``conventional``: every block wrapped by DeepSpeed's reentrant ``deepspeed.checkpointing.checkpoint``;
- ``act l=<lambda>``: every block wrapped by ``ggspeed.act.checkpoint`` with compressed
  (quantized + Exp-Golomb-coded) storage and the progressive rate constraint at that multiplier.

The variants advance in lockstep (one step of each in turn), so the load of a shared machine
hits them alike; step times are medians. Every ``--measure-every`` steps the average EG code
length of the block inputs is measured on one fixed batch for every variant (same step rule as
ACT's storage), and ACT's own telemetry (bits of what it stored, bytes held) is read.

    python tools/bench_act.py --steps 300 --out build/bench_act

Writes <out>/bench_act.json and <out>/bench_act.png, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ggspeed.act as act
from ggspeed.act.storage import eg_bits, step_for
from ggspeed.config.act import ACTConfig
from ggspeed.data.corpus import load_corpus_tokens, random_batches
from ggspeed.models.nanogpt import GPT, GPTConfig
from launch.pretrain_gpt import lr_scheduler


@dataclass
class Variant:
    name: str
    model: GPT
    opt: torch.optim.Optimizer
    batches: object
    state: act.ACTState | None
    sched: object = None  # DeepSpeed's WarmupCosineLR (launch/pretrain_gpt.lr_scheduler)
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    bits_steps: list[int] = field(default_factory=list)
    bits_fixed: list[float] = field(default_factory=list)
    bits_abs: list[float] = field(default_factory=list)
    bits_stored: list[float] = field(default_factory=list)
    peak_live_mb: float = 0.0
    stored_mb: list[float] = field(default_factory=list)


def block_inputs(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The block-boundary activations (what checkpointing holds) of one no-grad forward."""
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.blocks]
    saved, model.checkpoint_fn = model.checkpoint_fn, None
    try:
        with torch.no_grad():
            model(idx)
    finally:
        model.checkpoint_fn = saved
        for h in hooks:
            h.remove()
    return seen


def avg_bits(
    model: GPT, idx: torch.Tensor, rel_step: float, k, abs_step: float
) -> tuple[float, float]:
    """EG bits/element of the block inputs at ACT's relative step and at one fixed step."""
    acts = block_inputs(model, idx)
    n = sum(a.numel() for a in acts)
    rel = sum(eg_bits(a, step_for(a, rel_step), k) for a in acts) / n
    fixed = sum(eg_bits(a, abs_step, k) for a in acts) / n
    return rel, fixed


def make_variant(name, gcfg, args, tokens, ckpt, state) -> Variant:
    torch.manual_seed(args.seed)
    model = GPT(gcfg, checkpoint_fn=ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = random_batches(tokens, args.batch, gcfg.seq_len, seed=args.seed)
    # the trainer's --lr-decay-style cosine: warm-up over 5% of the steps, down to 0.1 x lr
    sched = lr_scheduler(opt, "cosine", 0.1 * args.lr, max(1, args.steps // 20), args.steps)
    return Variant(name, model, opt, batches, state, sched)


def train_step(v: Variant, step: int, args) -> None:
    act.activate(v.state)
    x, y = next(v.batches)
    t0 = time.perf_counter()
    _, loss = v.model(x, y)
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
    v.opt.step()
    v.sched.step()
    v.times.append(time.perf_counter() - t0)
    v.losses.append(loss.item())
    if v.state is not None:
        v.state.on_step(step + 1)


@torch.no_grad()
def eval_loss(model: GPT, tokens: torch.Tensor, args, n: int = 8) -> float:
    it = random_batches(tokens, args.batch, model.cfg.seq_len, seed=12345)
    return statistics.fmean(model(*next(it))[1].item() for _ in range(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--variants",
        default="rel:0,abs:3,abs:10",
        help="ACT variants, comma separated: rel:<lambda> stores with step = rel_step * RMS, "
        "abs:<lambda> with the fixed step --abs-step",
    )
    p.add_argument("--rel-step", type=float, default=0.5, help="ggspeed.act.rel_step")
    p.add_argument(
        "--abs-step",
        type=float,
        default=None,
        help="ggspeed.act.abs_step of abs variants (default: rel_step * RMS of the block "
        "inputs at init, on a fixed batch)",
    )
    p.add_argument("--eg-order", default="auto")
    p.add_argument("--warmup-frac", type=float, default=0.25, help="ACT warm-up / steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="build/bench_act")
    p.add_argument("--plot-only", help="redraw the PNG and table from a bench_act.json")
    args = p.parse_args()
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        plot(result["rows"], Path(args.plot_only).with_suffix(".png"))
        print(table(result))
        return
    torch.set_num_threads(args.threads)
    k = args.eg_order if args.eg_order == "auto" else int(args.eg_order)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import deepspeed

    corpus = load_corpus_tokens(vocab_size=args.vocab)
    gcfg = GPTConfig(
        vocab_size=corpus.vocab_size,
        seq_len=args.seq_len,
        n_layer=args.layers,
        n_head=4,
        d_model=args.d_model,
    )
    variants = [
        make_variant(
            "conventional",
            gcfg,
            args,
            corpus.train,
            lambda f, x: deepspeed.checkpointing.checkpoint(f, x),
            None,
        )
    ]
    fixed = next(random_batches(corpus.valid, args.batch, gcfg.seq_len, seed=999))[0]
    init_acts = block_inputs(variants[0].model, fixed)
    abs_step = args.abs_step or args.rel_step * math.sqrt(
        sum(float(a.pow(2).sum()) for a in init_acts) / sum(a.numel() for a in init_acts)
    )
    for spec in [s for s in args.variants.split(",") if s]:
        mode, _, lam_s = spec.partition(":")
        if mode not in ("rel", "abs") or not lam_s:
            raise SystemExit(f"--variants: got {spec!r}; each item is rel:<lambda> or abs:<lambda>")
        lam = float(lam_s)
        step_kw = {"rel_step": args.rel_step} if mode == "rel" else {"abs_step": abs_step}
        cfg = ACTConfig(
            enabled=True,
            lambda_target=lam,
            warmup_steps=int(args.steps * args.warmup_frac),
            compress=True,
            eg_order=k,
            shape_refresh_interval=max(1, args.measure_every),
            **step_kw,
        )
        variants.append(
            make_variant(
                f"act {mode} l={lam:g}", gcfg, args, corpus.train, act.checkpoint, act.ACTState(cfg)
            )
        )
    t_start = time.perf_counter()
    for step in range(args.steps):
        for v in variants:
            train_step(v, step, args)
        if (step + 1) % args.measure_every == 0 or step == 0:
            for v in variants:
                v.bits_steps.append(step + 1)
                rel, fixed_step = avg_bits(v.model, fixed, args.rel_step, k, abs_step)
                v.bits_fixed.append(rel)
                v.bits_abs.append(fixed_step)
                if v.state is not None:
                    s = v.state.scalars()
                    v.bits_stored.append(s.get("bits_per_element", float("nan")))
                    v.stored_mb.append(s["stored_mb"])
                    v.peak_live_mb = max(v.peak_live_mb, s["peak_live_mb"])
            line = " ".join(
                f"{v.name}: {v.losses[-1]:.3f}/{v.bits_fixed[-1]:.2f}b" for v in variants
            )
            print(f"step {step + 1}: {line}", flush=True)
    act.activate(None)
    wall = time.perf_counter() - t_start

    base = variants[0]
    acts = block_inputs(base.model, fixed)
    numel = sum(a.numel() for a in acts)
    rows = []
    for v in variants:
        tail = v.losses[-20:]
        step_ms = 1e3 * statistics.median(v.times[5:])
        row = {
            "name": v.name,
            "final_train_loss": statistics.fmean(tail),
            "valid_loss": eval_loss(v.model, corpus.valid, args),
            "step_ms": step_ms,
            "bits_fixed_final": v.bits_fixed[-1],
            "losses": v.losses,
            "bits_steps": v.bits_steps,
            "bits_fixed": v.bits_fixed,
            "bits_abs": v.bits_abs,
            "bits_abs_final": v.bits_abs[-1],
        }
        if v.state is None:
            row["held_mb"] = 4 * numel / 1e6  # DeepSpeed holds the fp32 block inputs
        else:
            row["bits_stored"] = v.bits_stored
            row["bits_stored_mean"] = statistics.fmean(v.bits_stored[1:] or v.bits_stored)
            row["held_mb"] = v.peak_live_mb
        rows.append(row)
    b = rows[0]
    for r in rows:
        r["loss_vs_conv_pct"] = 100 * (r["final_train_loss"] / b["final_train_loss"] - 1)
        r["valid_vs_conv_pct"] = 100 * (r["valid_loss"] / b["valid_loss"] - 1)
        r["step_overhead_pct"] = 100 * (r["step_ms"] / b["step_ms"] - 1)
        r["bf16_over_held"] = 2 * numel / 1e6 / r["held_mb"]
    result = {
        "args": vars(args),
        "model": gcfg.to_dict(),
        "checkpointed_elements_per_step": numel,
        "bf16_mb": 2 * numel / 1e6,
        "abs_step": abs_step,
        "wall_s": wall,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    (out / "bench_act.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "bench_act.png")
    print(table(result))
    print(f"wrote {out / 'bench_act.json'} and {out / 'bench_act.png'} ({wall:.0f} s)")


def table(result: dict) -> str:
    head = (
        "| variant | final train loss (last 20) | vs conv. | valid loss | vs conv. | "
        "EG bits/elem stored (mean) | EG bits/elem, rel. step (end) | EG bits/elem, fixed step "
        "(end) | held MB/step | bf16 MB / held | step ms (median) | step overhead |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in result["rows"]:
        stored = f"{r['bits_stored_mean']:.2f}" if "bits_stored_mean" in r else "- (fp32)"
        lines.append(
            f"| {r['name']} | {r['final_train_loss']:.4f} | {r['loss_vs_conv_pct']:+.2f}% | "
            f"{r['valid_loss']:.4f} | {r['valid_vs_conv_pct']:+.2f}% | {stored} | "
            f"{r['bits_fixed_final']:.2f} | {r['bits_abs_final']:.2f} | {r['held_mb']:.3f} | {r['bf16_over_held']:.2f}x | "
            f"{r['step_ms']:.0f} | {r['step_overhead_pct']:+.1f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    for r in rows:
        losses = torch.tensor(r["losses"])
        w = min(10, len(losses))
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], w, 1).flatten()
        ax1.plot(range(w, len(losses) + 1), smooth, label=r["name"])
        ax2.plot(
            r["bits_steps"], r["bits_fixed"], marker="o", ms=3, label=f"{r['name']} (fixed batch)"
        )
        ax3.plot(
            r["bits_steps"], r["bits_abs"], marker="o", ms=3, label=f"{r['name']} (fixed batch)"
        )
        if "bits_stored" in r:  # what ACT stored, on the panel of its step rule
            ax = ax3 if " abs " in r["name"] else ax2
            ax.plot(r["bits_steps"], r["bits_stored"], ls="--", label=f"{r['name']} (stored)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (10-step mean)")
    ax1.legend()
    ax2.axhline(4.0, color="gray", lw=0.8, ls=":")
    ax2.set_xlabel("step")
    ax2.set_ylabel("avg EG code length of block inputs (bits/elem)")
    ax2.set_title("step = rel_step * RMS (what ACT stores)")
    ax2.legend(fontsize=7)
    ax3.set_xlabel("step")
    ax3.set_ylabel("avg EG code length of block inputs (bits/elem)")
    ax3.set_title("one fixed step: abs_step (rel_step * RMS at init)")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
