"""The all-gather exchange with per-rank steps (``step_agreement``: the default for 2 ranks).

Each rank quantizes every block with its own step (from its own RMS, or the absolute step) and
sends the steps in its payload's header; every rank dequantizes each rank's levels with that
rank's steps and adds the float32 terms in rank order, so all ranks hold the same result bit for
bit (the same terms added in the same order).

Against agreed steps (``allreduce.py``): no small MAX all-reduce before quantizing, so no wait
for the slowest rank there, and the statistics of a block are taken right before it is
quantized, while it is in cache: one pass over memory instead of two. The header costs one
float32 per block (0.008 bits/element at 4096-element blocks), the agreement cost two. What
changes: a rank with small gradients quantizes them finely instead of with the largest rank's
step, and the sums are float, not integer, so the reduce_scatter exchange (which codes integer
sums) cannot use it.

Non-finite gradients: a rank that meets an inf or NaN stops quantizing and sends only its flag.
Every rank reads all flags after the exchange, returns NaN and keeps its residual; that is why
the new residual is written into a second buffer and swapped in only once all flags are clear.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from ..codec import cpu as codec_cpu
from . import kernels
from .common import (
    EMPTY_F32,
    MAX_CODE_BYTES,
    block_stats,
    coded_tensor,
    decode_chunk,
    encode_chunk,
    gather_coded,
    quantize_torch,
    received_stream,
    stream_orders,
)
from .state import GCTState

__all__ = ["all_reduce_per_rank", "own_steps"]

_FLAG_BYTES = 4  # header: a float32 non-finite flag, then (if clear) one float32 step per block


def own_steps(state: GCTState, rms: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """This rank's step per block from its own statistics, with torch ops (the non-CPU path):
    what ``kernels._own_step`` computes, float32 product for float32 product."""
    qs = torch.tensor(state.cfg.quant_step, dtype=torch.float32, device=rms.device)
    steps = rms * qs if state.cfg.step_mode == "relative" else qs.expand_as(rms).clone()
    steps = torch.where(steps > 0, steps, torch.ones_like(steps))  # all-zero block: any step
    steps = torch.maximum(steps, amax * float(kernels.OWN_GUARD))  # levels fit the codec
    return torch.where(torch.isfinite(steps), steps, torch.full_like(steps, 3e38))


def _encode_cpu(state: GCTState, x: torch.Tensor, residual, key: str, block: int):
    """The fused pass (``kernels.add_quantize_encode``). Returns (q, err, steps, coded, sum of
    err^2, sum of v^2); coded is None on a non-finite gradient."""
    cfg = state.cfg
    n = x.numel()
    nb = -(-n // block)
    ks, _ = stream_orders(state)
    q = state.workspace("levels", n, torch.int32)  # used up before the call returns
    # never the live residual: a peer's non-finite flag arrives after quantizing
    err = (
        state.next_residual(key, n)
        if cfg.error_feedback
        else state.workspace("err", n, torch.float32)
    )
    steps = torch.empty(nb, dtype=torch.float32)
    chunk = codec.DEFAULT_CHUNK
    out = np.empty(MAX_CODE_BYTES * n + 8 * (n // chunk + 1) + 64, np.uint8)
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0  # RDOQ's rate model
    nonfinite, nbytes, bits, orders, code, v_sq = kernels.add_quantize_encode(
        x.numpy(),
        residual.contiguous().numpy() if residual is not None else EMPTY_F32,
        block,
        cfg.step_mode == "relative",
        float(cfg.quant_step),
        float(cfg.rdoq_mu),
        k,
        bool(cfg.zero_runs),
        kernels.rdoq_thresholds(cfg.rdoq_mu, k, cfg.zero_runs),
        chunk,
        np.asarray(ks, np.int64),
        state.workspace("block", block, torch.float32).numpy(),
        q.numpy(),
        err.numpy(),
        steps.numpy(),
        out,
    )
    if nonfinite:
        return q, err, steps, None, 0.0, 0.0
    if code != 0:
        raise ValueError(f"cannot encode the levels: {codec_cpu.error_message(code, -1)}")
    coded = coded_tensor(state, out, 0, nbytes, n, bits, orders)
    return q, err, steps, coded, float(torch.dot(err, err)), float(v_sq)


def _encode_torch(state: GCTState, flat: torch.Tensor, residual, block: int):
    """Torch ops and the Triton codec (non-CPU tensors): as ``_encode_cpu``."""
    v = flat.to(torch.float32, copy=True)
    if residual is not None:
        v += residual
    rms, amax, nonfinite = block_stats(v, block)
    steps = own_steps(state, rms, amax)
    if nonfinite:
        return None, None, steps, None, 0.0, 0.0
    q, err, err_sq, v_sq = quantize_torch(state, v, steps, block)
    return q, err, steps, encode_chunk(q, state), err_sq, v_sq


def _headers(gathered: torch.Tensor, lens: list[int], width: int, nb: int):
    """Every rank's (non-finite flag, steps) from the gathered payloads (steps None if set)."""
    out = []
    for r, length in enumerate(lens):
        hb = _FLAG_BYTES * (nb + 1) if length > _FLAG_BYTES else _FLAG_BYTES
        if length < hb:
            raise ValueError(f"rank {r}'s payload has {length} bytes, less than its header")
        hdr = gathered[r * width : r * width + hb].to("cpu", copy=True).view(torch.float32)
        out.append((bool(hdr[0] != 0), hdr[1:] if hdr[0] == 0 else None))
    return out


