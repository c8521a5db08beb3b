"""Numba kernels for the Exp-Golomb bit format (see ``ggspeed/codec/stream.py`` for the format).

Everything here works on flat numpy arrays; ``ggspeed.codec`` wraps it for torch tensors.

Why it is fast: codes are written through a 64-bit accumulator flushed as whole big-endian words,
code lengths come from one count-leading-zeros (``EG_k(u)`` is ``u + 2^k`` in binary preceded by
``bitlen(u + 2^k) - k - 1`` zeros), decoding peeks a 64-bit window (one 8-byte load) whose
leading-zero count gives the code length directly, array indices are unsigned (numba then emits
no negative-index wraparound), and the order search ("auto") runs on histograms, not per order.
Why it is safe: numba has no bounds checks, so the decoder reads from a copy of the payload with
``PAD`` zero bytes appended and checks before every code that it has not passed its chunk's
recorded end; decoded values and run lengths are range-checked, and kernels return error codes
(turned into ValueError by the Python drivers) instead of raising.

Two drivers per kernel: a serial one (one thread) and a chunk-parallel one (``prange``), both
calling the same per-chunk functions, so their output is identical byte for byte.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

# Largest |q| the format supports: u = zigzag(q) <= 2^31 - 2, so every code fits in 63 bits.
MAX_ABS = (1 << 30) - 1
MAX_U = 2 * MAX_ABS
MAX_K = 31  # largest Exp-Golomb order (every code of a supported value stays <= 63 bits)

# Error codes returned by the kernels (mapped to messages by ``error_message``).
OK = 0
E_RANGE = 1  # encode: |q| > MAX_ABS
E_PREFIX = 2  # decode: zero prefix longer than any valid code (corrupt data)
E_RUN = 3  # decode: zero run or value runs past the end of its chunk
E_END = 4  # decode: chunk did not end exactly at its recorded length
E_PAD = 5  # decode: nonzero padding bits after a chunk
E_VALUE = 6  # decode: value larger than the supported range

_HB = 33  # histogram rows: bit length of u, 0..32
_HO = 34  # histogram columns: leading-ones count, 0..33
_SMALL = 4096  # values below this are counted in a direct histogram first
_U_SMALL = np.uint64(_SMALL)

U64_0 = np.uint64(0)
U64_1 = np.uint64(1)
# uint64 copies: numba compares uint64 with int64 through float64, so keep comparisons unsigned.
U_MAX_U = np.uint64(MAX_U)
U_MAX_BIG = np.uint64(MAX_ABS - 2)


@njit(inline="always")
def _bitlen(x):
    """Number of significant bits of a uint64 (0 for 0)."""
    return 64 - np.int64(leading_zeros(x))


@njit(inline="always")
def _zigzag(a):
    """u = 2q - 1 for q > 0, -2q otherwise (as uint64)."""
    a = np.int64(a)
    return np.uint64(2 * abs(a) - (a > 0))


@njit(inline="always")
def _hist_add(hist, u):
    # Row: bit length b of u; column: count of leading one bits of u (from its top bit down).
    # Together they determine the EG length of u for every order k exactly (see _best_order).
    b = _bitlen(u)
    mask = (U64_1 << np.uint64(b)) - U64_1
    ones = b - _bitlen(u ^ mask)
    hist[b, ones] += 1


@njit(inline="always")
def _hist_add_n(hist, u, n):
    b = _bitlen(u)
    mask = (U64_1 << np.uint64(b)) - U64_1
    hist[b, b - _bitlen(u ^ mask)] += n


@njit(cache=True, nogil=True)
def _best_order(hist, kmin, kmax):
    """(order, bits) minimizing the total EG length of the histogrammed values over [kmin, kmax].

    len_k(u) = 2 * floor(log2(u + 2^k)) + 1 - k, and floor(log2(u + 2^k)) is k when b <= k,
    else b - 1 plus one if u + 2^k carries into bit b, i.e. if the top b - k bits of u are ones.
    Ties go to the smaller order.
    """
    suffix = np.zeros((_HB, _HO + 1), np.int64)
    total = 0
    for b in range(_HB):
        acc = 0
        for j in range(_HO - 1, -1, -1):
            acc += hist[b, j]
            suffix[b, j] = acc
        total += acc
    best_k = kmin
    best = np.int64(-1)
    for k in range(kmin, kmax + 1):
        s = 0
        for b in range(_HB):
            if b <= k:
                s += k * suffix[b, 0]
            else:
                s += (b - 1) * suffix[b, 0] + suffix[b, b - k]
        cost = total * (1 - k) + 2 * s
        if best < 0 or cost < best:
            best = cost
            best_k = k
    return best_k, best


@njit(cache=True, nogil=True)
def _chunk_stats_plain(q, lo, hi, k):
    """(order, bits, err) of one chunk in plain mode; k < 0 chooses the best order."""
    umax = np.uint64(0)
    if k >= 0:
        kk = np.uint64(k)
        s = 0
        for i in range(lo, hi):
            u = _zigzag(q[i])
            umax = max(umax, u)
            s += _bitlen(u + (U64_1 << kk))
        if umax > U_MAX_U:
            return k, 0, E_RANGE
        return k, 2 * s - (hi - lo) * (k + 1), OK
    # Small u (nearly all of them) go to a direct histogram, folded into the (bit length,
    # leading ones) one at the end: one table increment instead of two leading-zero counts
    # per element.
    hist = np.zeros((_HB, _HO), np.int64)
    small = np.zeros(_SMALL, np.int32)
    for i in range(lo, hi):
        u = _zigzag(q[i])
        umax = max(umax, u)
        if u < _U_SMALL:
            small[u] += 1
        else:
            _hist_add(hist, u)
    for v in range(min(np.int64(umax) + 1, _SMALL)):
        if small[v]:
            _hist_add_n(hist, np.uint64(v), small[v])
    if umax > U_MAX_U:
        return 0, 0, E_RANGE
    kmax = min(MAX_K, _bitlen(umax))  # beyond bitlen(max u) every order only costs more
    best_k, best = _best_order(hist, 0, kmax)
    return best_k, best, OK


@njit(inline="always")
def _pick(hist, k):
    if k >= 0:
        return _best_order(hist, k, k)
    return _best_order(hist, 0, MAX_K)


@njit(cache=True, nogil=True)
def _chunk_stats_runs(q, lo, hi, kr, kb, kv):
    """(orders (run, ones-run, big value), bits, err) of one chunk in zero-run mode.

    The three symbol streams of a chunk: zero runs before each nonzero (and a trailing run),
    counts of |q| == 1 nonzeros before each |q| >= 2 one (one count at the chunk's first nonzero
    and at the first nonzero after each |q| >= 2), and |q| - 2 of the |q| >= 2 ones; plus one sign
    bit per nonzero. An order < 0 means the best one for this chunk.
    """
    hr = np.zeros((_HB, _HO), np.int64)
    hb = np.zeros((_HB, _HO), np.int64)
    hv = np.zeros((_HB, _HO), np.int64)
    run = 0
    ones = 0
    nnz = 0
    amax = 0
    for i in range(lo, hi):
        a = np.int64(q[i])
        if a == 0:
            run += 1
            continue
        m = abs(a)
        nnz += 1
        _hist_add(hr, np.uint64(run))
        run = 0
        if m == 1:
            ones += 1
        else:
            amax = max(amax, m)
            _hist_add(hb, np.uint64(ones))
            _hist_add(hv, np.uint64(m - 2))
            ones = 0
    if run > 0:
        _hist_add(hr, np.uint64(run))
    if ones > 0:
        _hist_add(hb, np.uint64(ones))
    if amax > MAX_ABS:
        return 0, 0, 0, 0, E_RANGE
    kr, br = _pick(hr, kr)
    kb, bb = _pick(hb, kb)
    kv, bv = _pick(hv, kv)
    return kr, kb, kv, br + bb + bv + nnz, OK


@njit(inline="always")
def _stats_one(q, n, chunk, c, runs, k0, k1, k2, bits, orders):
    lo = c * chunk
    hi = min(n, lo + chunk)
    if runs:
        a, b, d, nb, err = _chunk_stats_runs(q, lo, hi, k0, k1, k2)
    else:
        a, nb, err = _chunk_stats_plain(q, lo, hi, k0)
        b = 0
        d = 0
    bits[c] = nb
    orders[c, 0] = a
    orders[c, 1] = b
    orders[c, 2] = d
    return err


@njit(cache=True, nogil=True)
def _stats_serial(q, chunk, runs, k0, k1, k2, bits, orders):
    n = q.shape[0]
    for c in range(bits.shape[0]):
        err = _stats_one(q, n, chunk, c, runs, k0, k1, k2, bits, orders)
        if err != OK:
            return err, c
    return OK, -1


@njit(cache=True, nogil=True, parallel=True)
def _stats_parallel(q, chunk, runs, k0, k1, k2, bits, orders):
    n = q.shape[0]
    nchunks = bits.shape[0]
    errs = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        errs[c] = _stats_one(q, n, chunk, c, runs, k0, k1, k2, bits, orders)
    for c in range(nchunks):
        if errs[c] != OK:
            return errs[c], c
    return OK, -1


# ---------------------------------------------------------------- encode


@njit(inline="always")
def _store_be64(out, p, w):
    # Unsigned indices: numba then skips negative-index wraparound, and LLVM merges the stores.
    out[p] = np.uint8(w >> np.uint64(56))
    out[p + np.uint64(1)] = np.uint8((w >> np.uint64(48)) & np.uint64(255))
    out[p + np.uint64(2)] = np.uint8((w >> np.uint64(40)) & np.uint64(255))
    out[p + np.uint64(3)] = np.uint8((w >> np.uint64(32)) & np.uint64(255))
    out[p + np.uint64(4)] = np.uint8((w >> np.uint64(24)) & np.uint64(255))
    out[p + np.uint64(5)] = np.uint8((w >> np.uint64(16)) & np.uint64(255))
    out[p + np.uint64(6)] = np.uint8((w >> np.uint64(8)) & np.uint64(255))
    out[p + np.uint64(7)] = np.uint8(w & np.uint64(255))


@njit(inline="always")
def _put(out, p, acc, nacc, val, ln):
    """Append the ln (1..63) low bits of val; returns (p, acc, nacc). acc fills from the top."""
    free = np.uint64(64) - nacc
    if ln < free:
        return p, acc | (val << (free - ln)), nacc + ln
    spill = ln - free
    _store_be64(out, p, acc | (val >> spill))
    # val << (64 - spill) without a shift by 64 when spill == 0
    return p + np.uint64(8), (val << U64_1) << (np.uint64(63) - spill), spill


@njit(inline="always")
def _code(u, k):
    """(u + 2^k, code length) of EG_k(u): the value is written in that many bits."""
    val = u + (U64_1 << k)
    return val, np.uint64(2 * _bitlen(val)) - k - U64_1


@njit(inline="always")
def _nz_words(q, lo, n, nzw, bgw):
    """Bit b of word w of nzw / bgw: q[lo + 64 w + b] != 0 / |q[lo + 64 w + b]| >= 2.

    A bitmap pass vectorizes (LLVM packs 4 compares per instruction), and walking its set bits
    costs per nonzero, not per element: most elements are zeros.
    """
    un = np.uint64(n)
    nw = un >> np.uint64(6)
    ulo = np.uint64(lo)
    for w in range(nw):
        base = ulo + (w << np.uint64(6))
        m1 = np.uint64(0)
        m2 = np.uint64(0)
        for b in range(np.uint64(64)):
            a = q[base + b]
            m1 |= np.uint64(a != 0) << b
            m2 |= np.uint64((a > 1) | (a < -1)) << b
        nzw[w] = m1
        bgw[w] = m2
    m1 = np.uint64(0)
    m2 = np.uint64(0)
    base = ulo + (nw << np.uint64(6))
    for b in range(un - (nw << np.uint64(6))):
        a = q[base + b]
        m1 |= np.uint64(a != 0) << b
        m2 |= np.uint64((a > 1) | (a < -1)) << b
    nzw[nw] = m1
    bgw[nw] = m2


@njit(inline="always")
def _run_items(q, lo, pos, nnz, cc, kr, kv, it, split):
    """The codes of the nonzeros as (value, length) pairs in it, for the bit writer.

    One pair per nonzero, its run, sign, count and value codes joined (they nearly always fit
    in 63 bits: the returned OR of the lengths says whether they all did), or with split three
    (run and sign, count, value; unused ones of length 0). No branch depends on the data: a
    value's code is computed for every nonzero and masked off for |q| == 1, and the count code
    comes from cc[0] (empty) unless the previous nonzero ended a group. Returns (pairs * 2,
    position after the last nonzero, OR of the lengths).
    """
    ulo = np.uint64(lo)
    cr = U64_1 << kr
    nxt = np.uint64(0) - cr  # (position after the previous nonzero) - 2^kr
    g = U64_1  # cc index of the next group's count
    need = U64_1  # 1 if a count goes with this nonzero
    lens = np.uint64(0)
    for j in range(nnz):
        x = np.uint64(pos[j])
        a = np.int64(q[ulo + x])
        vr = x - nxt  # run + 2^kr
        nxt = x + U64_1 - cr
        lr = np.uint64(2 * _bitlen(vr)) - kr  # run code and sign bit
        vr = (vr << U64_1) | np.uint64(a < 0)
        c = cc[g & (U64_1 + ~need)]  # a load from a select: LLVM keeps it branch-free
        g += need
        cv = c >> np.uint64(6)
        cl = c & np.uint64(63)
        m = abs(a)
        need = np.uint64(m > 1)
        bm = U64_1 + ~need  # all ones for |q| >= 2
        vv, lv = _code(np.uint64(m - 2), kv)
        vv &= bm
        lv &= bm
        if split:
            k = np.uint64(6) * j
            it[k] = vr
            it[k + U64_1] = lr
            it[k + np.uint64(2)] = cv
            it[k + np.uint64(3)] = cl
            it[k + np.uint64(4)] = vv
            it[k + np.uint64(5)] = lv
        else:
            t = lr + cl + lv
            lens |= t
            it[j + j] = (((vr << cl) | cv) << lv) | vv
            it[j + j + U64_1] = t
    return nnz * np.uint64(6 if split else 2), nxt + cr, lens


@njit(cache=True, nogil=True)
def _encode_chunk(q, lo, hi, runs, k0, k1, k2, out, p):
    """Write one chunk's codes from byte p; only whole words inside the chunk are stored early.

    Returns (the byte after the chunk, the chunk's code bits): a caller that writes chunks back
    to back (a fused quantize-and-encode pass) needs no separate counting pass.
    """
    acc = np.uint64(0)
    nacc = np.uint64(0)  # bits used in acc, from the top
    p = np.uint64(p)
    p0 = p
    ulo = np.uint64(lo)
    uhi = np.uint64(hi)
    if not runs:
        kk = np.uint64(k0)
        for i in range(ulo, uhi):
            val, ln = _code(_zigzag(q[i]), kk)
            p, acc, nacc = _put(out, p, acc, nacc, val, ln)
    else:
        # Passes with short dependency chains and no data-dependent branches (a bit writer
        # fed straight from the nonzeros is bound by register spills and mispredicted
        # |q| == 1 / |q| >= 2 branches): bitmaps, positions, count codes, the codes of each
        # nonzero, then a tight bit-writer loop.
        kr = np.uint64(k0)
        kb = np.uint64(k1)
        kv = np.uint64(k2)
        n = hi - lo
        nw = (n >> 6) + 1
        nzw = np.empty(nw, np.uint64)
        bgw = np.empty(nw, np.uint64)
        _nz_words(q, lo, n, nzw, bgw)
        # Positions of the nonzeros, and the index (among them) of each |q| >= 2 one.
        pos = np.empty(n + 1, np.uint32)
        ends = np.empty(n + 1, np.uint32)
        nnz = np.uint64(0)
        nb = np.uint64(0)
        for w in range(np.uint64(nw)):
            bits = nzw[w]
            big = bgw[w]
            base = w << np.uint64(6)
            while bits:
                tz = trailing_zeros(bits)
                bits &= bits - U64_1
                pos[nnz] = base + tz
                ends[nb] = nnz
                nb += (big >> tz) & U64_1
                nnz += U64_1
        ends[nb] = nnz  # the last group ends at the chunk's end
        # Count code of each group (|q| == 1 nonzeros before its |q| >= 2 one), as
        # value << 6 | length; cc[0] is an empty code.
        cc = np.empty(nb + 2, np.uint64)
        cc[0] = 0
        start = np.uint64(0)
        for g in range(nb + U64_1):
            e = np.uint64(ends[g])
            val, ln = _code(e - start, kb)
            cc[g + U64_1] = (val << np.uint64(6)) | ln
            start = e + U64_1
        it = np.empty(2 * nnz + 2, np.uint64)
        if kr == U64_0 and kv == U64_0:  # the usual orders, as constants: fewer instructions
            k, nxt, lens = _run_items(q, lo, pos, nnz, cc, U64_0, U64_0, it, False)
        else:
            k, nxt, lens = _run_items(q, lo, pos, nnz, cc, kr, kv, it, False)
        if lens > np.uint64(63):  # some nonzero's codes do not fit in one word: split them
            it = np.empty(6 * nnz + 2, np.uint64)
            k, nxt, lens = _run_items(q, lo, pos, nnz, cc, kr, kv, it, True)
        if nxt < np.uint64(n):  # trailing zeros: a run with nothing after it (size is known)
            it[k], it[k + U64_1] = _code(np.uint64(n) - nxt, kr)
            k += np.uint64(2)
        for j in range(0, k, np.uint64(2)):
            ln = it[j + U64_1]
            if ln:
                p, acc, nacc = _put(out, p, acc, nacc, it[j], ln)
    nbits = np.int64(p - p0) * 8 + np.int64(nacc)
    # Last partial word: only its used bytes (the next chunk starts at the following byte).
    sh = np.int64(56)
    left = np.int64(nacc)
    while left > 0:
        out[p] = np.uint8((acc >> np.uint64(sh)) & np.uint64(255))
        p += U64_1
        sh -= 8
        left -= 8
    return p, nbits


@njit(cache=True, nogil=True)
def _encode_serial(q, chunk, runs, orders, starts, out):
    n = q.shape[0]
    for c in range(starts.shape[0]):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _encode_chunk(q, lo, hi, runs, orders[c, 0], orders[c, 1], orders[c, 2], out, starts[c])


@njit(cache=True, nogil=True, parallel=True)
def _encode_parallel(q, chunk, runs, orders, starts, out):
    n = q.shape[0]
    for c in prange(starts.shape[0]):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _encode_chunk(q, lo, hi, runs, orders[c, 0], orders[c, 1], orders[c, 2], out, starts[c])


# ---------------------------------------------------------------- decode


@njit(inline="always")
def _load_be64(data, p):
    return (
        (np.uint64(data[p]) << np.uint64(56))
        | (np.uint64(data[p + np.uint64(1)]) << np.uint64(48))
        | (np.uint64(data[p + np.uint64(2)]) << np.uint64(40))
        | (np.uint64(data[p + np.uint64(3)]) << np.uint64(32))
        | (np.uint64(data[p + np.uint64(4)]) << np.uint64(24))
        | (np.uint64(data[p + np.uint64(5)]) << np.uint64(16))
        | (np.uint64(data[p + np.uint64(6)]) << np.uint64(8))
        | np.uint64(data[p + np.uint64(7)])
    )


PAD = 64  # zero bytes appended to the payload before decoding: every read stays inside


@njit(inline="always")
def _read(data, pos, k, zcut):
    """(u, length, ok) of the EG_k code at bit pos of the padded payload.

    Fast path: one 8-byte load holds >= 57 bits, enough for every code whose zero prefix is at
    most zcut (then u is also within range); longer codes add a 9th byte and check u. A prefix
    longer than any valid code, or u out of range, gives ok = False (corrupt data).
    """
    p = pos >> np.uint64(3)
    s = pos & np.uint64(7)
    w = _load_be64(data, p) << s
    z = leading_zeros(w)
    if np.int64(z) > zcut:
        w |= np.uint64(data[p + np.uint64(8)]) >> (np.uint64(8) - s)
        z = leading_zeros(w)
        if z + k > np.uint64(31):
            return np.uint64(0), np.uint64(0), False
        ln = z + z + k + U64_1
        u = (w >> (np.uint64(64) - ln)) - (U64_1 << k)
        return u, ln, u <= U_MAX_U
    ln = z + z + k + U64_1
    return (w >> (np.uint64(64) - ln)) - (U64_1 << k), ln, True


@njit(inline="always")
def _zcut(k):
    # Longest zero prefix the fast path takes: code <= 57 bits and u <= MAX_U for sure.
    return min((56 - np.int64(k)) // 2, 30 - np.int64(k))


@njit(cache=True, nogil=True)
def _decode_chunk(data, start_byte, nbits, lo, hi, runs, k0, k1, k2, out):
    """Decode one chunk into out[lo:hi] (pre-zeroed in run mode); returns an error code.

    ``data`` carries PAD zero bytes after the payload, and every loop iteration starts with
    pos <= end (the chunk's recorded end), so no read leaves the buffer whatever the bits say.
    """
    pos = np.uint64(start_byte) * np.uint64(8)
    end = pos + np.uint64(nbits)
    ulo = np.uint64(lo)
    uhi = np.uint64(hi)
    if not runs:
        kk = np.uint64(k0)
        zc = _zcut(k0)
        for i in range(ulo, uhi):
            if pos > end:
                return E_END
            u, ln, ok = _read(data, pos, kk, zc)
            if not ok:
                return E_PREFIX
            pos += ln
            h = np.int64((u + U64_1) >> U64_1)
            out[i] = h if (u & U64_1) else -h
    else:
        kr = np.uint64(k0)
        kb = np.uint64(k1)
        kv = np.uint64(k2)
        zr, zb, zv = _zcut(k0), _zcut(k1), _zcut(k2)
        i = ulo
        ones = np.int64(-1)  # |q| == 1 values before the next |q| >= 2; -1: read a count next
        while i < uhi:
            if pos > end:
                return E_END
            r, ln, ok = _read(data, pos, kr, zr)
            if not ok:
                return E_PREFIX
            pos += ln
            if r > uhi - i:
                return E_RUN
            i += r
            if i == uhi:
                break
            neg = (data[pos >> np.uint64(3)] >> (np.uint64(7) - (pos & np.uint64(7)))) & 1
            pos += U64_1
            if ones < 0:
                c, ln, ok = _read(data, pos, kb, zb)
                if not ok:
                    return E_PREFIX
                if c > uhi - i:
                    return E_RUN
                pos += ln
                ones = np.int64(c)
            if ones > 0:
                m = np.int64(1)
                ones -= 1
            else:
                v, ln, ok = _read(data, pos, kv, zv)
                if not ok or v > U_MAX_BIG:
                    return E_VALUE
                pos += ln
                m = np.int64(v) + 2
                ones = -1
            out[i] = -m if neg else m
            i += U64_1
        if ones > 0:
            return E_RUN
    if pos != end:
        return E_END
    # Padding up to the next byte must be zero: catches some corruption for free.
    if end & np.uint64(7):
        last = np.uint64(data[end >> np.uint64(3)])
        if last & ((U64_1 << (np.uint64(8) - (end & np.uint64(7)))) - U64_1):
            return E_PAD
    return OK


@njit(inline="always")
def _decode_one(data, chunk, runs, bits, orders, starts, out, c):
    n = out.shape[0]
    lo = c * chunk
    hi = min(n, lo + chunk)
    o = orders[c]
    return _decode_chunk(data, starts[c], bits[c], lo, hi, runs, o[0], o[1], o[2], out)


@njit(cache=True, nogil=True)
def _decode_serial(data, chunk, runs, bits, orders, starts, out):
    for c in range(starts.shape[0]):
        err = _decode_one(data, chunk, runs, bits, orders, starts, out, c)
        if err != OK:
            return err, c
    return OK, -1


@njit(cache=True, nogil=True, parallel=True)
def _decode_parallel(data, chunk, runs, bits, orders, starts, out):
    nchunks = starts.shape[0]
    errs = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        errs[c] = _decode_one(data, chunk, runs, bits, orders, starts, out, c)
    for c in range(nchunks):
        if errs[c] != OK:
            return errs[c], c
    return OK, -1


# ---------------------------------------------------------------- Python drivers

_MESSAGES = {
    E_RANGE: f"value out of the supported range |q| <= {MAX_ABS}",
    E_PREFIX: "invalid code (zero prefix longer than any valid code): corrupt data",
    E_RUN: "zero run or value runs past the end of its chunk: corrupt data",
    E_END: "chunk does not end at its recorded length: corrupt or mismatched stream",
    E_PAD: "nonzero padding bits after a chunk: corrupt data",
    E_VALUE: f"decoded value exceeds the supported range |q| <= {MAX_ABS}: corrupt data",
}


def error_message(err: int, chunk: int) -> str:
    return f"{_MESSAGES.get(int(err), f'error {err}')} (chunk {chunk})"


PARALLEL_MIN = 1 << 18  # below this many elements threads cost more than they save


def _use_parallel(nchunks: int, numel: int, parallel: bool | None) -> bool:
    if parallel is None:
        return nchunks > 1 and numel >= PARALLEL_MIN and numba.get_num_threads() > 1
    return parallel


def chunk_stats(
    q: np.ndarray, chunk: int, runs: bool, ks: tuple[int, int, int], parallel: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk code bits (int64) and orders (uint8, (nchunks, 3)); ValueError if out of range.

    ``ks``: the orders asked for (plain: (k, 0, 0); runs: (zero run, ones run, big value)), -1
    meaning the best for each chunk.
    """
    nchunks = -(-q.shape[0] // chunk)
    bits = np.zeros(nchunks, np.int64)
    orders = np.zeros((nchunks, 3), np.uint8)
    fn = _stats_parallel if _use_parallel(nchunks, q.shape[0], parallel) else _stats_serial
    err, c = fn(q, chunk, runs, ks[0], ks[1], ks[2], bits, orders)
    if err != OK:
        raise ValueError(f"cannot encode: {error_message(err, c)}")
    return bits, orders


def chunk_starts(bits: np.ndarray) -> np.ndarray:
    """Byte offset of each chunk: chunks start on byte boundaries."""
    nb = (bits + 7) >> 3
    starts = np.zeros(bits.shape[0], np.int64)
    if bits.shape[0] > 1:
        np.cumsum(nb[:-1], out=starts[1:])
    return starts


def encode(
    q: np.ndarray, chunk: int, runs: bool, ks: tuple[int, int, int], parallel: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(payload uint8, chunk bits int64, orders uint8 (nchunks, 3)) of int32 array q."""
    bits, orders = chunk_stats(q, chunk, runs, ks, parallel)
    starts = chunk_starts(bits)
    total = int(((bits + 7) >> 3).sum())
    out = np.empty(total, np.uint8)
    fn = _encode_parallel if _use_parallel(bits.shape[0], q.shape[0], parallel) else _encode_serial
    fn(q, chunk, runs, orders, starts, out)
    return out, bits, orders


def decode(
    data: np.ndarray,
    numel: int,
    chunk: int,
    runs: bool,
    bits: np.ndarray,
    orders: np.ndarray,
    parallel: bool | None = None,
) -> np.ndarray:
    """int32 array of numel values; ValueError naming the chunk on any inconsistency."""
    if numel < 0 or chunk < 1 or -(-numel // chunk) != bits.shape[0]:
        raise ValueError(
            f"cannot decode: {bits.shape[0]} chunks cannot hold {numel} elements of {chunk}"
        )
    starts = chunk_starts(bits)
    nload = int(((bits + 7) >> 3).sum())
    if data.shape[0] != nload:
        raise ValueError(f"cannot decode: payload is {data.shape[0]} bytes, chunks need {nload}")
    padded = np.zeros(nload + PAD, np.uint8)
    padded[:nload] = data
    # Plain mode writes every element; run mode writes only the nonzeros.
    out = np.zeros(numel, np.int32) if runs else np.empty(numel, np.int32)
    fn = _decode_parallel if _use_parallel(bits.shape[0], numel, parallel) else _decode_serial
    err, c = fn(padded, chunk, runs, bits, orders, starts, out)
    if err != OK:
        raise ValueError(f"cannot decode: {error_message(err, c)}")
    return out
