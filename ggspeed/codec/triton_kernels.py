"""GPU backend: the same bit format as ``cpu.py``, for CUDA tensors (Triton + torch ops).

Plain-mode encode is two fused kernels, one program per chunk, reading the int32 levels with no
per-element temporaries: the first sums each order's code length over the chunk and picks the
order as the numba kernel does; after a prefix sum of the chunk sizes, the second computes every
code's bit position with a block prefix sum and ORs the codes into 32-bit words with atomics
(chunks start on byte boundaries, so neighbouring chunks may share a word). Zero-run mode encode
is data-parallel over codes: torch ops build every code's symbol (run, sign, ones-count, big
value) and each order's per-chunk length from a (bit length, leading ones) histogram, exactly as
the numba kernel does; a prefix sum of each nonzero's code bits gives every code's position and
a Triton kernel ORs them in the same way.

Decode is sequential inside a chunk (a code's position depends on all before it), parallel over
chunks (plain mode: one lane per chunk; zero-run mode: one program per chunk), with the same
checks as the numba decoder (every read stays inside the padded payload, codes and runs are
range checked, each chunk must end exactly at its recorded length with zero padding).

Run under ``TRITON_INTERPRET=1`` (set before triton is imported) with CPU tensors, these kernels
are what the tests compare byte for byte against the numba backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cpu import (
    E_END,
    E_PAD,
    E_PREFIX,
    E_RANGE,
    E_RUN,
    E_VALUE,
    MAX_ABS,
    MAX_K,
    MAX_U,
    PAD,
    error_message,
)

# Kernels may only read globals that are constexpr.
_MAX_U = tl.constexpr(MAX_U)
_MAX_BIG = tl.constexpr(MAX_ABS - 2)
_MAX_K = tl.constexpr(MAX_K)
_E_END = tl.constexpr(E_END)
_E_PAD = tl.constexpr(E_PAD)
_E_PREFIX = tl.constexpr(E_PREFIX)
_E_RUN = tl.constexpr(E_RUN)
_E_VALUE = tl.constexpr(E_VALUE)

_NB = 33  # bit lengths 0..32
_NO = 34  # leading-ones counts 0..33
_BLOCK = 1024
_LANES = 32  # chunks decoded side by side by one warp (plain mode)
SLICE_ELEMS = 1 << 24  # zero-run mode: nonzeros planned at once, on average (~100 B each)


# ---------------------------------------------------------------- statistics (torch ops)


def _bitlen_t(x: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 values below 2^53 (exact through float64's exponent)."""
    return torch.frexp(x.to(torch.float64))[1].to(torch.int64)


def _order_costs(x: torch.Tensor, cid: torch.Tensor, nchunks: int) -> torch.Tensor:
    """[nchunks, 32] total EG_k length of the symbols x (chunk ids cid), for k = 0..31.

    Same (bit length, leading ones) histogram and formula as ``cpu._best_order``.
    """
    dev = x.device
    b = _bitlen_t(x)
    ones = b - _bitlen_t(x ^ ((1 << b) - 1))
    key = cid * (_NB * _NO) + b * _NO + ones
    hist = torch.bincount(key, minlength=nchunks * _NB * _NO).view(nchunks, _NB, _NO)
    suffix = hist.flip(-1).cumsum(-1).flip(-1)  # suffix[c, b, j] = #(ones >= j)
    cnt = suffix[:, :, 0]  # [nc, NB]
    ks = torch.arange(MAX_K + 1, device=dev)
    bs = torch.arange(_NB, device=dev)
    col = (bs[None, :] - ks[:, None]).clamp(0, _NO - 1)  # [K, NB]
    carried = suffix[:, bs[None, :].expand_as(col), col]  # [nc, K, NB]
    term = torch.where(
        bs[None, :] <= ks[:, None],
        ks[:, None] * cnt[:, None, :],
        (bs[None, :] - 1) * cnt[:, None, :] + carried,
    )
    total = cnt.sum(-1)
    return total[:, None] * (1 - ks[None, :]) + 2 * term.sum(-1)


