"""How many threads the codec's numba kernels use in this process: its share of the CPUs.

numba starts one thread per CPU in *every* process. With several ranks per machine the codec's
chunk-parallel kernels (GCT buckets, large ACT checkpoints) then oversubscribe the cores, and the
spinning threads slow everything else down (docs/benchmarks.md, Trainer).
``ggspeed.initialize`` applies the share; an explicit ``NUMBA_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["codec_threads", "limit_codec_threads"]


def codec_threads(environ: Mapping[str, str] = os.environ) -> int:
    """This rank's share: OMP_NUM_THREADS when set (the per-rank budget the user chose for
    torch), else the CPUs this process may run on / the ranks on this machine."""
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    local = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or "1"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, int(local) if local.isdigit() else 1))


def limit_codec_threads() -> int:
    """Apply :func:`codec_threads` unless NUMBA_NUM_THREADS is set; returns the count in use.

    Before numba is imported this sets NUMBA_NUM_THREADS (the pool is then that size); after,
    the pool is fixed and ``numba.set_num_threads`` narrows what the kernels use of it.
    """
    n = int(os.environ.setdefault("NUMBA_NUM_THREADS", str(codec_threads())))
    numba = sys.modules.get("numba")
    if numba is not None:
        n = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(n)
    return n
