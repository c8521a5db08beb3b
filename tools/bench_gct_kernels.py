"""Per-pass CPU cost of GCT's compressed all-reduce on one rank (not a test).

    python tools/bench_gct_kernels.py [--captured build/bench_gct/captured.pt] [--repeats 50]

On one captured gradient of the small GPT (``tools/bench_gct.py`` writes the capture; without
one this script captures it first), one thread, no communication: the passes of one call timed
alone, and the fused CPU passes against the unfused path that does the same work in separate
steps (quantize, then ``codec.eg_encode``; ``codec.eg_decode``, then add, then dequantize), both
measured in this run; then the two passes of steps from the previous call
(``ggspeed/gct/previous_steps.py``). Times are thread CPU time (what the pass costs, not waiting for a core on
a shared machine), median over ``--repeats`` calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) thread CPU ms of ``fn()``."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def load_gradients(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.exists():
        spec = importlib.util.spec_from_file_location("bench_gct", ROOT / "tools/bench_gct.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        args = argparse.Namespace(batch=8, lr=3e-3, capture_steps=40, capture_every=5)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(bench.capture(args), path)
    snap = torch.load(path, weights_only=False)["snaps"][4]  # step 25
    return snap[0].flatten().float().contiguous(), snap[1].flatten().float().contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captured", default="build/bench_gct/captured.pt")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, common, previous_steps
    from ggspeed.gct import allreduce as ar

    torch.set_num_threads(1)
    mine, theirs = load_gradients(Path(args.captured))
    n, block, world = mine.numel(), 4096, 2
    cfg = GCTConfig(enabled=True, quant_step=1.0, block_size=block, rdoq_mu=0.1)
    state = GCTState(cfg)
    # The quantize rows use no residual (error feedback off: the residual goes to a reused
    # scratch buffer), so every timed call codes the same levels; with error feedback each call
    # would add the previous call's residual and the levels would drift.
    quant = GCTState(GCTConfig(enabled=True, quant_step=1.0, block_size=block, rdoq_mu=0.1,
                               error_feedback=False))  # fmt: skip
    v, msg, _ = ar._prepare(state, mine.clone(), None, block)
    other, other_msg, _ = ar._prepare(state, theirs.clone(), None, block)
    nb = (msg.numel() - 1) // 2
    steps = common.block_steps(state, torch.maximum(msg, other_msg)[:nb], msg[nb : 2 * nb], world)
    bounds = [0, n]
    q, _, _, (coded,) = ar._quantize_encode_cpu(quant, v, steps, block, None, bounds, -1)
    q = q.clone()
    _, _, _, (coded_other,) = ar._quantize_encode_cpu(quant, other, steps, block, None, bounds, -1)
    buf = common.with_slack(coded_other.numel(), torch.device("cpu"))
    buf[: coded_other.numel()] = coded_other
    out = torch.empty(n)

    # Every timed call reads the same inputs and overwrites the same outputs (scratch buffers,
    # ``out``), so no copies are timed.
    x, zeros = mine.clone(), torch.zeros(n)

    def unfused_encode() -> None:  # the same quantization kernel, then the codec's encoder
        levels, *_ = ar._quantize_encode_cpu(quant, v, steps, block, None, bounds, 0)
        ar.encode_chunk(levels, state)

    def unfused_decode() -> None:
        sums = q + ar.decode_chunk(coded_other)
        ar._dequantize(sums, steps, block, world, True, out)

    # Steps from the previous call (step_agreement "previous"): the one fused pass, and the receivers' weighted
    # sum over both ranks' levels, from a gathered buffer laid out as the exchange makes it.
    pr_state, pr_res = GCTState(cfg), torch.zeros(n)
    payloads = []
    for g in (mine, theirs):
        pq, _, psteps, prms, pcoded, _, _ = previous_steps._encode_cpu(
            GCTState(cfg), g, None, "b", block
        )
        hdr = torch.cat([torch.zeros(1), psteps, prms]).view(torch.uint8)
        payloads.append((pq.clone(), psteps, torch.cat([hdr, pcoded])))
    lens = [p.numel() for _, _, p in payloads]
    width = max(lens)
    gathered = common.with_slack(2 * width, torch.device("cpu"))
    for r, (_, _, p) in enumerate(payloads):
        gathered[r * width : r * width + p.numel()] = p
    all_steps = torch.stack([s for _, s, _ in payloads])
    own_q = payloads[0][0]

    rows = {
        "residual add + block statistics": cpu_ms(
            lambda: ar._prepare(state, x, zeros, block), args.repeats
        ),
        "quantize, then eg_encode (unfused)": cpu_ms(unfused_encode, args.repeats),
        "quantize-and-encode (fused)": cpu_ms(
            lambda: ar._quantize_encode_cpu(quant, v, steps, block, None, bounds, -1),
            args.repeats,
        ),
        "eg_decode, add, dequantize (unfused)": cpu_ms(unfused_decode, args.repeats),
        "decode-into-result (fused)": cpu_ms(
            lambda: common.decode_add_cpu(
                buf, 0, coded_other.numel(), q, (steps, block, world, True, out)
            ),
            args.repeats,
        ),
        "previous steps: add + quantize + encode": cpu_ms(
            lambda: previous_steps._encode_cpu(pr_state, x, pr_res, "b", block), args.repeats
        ),
        "previous steps: decode weighted sum": cpu_ms(
            lambda: previous_steps._decode_cpu(
                pr_state, gathered, lens, width, 0, own_q, all_steps, block, True, out
            ),
            args.repeats,
        ),
    }
    print(f"{n} elements, {8 * coded.numel() / n:.2f} bits/element; thread CPU ms")
    print(f"  {'pass':40s} {'median':>7s} {'min':>7s}")
    for name, (med, low) in rows.items():
        print(f"  {name:40s} {med:7.2f} {low:7.2f}")
    enc = rows["quantize, then eg_encode (unfused)"][0] / rows["quantize-and-encode (fused)"][0]
    dec = rows["eg_decode, add, dequantize (unfused)"][0] / rows["decode-into-result (fused)"][0]
    print(f"fused vs unfused (medians): encode side {enc:.2f}x, decode side {dec:.2f}x faster")


if __name__ == "__main__":
    main()
