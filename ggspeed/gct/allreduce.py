"""The compressed all-reduce: Exp-Golomb-coded reduce-scatter + all-gather with error feedback.

One call, on every rank of ``group``:

1. ``v = x + residual`` (error feedback: what earlier calls dropped is sent now).
2. One tiny all-reduce (MAX) of [RMS(v), max|v|, non-finite flag]: every rank derives the same
   quantization step, and all of them learn if any rank holds an inf/NaN.
3. ``q = quantize(v / step)`` (rounding or RDOQ); the new residual is ``v - q * step``.
4. Compressed reduce-scatter: chunk r of ``q`` is EG-coded and sent to rank r (an exchange of
   lengths, then one variable-size all_to_all_single of uint8). Rank r decodes and sums its
   chunk exactly, in integers.
5. All-gather of the EG-coded sums; every rank decodes the same integers and scales them by the
   same step, so the result is identical on all ranks bit for bit.

The uncompressed tensor never goes on the wire. Bytes are counted as handed to the collectives.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .. import codec
from .rdoq import quantize_rdoq
from .state import GCTState

__all__ = ["compressed_all_reduce", "decode_chunk", "encode_chunk"]

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Largest |integer sum| allowed: leaves headroom below the codec's 32-bit code width.
_MAX_LEVEL = 2**29  # codec.MAX_ABS is 2**30 - 1


def encode_chunk(q: torch.Tensor, state: GCTState) -> torch.Tensor:
    """EG-code an int32 chunk into a self-describing uint8 tensor (the codec's byte format)."""
    stream = codec.eg_encode(q, k=state.cfg.eg_order, runs=state.cfg.zero_runs)
    return stream.to_tensor(checksum=False)  # the transport (TCP, NCCL) already checks bytes


def decode_chunk(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_chunk`: int32 values."""
    # clone: a slice of a receive buffer may start unaligned, and from_tensor views int32 tables
    return codec.eg_decode(codec.EGStream.from_tensor(data.clone()))


def _chunk_bounds(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full blocks of ``x`` as a (nb, block) view, and the shorter tail (or None)."""
    nfull = x.numel() // block
    tail = x[nfull * block :]
    return x[: nfull * block].view(nfull, block), (tail if tail.numel() else None)


def _agree(v: torch.Tensor, group, block: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per block: (max over ranks of RMS, of max |v|), and whether any rank holds an inf/NaN.

    One small all-reduce (MAX) of 2 * blocks + 1 floats.
    """
    full, tail = _blocks(v, block)
    amax = full.abs().amax(1)  # NaN propagates through amax; inf shows as inf
    ms = torch.einsum("ij,ij->i", full, full) / block
    if tail is not None:
        amax = torch.cat([amax, tail.abs().amax().view(1)])
        ms = torch.cat([ms, (torch.dot(tail, tail) / tail.numel()).view(1)])
    finite = math.isfinite(float(amax.max()))
    t = torch.empty(2 * amax.numel() + 1, dtype=torch.float32, device=v.device)
    nb = amax.numel()
    if finite:
        t[:nb] = ms.sqrt_()  # a float32 overflow of ms (|v| > 1e19) only coarsens the step
        t[nb : 2 * nb] = amax
        t[-1] = 0.0
    else:
        t.zero_()
        t[-1] = 1.0
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t[:nb], t[nb : 2 * nb], bool(t[-1] > 0)


def _steps(state: GCTState, rms: torch.Tensor, amax: torch.Tensor, world: int) -> torch.Tensor:
    """One quantization step per block, the same on every rank (derived from agreed numbers)."""
    cfg = state.cfg
    if cfg.step_mode == "relative":
        steps = rms * cfg.quant_step
    else:
        steps = torch.full_like(rms, cfg.quant_step)
    steps = torch.where(steps > 0, steps, torch.ones_like(steps))  # all-zero block: any step
    # Never let the integer sums outgrow the codec: coarsen the step instead (same on all ranks).
    steps = torch.maximum(steps, amax * (world / _MAX_LEVEL))
    return torch.where(torch.isfinite(steps), steps, torch.full_like(steps, 3e38))


def compressed_all_reduce(
    tensor: torch.Tensor,
    state: GCTState,
    group=None,
    *,
    key: str = "default",
    average: bool = True,
) -> torch.Tensor:
    """Average (or sum) ``tensor`` over ``group`` in place with EG-coded messages; return it.

    ``key`` names this bucket's error-feedback residual: it must be stable across steps (bucket
    order, parameter identity), never a data_ptr. Any rank's inf/NaN makes the result NaN on
    every rank (DeepSpeed's overflow handling then skips the step everywhere) and leaves the
    residuals as they were.
    """
    group = group if group is not None else state.group
    world = dist.get_world_size(group)
    if world == 1 or tensor.numel() == 0:
        return tensor
    me = dist.get_rank(group)
    dev = tensor.device
    aliased = tensor.is_contiguous()
    flat = tensor.view(-1) if aliased else tensor.reshape(-1)
    n = flat.numel()
    t0 = time.perf_counter()
    v = flat.to(torch.float32, copy=True)
    residual = state.residual(key, v)
    if residual is not None:
        v += residual

    t1 = time.perf_counter()
    block = state.cfg.block_size or n
    rms, amax, nonfinite = _agree(v, group, block)
    t2 = time.perf_counter()
    # ring-equivalent bytes of the small all-reduce of per-block numbers
    tiny_bytes = (2 * rms.numel() + 1) * 4 * 2 * (world - 1) // world
    if nonfinite:
        tensor.fill_(float("nan"))
        state.record(calls=1, nonfinite_calls=1, comm_s=t2 - t1, bytes_sent=tiny_bytes)
        return tensor

    steps = _steps(state, rms, amax, world)
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    k = state.cfg.eg_order if isinstance(state.cfg.eg_order, int) else 0
    q = quantize_rdoq(v, step, state.cfg.rdoq_mu, k, state.cfg.zero_runs)
    err = v - q.to(torch.float32) * step
    rms_local_sq = float(torch.dot(v, v))
    state.set_residual(key, err)
    bounds = _chunk_bounds(n, world)
    # Reduce-scatter phase: every chunk but our own is coded and sent to its owner.
    payload = [
        encode_chunk(q[bounds[r] : bounds[r + 1]], state)
        if r != me
        else torch.empty(0, dtype=torch.uint8, device=dev)
        for r in range(world)
    ]
    t3 = time.perf_counter()
    in_len = torch.tensor([p.numel() for p in payload], dtype=torch.int64, device=dev)
    out_len = torch.empty(world, dtype=torch.int64, device=dev)
    dist.all_to_all_single(out_len, in_len, group=group)
    recv = torch.empty(int(out_len.sum()), dtype=torch.uint8, device=dev)
    dist.all_to_all_single(recv, torch.cat(payload), out_len.tolist(), in_len.tolist(), group=group)
    t4 = time.perf_counter()
    # int32 is exact: _steps keeps |level| * world below 2^29
    mine = q[bounds[me] : bounds[me + 1]].clone()
    for piece in torch.split(recv, out_len.tolist()):
        if piece.numel():
            mine += decode_chunk(piece)
    t5 = time.perf_counter()
    coded = encode_chunk(mine, state)
    t6 = time.perf_counter()
    # All-gather phase: the coded sums, padded to the longest (the padding counts as sent).
    lens = torch.empty(world, dtype=torch.int64, device=dev)
    own_len = torch.tensor([coded.numel()], dtype=torch.int64, device=dev)
    _all_gather(lens, own_len, group=group)
    width = int(lens.max())
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[: coded.numel()] = coded
    gathered = torch.empty(world * width, dtype=torch.uint8, device=dev)
    _all_gather(gathered, padded, group=group)
    t7 = time.perf_counter()
    sums = torch.empty(n, dtype=torch.int32, device=dev)
    for r in range(world):
        part = mine if r == me else decode_chunk(gathered[r * width : r * width + int(lens[r])])
        sums[bounds[r] : bounds[r + 1]] = part
    out = sums.to(torch.float32) * step
    if average:
        out /= world
    flat.copy_(out)
    if not aliased:
        tensor.copy_(flat.view_as(tensor))
    t8 = time.perf_counter()

    sent = int(in_len.sum()) + (world - 1) * width
    received = int(out_len.sum()) + (world - 1) * width
    small = tiny_bytes + 2 * 8 * (world - 1)  # the two length exchanges
    state.record(
        calls=1,
        elements=n,
        bytes_sent=sent + small,
        bytes_received=received + small,
        wire_elements=2.0 * n * (world - 1) / world,
        quant_sq_err=float(torch.dot(err, err)),
        signal_sq=rms_local_sq,
        encode_s=(t1 - t0) + (t3 - t2) + (t6 - t5),
        comm_s=(t2 - t1) + (t4 - t3) + (t7 - t6),
        decode_s=(t5 - t4) + (t8 - t7),
    )
    state.record_last(
        last_bytes_sent=sent + small,
        last_bytes_received=received + small,
        last_elements=n,
        last_step=float(steps.max()),
    )
    return tensor
