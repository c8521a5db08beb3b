"""Per-pass CPU cost of GCT's compressed all-reduce on one rank (not a test).

    python tools/bench_gct_kernels.py [--captured build/bench_gct/captured.pt] [--repeats 50]

On one captured gradient of the small GPT (``tools/bench_gct.py`` writes the capture; without
one this script captures it first), one thread, no communication: the passes of one call timed
alone, and the fused CPU passes against the unfused path that does the same work in separate
steps (quantize, then ``codec.eg_encode``; ``codec.eg_decode``, then add, then dequantize), both
measured in this run; and the fused passes with and without the wire checksum (the CRC-32 the
sender seals each stream with and the receiver checks). Times are thread CPU time (what the
pass costs, not waiting for a core on a shared machine), median over ``--repeats`` calls after
a warm-up call.

``--calls N`` adds whole calls on 2 gloo ranks (``ggspeed.testing``'s harness; each rank reduces
its own captured gradient, error feedback on): calls with and without the wire checksum
interleaved, and the verdict's message exchange alone; wall-clock medians, the slower rank's.
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
    p.add_argument("--calls", type=int, default=0, help="whole 2-rank calls per setting (0: none)")
    args = p.parse_args()
    from ggspeed import codec
    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, common

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
    v, msg, _ = common.add_and_block_stats(state, mine.clone(), None, block)
    other, other_msg, _ = common.add_and_block_stats(state, theirs.clone(), None, block)
    nb = (msg.numel() - 1) // 2
    steps = common.block_steps(state, torch.maximum(msg, other_msg)[:nb], msg[nb : 2 * nb], world)
    bounds = [0, n]

    def quantize_encode(x, skip=-1):
        return common.quantize_encode(quant, x, None, steps, block, None, bounds, skip)

    def received(checksum: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(own levels, the peer's stream in a receive buffer, its size) with or without CRC."""
        common.WIRE_CHECKSUM = checksum
        q, *_ = quantize_encode(v)
        q = q.clone()
        _, _, _, _, (coded_other,) = quantize_encode(other)
        buf = common.with_slack(coded_other.numel(), torch.device("cpu"))
        buf[: coded_other.numel()] = coded_other
        return q, buf, coded_other.numel()

    out = torch.empty(n)
    q, buf, size = received(True)
    _, buf_plain, size_plain = received(False)
    common.WIRE_CHECKSUM = True
    bits = 8 * size / n

    # Every timed call reads the same inputs and overwrites the same outputs (scratch buffers,
    # ``out``), so no copies are timed.
    x, zeros = mine.clone(), torch.zeros(n)

    def unfused_encode() -> None:  # the same quantization kernel, then the codec's encoder
        levels, *_ = quantize_encode(v, 0)
        common.encode_levels(levels, state)

    def unfused_decode() -> None:
        stream = torch.from_numpy(buf.numpy()[:size].copy())
        sums = q + codec.eg_decode(codec.EGStream.from_tensor(stream))
        common.dequantize(sums, steps, block, world, True, out)

    def fused_decode(buf, size) -> Callable[[], None]:
        return lambda: common.decode_add(buf, 0, size, q, (steps, block, world, True, out))

    def without_checksum(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            common.WIRE_CHECKSUM = False
            try:
                fn()
            finally:
                common.WIRE_CHECKSUM = True

        return run

    rows = {
        "residual add + block statistics": cpu_ms(
            lambda: common.add_and_block_stats(state, x, zeros, block), args.repeats
        ),
        "quantize, then eg_encode (unfused)": cpu_ms(unfused_encode, args.repeats),
        "quantize-and-encode (fused)": cpu_ms(lambda: quantize_encode(v), args.repeats),
        "quantize-and-encode, no CRC": cpu_ms(
            without_checksum(lambda: quantize_encode(v)), args.repeats
        ),
        "eg_decode, add, dequantize (unfused)": cpu_ms(unfused_decode, args.repeats),
        "decode-into-result (fused)": cpu_ms(fused_decode(buf, size), args.repeats),
        "decode-into-result, no CRC": cpu_ms(
            without_checksum(fused_decode(buf_plain, size_plain)), args.repeats
        ),
    }
    print(f"{n} elements, {bits:.2f} bits/element; thread CPU ms")
    print(f"  {'pass':40s} {'median':>7s} {'min':>7s}")
    for name, (med, low) in rows.items():
        print(f"  {name:40s} {med:7.2f} {low:7.2f}")
    enc = rows["quantize, then eg_encode (unfused)"][0] / rows["quantize-and-encode (fused)"][0]
    dec = rows["eg_decode, add, dequantize (unfused)"][0] / rows["decode-into-result (fused)"][0]
    print(f"fused vs unfused (medians): encode side {enc:.2f}x, decode side {dec:.2f}x faster")
    crc_enc = rows["quantize-and-encode (fused)"][0] / rows["quantize-and-encode, no CRC"][0]
    crc_dec = rows["decode-into-result (fused)"][0] / rows["decode-into-result, no CRC"][0]
    both = sum(rows[k][0] for k in ("quantize-and-encode (fused)", "decode-into-result (fused)"))
    plain = sum(rows[k][0] for k in ("quantize-and-encode, no CRC", "decode-into-result, no CRC"))
    print(
        f"wire checksum (medians, with / without): encode side {crc_enc:.3f}x, decode side "
        f"{crc_dec:.3f}x, both passes {both / plain:.3f}x"
    )

    if args.calls:
        two_ranks(args.captured, args.calls)


def _calls(captured: str, calls: int) -> dict[str, float]:
    """On each rank: median wall ms of whole calls with and without the wire checksum
    (interleaved, in the same order on both ranks) and of the verdict's exchange alone."""
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, common, compressed_all_reduce
    from ggspeed.gct.exchange import choose

    rank = dist.get_rank()
    grad = load_gradients(Path(captured))[rank]
    cfg = GCTConfig(enabled=True, quant_step=1.0, block_size=4096, rdoq_mu=0.1)
    states = {"crc": GCTState(cfg), "no_crc": GCTState(cfg)}
    times: dict[str, list[float]] = {"crc": [], "no_crc": [], "verdict": []}
    ex = choose("allgather", None, grad, rank, dist.get_world_size())
    for i in range(calls + 2):  # the first two are warm-up
        order = ("crc", "no_crc") if i % 2 == 0 else ("no_crc", "crc")
        for mode in order:
            common.WIRE_CHECKSUM = mode == "crc"
            x = grad.clone()
            dist.barrier()
            t = time.perf_counter()
            compressed_all_reduce(x, states[mode], key="g")
            if i >= 2:
                times[mode].append(time.perf_counter() - t)
        flags = torch.zeros(4, dtype=torch.int64)
        dist.barrier()
        t = time.perf_counter()
        ex.agree_flags(flags)
        if i >= 2:
            times["verdict"].append(time.perf_counter() - t)
    common.WIRE_CHECKSUM = True
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def two_ranks(captured: str, calls: int) -> None:
    from ggspeed.testing import run_ranks

    res = run_ranks(_calls, 2, captured, calls)
    slow = {k: max(r[k] for r in res) for k in res[0]}
    print(f"2 ranks, {calls} calls each, wall ms (median, slower rank):")
    for k, v in slow.items():
        print(f"  {k:10s} {v:7.2f}")
    print(f"whole call with / without the wire checksum: {slow['crc'] / slow['no_crc']:.3f}x")


if __name__ == "__main__":
    main()
