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
usually share the cores. ``step_agreement: "previous"`` replaces step 2 by the previous call's
statistics, sent with the payloads (``previous_steps.py``).

The uncompressed tensor never goes on the wire. Bytes are counted as handed to the collectives.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from ..codec import cpu as codec_cpu
from . import direct, kernels
from .common import (
    EMPTY_F32,
    block_stats,
    block_steps,
    code_buffer,
    coded_tensor,
    decode_add_cpu,
    decode_chunk,
    encode_chunk,
    gather_coded,
    quantize_torch,
    stream_orders,
    with_slack,
)
from .previous_steps import all_reduce_previous_steps
from .state import GCTState

__all__ = ["compressed_all_reduce", "decode_chunk", "encode_chunk"]

_EXCHANGES = ("auto", "allgather", "reduce_scatter")


def _quantize_encode_cpu(
    state: GCTState,
    x: torch.Tensor,
    steps: torch.Tensor,
    block: int,
    residual: torch.Tensor | None,
    bounds: list[int],
    skip: int,
):
    """CPU: levels of v = x + residual, the new residual and the coded segments
    ``bounds[r]:bounds[r + 1]``, in one pass.

    Returns (q, err, sum err^2, coded): coded[r] is segment r's stream as
    ``encode_chunk`` would make it from q (the same bytes; a test checks), None for ``skip``.
    """
    cfg = state.cfg
    n = x.numel()
    ks, _ = stream_orders(state)
    q = state.workspace("levels", n, torch.int32)  # used up before this call returns
    err = _err_out(state, residual, n)
    chunk = codec.DEFAULT_CHUNK
    out = code_buffer(n, len(bounds) - 1)
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0  # RDOQ's rate model
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
        np.asarray(ks, np.int64),
        state.workspace("block", block, torch.float32).numpy(),
        q.numpy(),
        err.numpy(),
        out,
    )
    if code != 0:
        raise ValueError(f"cannot encode the levels: {codec_cpu.error_message(code, -1)}")
    coded: list[torch.Tensor | None] = []
    c = 0
    for r in range(len(bounds) - 1):
        if r == skip:
            coded.append(None)
            continue
        numel = bounds[r + 1] - bounds[r]
        nch = -(-numel // chunk)
        lo, hi = seg_bytes[r], seg_bytes[r + 1]
        coded.append(
            coded_tensor(state, out, lo, hi, numel, bits[c : c + nch], orders[c : c + nch])
        )
        c += nch
    return q, err if cfg.error_feedback else None, err_sq, coded


def _chunk_bounds(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def _prepare(state: GCTState, flat: torch.Tensor, residual: torch.Tensor | None, block: int):
    """What to quantize, the per-block message [rms, amax, non-finite flag] of v = flat +
    residual, and the sum of v^2 (a statistic; None off the CPU, where the quantizer takes it).

    On CPU one pass that does not store v: it returns ``flat`` as float32 (the quantize pass adds
    the residual again); elsewhere v itself, from torch ops.
    """
    n = flat.numel()
    nb = -(-n // block)
    t = torch.empty(2 * nb + 1, dtype=torch.float32, device=flat.device)
    if flat.device.type == "cpu":
        x = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        res = residual.contiguous().numpy() if residual is not None else EMPTY_F32
        tn = t.numpy()
        vb = state.workspace("block", block, torch.float32).numpy()
        v_sq = kernels.add_and_block_stats(x.numpy(), res, block, vb, tn[:nb], tn[nb : 2 * nb])
        nonfinite = not np.isfinite(v_sq)
    else:
        x = flat.to(torch.float32, copy=True)
        if residual is not None:
            x += residual
        t[:nb], t[nb : 2 * nb], nonfinite = block_stats(x, block)
        v_sq = None
    if nonfinite:
        t.zero_()
    t[-1] = 1.0 if nonfinite else 0.0
    return x, t, v_sq


def _err_out(state: GCTState, residual: torch.Tensor | None, n: int) -> torch.Tensor:
    """Where the CPU kernels write ``v - q * step``: over the old residual when it is a
    contiguous float32 tensor (the quantize pass reads each block of it before writing it),
    else a new buffer (it becomes the residual), or a reused scratch buffer without error
    feedback."""
    if residual is not None and residual.dtype == torch.float32 and residual.is_contiguous():
        return residual
    if state.cfg.error_feedback:
        return torch.empty(n, dtype=torch.float32)
    return state.workspace("err", n, torch.float32)


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


def _add_decoded(buf: torch.Tensor, offset: int, length: int, q: torch.Tensor) -> None:
    """q += the levels coded at buf[offset:offset + length] (a buffer from ``with_slack``)."""
    if q.device.type == "cpu":
        decode_add_cpu(buf, offset, length, q)
    else:
        q += decode_chunk(buf[offset : offset + length])


def _reduce_scatter_gather(
    q: torch.Tensor, payload: list[torch.Tensor], state: GCTState, group, world: int, me: int
):
    """Replace q (int32, in place) by the sum over ranks: ``payload[r]`` (the coded chunk r of
    q; empty for ours) goes to rank r, which sums it exactly; then an all-gather of the coded
    sums. Returns phase times and bytes."""
    dev = q.device
    n = q.numel()
    bounds = _chunk_bounds(n, world)
    t3 = time.perf_counter()
    in_sizes = [p.numel() for p in payload]
    in_len = torch.tensor(in_sizes, dtype=torch.int64, device=dev)
    out_len = torch.empty(world, dtype=torch.int64, device=dev)
    dist.all_to_all_single(out_len, in_len, group=group)
    out_sizes = out_len.tolist()
    total = sum(out_sizes)
    recv = with_slack(total, dev)
    dist.all_to_all_single(recv[:total], torch.cat(payload), out_sizes, in_sizes, group=group)
    t4 = time.perf_counter()
    # int32 is exact: block_steps keeps |level| * world below 2^29
    mine = q[bounds[me] : bounds[me + 1]]
    offset = 0
    for size in out_sizes:
        if size:
            _add_decoded(recv, offset, size, mine)  # q is ours alone: sum into it in place
        offset += size
    t5 = time.perf_counter()
    coded = encode_chunk(mine, state)
    t6 = time.perf_counter()
    gathered, lens, width = gather_coded([coded], group, world)
    t7 = time.perf_counter()
    for r in range(world):  # q's other chunks become the others' sums; ours is in place
        if r != me:
            theirs = q[bounds[r] : bounds[r + 1]]
            theirs.zero_()
            _add_decoded(gathered, r * width, lens[r], theirs)
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
    exchange: str | None = None,
) -> torch.Tensor:
    """Average (or sum) ``tensor`` over ``group`` in place with EG-coded messages; return it.

    ``key`` names this bucket's error-feedback residual: it must be stable across steps (bucket
    order, parameter identity), never a data_ptr. Any rank's inf/NaN makes the result NaN on
    every rank (DeepSpeed's overflow handling then skips the step everywhere) and leaves the
    residuals as they were.

    ``exchange`` (default: the config's ``exchange``): "allgather" (every rank's coded levels to
    every rank: with 2 ranks fewer bytes and 3 collectives instead of 5), "reduce_scatter"
    (coded chunks to their owners, then an all-gather of the coded sums: wire volume independent
    of the world size), or "auto" (allgather for 2 ranks). Both give the same result bit for bit.
    With the config's ``step_agreement`` "previous" (allgather only) the steps come from the
    previous call's headers instead of a MAX all-reduce (``previous_steps.py``).
    """
    exchange = state.cfg.exchange if exchange is None else exchange
    if exchange not in _EXCHANGES:
        raise ValueError(
            f"compressed_all_reduce: exchange must be one of {_EXCHANGES}, got {exchange!r}"
        )
    group = group if group is not None else state.group
    world = dist.get_world_size(group)
    if world == 1 or tensor.numel() == 0:
        return tensor
    allgather = exchange == "allgather" or (exchange == "auto" and world == 2)
    previous = state.cfg.step_agreement == "previous"
    if previous and not allgather:
        raise ValueError(
            f"compressed_all_reduce: step_agreement 'previous' needs the allgather exchange, "
            f"got exchange {exchange!r} with {world} ranks"
        )
    me = dist.get_rank(group)
    aliased = tensor.is_contiguous()
    flat = tensor.view(-1) if aliased else tensor.reshape(-1)
    n = flat.numel()
    block = min(state.cfg.block_size or n, n)
    if previous:
        all_reduce_previous_steps(flat, state, group, key=key, block=block, average=average)
        if not aliased:
            tensor.copy_(flat.view_as(tensor))
        return tensor
    t0 = time.perf_counter()
    nb = -(-n // block)
    # CPU buckets on gloo: point-to-point messages, no collectives (direct.py)
    use_direct = allgather and direct.usable(group, flat)
    posted = direct.post(state, n, block, 2 * nb + 1, group, me, world) if use_direct else None
    residual = state.residual(key, flat)
    # v = flat + residual: on CPU formed again by the quantize pass, elsewhere given
    v, msg, sig_sq = _prepare(state, flat, residual, block)

    t1 = time.perf_counter()
    if use_direct:
        direct.max_over_ranks(msg, posted, group)
        tiny_bytes = msg.numel() * 4 * (world - 1)
    else:
        dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=group)
        tiny_bytes = msg.numel() * 4 * 2 * (world - 1) // world  # ring-equivalent
    t2 = time.perf_counter()
    if msg[-1] > 0:
        if use_direct:
            direct.abandon(posted, group)
        tensor.fill_(float("nan"))
        state.record(calls=1, nonfinite_calls=1, comm_s=t2 - t1, bytes_sent=tiny_bytes)
        return tensor

    steps = block_steps(state, msg[:nb], msg[nb : 2 * nb], world)
    out = None
    if use_direct:
        err = _err_out(state, residual, n)
        out = flat if flat.dtype == torch.float32 else torch.empty(n, dtype=torch.float32)
        res = direct.all_gather_sum(
            state, v, residual, steps, msg[nb : 2 * nb], block, err, group, me, world, average,
            out, posted,
        )  # fmt: skip
        if state.cfg.error_feedback:
            state.set_residual(key, err)
        err_sq, sent, received, small = res.err_sq, res.bytes_sent, res.bytes_received, tiny_bytes
        t3 = t2 + res.encode_s
        t4 = t5 = t6 = t7 = t3 + res.comm_s
    else:
        # allgather: every rank's coded levels to every rank; reduce_scatter: chunk r to rank r
        bounds = [0, n] if allgather else _chunk_bounds(n, world)
        skip = -1 if allgather else me
        if v.device.type == "cpu":
            q, err, err_sq, payload = _quantize_encode_cpu(
                state, v, steps, block, residual, bounds, skip
            )
        else:
            q, err, err_sq, sig_sq = quantize_torch(state, v, steps, block)
            payload = [
                encode_chunk(q[bounds[r] : bounds[r + 1]], state) if r != skip else None
                for r in range(len(bounds) - 1)
            ]
        if err is not None:
            state.set_residual(key, err)
        if allgather:
            t3 = time.perf_counter()
            gathered, lens, width = gather_coded([payload[0]], group, world)
            t4 = t5 = t6 = t7 = time.perf_counter()
            peers = [r for r in range(world) if r != me]  # integer sums: any order
            if q.device.type == "cpu":
                # the last peer's decode writes the dequantized result (no pass over the sums)
                out = flat if flat.dtype == torch.float32 else torch.empty(n, dtype=torch.float32)
                for r in peers:
                    fin = (steps, block, world, average, out) if r == peers[-1] else None
                    decode_add_cpu(gathered, r * width, lens[r], q, fin)
            else:
                for r in peers:
                    _add_decoded(gathered, r * width, lens[r], q)
            sent = received = (world - 1) * width
            small = tiny_bytes + 8 * (world - 1)  # the length exchange
        else:
            payload[me] = torch.empty(0, dtype=torch.uint8, device=q.device)
            t3, t4, t5, t6, t7, sent, received = _reduce_scatter_gather(
                q, payload, state, group, world, me
            )
            small = tiny_bytes + 2 * 8 * (world - 1)  # the two length exchanges
        if out is None:
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
