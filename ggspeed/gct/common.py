"""Pieces both step agreements of the compressed all-reduce share: the coded form of levels,
the padded all-gather of coded bytes, the torch-op quantizer of the non-CPU path, buffers."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from ..codec import api as codec_api
from ..codec import cpu as codec_cpu
from . import kernels
from .kernels import MAX_LEVEL
from .rdoq import quantize_rdoq
from .state import GCTState

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

EMPTY_F32 = np.empty(0, dtype=np.float32)
# Worst case of one element's codes (runs mode: run + sign + ones count + value, each <= 63 bits)
MAX_CODE_BYTES = 24


def code_bound(n: int, segments: int) -> int:
    """Bytes the CPU kernels may write when they code n levels in ``segments`` streams: the
    worst case (numba does not check bounds), with room for each chunk's partial last word."""
    nwords = n // codec.DEFAULT_CHUNK + segments + 1
    return MAX_CODE_BYTES * n + 8 * nwords + 64


def code_buffer(n: int, segments: int) -> np.ndarray:
    """An output buffer of ``code_bound(n, segments)`` bytes."""
    return np.empty(code_bound(n, segments), np.uint8)


def block_steps(state: GCTState, rms: torch.Tensor, amax: torch.Tensor, world: int):
    """One quantization step per block from a per-block RMS and max |v| that every rank holds
    alike (agreed, or from the previous call's headers), so every rank derives the same steps;
    coarsened where the integer sums over ``world`` ranks could outgrow the codec (``world`` 1:
    the levels of one rank). On CPU one numba call (``kernels.block_steps``) instead of ~8 torch
    ops on small tensors (~0.2 ms a call); the same float32 results as ``block_steps_torch``."""
    if rms.device.type != "cpu":
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


NARROW_BOUND = 120.0  # max |v| / step below this: every level fits int8 (|level| <= that + 1)


def level_buffer(
    state: GCTState, n: int, amax: torch.Tensor, steps: torch.Tensor, narrow: bool
) -> torch.Tensor:
    """The CPU buffer of a call's levels (reused; used up before the call returns): int8 when
    ``narrow`` (only this rank's levels go in, no sums) and every level fits, else int32.

    Why: it is written by the quantize pass and read back by the decode, and on ranks sharing
    memory bandwidth those 2 x 5 MB are a real part of the call; int8 moves a quarter. With
    relative steps it nearly always fits: a block's max |v| is at most sqrt(block) times its
    RMS (64 for 4096-element blocks), so levels stay below ~64 / quant_step + 1.
    """
    if narrow and bool((amax / steps).max() < NARROW_BOUND):
        return state.workspace("levels8", n, torch.int8)
    return state.workspace("levels", n, torch.int32)


def encode_chunk(q: torch.Tensor, state: GCTState) -> torch.Tensor:
    """EG-code an int32 chunk into a self-describing uint8 tensor (the codec's byte format)."""
    stream = codec.eg_encode(q, k=state.cfg.eg_order, runs=state.cfg.zero_runs)
    return stream.to_tensor(checksum=False)  # the transport (TCP, NCCL) already checks bytes


