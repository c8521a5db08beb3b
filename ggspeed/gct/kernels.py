"""Fused CPU passes of the compressed all-reduce (numba, one thread, no temporaries).

Each torch op over a 1.3M-element gradient is a full memory pass plus an allocation; the
all-reduce used ~15 of them around the codec. These kernels do the work in three passes:
(residual add + per-block statistics), (quantize + residual + EG coding, chunk by chunk), and
(decode each received chunk, add, dequantize into the output); ``dequantize_into`` serves the
reduce-scatter exchange. float32 arithmetic matches the torch path's operation order, so the
levels and the result are the same on every rank (every rank runs the same code on the same
agreed steps).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ..codec import cpu as codec_cpu
from .rdoq import RUN_BITS

__all__ = [
    "add_and_block_stats",
    "decode_add",
    "dequantize_into",
    "quantize_encode",
]


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


# Levels whose round-up threshold is tabulated. In relative step mode a level is at most
# sqrt(block_size) / quant_step (|v| <= RMS * sqrt(block)): 64 for the defaults.
_TABLE = 1024


@numba.njit(cache=True, inline="always")
def _threshold(lev, mu, k, runs):
    """RDOQ rounds |y| = lev + f up iff f > this: (1-f)^2 + mu bits(lev+1) < f^2 + mu bits(lev)."""
    return 0.5 + 0.5 * mu * (_cost_bits(lev + 1, k, runs) - _cost_bits(lev, k, runs))


@numba.njit(cache=True, nogil=True)
def _threshold_table64(mu, k, runs):
    th = np.empty(_TABLE, dtype=np.float64)
    for lev in range(_TABLE):
        th[lev] = _threshold(lev, mu, k, runs)
    return th


@functools.lru_cache(maxsize=16)
def threshold_table(mu: float, k: int, runs: bool) -> np.ndarray:
    """``_threshold`` of the levels 0 .. _TABLE - 1 as float32 numbers rounded down, so that for
    a float32 fraction f: ``f > table[lev]`` exactly when ``float64(f) > _threshold(lev)``
    (the comparison stays in float32 and vectorizes 8 wide)."""
    th64 = _threshold_table64(float(mu), int(k), bool(runs))
    th32 = th64.astype(np.float32)
    above = th32.astype(np.float64) > th64
    th32[above] = np.nextafter(th32[above], np.float32(-np.inf))
    th32.flags.writeable = False
    return th32


@numba.njit(cache=True, inline="always")
def _quantize_range(v, lo, hi, s, th, mu, k, runs, q, err):
    """q[i] = RDOQ (mu > 0) or round-half-even (mu = 0) of v[i] / s, err[i] = v[i] - q[i] * s.

    RDOQ runs as three loops over the range (a few KB, in cache): floor and fraction, the
    table look-up, sign and residual. Apart from the look-up they have no calls, branches or
    64-bit lanes (AVX2 has no packed float -> int64 conversion), so LLVM vectorizes them: 2x
    faster than one loop doing it all. A level past the table (only possible with absolute
    steps or quant_step < sqrt(block) / _TABLE) is redone with the exact threshold. Levels fit
    int32: ``_steps`` keeps them below 2^29.
    """
    vv = v[lo:hi]
    qq = q[lo:hi]
    ee = err[lo:hi]
    if mu > 0:
        last = np.int32(_TABLE - 1)
        big = np.int32(0)
        for i in range(vv.size):
            a = abs(vv[i] / s)
            fl = np.floor(a)
            lev = np.int32(fl)
            qq[i] = lev
            ee[i] = a - fl  # the fraction, for now
            big = max(big, lev)
        for i in range(vv.size):
            lev = qq[i]
            qq[i] = lev + np.int32(ee[i] > th[min(lev, last)])
        for i in range(vv.size):
            x = vv[i]
            lev = qq[i]
            lv = lev if x >= 0 else -lev
            qq[i] = lv
            ee[i] = x - np.float32(lv) * s
        if big >= last:
            for i in range(vv.size):
                x = vv[i]
                y = x / s
                a = abs(y)
                fl = np.floor(a)
                lev = np.int64(fl)
                if lev >= last:
                    if np.float64(a - fl) > _threshold(lev, mu, k, runs):
                        lev += 1
                    lv = lev if y >= 0 else -lev
                    qq[i] = lv
                    ee[i] = x - np.float32(lv) * s
    else:
        for i in range(vv.size):
            x = vv[i]
            lv = np.int32(np.rint(x / s))
            qq[i] = lv
            ee[i] = x - np.float32(lv) * s


@numba.njit(cache=True, inline="always")
def _dequantize_range(sums, s, w, average, out):
    """out = float32(sum) * s (/ w if ``average``), as the torch path computes it."""
    if average:
        for i in range(sums.size):
            out[i] = (np.float32(sums[i]) * s) / w
    else:
        for i in range(sums.size):
            out[i] = np.float32(sums[i]) * s


@numba.njit(cache=True, nogil=True)
def dequantize_into(sums, steps, block, world, average, out):
    """out = float32(sum) * step (/ world if ``average``), block by block."""
    w = np.float32(world)
    n = sums.size
    for b in range(steps.size):
        lo = b * block
        hi = min(lo + block, n)
        _dequantize_range(sums[lo:hi], steps[b], w, average, out[lo:hi])


@numba.njit(cache=True, nogil=True)
def quantize_encode(v, steps, block, mu, k, runs, th, seg_lo, skip, chunk, ko, q, err, out):
    """q = RDOQ (mu > 0) or round-half-even (mu = 0) of v / step, err = v - q * step, and the EG
    coding of the levels, in one pass over memory.

    RDOQ picks floor or ceil of |v| / step, the lower of (|y| - level)^2 + mu * bits(level)
    (see rdoq.py), as a per-level threshold on the fraction (``th = threshold_table(...)``).

    The levels of each codec chunk are coded right after they are computed, while they are
    still in cache, straight into ``out`` (sized for the worst case): no separate counting pass
    (orders fixed) and no second read of q. ``seg_lo`` (ascending, ending with n) cuts the tensor
    into segments coded as separate streams (one per destination rank; chunks restart at each
    segment); segment ``skip`` (-1: none) is quantized but not coded. ``ko``: the orders
    (plain: k, 0, 0; runs: kr, kb, kv), -1 choosing the best for each chunk.

    Returns (seg_bytes, chunk_bits, chunk_orders, err_code): the byte offset where
    each segment's payload starts (and the end), and every coded chunk's bits and orders
    (segments in order; chunk c of segment s covers seg_lo[s] + c * chunk ...).
    """
    nseg = seg_lo.size - 1
    nchunks = 0
    for s in range(nseg):
        nchunks += (seg_lo[s + 1] - seg_lo[s] + chunk - 1) // chunk
    bits = np.zeros(nchunks, np.int64)
    orders = np.zeros((nchunks, 3), np.uint8)
    seg_bytes = np.zeros(nseg + 1, np.int64)
    auto = ko[0] < 0 or ko[1] < 0 or ko[2] < 0
    p = np.uint64(0)
    c = 0
    for s in range(nseg):
        seg_bytes[s] = np.int64(p)
        for lo in range(seg_lo[s], seg_lo[s + 1], chunk):
            hi = min(lo + chunk, seg_lo[s + 1])
            i = lo
            while i < hi:  # the blocks (steps) overlapping this chunk
                b = i // block
                e = min(hi, (b + 1) * block)
                _quantize_range(v, i, e, steps[b], th, mu, k, runs, q, err)
                i = e
            if s == skip:
                continue
            if auto:
                if runs:
                    k0, k1, k2, _, code = codec_cpu._chunk_stats_runs(
                        q, lo, hi, ko[0], ko[1], ko[2]
                    )
                else:
                    k0, _, code = codec_cpu._chunk_stats_plain(q, lo, hi, ko[0])
                    k1 = 0
                    k2 = 0
                if code != 0:
                    return seg_bytes, bits, orders, code
            else:
                k0, k1, k2 = ko[0], ko[1], ko[2]
            orders[c, 0] = k0
            orders[c, 1] = k1
            orders[c, 2] = k2
            p, bits[c] = codec_cpu._encode_chunk(q, lo, hi, runs, k0, k1, k2, out, p)
            c += 1
    seg_bytes[nseg] = np.int64(p)
    return seg_bytes, bits[:c], orders[:c], 0


@numba.njit(cache=True, nogil=True)
def decode_add(data, chunk, runs, bits, orders, starts, q, finish, steps, block, world, avg, out):
    """q += the levels coded in ``data`` (one stream's payload, followed by at least
    ``codec.cpu.PAD`` readable bytes), decoded chunk by chunk into a cache-sized buffer, so the
    decoded tensor is never materialized. With ``finish`` the sum is not stored back: it goes
    straight to ``out`` dequantized, as ``dequantize_into`` computes it (one pass fewer).
    Returns (error code, chunk)."""
    n = q.size
    buf = np.zeros(chunk, np.int32)
    w = np.float32(world)
    for c in range(bits.size):
        lo = c * chunk
        hi = min(n, lo + chunk)
        code = codec_cpu._decode_chunk(
            data,
            starts[c],
            bits[c],
            0,
            hi - lo,
            runs,
            orders[c, 0],
            orders[c, 1],
            orders[c, 2],
            buf,
        )
        if code != 0:
            return code, c
        m = hi - lo
        if not finish:
            for i in range(m):
                q[lo + i] += buf[i]
            buf[:m] = 0
            continue
        for i in range(m):
            buf[i] += q[lo + i]
        i = lo
        while i < hi:  # the blocks (steps) overlapping this chunk
            b = i // block
            e = min(hi, (b + 1) * block)
            _dequantize_range(buf[i - lo : e - lo], steps[b], w, avg, out[i:e])
            i = e
        buf[:m] = 0
    return 0, -1
