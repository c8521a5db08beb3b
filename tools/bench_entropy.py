"""What the coded traffic's entropy statistics cost (not a test).

    python tools/bench_entropy.py [--n 4194304] [--repeats 15]

1. GCT: ``compressed_all_reduce`` on 2 gloo ranks (the direct exchange) and 4 (reduce-scatter),
   every call histogramming its levels (``scalars()`` before each call opens a new telemetry
   window) against calls that do not (a bucket's later calls in one window), alternated in one
   run on the same gradient-like data: the median call time of each and their ratio.
2. The wire coders, one process: ``pipe.encode_message`` (coding plus the entropy histogram, a
   decode and the error sums on every send) against ``coding.encode_update`` (the coding
   alone), and ``coding.entropy_bits`` (what a ZeRO gather adds per gather) against
   ``encode_update``.

Ratios are measured side by side in one run; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _grad_like(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-1e-3 * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _gct_ranks(n: int, repeats: int) -> dict[str, float]:
    """Per rank: the median seconds of a call with and without the histogram."""
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce

    rank = dist.get_rank()
    state = GCTState(GCTConfig(enabled=True, rdoq_mu=0.1))
    x = _grad_like(rank, n)
    buf = torch.empty_like(x)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * repeats + 2):
        measured = i % 2 == 0
        if measured:
            state.scalars()  # a new window: this call histograms its levels
        buf.copy_(x)
        dist.barrier()
        t0 = time.perf_counter()
        compressed_all_reduce(buf, state, key="bucket")
        dt = time.perf_counter() - t0
        if i >= 2:  # the first pair warms up
            times[measured].append(dt)
    return {"with_s": statistics.median(times[True]), "without_s": statistics.median(times[False])}


def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def wire_coders(n: int, repeats: int) -> dict[str, float]:
    from ggspeed.config.wire import PipeCodingConfig
    from ggspeed.wire import coding, pipe

    settings = PipeCodingConfig(enabled=True)
    x = _grad_like(0, n)
    q = coding.encode_update(x, settings).q  # type: ignore[arg-type]
    t = {
        "encode_message_s": _median_time(lambda: pipe.encode_message(x, settings), repeats),
        "encode_update_s": _median_time(
            lambda: coding.encode_update(x, settings),  # type: ignore[arg-type]
            repeats,
        ),
        "entropy_bits_s": _median_time(lambda: coding.entropy_bits(q), repeats),
    }
    t["pipe_statistics_share"] = 1.0 - t["encode_update_s"] / t["encode_message_s"]
    t["entropy_over_encode"] = t["entropy_bits_s"] / t["encode_update_s"]
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1 << 22, help="elements per bucket / message")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = p.parse_args(argv)
    from ggspeed.testing import run_ranks

    out: dict[str, dict[str, float]] = {}
    for world in args.worlds:
        per_rank = run_ranks(_gct_ranks, world, args.n, args.repeats)
        w = max(r["with_s"] for r in per_rank)
        wo = max(r["without_s"] for r in per_rank)
        out[f"gct_{world}_ranks"] = {"with_s": w, "without_s": wo, "ratio": w / wo}
    out["wire_coders"] = wire_coders(args.n, args.repeats)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
