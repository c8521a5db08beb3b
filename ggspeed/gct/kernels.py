"""Fused CPU passes of the compressed all-reduce (numba, one thread, no temporaries).

Each torch op over a 1.3M-element gradient is a full memory pass plus an allocation; the
all-reduce used ~15 of them around the codec. These kernels do the same arithmetic in three
passes: (residual add + per-block statistics), (quantize + residual + error sums), and
(dequantize into the output). float32 arithmetic matches the torch path's operation order, so
the levels and the result are the same on every rank (every rank runs the same code on the
same agreed steps).
"""

from __future__ import annotations

import numba
import numpy as np

from .rdoq import RUN_BITS

__all__ = ["add_and_block_stats", "dequantize_into", "quantize_with_residual"]


@numba.njit(cache=True, nogil=True)
def add_and_block_stats(x, res, block, v, rms, amax):
    """v = x + res (res may be empty); per block RMS and max |v| of v. True if non-finite."""
    n = x.size
    has_res = res.size == n
    nonfinite = False
    nb = rms.size
    for b in range(nb):
        lo = b * block
        hi = min(lo + block, n)
        ss = 0.0
        m = np.float32(0.0)
        for i in range(lo, hi):
            t = x[i] + res[i] if has_res else x[i]
            v[i] = t
            a = abs(t)
            if not np.isfinite(a):
                nonfinite = True
            if a > m:
                m = a
            ss += np.float64(t) * t
        rms[b] = np.float32(np.sqrt(ss / (hi - lo)))
        amax[b] = m
    return nonfinite


@numba.njit(cache=True, inline="always")
def _nz_bits(lev, k):
    """Zero-run mode cost of a nonzero level: EG_k(lev - 1) + sign + run bits (lev >= 1)."""
    m = ((lev - 1) >> k) + 1
    nbits = 0
    while m > 1:
        m >>= 1
        nbits += 1
    return 2.0 * nbits + k + 2 + RUN_BITS


@numba.njit(cache=True, inline="always")
def _plain_bits(lev, k):
    """Plain mode cost of zig-zag(+lev) (lev >= 0): EG_k of 2 lev - 1, or of 0."""
    u = 2 * lev - 1 if lev > 0 else 0
    m = (u >> k) + 1
    nbits = 0
    while m > 1:
        m >>= 1
        nbits += 1
    return 2.0 * nbits + 1 + k


@numba.njit(cache=True, inline="always")
def _cost_bits(lev, k, runs):
    if runs:
        return 0.0 if lev == 0 else _nz_bits(lev, k)
    return _plain_bits(lev, k)


_TABLE = 64  # levels whose round-up threshold is tabulated (larger ones are rare)


@numba.njit(cache=True, inline="always")
def _threshold(lev, mu, k, runs):
    """RDOQ rounds |y| = lev + f up iff f > this: (1-f)^2 + mu bits(lev+1) < f^2 + mu bits(lev)."""
    return 0.5 + 0.5 * mu * (_cost_bits(lev + 1, k, runs) - _cost_bits(lev, k, runs))


@numba.njit(cache=True, nogil=True)
def quantize_with_residual(v, steps, block, mu, k, runs, q, err, keep_err):
    """q = RDOQ (mu > 0) or round-half-even (mu = 0) of v / step; err = v - q * step.

    RDOQ picks floor or ceil of |v| / step, the lower of (|y| - level)^2 + mu * bits(level)
    (see rdoq.py), as a per-level threshold on the fraction. ``err`` is written only if
    ``keep_err``. Returns (sum err^2, sum v^2) in float64.
    """
    n = v.size
    th = np.empty(_TABLE, dtype=np.float64)
    for lev in range(_TABLE):
        th[lev] = _threshold(lev, mu, k, runs)
    esq = 0.0
    vsq = 0.0
    for b in range(steps.size):
        s = steps[b]
        lo = b * block
        hi = min(lo + block, n)
        for i in range(lo, hi):
            x = v[i]
            y = x / s
            if mu > 0:
                a = abs(y)
                fl = np.floor(a)
                lev = np.int64(fl)
                t = th[lev] if lev < _TABLE else _threshold(lev, mu, k, runs)
                if np.float64(a - fl) > t:
                    lev += 1
                lv = lev if y >= 0 else -lev
            else:
                lv = np.int64(np.rint(y))
            q[i] = lv
            e = x - np.float32(lv) * s
            if keep_err:
                err[i] = e
            esq += np.float64(e) * e
            vsq += np.float64(x) * x
    return esq, vsq


@numba.njit(cache=True, nogil=True)
def dequantize_into(sums, steps, block, world, average, out):
    """out = float32(sum) * step (/ world if ``average``), as the torch path computes it."""
    w = np.float32(world)
    n = sums.size
    for b in range(steps.size):
        s = steps[b]
        lo = b * block
        hi = min(lo + block, n)
        if average:
            for i in range(lo, hi):
                out[i] = (np.float32(sums[i]) * s) / w
        else:
            for i in range(lo, hi):
                out[i] = np.float32(sums[i]) * s