def _decode_cpu(state, gathered, lens, width, me, q, steps, block, average, out) -> None:
    """out = the rank-ordered sum of every rank's dequantized levels (``decode_weighted_sum``)."""
    world, n = steps.shape[0], q.numel()
    chunk = codec.DEFAULT_CHUNK
    nch = -(-n // chunk)
    bits = np.zeros((world, nch), np.int64)
    starts = np.zeros((world, nch), np.int64)
    orders = np.zeros((world, nch, 3), np.uint8)
    hb = _FLAG_BYTES * (steps.shape[1] + 1)
    for r in range(world):
        if r == me:
            continue
        offset, length = r * width + hb, lens[r] - hb
        stream = received_stream(gathered, offset, length, n)
        if stream.chunk_size != chunk or stream.runs != state.cfg.zero_runs:
            raise ValueError(
                f"rank {r}'s stream has chunk size {stream.chunk_size} and runs={stream.runs}, "
                f"expected {chunk} and {state.cfg.zero_runs}: ranks run different settings"
            )
        bits[r] = stream.chunk_bits.numpy()
        orders[r] = stream.orders.numpy()
        starts[r] = offset + length - stream.data.numel() + codec_cpu.chunk_starts(bits[r])
    code, r, c = kernels.decode_weighted_sum(
        gathered.numpy(),
        chunk,
        bool(state.cfg.zero_runs),
        bits,
        orders,
        starts,
        me,
        q.numpy(),
        steps.numpy(),
        block,
        average,
        out.numpy(),
    )
    if code != 0:
        msg = codec_cpu.error_message(code, c)
        raise ValueError(f"cannot decode rank {r}'s stream: {msg}")


def _decode_torch(gathered, lens, width, me, q, steps, block, average) -> torch.Tensor:
    """Torch ops: as ``_decode_cpu``, the same float32 operations in the same order."""
    world, n = steps.shape[0], q.numel()
    hb = _FLAG_BYTES * (steps.shape[1] + 1)
    acc = None
    for r in range(world):
        if r == me:
            levels = q
        else:
            levels = decode_chunk(gathered[r * width + hb : r * width + lens[r]])
            if levels.numel() != n:
                raise ValueError(f"received a stream of {levels.numel()} levels, expected {n}")
        step = steps[r].to(q.device).repeat_interleave(block)[:n]
        term = levels.to(torch.float32) * step
        acc = term if acc is None else acc + term
    return acc / world if average else acc


def all_reduce_per_rank(
    flat: torch.Tensor, state: GCTState, group, *, key: str, block: int, average: bool
) -> None:
    """Average (or sum) the 1-D ``flat`` over ``group`` in place, with per-rank steps."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    n = flat.numel()
    nb = -(-n // block)
    t0 = time.perf_counter()
    residual = state.residual(key, flat)
    cpu = flat.device.type == "cpu"
    if cpu:
        x = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        q, err, steps, coded, err_sq, v_sq = _encode_cpu(state, x, residual, key, block)
    else:
        q, err, steps, coded, err_sq, v_sq = _encode_torch(state, flat, residual, block)
    hdr = torch.empty(nb + 1 if coded is not None else 1, dtype=torch.float32, device=flat.device)
    hdr[0] = 0.0 if coded is not None else 1.0
    if coded is not None:
        hdr[1:] = steps
    parts = [hdr.view(torch.uint8)] + ([coded] if coded is not None else [])

    t1 = time.perf_counter()
    gathered, lens, width = gather_coded(parts, group, world)
    t2 = time.perf_counter()
    small = 8 * (world - 1)  # the length exchange
    sent = (world - 1) * width + small
    headers = _headers(gathered, lens, width, nb)
    if any(flag for flag, _ in headers):
        flat.fill_(float("nan"))
        state.record(calls=1, nonfinite_calls=1, comm_s=t2 - t1, bytes_sent=sent)
        return
    all_steps = torch.stack([s for _, s in headers])  # ours included: the bits we sent
    if err is not None:
        state.set_residual(key, err)
    if cpu:
        out = flat if flat.dtype == torch.float32 else torch.empty(n, dtype=torch.float32)
        _decode_cpu(state, gathered, lens, width, me, q, all_steps, block, average, out)
    else:
        out = _decode_torch(gathered, lens, width, me, q, all_steps, block, average)
    if out is not flat:
        flat.copy_(out)
    t3 = time.perf_counter()
    state.record(
        calls=1,
        elements=n,
        bytes_sent=sent,
        bytes_received=sent,
        wire_elements=2.0 * n * (world - 1) / world,  # ring-equivalent: fp32 = 32 bits
        quant_sq_err=err_sq,
        signal_sq=v_sq,
        encode_s=t1 - t0,
        comm_s=t2 - t1,
        decode_s=t3 - t2,
    )
    state.record_last(
        last_bytes_sent=sent,
        last_bytes_received=sent,
        last_elements=n,
        last_step=float(all_steps.max()),
    )
