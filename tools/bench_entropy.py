"""What the coded traffic's entropy statistics cost (not a test).

    python tools/bench_entropy.py [--n 4194304] [--repeats 15]

1. GCT: ``compressed_all_reduce`` on 2 gloo ranks (the direct exchange) and 4 (reduce-scatter),
   every call histogramming its levels (``scalars()`` before each call opens a new telemetry
   window) against calls that do not (a bucket's later calls in one window), alternated in one
   run on the same gradient-like data: the median call time of each and their ratio.
2. The wire coders, one process, calls alternated: ``coding.encode_update`` (the coding alone);
   ``pipe.encode_message`` with its decode-back for the error statistics (a message's first
   send per telemetry window) and without (its other sends); ``coding.entropy_bits`` (each
   pipe send and ZeRO gather histograms its levels) and ``codec.empirical_entropy`` (the torch
   bincount it replaces).

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


def wire_coders(n: int, repeats: int) -> dict[str, float]:
    """Median seconds of each operation (alternated), and the ratios to the coding alone."""
    from ggspeed.codec import empirical_entropy
    from ggspeed.config.wire import PipeCodingConfig
    from ggspeed.wire import coding, pipe

    settings = PipeCodingConfig(enabled=True)
    x = _grad_like(0, n)
    q = coding.encode_update(x, settings).q  # type: ignore[arg-type]
    ops = {
        "encode_update": lambda: coding.encode_update(x, settings),  # type: ignore[arg-type]
        "encode_message": lambda: pipe.encode_message(x, settings),
        "encode_message_no_errors": lambda: pipe.encode_message(x, settings, errors=False),
        "entropy_bits": lambda: coding.entropy_bits(q),
        "empirical_entropy_bincount": lambda: empirical_entropy(q),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for i in range(repeats + 1):
        for k, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{k}_s": v for k, v in med.items()}
    out.update({f"{k}_over_encode_update": v / med["encode_update"] for k, v in med.items()})
    return out


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
