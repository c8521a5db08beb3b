"""GPU backend: the same bit format as ``cpu.py``, for CUDA tensors (Triton + torch ops).

Encode is data-parallel over codes: torch ops build every code's symbol (plain: one per element;
zero-run mode: run, sign, ones-count, big value, in stream order) and the per-chunk length of
every order from a (bit length, leading ones) histogram, exactly as the numba kernel does, so
both backends pick the same orders; an exclusive prefix sum of code lengths gives each code's
bit position, and a Triton kernel ORs the codes into 32-bit words with atomics (chunks start on
byte boundaries, so neighbouring chunks may share a word; the atomics make that safe).

Decode is sequential inside a chunk (a code's position depends on all before it), parallel over
chunks: one Triton program per chunk, with the same checks as the numba decoder (every read stays
inside the padded payload, codes and runs are range checked, each chunk must end exactly at its
recorded length with zero padding).

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
_E_END = tl.constexpr(E_END)
_E_PAD = tl.constexpr(E_PAD)
_E_PREFIX = tl.constexpr(E_PREFIX)
_E_RUN = tl.constexpr(E_RUN)
_E_VALUE = tl.constexpr(E_VALUE)

_NB = 33  # bit lengths 0..32
_NO = 34  # leading-ones counts 0..33
_BLOCK = 1024
SLICE_ELEMS = 1 << 24  # elements planned at once (~80 bytes of temporaries per element)


# ---------------------------------------------------------------- statistics (torch ops)


def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 values below 2^53 (exact through float64's exponent)."""
    return torch.frexp(x.to(torch.float64))[1].to(torch.int64)


def _order_costs(x: torch.Tensor, cid: torch.Tensor, nchunks: int) -> torch.Tensor:
    """[nchunks, 32] total EG_k length of the symbols x (chunk ids cid), for k = 0..31.

    Same (bit length, leading ones) histogram and formula as ``cpu._best_order``.
    """
    dev = x.device
    b = _bitlen(x)
    ones = b - _bitlen(x ^ ((1 << b) - 1))
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


def _zigzag(q: torch.Tensor) -> torch.Tensor:
    a = q.to(torch.int64)
    return torch.where(a > 0, 2 * a - 1, -2 * a)


