"""The all-gather exchange with steps from the previous call (``step_agreement: "previous"``).

The default (``allreduce.py``) agrees on each block's step by a small MAX all-reduce of block
RMS before quantizing: every rank waits there for the slowest. Here each rank sends, in its
payload's header, the steps it used and its blocks' RMS; the next call's step of a block is
quant_step x the largest of those RMS, which every rank computes from the same headers (a
bucket's first call uses each rank's own RMS). Every rank dequantizes each rank's levels with
that rank's steps and adds the float32 terms in rank order: the same terms in the same order on
every rank, so the result is identical on all of them bit for bit.

What it buys: one sync point fewer per call, and one pass over memory fewer (the statistics of a
block are taken right before it is quantized, while it is in cache). What it costs: steps one
call late (a block whose gradient grows quickly is quantized finely for a call; one that shrinks,
coarsely); in the benchmark's training it reached the loss plateau's exit later in 2 of 3 seeds
(docs/gct.md). The sums are float, so the reduce_scatter exchange (integer sums) cannot use it.
Header: one float32 flag and two float32 per block (0.016 bits/element at 4096-element blocks).

Non-finite gradients: a rank that meets an inf or NaN stops quantizing and sends only its flag.
Every rank reads all flags after the exchange, returns NaN and keeps its residual and step basis;
that is why the new residual is written into a second buffer and swapped in only once all flags
are clear.
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
    block_stats,
    block_steps,
    code_buffer,
    coded_tensor,
    decode_chunk,
    encode_chunk,
    gather_coded,
    quantize_torch,
    received_stream,
    stream_orders,
)
from .state import GCTState

__all__ = ["all_reduce_previous_steps"]

_FLAG_BYTES = 4  # a float32 non-finite flag opens every payload (see _header_bytes)


def _encode_cpu(state: GCTState, x: torch.Tensor, residual, key: str, block: int, basis=None):
    """The fused pass (``kernels.add_quantize_encode``). Returns (q, err, steps, rms, coded,
    sum of err^2, sum of v^2); coded is None on a non-finite gradient."""
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
    rms = torch.empty(nb, dtype=torch.float32)
    chunk = codec.DEFAULT_CHUNK
    out = code_buffer(n, 1)
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0  # RDOQ's rate model
    nonfinite, nbytes, bits, orders, code, v_sq, err_sq = kernels.add_quantize_encode(
        x.numpy(),
        residual.contiguous().numpy() if residual is not None else EMPTY_F32,
        block,
        cfg.step_mode == "relative",
        float(cfg.quant_step),
        basis.numpy() if basis is not None else EMPTY_F32,
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
        rms.numpy(),
        out,
    )
    if nonfinite:
        return q, err, steps, rms, None, 0.0, 0.0
    if code != 0:
        raise ValueError(f"cannot encode the levels: {codec_cpu.error_message(code, -1)}")
    coded = coded_tensor(state, out, 0, nbytes, n, bits, orders)
    return q, err, steps, rms, coded, float(err_sq), float(v_sq)


def _encode_torch(state: GCTState, flat: torch.Tensor, residual, block: int, basis=None):
    """Torch ops and the Triton codec (non-CPU tensors): as ``_encode_cpu``."""
    v = flat.to(torch.float32, copy=True)
    if residual is not None:
        v += residual
    rms, amax, nonfinite = block_stats(v, block)
    # world 1: the sums are float, only each rank's levels must fit the codec
    steps = block_steps(state, basis.to(rms.device) if basis is not None else rms, amax, 1)
    if nonfinite:
        return None, None, steps, rms, None, 0.0, 0.0
    q, err, err_sq, v_sq = quantize_torch(state, v, steps, block)
    return q, err, steps, rms, encode_chunk(q, state), err_sq, v_sq


def _header_bytes(nb: int) -> int:
    """Header of a payload: float32 non-finite flag, then per block the step and the RMS."""
    return _FLAG_BYTES * (2 * nb + 1)


def _headers(gathered: torch.Tensor, lens: list[int], width: int, nb: int):
    """Every rank's (non-finite flag, steps, RMS) from the gathered payloads (None, None if
    the flag is set: the payload is the flag alone)."""
    out = []
    for r, length in enumerate(lens):
        hb = _header_bytes(nb) if length > _FLAG_BYTES else _FLAG_BYTES
        if length < hb:
            raise ValueError(f"rank {r}'s payload has {length} bytes, less than its header")
        hdr = gathered[r * width : r * width + hb].to("cpu", copy=True).view(torch.float32)
        if hdr[0] != 0:
            out.append((True, None, None))
        else:
            out.append((False, hdr[1 : nb + 1], hdr[nb + 1 :]))
    return out


def _decode_cpu(state, gathered, lens, width, me, q, steps, block, average, out) -> None:
    """out = the rank-ordered sum of every rank's dequantized levels (``decode_weighted_sum``)."""
    world, n = steps.shape[0], q.numel()
    chunk = codec.DEFAULT_CHUNK
    nch = -(-n // chunk)
    bits = np.zeros((world, nch), np.int64)
    starts = np.zeros((world, nch), np.int64)
    orders = np.zeros((world, nch, 3), np.uint8)
    hb = _header_bytes(steps.shape[1])
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
    hb = _header_bytes(steps.shape[1])
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


def all_reduce_previous_steps(
    flat: torch.Tensor, state: GCTState, group, *, key: str, block: int, average: bool
) -> None:
    """Average (or sum) the 1-D ``flat`` over ``group`` in place, with steps set without a
    collective: from the previous call's largest RMS over ranks (this rank's own RMS in the
    bucket's first call)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    n = flat.numel()
    nb = -(-n // block)
    t0 = time.perf_counter()
    residual = state.residual(key, flat)
    basis = state.step_basis(key, nb)  # None in a bucket's first call: own RMS
    cpu = flat.device.type == "cpu"
    if cpu:
        x = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        q, err, steps, rms, coded, err_sq, v_sq = _encode_cpu(state, x, residual, key, block, basis)
    else:
        q, err, steps, rms, coded, err_sq, v_sq = _encode_torch(state, flat, residual, block, basis)
    ok = coded is not None
    hdr = torch.zeros(2 * nb + 1 if ok else 1, dtype=torch.float32, device=flat.device)
    hdr[0] = 0.0 if ok else 1.0
    if ok:
        hdr[1 : nb + 1] = steps
        hdr[nb + 1 :] = rms
    parts = [hdr.view(torch.uint8)] + ([coded] if ok else [])

    t1 = time.perf_counter()
    gathered, lens, width = gather_coded(parts, group, world)
    t2 = time.perf_counter()
    small = 8 * (world - 1)  # the length exchange
    sent = (world - 1) * width + small
    headers = _headers(gathered, lens, width, nb)
    if any(flag for flag, _, _ in headers):
        flat.fill_(float("nan"))  # residual and basis stay as they were
        state.record(calls=1, nonfinite_calls=1, comm_s=t2 - t1, bytes_sent=sent)
        return
    all_steps = torch.stack([s for _, s, _ in headers])  # ours included: the bits we sent
    if err is not None:
        state.set_residual(key, err)
    # the next call's steps: the largest RMS over ranks, the same on every rank
    state.set_step_basis(key, torch.stack([r for _, _, r in headers]).amax(0))
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