def decode_chunk(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_chunk`: int32 values (``from_tensor`` has validated the stream)."""
    return codec.eg_decode(codec.EGStream.from_tensor(data), validate=False)


def stream_orders(
    state: GCTState,
) -> tuple[tuple[int, int, int], int | str | tuple[int, int, int]]:
    """(the kernels' three orders, -1 = per chunk; the ``k`` an EGStream records), as
    ``codec.eg_encode`` derives them."""
    k, runs = state.cfg.eg_order, state.cfg.zero_runs
    ks = codec_api._orders(k, runs)
    return ks, ("auto" if k == "auto" else ks if runs else ks[0])


def coded_tensor(
    state: GCTState, out: np.ndarray, lo: int, hi: int, numel: int, bits, orders
) -> torch.Tensor:
    """The stream tensor (``encode_chunk``'s bytes) of a payload a CPU kernel wrote at
    ``out[lo:hi]``, from its per-chunk bits and orders."""
    _, kk = stream_orders(state)
    seg_bits = torch.from_numpy(bits)
    stream = codec.EGStream(
        data=torch.from_numpy(out[lo:hi]),
        numel=numel,
        k=kk,
        runs=bool(state.cfg.zero_runs),
        nbits=int(seg_bits.sum()),
        chunk_size=codec.DEFAULT_CHUNK,
        chunk_bits=seg_bits,
        orders=torch.from_numpy(orders),
    )
    return stream.to_tensor(checksum=False)


def blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full blocks of ``x`` as a (nb, block) view, and the shorter tail (or None)."""
    nfull = x.numel() // block
    tail = x[nfull * block :]
    return x[: nfull * block].view(nfull, block), (tail if tail.numel() else None)


def block_stats(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Torch ops (the non-CPU path): per-block RMS and max |v| (float32), and whether v holds
    an inf or NaN. The sums of squares are float64, as the CPU kernels take them (float32
    products are exact in float64), so both paths round the same RMS: the same steps."""
    full, tail = blocks(v, block)
    amax = full.abs().amax(1)  # NaN propagates through amax; inf shows as inf
    ms = full.double().square().sum(1) / block
    if tail is not None:
        amax = torch.cat([amax, tail.abs().amax().view(1)])
        ms = torch.cat([ms, (tail.double().square().sum() / tail.numel()).view(1)])
    nonfinite = not bool(torch.isfinite(amax.max()))
    return ms.sqrt_().float(), amax, nonfinite


def quantize_torch(state: GCTState, v: torch.Tensor, steps: torch.Tensor, block: int):
    """Torch ops (the non-CPU path; on CPU the reference the fused kernels are tested against):
    levels q (int32), the new residual ``v - q * step`` (None without error feedback), and the
    sums of err^2 and v^2 (statistics)."""
    cfg = state.cfg
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0
    n = v.numel()
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    q = quantize_rdoq(v, step, cfg.rdoq_mu, k, cfg.zero_runs)
    err = v - q.to(torch.float32) * step
    return (q, err if cfg.error_feedback else None, *square_sums(v, err))


def square_sums(v: torch.Tensor, err: torch.Tensor) -> tuple[float, float]:
    """Sum of err^2 and of v^2 (statistics): BLAS dot products, ~4x faster than a numba loop."""
    return float(torch.dot(err, err)), float(torch.dot(v, v))


def gather_coded(parts: list[torch.Tensor], group, world: int):
    """All-gather of each rank's coded bytes (``parts`` joined), padded to the longest (the
    padding is sent).

    Returns (gathered, lengths, width): rank r's bytes are gathered[r * width:][:lengths[r]];
    ``gathered`` ends with ``codec_cpu.PAD`` zero bytes more (the CPU decoder reads ahead).
    """
    dev = parts[0].device
    own = sum(p.numel() for p in parts)
    lens = torch.empty(world, dtype=torch.int64, device=dev)
    all_gather(lens, torch.tensor([own], dtype=torch.int64, device=dev), group=group)
    lens_l = lens.tolist()
    width = max(lens_l)
    if own < width:
        parts = [*parts, torch.zeros(width - own, dtype=torch.uint8, device=dev)]
    coded = parts[0] if len(parts) == 1 else torch.cat(parts)
    gathered = with_slack(world * width, dev)
    all_gather(gathered[: world * width], coded, group=group)
    return gathered, lens_l, width


def with_slack(n: int, dev: torch.device) -> torch.Tensor:
    """An uninitialized uint8 buffer of n bytes followed by ``codec_cpu.PAD`` zero bytes."""
    buf = torch.empty(n + codec_cpu.PAD, dtype=torch.uint8, device=dev)
    buf[n:].zero_()
    return buf


def decode_add_cpu(
    buf: torch.Tensor, offset: int, length: int, q: torch.Tensor, finish=None
) -> None:
    """q += the levels of the stream at ``buf[offset:offset + length]`` (CPU), which must be
    followed by at least ``codec_cpu.PAD`` bytes of ``buf``; ValueError if it is malformed or
    does not match q. ``finish = (steps, block, world, average, out)``: instead of storing the
    sums in q, write them dequantized into ``out`` (float32), as ``_dequantize`` would."""
    stream = received_stream(buf, offset, length, q.numel())
    bits = stream.chunk_bits.numpy()
    payload = offset + length - stream.data.numel()
    data = buf.numpy()[payload : offset + length + codec_cpu.PAD]
    steps, block, world, average, out = finish or (None, 1, 1, False, None)
    code, c = kernels.decode_add(
        data,
        stream.chunk_size,
        stream.runs,
        bits,
        stream.orders.contiguous().numpy(),
        codec_cpu.chunk_starts(bits),
        q.numpy(),
        finish is not None,
        steps.contiguous().numpy() if finish else EMPTY_F32,
        block,
        world,
        average,
        out.numpy() if finish else EMPTY_F32,
    )
    if code != 0:
        raise ValueError(f"cannot decode a received stream: {codec_cpu.error_message(code, c)}")


def received_stream(buf: torch.Tensor, offset: int, length: int, numel: int) -> codec.EGStream:
    """The stream at ``buf[offset:offset + length]``, its tables validated; ValueError if it
    does not hold ``numel`` levels."""
    stream = codec.EGStream.from_tensor(buf[offset : offset + length])
    if stream.numel != numel:
        raise ValueError(f"received a stream of {stream.numel} levels, expected {numel}")
    return stream
