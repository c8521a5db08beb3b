"""The operations of the compressed all-reduce, each as a torch reference and a fused CPU kernel.

Every operation exists twice: a torch version (any device; what CUDA tensors run, with the
codec's Triton kernels for the coding) and a numba version for CPU tensors that fuses the
passes (``kernels.py``). Both compute the same float32 values in the same order, so a CPU and
a CUDA rank agree bit for bit; tests compare each pair.

====================  ===========================  =========================================
operation             torch reference              CPU kernel
====================  ===========================  =========================================
statistics (step 1)   ``add_and_block_stats_torch``  ``kernels.add_and_block_stats``
steps (step 2)        ``block_steps_torch``        ``kernels.block_steps``
quantize + code (3)   ``quantize_torch`` + codec   ``kernels.quantize_encode``
decode + add (5)      ``codec.eg_decode`` + add    ``kernels.decode_add`` / ``codec.chunks``
dequantize (5)        ``dequantize_torch``         ``kernels.dequantize_into`` (or fused in
                                                   the last decode)
level histogram       ``torch.bincount``           ``kernels.level_histogram``
(sampled calls)
====================  ===========================  =========================================

Wire streams always carry the codec's CRC-32 (``WIRE_CHECKSUM``) and receivers require it: a
flipped bit is refused instead of giving different gradients on different ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import codec
from ..codec import chunks
from . import kernels
from .kernels import MAX_LEVEL
from .rdoq import quantize_rdoq
from .state import GCTState

EMPTY_F32 = np.empty(0, dtype=np.float32)
WIRE_CHECKSUM = True  # every stream on the wire carries, and every receiver requires, a CRC-32
FUSED_CPU = True  # False: CPU tensors take the torch path too (tests run it without a GPU)


def fused(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the fused CPU kernels (else the torch reference path)."""
    return FUSED_CPU and t.device.type == "cpu"