def _choose(costs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, bits) per chunk: order k, or (k < 0) the first order of least length."""
    if k >= 0:
        order = torch.full((costs.shape[0],), k, dtype=torch.int64, device=costs.device)
    else:
        order = torch.argmin(costs, dim=1)  # first minimum: ties go to the smaller order
    return order, costs.gather(1, order[:, None])[:, 0]


def _run_symbols(q: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """The zero-run mode symbols of flat q: per nonzero (in stream order) its chunk, zero run,
    sign, |q|, whether a ones-count precedes it and that count; and each chunk's trailing run."""
    dev = q.device
    n = q.numel()
    nchunks = -(-n // chunk)
    pos = torch.nonzero(q).flatten()
    cid = pos // chunk
    a = q[pos].to(torch.int64)
    m = a.abs()
    big = m > 1
    same = torch.zeros_like(big)
    same[1:] = cid[1:] == cid[:-1]  # previous nonzero is in the same chunk
    prev = torch.empty_like(pos)
    prev[1:] = pos[:-1]
    prev = torch.where(same, prev, cid * chunk - 1)
    prevbig = torch.zeros_like(big)
    prevbig[1:] = big[:-1]
    # ones-count at j: |q| == 1 nonzeros from j up to the next big one or the chunk's last nonzero
    ones_cs = torch.cumsum((m == 1).to(torch.int64), 0)
    ones_ex = ones_cs - (m == 1).to(torch.int64)
    j = torch.arange(pos.numel(), device=dev)
    bigidx = torch.nonzero(big).flatten()
    sentinel = torch.full((1,), pos.numel(), dtype=bigidx.dtype, device=dev)
    nbpos = torch.cat([bigidx, sentinel])[torch.searchsorted(bigidx, j)]  # next big at or after j
    chunk_end = torch.searchsorted(cid, cid, right=True)  # one past the chunk's last nonzero
    stop = torch.minimum(nbpos, chunk_end)
    # trailing zero run of each chunk
    hi = torch.clamp((torch.arange(nchunks, device=dev) + 1) * chunk, max=n)
    last = torch.arange(nchunks, device=dev) * chunk - 1
    last = last.scatter_reduce(0, cid, pos, "amax", include_self=True)
    trail = hi - 1 - last
    tc = torch.nonzero(trail > 0).flatten()
    return {
        "cid": cid,
        "run": pos - prev - 1,
        "sign": (a < 0).to(torch.int64),
        "m": m,
        "big": big,
        # a ones-count precedes the chunk's first nonzero and the first one after a big one
        "emit": ~same | prevbig,
        "count": torch.where(stop > j, ones_cs[(stop - 1).clamp(min=0)] - ones_ex, 0),
        "trail": trail[tc],
        "trail_cid": tc,
    }


def _check_range(flat: torch.Tensor) -> None:
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if min(lo, -hi) < -MAX_ABS:
            raise ValueError(f"cannot encode: {error_message(E_RANGE, -1)}")


def chunk_stats(
    flat: torch.Tensor, chunk: int, runs: bool, ks: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk code bits (int64) and orders (uint8, (nchunks, 3)), as ``cpu.chunk_stats``."""
    _check_range(flat)
    if not runs:
        return _plain_stats(flat, chunk, ks[0])
    return _runs_stats(flat, chunk, ks, _slices(flat, chunk))


def _runs_stats(flat: torch.Tensor, chunk: int, ks: tuple[int, int, int], parts):
    out = [_runs_orders(flat[lo:hi], chunk, ks)[:2] for lo, hi in parts]
    return torch.cat([b for b, _ in out]), torch.cat([o for _, o in out])


def _eg(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    val = x + (1 << k)
    return val, 2 * _bitlen_t(val) - k - 1


def _runs_orders(flat: torch.Tensor, chunk: int, ks: tuple[int, int, int]):
    """Zero-run mode: (chunk bits, orders (nchunks, 3), [kr, kb, kv] per chunk, the symbols)."""
    nchunks = -(-flat.numel() // chunk)
    s = _run_symbols(flat, chunk)
    cid, emit, big = s["cid"], s["emit"], s["big"]
    streams = (
        (torch.cat([s["run"], s["trail"]]), torch.cat([cid, s["trail_cid"]])),
        (s["count"][emit], cid[emit]),
        (s["m"][big] - 2, cid[big]),
    )
    orders = torch.zeros((nchunks, 3), dtype=torch.uint8, device=flat.device)
    bits = torch.bincount(cid, minlength=nchunks).to(torch.int64)  # sign bits
    ks_used = []
    for col, (x, c) in enumerate(streams):
        order, b = _choose(_order_costs(x, c, nchunks), ks[col])
        orders[:, col] = order.to(torch.uint8)
        bits += b
        ks_used.append(order)
    return bits, orders, ks_used, s


def _plan_runs(flat: torch.Tensor, chunk: int, ks: tuple[int, int, int]):
    """Zero-run mode: (bits, orders, codes); codes = (values, lengths, bit offset inside the
    chunk, chunk) of every code, in no particular order (the writer ORs them in)."""
    bits, orders, (kr, kb, kv), s = _runs_orders(flat, chunk, ks)
    cid, emit, big = s["cid"], s["emit"], s["big"]
    # per nonzero: its run and sign joined into one code (<= 48 bits), then the ones-count
    # where one is emitted, then |q| - 2 for a big one
    rv, rl = _eg(s["run"], kr[cid])
    rv, rl = 2 * rv + s["sign"], rl + 1
    cv, cl = _eg(s["count"][emit], kb[cid[emit]])
    vv, vl = _eg(s["m"][big] - 2, kv[cid[big]])
    cl_all = torch.zeros_like(rl)
    cl_all[emit] = cl
    per = rl + cl_all  # bits of each nonzero's codes
    per[big] += vl
    tot = torch.zeros(bits.numel(), dtype=torch.int64, device=bits.device)
    tot.scatter_add_(0, cid, per)  # bits of each chunk's nonzeros; its trailing run follows
    off = torch.cumsum(per, 0) - per - (torch.cumsum(tot, 0) - tot)[cid]
    tv, tl_ = _eg(s["trail"], kr[s["trail_cid"]])
    return (
        bits,
        orders,
        (
            torch.cat([rv, cv, vv, tv]),
            torch.cat([rl, cl, vl, tl_]),
            torch.cat([off, (off + rl)[emit], (off + rl + cl_all)[big], tot[s["trail_cid"]]]),
            torch.cat([cid, cid[emit], cid[big], s["trail_cid"]]),
        ),
    )


# ---------------------------------------------------------------- encode: scatter the codes


@triton.jit
def _bswap32(w):
    """The byte order of the 32 bits held in uint64 ``w`` reversed (stream bytes <-> int32 words
    on this little-endian layout)."""
    return ((w & 0xFF) << 24) | ((w & 0xFF00) << 8) | ((w >> 8) & 0xFF00) | ((w >> 24) & 0xFF)


@triton.jit
def _or_codes(out_ptr, val, ln, pos, m):
    """OR codes (``ln`` <= 63 bits of ``val``) into the stream at bit ``pos``, MSB first.

    ``out`` is int32 words in memory order; stream bit p is bit 7 - p % 8 of byte p // 8, so each
    32-bit big-endian piece is byte-swapped before the atomic OR (atomics: neighbouring codes, and
    neighbouring chunks, may share a word).
    """
    val = val.to(tl.uint64)
    w0 = pos >> 5
    e = (pos & 31) + ln  # end of the code, in bits from the start of word w0: 1..94
    for j in tl.static_range(3):
        sh = e - 32 - 32 * j
        right = val >> tl.minimum(tl.maximum(sh, 0), 63).to(tl.uint64)
        left = val << tl.minimum(tl.maximum(-sh, 0), 63).to(tl.uint64)
        word = _bswap32(tl.where(sh >= 0, right, left) & 0xFFFFFFFF)
        word32 = word.to(tl.uint32).to(tl.int32, bitcast=True)
        # relaxed: the ORs commute, and nothing reads the words before the kernel ends
        tl.atomic_or(out_ptr + w0 + j, word32, mask=m & (32 * j < e), sem="relaxed")


@triton.jit
def _put_codes_kernel(val_ptr, len_ptr, pos_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Write code i (``len[i]`` bits of ``val[i]``) at bit ``pos[i]``: the zero-run mode's codes."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    val = tl.load(val_ptr + offs, mask=m, other=0)
    ln = tl.load(len_ptr + offs, mask=m, other=0)
    pos = tl.load(pos_ptr + offs, mask=m, other=0)
    _or_codes(out_ptr, val, ln, pos, m)


# ---------------------------------------------------------------- plain mode: fused kernels
#
# One program per chunk reads the int32 levels directly: no per-element temporaries in global
# memory. Stats: for k="auto" the total length of every order is summed over the chunk, for
# k = 0..bitlen(max u) only (above that every code is k + 1 bits long, so the total grows with k
# and cannot be the first minimum); ties go to the smaller order, as in ``cpu._best_order``.


@triton.jit
def _bitlen(x):
    """Bit length of integers below 2^53 (0 for 0): float64's exponent, exact in that range."""
    e = (x.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1022
    return tl.maximum(e, 0)


@triton.jit
def _zigzag_u(q):
    """|q| to the unsigned EG symbol: 2q - 1 for q > 0, -2q otherwise (int64)."""
    a = q.to(tl.int64)
    return tl.where(a > 0, 2 * a - 1, -2 * a)


@triton.jit
def _plain_stats_kernel(q_ptr, bits_ptr, ord_ptr, n, chunk, k_fixed, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, n)
    offs = tl.arange(0, BLOCK)
    kmin = k_fixed + tl.zeros((), tl.int64)  # int64 whether k_fixed came typed or constant
    kmax = kmin
    if kmin < 0:
        top = tl.zeros((BLOCK,), tl.int64)
        for start in range(lo, hi, BLOCK):
            i = start + offs
            top = tl.maximum(top, _zigzag_u(tl.load(q_ptr + i, mask=i < hi, other=0)))
        kmin = tl.zeros((), tl.int64)
        kmax = tl.minimum(_bitlen(tl.max(top, axis=0)), _MAX_K)
    best = tl.full((), -1, tl.int64)
    best_k = kmin
    for k in range(kmin, kmax + 1):
        one_k = tl.full((), 1, tl.int64) << k
        acc = tl.zeros((BLOCK,), tl.int64)
        for start in range(lo, hi, BLOCK):
            i = start + offs
            m = i < hi
            u = _zigzag_u(tl.load(q_ptr + i, mask=m, other=0))
            acc += tl.where(m, _bitlen(u + one_k), 0)
        cost = 2 * tl.sum(acc, axis=0) - (hi - lo) * (k + 1)
        better = (best < 0) | (cost < best)
        best = tl.where(better, cost, best)
        best_k = tl.where(better, k, best_k)
    tl.store(bits_ptr + c, best)
    tl.store(ord_ptr + 3 * c, best_k.to(tl.uint8))


@triton.jit
def _plain_write_kernel(q_ptr, start_ptr, ord_ptr, out_ptr, n, chunk, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, n)
    offs = tl.arange(0, BLOCK)
    k = tl.load(ord_ptr + 3 * c).to(tl.int64)
    pos = tl.load(start_ptr + c) * 8
    for start in range(lo, hi, BLOCK):
        i = start + offs
        m = i < hi
        val = _zigzag_u(tl.load(q_ptr + i, mask=m, other=0)) + (tl.full((), 1, tl.int64) << k)
        ln = tl.where(m, 2 * _bitlen(val) - k - 1, 0).to(tl.int32)  # a block's bits fit int32
        ends = tl.cumsum(ln, axis=0)
        _or_codes(out_ptr, val, ln, pos + (ends - ln).to(tl.int64), m)
        pos += tl.sum(ln, axis=0).to(tl.int64)


def _chunk_block(chunk: int) -> int:
    """Elements a plain-mode program handles at once: the chunk, up to _BLOCK."""
    return max(16, min(_BLOCK, triton.next_power_of_2(chunk)))


def _plain_stats(flat: torch.Tensor, chunk: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    nchunks = -(-flat.numel() // chunk)
    bits = torch.empty(nchunks, dtype=torch.int64, device=flat.device)
    orders = torch.zeros((nchunks, 3), dtype=torch.uint8, device=flat.device)
    if nchunks:
        _plain_stats_kernel[(nchunks,)](
            flat, bits, orders, flat.numel(), chunk, k, BLOCK=_chunk_block(chunk), num_warps=4
        )
    return bits, orders


def _starts(bits: torch.Tensor) -> torch.Tensor:
    nb = (bits + 7) // 8
    return torch.cumsum(nb, 0) - nb


def _slices(flat: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Chunk-aligned element ranges holding ~SLICE_ELEMS nonzeros each on average: the zero-run
    planner's temporaries grow with the nonzeros, and every extra slice costs a second planning
    pass (docs/codec.md, GPU results)."""
    n = flat.numel()
    nnz = int(torch.count_nonzero(flat)) if n else 0
    per = SLICE_ELEMS * n // max(nnz, 1) if nnz else n
    step = chunk * max(1, min(n, max(SLICE_ELEMS, per)) // chunk)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]


def encode(
    flat: torch.Tensor, chunk: int, runs: bool, ks: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload uint8, chunk bits int64, orders uint8 (nchunks, 3)), same bytes as cpu.encode."""
    _check_range(flat)
    if runs:
        return _encode_runs(flat, chunk, ks)
    bits, orders = _plain_stats(flat, chunk, ks[0])
    words, total = _zeroed_payload(bits)
    if bits.numel():
        _plain_write_kernel[(bits.numel(),)](
            flat, _starts(bits), orders, words, flat.numel(), chunk, BLOCK=_chunk_block(chunk)
        )
    return words.view(torch.uint8)[:total].clone(), bits, orders


def _zeroed_payload(bits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Zeroed int32 words for the codes to be ORed into, and the payload's size in bytes."""
    total = int(((bits + 7) // 8).sum()) if bits.numel() else 0
    return torch.zeros(total // 4 + 2, dtype=torch.int32, device=bits.device), total


def _encode_runs(flat: torch.Tensor, chunk: int, ks: tuple[int, int, int]):
    """Zero-run mode: torch ops plan every code; inputs with more than ~SLICE_ELEMS nonzeros are
    planned slice by slice twice (once for the chunk sizes, once for the codes) rather than
    holding every code's temporaries at once."""
    parts = _slices(flat, chunk)
    if len(parts) == 1:
        bits, orders, codes = _plan_runs(flat, chunk, ks)
    else:
        bits, orders = _runs_stats(flat, chunk, ks, parts)
    words, total = _zeroed_payload(bits)
    start_bits = _starts(bits) * 8
    for lo, hi in parts:
        if len(parts) > 1:
            _, _, codes = _plan_runs(flat[lo:hi], chunk, ks)
        val, ln, off, cid = codes
        if not val.numel():
            continue
        pos = start_bits[lo // chunk + cid] + off
        grid = (triton.cdiv(val.numel(), _BLOCK),)
        _put_codes_kernel[grid](val, ln, pos, words, val.numel(), BLOCK=_BLOCK)
    return words.view(torch.uint8)[:total].clone(), bits, orders


# ---------------------------------------------------------------- decode
#
# Decoding is sequential inside a chunk (a code's position depends on all before it). Plain
# mode: one lane per chunk, 32 chunks per warp. Zero-run mode (few codes per element at its
# rates): one program per chunk.


@triton.jit
def _code_at(w, k):
    """(u, length, ok) of the EG_k code at the top of the 64-bit window ``w`` (uint64)."""
    hi = w >> 32
    z = tl.where(hi != 0, 32 - _bitlen(hi), 64 - _bitlen(w & 0xFFFFFFFF))  # leading zeros
    ok = z + k <= 31
    ln = tl.where(ok, 2 * z + k + 1, 1)
    u = (w >> (64 - ln).to(tl.uint64)) - (tl.full((), 1, tl.uint64) << k.to(tl.uint64))
    ok = ok & (u <= _MAX_U)
    return u.to(tl.int64), ln, ok


@triton.jit
def _read_code(data_ptr, pos, k):
    """(u, length, ok) of the EG_k code at bit pos (9 bytes read: the payload is padded)."""
    p = pos >> 3
    s = (pos & 7).to(tl.uint64)
    offs = tl.arange(0, 8)
    b = tl.load(data_ptr + p + offs).to(tl.uint64)
    w = tl.sum(b << ((7 - offs) * 8).to(tl.uint64), axis=0)  # disjoint bytes: sum == OR
    nxt = tl.load(data_ptr + p + 8).to(tl.uint64)
    return _code_at((w << s) | (nxt >> (8 - s)), k)


@triton.jit
def _big_endian_word(words_ptr, i, m):
    """Word i of the stream as a uint64 holding its 32 bits, first stream bit most significant."""
    return _bswap32(
        tl.load(words_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    )


@triton.jit
def _decode_plain_kernel(
    words_ptr,
    out_ptr,
    start_ptr,
    bits_ptr,
    ord_ptr,
    err_ptr,
    n,
    chunk,
    nchunks,
    LANES: tl.constexpr,
):
    """One lane per chunk. Each lane holds the three words (a, b, c) under its read position and
    loads the fourth (d) one code ahead, so a code's decode never waits on memory unless it
    crosses two word boundaries at once (rare: codes of 33 bits or more)."""
    c = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = c < nchunks
    lo = c * chunk
    cnt = tl.where(live, tl.minimum(lo + chunk, n) - lo, 0)
    pos = tl.load(start_ptr + c, mask=live, other=0) * 8
    end = pos + tl.load(bits_ptr + c, mask=live, other=0)
    k = tl.load(ord_ptr + 3 * c, mask=live, other=0).to(tl.int64)
    err = tl.zeros((LANES,), tl.int32)
    wi = pos >> 5
    wa = _big_endian_word(words_ptr, wi, live)
    wb = _big_endian_word(words_ptr, wi + 1, live)
    wc = _big_endian_word(words_ptr, wi + 2, live)
    for j in range(0, tl.max(cnt, axis=0)):
        act = (j < cnt) & (err == 0)
        wd = _big_endian_word(words_ptr, wi + 3, act)
        s = (pos & 31).to(tl.uint64)
        u, ln, ok = _code_at((((wa << 32) | wb) << s) | (wc >> (32 - s)), k)
        err = tl.where(act & (pos > end), _E_END, err)
        err = tl.where(act & (err == 0) & (ok == 0), _E_PREFIX, err)
        good = act & (err == 0)
        h = (u + 1) >> 1
        tl.store(out_ptr + lo + j, tl.where((u & 1) != 0, h, -h).to(tl.int32), mask=good)
        pos = tl.where(good, pos + ln, pos)
        step = (pos >> 5) - wi  # words passed: 0, 1 or 2 ((pos & 31) + ln <= 94)
        we = _big_endian_word(words_ptr, wi + 4, good & (step == 2))
        wa = tl.where(step == 0, wa, tl.where(step == 1, wb, wc))
        wb = tl.where(step == 0, wb, tl.where(step == 1, wc, wd))
        wc = tl.where(step == 0, wc, tl.where(step == 1, wd, we))
        wi += step
    err = tl.where(live & (err == 0) & (pos != end), _E_END, err)
    # the last byte's padding bits must be zero
    last = tl.load(words_ptr + (end >> 5), mask=live, other=0).to(tl.uint32, bitcast=True)
    byte = ((last >> (8 * ((end >> 3) & 3)).to(tl.uint32)) & 0xFF).to(tl.int64)
    tail = end & 7
    bad_pad = (tail != 0) & ((byte & ((1 << (8 - tail)) - 1)) != 0)
    err = tl.where(live & (err == 0) & bad_pad, _E_PAD, err)
    tl.store(err_ptr + c, err, mask=live)


@triton.jit
def _decode_runs_kernel(
    data_ptr,
    out_ptr,
    start_ptr,
    bits_ptr,
    ord_ptr,
    err_ptr,
    n,
    chunk,
):
    c = tl.program_id(0).to(tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, n)
    pos = tl.load(start_ptr + c) * 8
    end = pos + tl.load(bits_ptr + c)
    k0 = tl.load(ord_ptr + 3 * c).to(tl.int64)
    err = tl.zeros((), tl.int32)
    i = lo
    k1 = tl.load(ord_ptr + 3 * c + 1).to(tl.int64)
    k2 = tl.load(ord_ptr + 3 * c + 2).to(tl.int64)
    ones = tl.full((), -1, tl.int64)
    while (i < hi) & (err == 0):
        r, ln, ok = _read_code(data_ptr, pos, k0)
        if pos > end:
            err = tl.full((), _E_END, tl.int32)
        elif ok == 0:
            err = tl.full((), _E_PREFIX, tl.int32)
        elif r > hi - i:
            err = tl.full((), _E_RUN, tl.int32)
        else:
            pos += ln
            i += r
            if i < hi:
                byte = tl.load(data_ptr + (pos >> 3)).to(tl.int64)
                neg = (byte >> (7 - (pos & 7))) & 1
                pos += 1
                if ones < 0:
                    cnt, ln2, ok2 = _read_code(data_ptr, pos, k1)
                    if ok2 == 0:
                        err = tl.full((), _E_PREFIX, tl.int32)
                    elif cnt > hi - i:
                        err = tl.full((), _E_RUN, tl.int32)
                    else:
                        pos += ln2
                        ones = cnt
                m = tl.full((), 1, tl.int64)
                if err == 0:
                    if ones > 0:
                        ones -= 1
                    else:
                        v, ln3, ok3 = _read_code(data_ptr, pos, k2)
                        if (ok3 == 0) | (v > _MAX_BIG):
                            err = tl.full((), _E_VALUE, tl.int32)
                        else:
                            pos += ln3
                            m = v + 2
                            ones = tl.full((), -1, tl.int64)
                if err == 0:
                    tl.store(out_ptr + i, tl.where(neg != 0, -m, m).to(tl.int32))
                    i += 1
    if (err == 0) & (ones > 0):
        err = tl.full((), _E_RUN, tl.int32)
    if (err == 0) & (pos != end):
        err = tl.full((), _E_END, tl.int32)
    if (err == 0) & ((end & 7) != 0):
        last = tl.load(data_ptr + (end >> 3)).to(tl.int64)
        if (last & ((1 << (8 - (end & 7))) - 1)) != 0:
            err = tl.full((), _E_PAD, tl.int32)
    tl.store(err_ptr + c, err)


def decode(stream) -> torch.Tensor:
    """int32 tensor of stream.numel values on the stream's device; ValueError if corrupt."""
    dev = stream.data.device
    out = torch.zeros(stream.numel, dtype=torch.int32, device=dev)
    nchunks = stream.nchunks
    if nchunks == 0:
        return out
    pad = PAD + (-stream.data.numel()) % 4  # whole, aligned int32 words for the plain decoder
    data = torch.cat([stream.data, torch.zeros(pad, dtype=torch.uint8, device=dev)])
    bits = stream.chunk_bits.to(device=dev, dtype=torch.int64)
    starts = _starts(bits)
    orders = stream.orders.to(device=dev, dtype=torch.uint8).contiguous()
    errs = torch.zeros(nchunks, dtype=torch.int32, device=dev)
    args = (out, starts, bits, orders, errs, stream.numel, stream.chunk_size)
    if stream.runs:
        # scalar code: one warp per chunk leaves room for more chunks per SM
        _decode_runs_kernel[(nchunks,)](data, *args, num_warps=1)
    else:
        grid = (triton.cdiv(nchunks, _LANES),)
        _decode_plain_kernel[grid](
            data.view(torch.int32), *args, nchunks, LANES=_LANES, num_warps=1
        )
    bad = torch.nonzero(errs).flatten()
    if bad.numel():
        c = int(bad[0])
        raise ValueError(f"cannot decode: {error_message(int(errs[c]), c)}")
    return out
