"""The compressed all-reduce: Exp-Golomb-coded levels exchanged between ranks, error feedback.

One call, on every rank of ``group``:

1. ``v = x + residual`` (error feedback: what earlier calls dropped is sent now).
2. One tiny all-reduce (MAX) of [RMS(v), max|v|, non-finite flag]: every rank derives the same
   quantization step, and all of them learn if any rank holds an inf/NaN.
3. ``q = quantize(v / step)`` (rounding or RDOQ); the new residual is ``v - q * step``.
4. Exchange of the EG-coded levels (``exchange``): an all-gather of every rank's coded q
   (2 ranks: fewer bytes, 3 collectives per call), or a reduce-scatter (chunk r coded and sent
   to rank r, summed there exactly in integers) followed by an all-gather of the coded sums.
5. Every rank holds the same integer sums and scales them by the same step, so the result is
   identical on all ranks bit for bit.

On CPU the element-wise passes are fused numba kernels (``kernels.py``), single-threaded: ranks
usually share the cores.

The uncompressed tensor never goes on the wire. Bytes are counted as handed to the collectives.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from . import kernels
from .rdoq import quantize_rdoq
from .state import GCTState

__all__ = ["compressed_all_reduce", "decode_chunk", "encode_chunk"]

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Largest |integer sum| allowed: leaves headroom below the codec's 32-bit code width.
_MAX_LEVEL = 2**29  # codec.MAX_ABS is 2**30 - 1
_EMPTY_F32 = np.empty(0, dtype=np.float32)
_EXCHANGES = ("auto", "allgather", "reduce_scatter")


def encode_chunk(q: torch.Tensor, state: GCTState) -> torch.Tensor:
    """EG-code an int32 chunk into a self-describing uint8 tensor (the codec's byte format)."""
    stream = codec.eg_encode(q, k=state.cfg.eg_order, runs=state.cfg.zero_runs)
    return stream.to_tensor(checksum=False)  # the transport (TCP, NCCL) already checks bytes


def decode_chunk(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_chunk`: int32 values (``from_tensor`` has validated the stream)."""
    return codec.eg_decode(codec.EGStream.from_tensor(data), validate=False)


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


def _prepare(flat: torch.Tensor, residual: torch.Tensor | None, block: int):
    """``v = flat + residual`` (float32) and the per-block message [rms, amax, non-finite flag].

    On CPU one fused pass, in place when ``flat`` is float32 (it is overwritten with the result
    at the end anyway); elsewhere torch ops.
    """
    n = flat.numel()
    nb = -(-n // block)
    t = torch.empty(2 * nb + 1, dtype=torch.float32, device=flat.device)
    if flat.device.type == "cpu":
        v = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        res = residual.contiguous().numpy() if residual is not None else _EMPTY_F32
        tn = t.numpy()
        nonfinite = kernels.add_and_block_stats(
            v.numpy(), res, block, v.numpy(), tn[:nb], tn[nb : 2 * nb]
        )
    else:
        v = flat.to(torch.float32, copy=True)
        if residual is not None:
            v += residual
        full, tail = _blocks(v, block)
        amax = full.abs().amax(1)  # NaN propagates through amax; inf shows as inf
        ms = torch.einsum("ij,ij->i", full, full) / block
        if tail is not None:
            amax = torch.cat([amax, tail.abs().amax().view(1)])
            ms = torch.cat([ms, (torch.dot(tail, tail) / tail.numel()).view(1)])
        nonfinite = not math.isfinite(float(amax.max()))
        t[:nb] = ms.sqrt_()  # a float32 overflow of ms (|v| > 1e19) only coarsens the step
        t[nb : 2 * nb] = amax
    if nonfinite:
        t.zero_()
    t[-1] = 1.0 if nonfinite else 0.0
    return v, t


def _quantize(state: GCTState, v: torch.Tensor, steps: torch.Tensor, block: int, residual):
    """Levels q (int32), the new residual ``v - q * step`` (None without error feedback), and
    the sums of err^2 and v^2 (statistics)."""
    cfg = state.cfg
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0
    keep = cfg.error_feedback
    n = v.numel()
    if v.device.type == "cpu":
        q = torch.empty(n, dtype=torch.int32)
        if not keep:
            err = None
        elif residual is not None and residual.dtype == torch.float32 and residual.is_contiguous():
            err = residual  # read already (v holds it): overwrite in place
        else:
            err = torch.empty(n, dtype=torch.float32)
        esq, vsq = kernels.quantize_with_residual(
            v.numpy(),
            steps.contiguous().numpy(),
            block,
            float(cfg.rdoq_mu),
            int(k),
            bool(cfg.zero_runs),
            q.numpy(),
            err.numpy() if err is not None else _EMPTY_F32,
            keep,
        )
        return q, err, esq, vsq
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    q = quantize_rdoq(v, step, cfg.rdoq_mu, k, cfg.zero_runs)
    err = v - q.to(torch.float32) * step
    return q, (err if keep else None), float(torch.dot(err, err)), float(torch.dot(v, v))


def _dequantize(
    sums: torch.Tensor, steps: torch.Tensor, block: int, world: int, average: bool, out
):
    """The float32 result ``sums * step`` (/ world), identical on every rank; written into
    ``out`` when it is a float32 CPU tensor (saves a pass), else returned."""
    n = sums.numel()
    if sums.device.type == "cpu":
        if out is None or out.dtype != torch.float32:
            out = torch.empty(n, dtype=torch.float32)
        kernels.dequantize_into(
            sums.numpy(), steps.contiguous().numpy(), block, world, average, out.numpy()
        )
        return out
    step = steps.repeat_interleave(block)[:n] if steps.numel() > 1 else float(steps[0])
    out = sums.to(torch.float32) * step
    if average:
        out /= world
    return out


def _gather_coded(coded: torch.Tensor, group, world: int):
    """All-gather of each rank's coded bytes, padded to the longest (the padding is sent).

    Returns (gathered, lengths, width): rank r's bytes are gathered[r * width:][:lengths[r]].
    """
    dev = coded.device
    lens = torch.empty(world, dtype=torch.int64, device=dev)
    own_len = torch.tensor([coded.numel()], dtype=torch.int64, device=dev)
    _all_gather(lens, own_len, group=group)
    lens_l = lens.tolist()
    width = max(lens_l)
    if coded.numel() < width:
        coded = torch.cat(
            [coded, torch.zeros(width - coded.numel(), dtype=torch.uint8, device=dev)]
        )
    gathered = torch.empty(world * width, dtype=torch.uint8, device=dev)
    _all_gather(gathered, coded, group=group)
    return gathered, lens_l, width


def _reduce_scatter_gather(q: torch.Tensor, state: GCTState, group, world: int, me: int):
    """Replace q (int32, in place) by the sum over ranks: coded chunk r goes to rank r, which
    sums it exactly; then an all-gather of the coded sums. Returns phase times and bytes."""
    dev = q.device
    n = q.numel()
    bounds = _chunk_bounds(n, world)
    payload = [
        encode_chunk(q[bounds[r] : bounds[r + 1]], state)
        if r != me
        else torch.empty(0, dtype=torch.uint8, device=dev)
        for r in range(world)
    ]
    t3 = time.perf_counter()
    in_sizes = [p.numel() for p in payload]
    in_len = torch.tensor(in_sizes, dtype=torch.int64, device=dev)
    out_len = torch.empty(world, dtype=torch.int64, device=dev)
    dist.all_to_all_single(out_len, in_len, group=group)
    out_sizes = out_len.tolist()
    recv = torch.empty(sum(out_sizes), dtype=torch.uint8, device=dev)
    dist.all_to_all_single(recv, torch.cat(payload), out_sizes, in_sizes, group=group)
    t4 = time.perf_counter()
    # int32 is exact: _steps keeps |level| * world below 2^29
    mine = q[bounds[me] : bounds[me + 1]]
    for piece in torch.split(recv, out_sizes):
        if piece.numel():
            mine += decode_chunk(piece)  # q is ours alone: sum into it in place
    t5 = time.perf_counter()
    coded = encode_chunk(mine, state)
    t6 = time.perf_counter()
    gathered, lens, width = _gather_coded(coded, group, world)
    t7 = time.perf_counter()
    for r in range(world):  # q's other chunks become the others' sums; ours is in place
        if r != me:
            q[bounds[r] : bounds[r + 1]] = decode_chunk(gathered[r * width : r * width + lens[r]])
    sent = sum(in_sizes) + (world - 1) * width
    received = sum(out_sizes) + (world - 1) * width
    return t3, t4, t5, t6, t7, sent, received


def compressed_all_reduce(
    tensor: torch.Tensor,
    state: GCTState,
    group=None,
    *,
    key: str = "default",
    average: bool = True,
    exchange: str = "auto",
) -> torch.Tensor:
    """Average (or sum) ``tensor`` over ``group`` in place with EG-coded messages; return it.

    ``key`` names this bucket's error-feedback residual: it must be stable across steps (bucket
    order, parameter identity), never a data_ptr. Any rank's inf/NaN makes the result NaN on
    every rank (DeepSpeed's overflow handling then skips the step everywhere) and leaves the
    residuals as they were.

    ``exchange``: "allgather" (every rank's coded levels to every rank: with 2 ranks fewer bytes
    and 3 collectives instead of 5), "reduce_scatter" (coded chunks to their owners, then an
    all-gather of the coded sums: wire volume independent of the world size), or "auto"
    (allgather for 2 ranks). Both give the same result bit for bit.
    """
    if exchange not in _EXCHANGES:
        raise ValueError(
            f"compressed_all_reduce: exchange must be one of {_EXCHANGES}, got {exchange!r}"
        )
    group = group if group is not None else state.group
    world = dist.get_world_size(group)
    if world == 1 or tensor.numel() == 0:
        return tensor
    me = dist.get_rank(group)
    aliased = tensor.is_contiguous()
    flat = tensor.view(-1) if aliased else tensor.reshape(-1)
    n = flat.numel()
    block = min(state.cfg.block_size or n, n)
    t0 = time.perf_counter()
    residual = state.residual(key, flat)
    v, msg = _prepare(flat, residual, block)
    nb = (msg.numel() - 1) // 2

    t1 = time.perf_counter()
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=group)
    t2 = time.perf_counter()
    # ring-equivalent bytes of the small all-reduce of per-block numbers
    tiny_bytes = msg.numel() * 4 * 2 * (world - 1) // world
    if msg[-1] > 0:
        tensor.fill_(float("nan"))
        state.record(calls=1, nonfinite_calls=1, comm_s=t2 - t1, bytes_sent=tiny_bytes)
        return tensor

    steps = _steps(state, msg[:nb], msg[nb : 2 * nb], world)
    q, err, err_sq, sig_sq = _quantize(state, v, steps, block, residual)
    if err is not None:
        state.set_residual(key, err)
    if exchange == "allgather" or (exchange == "auto" and world == 2):
        # Every rank's coded levels to every rank; each sums all of them in rank order.
        coded = encode_chunk(q, state)
        t3 = time.perf_counter()
        gathered, lens, width = _gather_coded(coded, group, world)
        t4 = t5 = t6 = t7 = time.perf_counter()
        for r in range(world):
            if r != me:
                q += decode_chunk(gathered[r * width : r * width + lens[r]])
        sent = received = (world - 1) * width
        small = tiny_bytes + 8 * (world - 1)  # the length exchange
    else:
        t3, t4, t5, t6, t7, sent, received = _reduce_scatter_gather(q, state, group, world, me)
        small = tiny_bytes + 2 * 8 * (world - 1)  # the two length exchanges
    out = _dequantize(q, steps, block, world, average, flat)
    if out is not flat:
        flat.copy_(out)
    if not aliased:
        tensor.copy_(flat.view_as(tensor))
    t8 = time.perf_counter()

    state.record(
        calls=1,
        elements=n,
        bytes_sent=sent + small,
        bytes_received=received + small,
        wire_elements=2.0 * n * (world - 1) / world,  # ring-equivalent: fp32 = 32 bits
        quant_sq_err=float(err_sq),
        signal_sq=float(sig_sq),
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
