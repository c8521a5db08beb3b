"""Fused CPU passes of the compressed all-reduce (numba, one thread, no temporaries).

Each torch op over a gradient bucket is a full memory pass plus an allocation, and the
all-reduce needs about fifteen of them around the codec. These kernels do the work in three
passes: (residual add + per-block statistics), (quantize + residual + EG coding, chunk by
chunk), and
(decode each received chunk, add, dequantize into the output); ``dequantize_into`` serves the
reduce-scatter exchange. float32 arithmetic matches the torch path's operation order, so the
levels and the result are the same on every rank (every rank runs the same code on the same
agreed steps).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ..codec import chunks
from .rdoq import RUN_BITS

__all__ = [
    "add_and_block_stats",
    "block_steps",
    "decode_add",
    "dequantize_into",
    "level_histogram",
    "quantize_encode",
]


@numba.njit(cache=True, nogil=True)
def add_and_block_stats(x, res, block, vb, rms, amax):
    """Per block of v = x + res (res may be empty): RMS and max |v| (``_stats``). v goes through
    the block-sized scratch ``vb`` only, never to memory: the quantize pass adds again, which is
    cheaper than writing v and reading it back when the ranks share the memory bandwidth.
    Returns the sum of v^2 (float64): inf or NaN iff v holds an inf or NaN (finite squares
    cannot overflow float64)."""
    n = x.size
    has_res = res.size == n
    total = 0.0
    mbits = np.zeros(1, np.int32)  # max |v| of a block, as bits, then as float32
    for b in range(rms.size):
        lo = b * block
        hi = min(lo + block, n)
        if has_res:
            ss, mbits[0] = _add_and_stats(x[lo:hi], res[lo:hi], vb)
        else:
            ss, mbits[0] = _stats(x[lo:hi])
        total += ss
        rms[b] = np.float32(np.sqrt(ss / (hi - lo)))
        amax[b] = mbits.view(np.float32)[0]
    return total


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


_I32 = np.int32

# Largest |level| (or integer sum of levels) a step may leave: headroom below the codec's
# MAX_ABS (2^30 - 1). A step is at least max|v| x world / MAX_LEVEL.
MAX_LEVEL = 2**29


@numba.njit(cache=True, inline="always")
def _threshold(lev, mu, k, runs):
    """RDOQ rounds |y| = lev + f up iff f > this: (1-f)^2 + mu bits(lev+1) < f^2 + mu bits(lev)."""
    return 0.5 + 0.5 * mu * (_cost_bits(lev + 1, k, runs) - _cost_bits(lev, k, runs))


@numba.njit(cache=True, inline="always")
def _grows(fl, inv, runs):
    """True where the rate model's bits grow from level fl to fl + 1 (fl: a float32 integer
    >= 0, in runs mode >= 1; inv = 2^-k). Both modes code some m(lev) = floor(u / 2^k) + 1 in
    EG, whose length grows with bitlen(m), and m at most doubles from one level to the next:
    so bitlen grows by 0 or 1, and it grows iff ``(m ^ m') > m``.

    m is computed in float32 (exact: power-of-two scaling and floor; for levels >= 2^23,
    where 2 fl - 1 would round, the fraction is 0 and no threshold matters) and compared as
    int32: numba widens integer shifts to int64, which does not vectorize well.
    """
    one = _I32(1)
    if runs:
        m0 = _I32(np.floor(max(fl - np.float32(1.0), np.float32(0.0)) * inv)) + one
        m1 = _I32(np.floor(fl * inv)) + one
    else:
        two_fl = np.float32(2.0) * fl
        m0 = _I32(np.floor(max(two_fl - np.float32(1.0), np.float32(0.0)) * inv)) + one
        m1 = _I32(np.floor((two_fl + np.float32(1.0)) * inv)) + one
    return _I32(_I32(m0) ^ _I32(m1)) > _I32(m0)


@numba.njit(cache=True, nogil=True)
def _check_thresholds(th, mu, k, runs, levels):
    """Index of the first level below ``levels`` whose threshold from ``th`` (as
    ``_quantize_range`` picks it) is not ``_threshold`` rounded down to float32; -1 if none."""
    for lev in range(levels):
        fl = np.float32(lev)
        inv = np.float32(2.0**-k)
        t = th[0] if runs and lev == 0 else (th[2] if _grows(fl, inv, runs) else th[1])
        exact = _threshold(lev, mu, k, runs)
        if not (np.float64(t) <= exact and np.float64(np.nextafter(t, np.float32(np.inf))) > exact):
            return lev
    return -1


def _down32(x: float) -> np.float32:
    """The largest float32 <= x: ``f > _down32(x)`` iff ``float64(f) > x`` for float32 f."""
    t = np.float32(x)
    return np.nextafter(t, np.float32(-np.inf)) if float(t) > x else t


@functools.lru_cache(maxsize=16)
def rdoq_thresholds(mu: float, k: int, runs: bool) -> np.ndarray:
    """RDOQ's round-up thresholds on the fraction, as float32 numbers rounded down: [level 0
    in runs mode, a level whose bits do not grow, one whose bits grow by one bit length].

    The rate model's cost difference between consecutive levels takes only these values, so
    the quantizer picks one per element by arithmetic (``_grows``) instead of a table
    look-up (a gather, which does not vectorize). Checked here against the exact threshold of
    every level below 2^16.
    """
    mu, k, runs = float(mu), int(k), bool(runs)
    th = np.array(
        [
            _down32(_threshold(0, mu, k, runs)),
            _down32(0.5),  # no growth: the cost difference is 0
            _down32(0.5 + mu),  # one bit length more: 2 bits (0.5 + 0.5 * mu * 2)
        ],
        dtype=np.float32,
    )
    bad = _check_thresholds(th, mu, k, runs, 1 << 16)
    if bad >= 0:
        raise AssertionError(f"RDOQ thresholds disagree with the cost model at level {bad}")
    th.flags.writeable = False
    return th


@numba.njit(cache=True, inline="always")
def _quantize_range(vv, s, th, mu, k, runs, qq, ee):
    """qq = RDOQ (mu > 0) or round-half-even (mu = 0) of vv / s, ee = vv - qq * s (equal sizes).

    One loop without calls, branches, look-ups or 64-bit lanes, so LLVM vectorizes it 8 wide.
    RDOQ rounds |y| = lev + f up iff f exceeds the level's threshold (``rdoq_thresholds``).
    Levels fit int32: the steps keep them below 2^29.
    """
    if mu > 0:
        inv = np.float32(2.0**-k)
        t0, t1, t2 = th[0], th[1], th[2]
        for i in range(vv.size):
            x = vv[i]
            a = abs(x / s)
            fl = np.floor(a)  # the level, kept in float32 (exact: levels < 2^29, and from
            # 2^23 on a has no fraction, so fl + 1 is never taken where it would round)
            g = _grows(fl, inv, runs)
            t = t0 if runs and fl == 0 else (t2 if g else t1)
            lv = fl + np.float32(1.0) if a - fl > t else fl
            lv = lv if x >= 0 else -lv
            qq[i] = _I32(lv)
            ee[i] = x - lv * s
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
def quantize_encode(
    x, res, steps, block, mu, k, runs, th, seg_lo, skip, chunk, ko, vb, q, err, out
):
    """q = RDOQ (mu > 0) or round-half-even (mu = 0) of v / step, err = v - q * step, and the EG
    coding of the levels, in one pass over memory; v = x + res (res may be empty; err may be
    res: each block's v is formed in the scratch ``vb`` before its err is written).

    RDOQ picks floor or ceil of |v| / step, the lower of (|y| - level)^2 + mu * bits(level)
    (see rdoq.py), as a per-level threshold on the fraction (``th = rdoq_thresholds(...)``).

    The levels of each codec chunk are coded right after they are computed, while they are
    still in cache, straight into ``out`` (sized for the worst case): no separate counting pass
    (orders fixed) and no second read of q. ``seg_lo`` (ascending, ending with n) cuts the tensor
    into segments coded as separate streams (one per destination rank; chunks restart at each
    segment); segment ``skip`` (-1: none) is quantized but not coded. ``ko``: the orders
    (plain: k, 0, 0; runs: kr, kb, kv), -1 choosing the best for each chunk.

    Returns (seg_bytes, chunk_bits, chunk_orders, err_code, sum of err^2): the byte offset where
    each segment's payload starts (and the end), and every coded chunk's bits and orders
    (segments in order; chunk c of segment s covers seg_lo[s] + c * chunk ...); the sum of
    squares (a statistic) is taken while err is in cache.
    """
    nseg = seg_lo.size - 1
    nchunks = 0
    for s in range(nseg):
        nchunks += (seg_lo[s + 1] - seg_lo[s] + chunk - 1) // chunk
    bits = np.zeros(nchunks, np.int64)
    orders = np.zeros((nchunks, 3), np.uint8)
    seg_bytes = np.zeros(nseg + 1, np.int64)
    has_res = res.size == x.size
    p = np.uint64(0)
    c = 0
    err_sq = 0.0
    for s in range(nseg):
        seg_bytes[s] = np.int64(p)
        for lo in range(seg_lo[s], seg_lo[s + 1], chunk):
            hi = min(lo + chunk, seg_lo[s + 1])
            i = lo
            while i < hi:  # the blocks (steps) overlapping this chunk
                b = i // block
                e = min(hi, (b + 1) * block)
                if has_res:
                    vv = vb[: e - i]
                    _add_into(x[i:e], res[i:e], vv)
                    _quantize_range(vv, steps[b], th, mu, k, runs, q[i:e], err[i:e])
                else:
                    _quantize_range(x[i:e], steps[b], th, mu, k, runs, q[i:e], err[i:e])
                i = e
            err_sq += _sum_squares(err[lo:hi])
            if s == skip:
                continue
            p, code = _code_chunk(q, lo, hi, runs, ko, out, p, bits, orders, c)
            if code != 0:
                return seg_bytes, bits, orders, code, err_sq
            c += 1
    seg_bytes[nseg] = np.int64(p)
    return seg_bytes, bits[:c], orders[:c], 0, err_sq


@numba.njit(cache=True, inline="always")
def _code_chunk(q, lo, hi, runs, ko, out, p, bits, orders, c):
    """EG-code q[lo:hi] at byte p of ``out`` as codec chunk c (orders ``ko``; -1: the best for
    the chunk), recording its bits and orders. Returns (next byte, error code)."""
    p, nbits, k0, k1, k2, code = chunks.encode_chunk(q, lo, hi, runs, ko, out, p)
    if code != 0:
        return p, code
    orders[c, 0] = k0
    orders[c, 1] = k1
    orders[c, 2] = k2
    bits[c] = nbits
    return p, 0


@numba.njit(cache=True, inline="always")
def _block_step(rms, amax, relative, quant_step, guard):
    """A block's step from the agreed RMS and max |v|, as ``common.block_steps_torch``
    computes it (float32 products); ``guard`` = world / MAX_LEVEL keeps the integer sums of
    ``world`` ranks' levels in the codec's range."""
    s = rms * quant_step if relative else quant_step
    if not s > 0:
        s = np.float32(1.0)  # an all-zero block: any step
    s = max(s, amax * guard)
    if not np.isfinite(s):
        s = np.float32(3e38)
    return s


@numba.njit(cache=True, nogil=True)
def block_steps(rms, amax, relative, quant_step, world, steps):
    """steps[b] = ``_block_step`` of block b for the sums over ``world`` ranks (the CPU form of
    ``common.block_steps``: the same float32 results; a test compares them)."""
    qs = np.float32(quant_step)
    guard = np.float32(world / MAX_LEVEL)  # a power of two over 2^29: exact in float32
    for b in range(steps.size):
        steps[b] = _block_step(rms[b], amax[b], relative, qs, guard)


@numba.njit(cache=True, inline="always")
def _add_and_stats(x, res, v):
    """v = x + res (res may be empty), and ``_stats`` of v."""
    n = x.size
    if res.size == n:
        _add_into(x, res, v)
    else:
        v[:n] = x
    return _stats(v[:n])


@numba.njit(cache=True, inline="always")
def _add_into(x, res, v):
    """v[i] = x[i] + res[i] (float32, as torch adds them), for the first x.size elements."""
    for i in range(x.size):
        v[i] = x[i] + res[i]


@numba.njit(cache=True, inline="always")
def _stats(v):
    """(sum of v^2 in float64, the int32 bits of max |v|).

    Written for speed in a latency-bound loop: the sum in four float64 accumulators
    (``_sum_squares``), the maximum over the int32 bits of |v| (ordered like the floats for
    non-negative values; NaN bits sort above inf, and the caller sees NaN or inf in the sum
    anyway).
    """
    vb = v.view(np.int32)
    mb = _I32(0)
    for i in range(v.size):
        mb = max(mb, vb[i] & _I32(0x7FFFFFFF))
    return _sum_squares(v), mb


@numba.njit(cache=True, inline="always")
def _sum_squares(a):
    """Sum of a^2 in float64 over four accumulators (one sequential sum waits ~4 cycles per
    element); float32 squares are exact in float64, so the result depends only on the order."""
    n = a.size
    s0 = s1 = s2 = s3 = 0.0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        t0, t1, t2, t3 = (
            np.float64(a[i]),
            np.float64(a[i + 1]),
            np.float64(a[i + 2]),
            np.float64(a[i + 3]),
        )
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
    for i in range(n4, n):
        t = np.float64(a[i])
        s0 += t * t
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, nogil=True)
def decode_add(data, chunk, runs, bits, orders, starts, q, finish, steps, block, world, avg, out):
    """q += the levels coded in ``data`` (one stream's payload, followed by at least
    ``codec.chunks.PAD`` readable bytes), decoded chunk by chunk into a cache-sized buffer, so the
    decoded tensor is never materialized. With ``finish`` the sum is not stored back: it goes
    straight to ``out`` dequantized, as ``dequantize_into`` computes it (one pass fewer).
    Returns (error code, chunk)."""
    n = q.size
    buf = np.zeros(chunk, np.int32)
    w = np.float32(world)
    for c in range(bits.size):
        lo = c * chunk
        hi = min(n, lo + chunk)
        code = chunks.decode_chunk(
            data, starts[c], bits[c], hi - lo, runs, orders[c, 0], orders[c, 1], orders[c, 2], buf
        )
        if code != 0:
            return code, c
        m = hi - lo
        if not finish:
            for i in range(m):
                q[lo + i] += buf[i]
            buf[:m] = 0
            continue
        i = lo
        while i < hi:  # the blocks (steps) overlapping this chunk
            b = i // block
            e = min(hi, (b + 1) * block)
            _add_dequantize_range(buf[i - lo : e - lo], q[i:e], steps[b], w, avg, out[i:e])
            i = e
    return 0, -1


@numba.njit(cache=True, inline="always")
def _add_dequantize_range(dec, own, s, w, average, out):
    """out = float32(dec + own) * s (/ w if ``average``), as ``_dequantize_range`` computes it,
    and dec zeroed for the next chunk: one pass over the decode buffer instead of three."""
    if average:
        for i in range(dec.size):
            t = np.int32(dec[i] + own[i])
            dec[i] = 0
            out[i] = (np.float32(t) * s) / w
    else:
        for i in range(dec.size):
            t = np.int32(dec[i] + own[i])
            dec[i] = 0
            out[i] = np.float32(t) * s


HIST_K = 64  # level_histogram's bins: the levels -HIST_K ... HIST_K; others counted apart


@numba.njit(cache=True, nogil=True)
def level_histogram(q, counts):
    """counts[HIST_K + l] += how often level l (|l| <= HIST_K) occurs in q; returns how many
    levels lie outside (``outside_levels`` collects them). Four interleaved sub-histograms:
    runs of equal levels (mostly zeros) would otherwise chain each increment on the last."""
    k = HIST_K
    w = 2 * k + 1
    sub = np.zeros((4, w), np.int64)
    n = q.size
    n4 = n - n % 4
    outside = 0
    for i in range(0, n4, 4):
        for j in range(4):
            t = np.int64(q[i + j]) + k
            if t < 0 or t >= w:
                outside += 1
            else:
                sub[j, t] += 1
    for i in range(n4, n):
        t = np.int64(q[i]) + k
        if t < 0 or t >= w:
            outside += 1
        else:
            sub[0, t] += 1
    for t in range(w):
        counts[t] += sub[0, t] + sub[1, t] + sub[2, t] + sub[3, t]
    return outside


@numba.njit(cache=True, nogil=True)
def outside_levels(q, out, m):
    """Write the levels of q outside -HIST_K ... HIST_K into out from index m; returns the next
    index (the exact path for the rare wide levels ``level_histogram`` does not bin)."""
    k = HIST_K
    for i in range(q.size):
        v = np.int64(q[i])
        if v < -k or v > k:
            out[m] = v
            m += 1
    return m