def _run_symbols(q: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """The zero-run mode symbols of flat q, each with its chunk id and stream sort key."""
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
    run = pos - prev - 1
    prevbig = torch.zeros_like(big)
    prevbig[1:] = big[:-1]
    emit = ~same | prevbig  # a ones-count precedes the chunk's first nonzero and follows a big one
    # ones-count at j: |q| == 1 nonzeros from j up to the next big one or the chunk's last nonzero
    ones_cs = torch.cumsum((m == 1).to(torch.int64), 0)
    ones_ex = ones_cs - (m == 1).to(torch.int64)
    j = torch.arange(pos.numel(), device=dev)
    bigidx = torch.nonzero(big).flatten()
    sentinel = torch.full((1,), pos.numel(), dtype=bigidx.dtype, device=dev)
    nbpos = torch.cat([bigidx, sentinel])[torch.searchsorted(bigidx, j)]  # next big at or after j
    chunk_end = torch.searchsorted(cid, cid, right=True)  # one past the chunk's last nonzero
    stop = torch.minimum(nbpos, chunk_end)
    count = torch.where(stop > j, ones_cs[(stop - 1).clamp(min=0)] - ones_ex, 0)
    # trailing zero run of each chunk
    hi = torch.clamp((torch.arange(nchunks, device=dev) + 1) * chunk, max=n)
    last = torch.arange(nchunks, device=dev) * chunk - 1
    last = last.scatter_reduce(0, cid, pos, "amax", include_self=True)
    trail = hi - 1 - last
    has_trail = trail > 0
    tc = torch.nonzero(has_trail).flatten()
    return {
        "run": torch.cat([run, trail[tc]]),
        "run_cid": torch.cat([cid, tc]),
        "run_key": torch.cat([pos * 5, (hi[tc] - 1) * 5 + 4]),
        "sign": (a < 0).to(torch.int64),
        "sign_cid": cid,
        "sign_key": pos * 5 + 1,
        "count": count[emit],
        "count_cid": cid[emit],
        "count_key": pos[emit] * 5 + 2,
        "big": m[big] - 2,
        "big_cid": cid[big],
        "big_key": pos[big] * 5 + 3,
        "amax": m.max() if m.numel() else torch.zeros((), dtype=torch.int64, device=dev),
    }


def _check_range(flat: torch.Tensor) -> None:
    if flat.numel() and int(flat.to(torch.int64).abs().max()) > MAX_ABS:
        raise ValueError(f"cannot encode: {error_message(E_RANGE, -1)}")


def chunk_stats(
    flat: torch.Tensor, chunk: int, runs: bool, ks: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk code bits (int64) and orders (uint8, (nchunks, 3)), as ``cpu.chunk_stats``."""
    _check_range(flat)
    out = [_plan(flat[lo:hi], chunk, runs, ks)[:2] for lo, hi in _slices(flat.numel(), chunk)]
    return torch.cat([b for b, _ in out]), torch.cat([o for _, o in out])


def _eg(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    val = x + (1 << k)
    return val, 2 * _bitlen(val) - k - 1


def _plan(flat: torch.Tensor, chunk: int, runs: bool, ks: tuple[int, int, int]):
    """(bits, orders, (values, lengths) of every code in stream order)."""
    _check_range(flat)
    dev = flat.device
    n = flat.numel()
    nchunks = -(-n // chunk)
    if not runs:
        u = _zigzag(flat)
        cid = torch.arange(n, device=dev) // chunk
        order, bits = _choose(_order_costs(u, cid, nchunks), ks[0])
        orders = torch.zeros((nchunks, 3), dtype=torch.uint8, device=dev)
        orders[:, 0] = order.to(torch.uint8)
        val, ln = _eg(u, order[cid])
        return bits, orders, (val, ln)
    s = _run_symbols(flat, chunk)
    orders = torch.zeros((nchunks, 3), dtype=torch.uint8, device=dev)
    bits = torch.bincount(s["sign_cid"], minlength=nchunks).to(torch.int64)  # sign bits
    vals, lens, keys = [s["sign"]], [torch.ones_like(s["sign"])], [s["sign_key"]]
    for col, name in enumerate(("run", "count", "big")):
        x, cid = s[name], s[name + "_cid"]
        order, b = _choose(_order_costs(x, cid, nchunks), ks[col])
        orders[:, col] = order.to(torch.uint8)
        bits += b
        val, ln = _eg(x, order[cid])
        vals.append(val)
        lens.append(ln)
        keys.append(s[name + "_key"])
    key_order = torch.argsort(torch.cat(keys))
    return bits, orders, (torch.cat(vals)[key_order], torch.cat(lens)[key_order])


# ---------------------------------------------------------------- encode: scatter the codes


@triton.jit
def _put_codes_kernel(val_ptr, len_ptr, pos_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """OR code i (len[i] <= 63 bits of val[i]) into the stream at bit pos[i], MSB first.

    ``out`` is int32 words in memory order; stream bit p is bit 7 - p % 8 of byte p // 8, so each
    32-bit big-endian piece is byte-swapped before the atomic OR.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    val = tl.load(val_ptr + offs, mask=m, other=0).to(tl.uint64)
    ln = tl.load(len_ptr + offs, mask=m, other=0)
    pos = tl.load(pos_ptr + offs, mask=m, other=0)
    w0 = pos >> 5
    e = (pos & 31) + ln  # end of the code, in bits from the start of word w0: 1..94
    for j in tl.static_range(3):
        sh = e - 32 - 32 * j
        right = val >> tl.minimum(tl.maximum(sh, 0), 63).to(tl.uint64)
        left = val << tl.minimum(tl.maximum(-sh, 0), 63).to(tl.uint64)
        word = tl.where(sh >= 0, right, left) & 0xFFFFFFFF
        word = (
            ((word & 0xFF) << 24)
            | ((word & 0xFF00) << 8)
            | ((word >> 8) & 0xFF00)
            | ((word >> 24) & 0xFF)
        )
        word32 = word.to(tl.uint32).to(tl.int32, bitcast=True)
        tl.atomic_or(out_ptr + w0 + j, word32, mask=m & (32 * j < e))


def _starts(bits: torch.Tensor) -> torch.Tensor:
    nb = (bits + 7) // 8
    return torch.cumsum(nb, 0) - nb


def _slices(n: int, chunk: int) -> list[tuple[int, int]]:
    """Chunk-aligned element ranges of at most ~SLICE_ELEMS: bounds the temporaries' memory."""
    step = chunk * max(1, SLICE_ELEMS // chunk)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]


def encode(
    flat: torch.Tensor, chunk: int, runs: bool, ks: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload uint8, chunk bits int64, orders uint8 (nchunks, 3)), same bytes as cpu.encode.

    Inputs longer than SLICE_ELEMS are planned slice by slice twice (once for the chunk sizes,
    once for the codes) rather than holding every code's temporaries at once.
    """
    dev = flat.device
    parts = _slices(flat.numel(), chunk)
    if len(parts) == 1:
        bits, orders, codes = _plan(flat, chunk, runs, ks)
    else:
        bits, orders = chunk_stats(flat, chunk, runs, ks)
    total = int(((bits + 7) // 8).sum()) if bits.numel() else 0
    words = torch.zeros(total // 4 + 2, dtype=torch.int32, device=dev)
    start_bits = _starts(bits) * 8
    for lo, hi in parts:
        if len(parts) > 1:
            _, _, codes = _plan(flat[lo:hi], chunk, runs, ks)
        val, ln = codes
        if not val.numel():
            continue
        c0 = lo // chunk
        sbits = bits[c0 : c0 + (hi - lo + chunk - 1) // chunk]
        # code position = its chunk's start + bits of the chunk's earlier codes
        before = torch.cumsum(ln, 0) - ln
        cid = _code_chunks(ln, sbits)
        chunk_base = torch.cumsum(sbits, 0) - sbits
        pos = before - chunk_base[cid] + start_bits[c0 + cid]
        grid = (triton.cdiv(val.numel(), _BLOCK),)
        _put_codes_kernel[grid](val, ln, pos, words, val.numel(), BLOCK=_BLOCK)
    return words.view(torch.uint8)[:total].clone(), bits, orders


def _code_chunks(ln: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Chunk id of each code (codes are in stream order; chunk c holds bits[c] bits of them)."""
    before = torch.cumsum(ln, 0) - ln
    bounds = torch.cumsum(bits, 0)
    return torch.searchsorted(bounds, before, right=True)


# ---------------------------------------------------------------- decode: one program per chunk


@triton.jit
def _read_code(data_ptr, pos, k):
    """(u, length, ok) of the EG_k code at bit pos (9 bytes read: the payload is padded)."""
    p = pos >> 3
    s = (pos & 7).to(tl.uint64)
    offs = tl.arange(0, 8)
    b = tl.load(data_ptr + p + offs).to(tl.uint64)
    w = tl.sum(b << ((7 - offs) * 8).to(tl.uint64), axis=0)  # disjoint bytes: sum == OR
    nxt = tl.load(data_ptr + p + 8).to(tl.uint64)
    w = (w << s) | (nxt >> (8 - s))
    # z = leading zeros of w, by binary search (inline: nested jit calls are slow to interpret)
    x = w
    z = tl.full((), 64, tl.int64)
    t = x >> 32
    z -= tl.where(t != 0, 32, 0)
    x = tl.where(t != 0, t, x)
    t = x >> 16
    z -= tl.where(t != 0, 16, 0)
    x = tl.where(t != 0, t, x)
    t = x >> 8
    z -= tl.where(t != 0, 8, 0)
    x = tl.where(t != 0, t, x)
    t = x >> 4
    z -= tl.where(t != 0, 4, 0)
    x = tl.where(t != 0, t, x)
    t = x >> 2
    z -= tl.where(t != 0, 2, 0)
    x = tl.where(t != 0, t, x)
    t = x >> 1
    z -= tl.where(t != 0, 1, 0)
    x = tl.where(t != 0, t, x)
    z -= (x != 0).to(tl.int64)
    ok = z + k <= 31
    ln = tl.where(ok, 2 * z + k + 1, 1)
    u = (w >> (64 - ln).to(tl.uint64)) - (tl.full((), 1, tl.uint64) << k.to(tl.uint64))
    ok = ok & (u <= _MAX_U)
    return u.to(tl.int64), ln, ok


@triton.jit
def _decode_kernel(
    data_ptr,
    out_ptr,
    start_ptr,
    bits_ptr,
    ord_ptr,
    err_ptr,
    n,
    chunk,
    RUNS: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, n)
    pos = tl.load(start_ptr + c) * 8
    end = pos + tl.load(bits_ptr + c)
    k0 = tl.load(ord_ptr + 3 * c).to(tl.int64)
    err = tl.zeros((), tl.int32)
    i = lo
    if not RUNS:
        while (i < hi) & (err == 0):
            u, ln, ok = _read_code(data_ptr, pos, k0)
            if pos > end:
                err = tl.full((), _E_END, tl.int32)
            elif ok == 0:
                err = tl.full((), _E_PREFIX, tl.int32)
            else:
                pos += ln
                h = (u + 1) >> 1
                tl.store(out_ptr + i, tl.where((u & 1) != 0, h, -h).to(tl.int32))
                i += 1
    else:
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
    data = torch.cat([stream.data, torch.zeros(PAD, dtype=torch.uint8, device=dev)])
    bits = stream.chunk_bits.to(device=dev, dtype=torch.int64)
    starts = _starts(bits)
    orders = stream.orders.to(device=dev, dtype=torch.uint8).contiguous()
    errs = torch.zeros(nchunks, dtype=torch.int32, device=dev)
    _decode_kernel[(nchunks,)](
        data,
        out,
        starts,
        bits,
        orders,
        errs,
        stream.numel,
        stream.chunk_size,
        RUNS=stream.runs,
        num_warps=1,  # scalar code: one warp per chunk leaves room for more chunks per SM
    )
    bad = torch.nonzero(errs).flatten()
    if bad.numel():
        c = int(bad[0])
        raise ValueError(f"cannot decode: {error_message(int(errs[c]), c)}")
    return out