# ---- statistics (step 1) ---------------------------------------------------------------------
def add_and_block_stats(
    state: GCTState, flat: torch.Tensor, residual: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """What to quantize, the per-block message [rms, amax, non-finite flag] of v = flat +
    residual (zeros but the flag when v holds an inf or NaN), and the sum of v^2 (a statistic;
    None off the CPU, where the quantizer takes it).

    On the CPU one pass that does not store v: it returns ``flat`` as float32 (the quantize
    pass adds the residual again, cheaper than writing v and reading it back); elsewhere v
    itself, from torch ops."""
    n = flat.numel()
    nb = -(-n // block)
    msg = torch.empty(2 * nb + 1, dtype=torch.float32, device=flat.device)
    if fused(flat):
        x = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        res = residual.contiguous().numpy() if residual is not None else EMPTY_F32
        m = msg.numpy()
        vb = state.workspace("block", block, torch.float32).numpy()
        v_sq = kernels.add_and_block_stats(x.numpy(), res, block, vb, m[:nb], m[nb : 2 * nb])
        nonfinite = not np.isfinite(v_sq)
    else:
        x, rms, amax, nonfinite = add_and_block_stats_torch(flat, residual, block)
        msg[:nb], msg[nb : 2 * nb] = rms, amax
        v_sq = None
    if nonfinite:
        msg.zero_()
    msg[-1] = 1.0 if nonfinite else 0.0
    return x, msg, v_sq


def add_and_block_stats_torch(
    flat: torch.Tensor, residual: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """v = flat + residual (float32), its per-block RMS and max |v|, and whether v holds an inf
    or NaN. The sums of squares are float64, as the CPU kernel takes them (float32 squares are
    exact in float64), so both round the same RMS."""
    v = flat.to(torch.float32, copy=True)
    if residual is not None:
        v += residual
    full, tail = blocks(v, block)
    amax = full.abs().amax(1)  # NaN propagates through amax; inf shows as inf
    ms = full.double().square().sum(1) / block
    if tail is not None:
        amax = torch.cat([amax, tail.abs().amax().view(1)])
        ms = torch.cat([ms, (tail.double().square().sum() / tail.numel()).view(1)])
    nonfinite = not bool(torch.isfinite(amax.max()))
    return v, ms.sqrt_().float(), amax, nonfinite


def blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full blocks of ``x`` as a (nb, block) view, and the shorter tail (or None)."""
    nfull = x.numel() // block
    tail = x[nfull * block :]
    return x[: nfull * block].view(nfull, block), (tail if tail.numel() else None)


# ---- steps (step 2) --------------------------------------------------------------------------
def block_steps(state: GCTState, rms: torch.Tensor, amax: torch.Tensor, world: int):
    """One quantization step per block from the per-block RMS and max |v| every rank holds
    alike after the agreement, so every rank derives the same steps; coarsened where the
    integer sums over ``world`` ranks could outgrow the codec. On the CPU one numba call
    instead of several torch ops on small tensors; the same float32 results."""
    if not fused(rms):
        return block_steps_torch(state, rms, amax, world)
    steps = torch.empty_like(rms)
    kernels.block_steps(
        rms.contiguous().numpy(),
        amax.contiguous().numpy(),
        state.cfg.step_mode == "relative",
        float(state.cfg.quant_step),
        world,
        steps.numpy(),
    )
    return steps


def block_steps_torch(state: GCTState, rms: torch.Tensor, amax: torch.Tensor, world: int):
    """``block_steps`` with torch ops (any device)."""
    cfg = state.cfg
    if cfg.step_mode == "relative":
        steps = rms * cfg.quant_step
    else:
        steps = torch.full_like(rms, cfg.quant_step)
    steps = torch.where(steps > 0, steps, torch.ones_like(steps))  # all-zero block: any step
    steps = torch.maximum(steps, amax * (world / MAX_LEVEL))
    return torch.where(torch.isfinite(steps), steps, torch.full_like(steps, 3e38))


# ---- quantize + code (step 3) ----------------------------------------------------------------
NARROW_BOUND = 120.0  # max |v| / step below this: every level fits int8 (|level| <= that + 1)


def level_buffer(
    state: GCTState, n: int, amax: torch.Tensor, steps: torch.Tensor, narrow: bool
) -> torch.Tensor:
    """The CPU buffer of a call's levels (reused; used up before the call returns): int8 when
    ``narrow`` (only this rank's levels go in, no sums) and every level fits, else int32.

    Why: it is written by the quantize pass and read back by the decode, and on ranks sharing
    memory bandwidth that traffic is a real part of the call; int8 moves a quarter. With
    relative steps it nearly always fits: a block's max |v| is at most sqrt(block) times its
    RMS (64 for 4096-element blocks), so levels stay below ~64 / quant_step + 1.
    """
    if narrow and bool((amax / steps).max() < NARROW_BOUND):
        return state.workspace("levels8", n, torch.int8)
    return state.workspace("levels", n, torch.int32)


def rdoq_order(state: GCTState) -> int:
    """The Exp-Golomb order RDOQ's rate model assumes (0 with per-chunk orders)."""
    k = state.cfg.eg_order
    return k if isinstance(k, int) else 0


def quantize_encode(
    state: GCTState,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    steps: torch.Tensor,
    block: int,
    err: torch.Tensor | None,
    bounds: list[int],
    skip: int,
) -> tuple[torch.Tensor, torch.Tensor | None, float, float | None, list[torch.Tensor | None]]:
    """Levels q of v = x + residual (on the CPU x excludes the residual; elsewhere it is v),
    the new residual ``v - q * step`` and the coded segments ``bounds[r]:bounds[r + 1]`` (None
    for ``skip``), each a wire stream (``encode_levels``'s bytes).

    On the CPU one fused pass writing the new residual into ``err`` (never the live residual:
    the call may still fail); elsewhere torch ops and the codec. Returns (q, new residual or
    None without error feedback, sum of err^2, sum of v^2 or None, coded)."""
    if not fused(x):
        q, new, err_sq, sig_sq = quantize_torch(state, x, steps, block)
        coded = [
            encode_levels(q[bounds[r] : bounds[r + 1]], state) if r != skip else None
            for r in range(len(bounds) - 1)
        ]
        return q, new, err_sq, sig_sq, coded
    cfg = state.cfg
    n = x.numel()
    q = state.workspace("levels", n, torch.int32)  # used up before this call returns
    if err is None:
        err = state.workspace("err", n, torch.float32)
    chunk = codec.DEFAULT_CHUNK
    nseg = len(bounds) - 1
    heads = [chunks.head_size(-(-(bounds[r + 1] - bounds[r]) // chunk)) for r in range(nseg)]
    out = np.empty(sum(heads) + chunks.code_bound(n, nseg), np.uint8)
    k = rdoq_order(state)
    seg_bytes, bits, orders, code, err_sq = kernels.quantize_encode(
        x.numpy(),
        residual.numpy() if residual is not None else EMPTY_F32,
        steps.contiguous().numpy(),
        block,
        float(cfg.rdoq_mu),
        k,
        bool(cfg.zero_runs),
        kernels.rdoq_thresholds(cfg.rdoq_mu, k, cfg.zero_runs),
        np.asarray(bounds, np.int64),
        skip,
        chunk,
        np.asarray(chunks.kernel_orders(cfg.eg_order, cfg.zero_runs), np.int64),
        state.workspace("block", block, torch.float32).numpy(),
        q.numpy(),
        err.numpy(),
        out[sum(heads) :],
    )
    if code != 0:
        raise ValueError(f"cannot encode the levels: {chunks.error_message(code)}")
    coded: list[torch.Tensor | None] = []
    c = 0
    kk = chunks.stream_k(cfg.eg_order, cfg.zero_runs)
    for r in range(nseg):
        if r == skip:
            coded.append(None)
            continue
        numel = bounds[r + 1] - bounds[r]
        nch = -(-numel // chunk)
        lo, hi = sum(heads) + seg_bytes[r], sum(heads) + seg_bytes[r + 1]
        if nseg == 1:  # the payload follows the room left for its header: no copy
            stream = out[: heads[0] + hi - lo]
        else:  # the stream: header and tables, then the payload the kernel wrote
            stream = np.empty(heads[r] + hi - lo, np.uint8)
            stream[heads[r] :] = out[lo:hi]
        chunks.write_stream_head(
            stream, numel, kk, cfg.zero_runs, bits[c : c + nch], orders[c : c + nch], hi - lo,
            checksum=WIRE_CHECKSUM,
        )  # fmt: skip
        coded.append(torch.from_numpy(stream))
        c += nch
    return q, err if cfg.error_feedback else None, float(err_sq), None, coded


def quantize_torch(state: GCTState, v: torch.Tensor, steps: torch.Tensor, block: int):
    """Torch ops (the non-CPU path; on the CPU the reference the fused kernel is tested
    against): levels q (int32), the new residual ``v - q * step`` (None without error feedback),
    and the sums of err^2 and v^2 (statistics)."""
    cfg = state.cfg
    n = v.numel()
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    q = quantize_rdoq(v, step, cfg.rdoq_mu, rdoq_order(state), cfg.zero_runs)
    err = v - q.to(torch.float32) * step
    return (q, err if cfg.error_feedback else None, *square_sums(v, err))


def square_sums(v: torch.Tensor, err: torch.Tensor) -> tuple[float, float]:
    """Sum of err^2 and of v^2 (statistics): BLAS dot products."""
    return float(torch.dot(err, err)), float(torch.dot(v, v))


def encode_levels(q: torch.Tensor, state: GCTState) -> torch.Tensor:
    """The wire stream of int32 levels: the codec's self-describing bytes with the CRC-32."""
    stream = codec.eg_encode(q, k=state.cfg.eg_order, runs=state.cfg.zero_runs)
    return stream.to_tensor(checksum=WIRE_CHECKSUM)


# ---- entropy of the coded levels (sampled calls) ---------------------------------------------
def level_counts(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The histogram of the integer levels in ``parts`` taken together: how often each value
    that occurs does, in ascending order of value (int64, CPU), as ``codec.empirical_entropy``
    counts them. On the CPU one numba pass (levels within +-``kernels.HIST_K`` binned, the
    rare others counted exactly by a second pass); elsewhere ``torch.bincount``."""
    parts = [p.reshape(-1) for p in parts if p.numel()]
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    if not all(fused(p) for p in parts):
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo < (1 << 24):
            counts = torch.bincount(flat.to(torch.int64) - lo)
        else:
            counts = torch.unique(flat, return_counts=True)[1]
        return counts[counts > 0].cpu()
    k = kernels.HIST_K
    binned = np.zeros(2 * k + 1, np.int64)
    outside = sum(kernels.level_histogram(p.numpy(), binned) for p in parts)
    below = above = np.zeros(0, np.int64)
    if outside:
        wide = np.empty(outside, np.int64)
        m = 0
        for p in parts:
            m = kernels.outside_levels(p.numpy(), wide, m)
        values, n_wide = np.unique(wide, return_counts=True)
        below, above = n_wide[values < -k], n_wide[values > k]
    counts = np.concatenate([below, binned[binned > 0], above]).astype(np.int64)
    return torch.from_numpy(counts)


def level_entropy(counts: torch.Tensor) -> float:
    """The empirical entropy in bits per element of the histogram ``counts`` (``level_counts``;
    0 for none), computed as ``codec.empirical_entropy`` computes it and on the CPU, so every
    device gives the same value for the same levels, and the CPU that function's value."""
    n = int(counts.sum())
    if n == 0:
        return 0.0
    p = counts.to(torch.float64) / n
    return float(-(p * torch.log2(p)).sum())


def entropy_bits(counts: torch.Tensor) -> float:
    """Elements x ``level_entropy``: what an ideal coder of the histogram's distribution would
    spend on those levels."""
    return int(counts.sum()) * level_entropy(counts)


# ---- decode + add, dequantize (step 5) -------------------------------------------------------
def with_slack(n: int, dev: torch.device) -> torch.Tensor:
    """An uninitialized uint8 buffer of n bytes followed by ``chunks.PAD`` zero bytes (the CPU
    decoder reads ahead)."""
    buf = torch.empty(n + chunks.PAD, dtype=torch.uint8, device=dev)
    buf[n:].zero_()
    return buf


def decode_add(buf: torch.Tensor, offset: int, length: int, q: torch.Tensor, finish=None) -> None:
    """q += the levels of the wire stream at ``buf[offset:offset + length]`` (a buffer from
    ``with_slack``, or one with at least ``chunks.PAD`` bytes after the stream); ValueError if
    it is malformed, fails its checksum or does not match q.

    ``finish = (steps, block, world, average, out)``: instead of storing the sums in q, write
    them dequantized into ``out`` (float32), as ``dequantize`` would (CPU: in the same pass)."""
    stream = chunks.read_stream(
        buf[offset : offset + length], q.numel(), require_checksum=WIRE_CHECKSUM
    )
    if not fused(q):
        q += codec.eg_decode(stream, validate=False)
        if finish is not None:
            steps, block, world, average, out = finish
            out.copy_(dequantize_torch(q, steps, block, world, average))
        return
    bits = stream.chunk_bits.numpy()
    payload = offset + length - stream.data.numel()
    data = buf.numpy()[payload : offset + length + chunks.PAD]
    steps, block, world, average, out = finish or (None, 1, 1, False, None)
    code, c = kernels.decode_add(
        data,
        stream.chunk_size,
        stream.runs,
        bits,
        stream.orders.contiguous().numpy(),
        chunks.chunk_starts(bits),
        q.numpy(),
        finish is not None,
        steps.contiguous().numpy() if finish else EMPTY_F32,
        block,
        world,
        average,
        out.numpy() if finish else EMPTY_F32,
    )
    if code != 0:
        raise ValueError(f"cannot decode a received stream: {chunks.error_message(code, c)}")


def dequantize(
    sums: torch.Tensor, steps: torch.Tensor, block: int, world: int, average: bool, out
) -> torch.Tensor:
    """The float32 result ``sums * step`` (/ world), identical on every rank; written into
    ``out`` when it is a float32 CPU tensor (saves a pass), else returned."""
    if not fused(sums):
        return dequantize_torch(sums, steps, block, world, average)
    if out is None or out.dtype != torch.float32:
        out = torch.empty(sums.numel(), dtype=torch.float32)
    kernels.dequantize_into(
        sums.numpy(), steps.contiguous().numpy(), block, world, average, out.numpy()
    )
    return out


def dequantize_torch(
    sums: torch.Tensor, steps: torch.Tensor, block: int, world: int, average: bool
) -> torch.Tensor:
    """``dequantize`` with torch ops (any device)."""
    n = sums.numel()
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    out = sums.to(torch.float32) * step
    if average:
        out /= world
    return out
