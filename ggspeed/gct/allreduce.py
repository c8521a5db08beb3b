"""The compressed all-reduce: Exp-Golomb-coded levels exchanged between ranks, error feedback.

One call, on every rank of ``group`` (each step is marked where it happens, here and in the
exchanges of ``exchange.py`` / ``direct.py``):

1. Error feedback: ``v = x + residual`` (what earlier calls dropped is sent now), and per block
   of v its RMS, max |v| and whether it holds an inf or NaN.
2. Agree on steps: one tiny MAX over the ranks of [block RMS, block max |v|, non-finite flag];
   every rank derives the same quantization step per block from the same numbers, and all of
   them learn alike if any rank holds an inf or NaN (then every rank returns NaN).
3. Quantize and code: ``q = quantize(v / step)`` (rounding or RDOQ), the new residual
   ``v - q * step``, and the levels Exp-Golomb coded into wire streams with a CRC-32. On a
   bucket's first call of each telemetry window also the histogram of the coded levels
   (``GCTState.entropy_due``: the ``entropy_bits_per_element`` statistic).
4. Exchange the streams (``exchange.choose``): an all-gather, a reduce-scatter followed by an
   all-gather of the coded sums, or the all-gather's messages point to point (gloo, CPU).
5. Decode and dequantize: every rank adds the received levels to its own as exact integer sums
   and scales them by the agreed steps, so the result is identical on all ranks bit for bit.
6. Verdict: one tiny MAX of "a bad stream came from rank r" flags and a checksum of the agreed
   statistics; if any rank refused a stream, or the ranks' agreed statistics differ, every rank
   raises :class:`WireError` naming the sender, and no rank's residual changes.
7. Commit: the new residual replaces the old one, the result goes into the caller's tensor.

On the CPU the element-wise passes are fused numba kernels (``kernels.py``, one thread: ranks
usually share the cores); elsewhere torch ops and the codec's Triton kernels (``common.py``
lists each operation's two forms). The uncompressed tensor never goes on the wire; bytes are
counted as handed to the transport.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .common import add_and_block_stats, block_steps, fused
from .exchange import EXCHANGES, Call, Timings, choose
from .state import GCTState

__all__ = ["WireError", "compressed_all_reduce"]


class WireError(ValueError):
    """A call refused on every rank: a rank received a stream that failed its checks, or the
    ranks' agreed statistics differ. The same message on every rank; no residual changed."""


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
    every rank and leaves the residuals as they were (the caller's overflow handling decides
    what to do with the step). A corrupted message raises :class:`WireError` on every rank,
    residuals unchanged (the tensor's contents are then undefined).

    ``exchange`` (default: the config's ``exchange``): "allgather" (every rank's coded levels to
    every rank: with 2 ranks fewer bytes and collectives), "reduce_scatter" (coded chunks to
    their owners, then an all-gather of the coded sums: wire volume independent of the world
    size), or "auto" (allgather for 2 ranks). All give the same result bit for bit.
    """
    name = state.cfg.exchange if exchange is None else exchange
    if name not in EXCHANGES:
        raise ValueError(
            f"compressed_all_reduce: exchange must be one of {EXCHANGES}, got {name!r}"
        )
    group = group if group is not None else state.group
    world = dist.get_world_size(group)
    if world == 1 or tensor.numel() == 0:
        return tensor
    me = dist.get_rank(group)
    aliased = tensor.is_contiguous()
    flat = tensor.view(-1) if aliased else tensor.reshape(-1)
    ex = choose(name, group, flat, me, world)
    n = flat.numel()
    block = min(state.cfg.block_size or n, n)
    nb = -(-n // block)
    residual = state.residual(key, flat)  # before any message: it may refuse a restored one
    timings = Timings()
    ex.begin(state, n, block, 2 * nb + 1)

    # 1. Error feedback and statistics: v = flat + residual (on the CPU not stored: the quantize
    #    pass adds again), msg = [RMS per block, max |v| per block, non-finite flag].
    x, msg, sig_sq = add_and_block_stats(state, flat, residual, block)
    timings.lap("encode")

    # 2. Agree on steps: the MAX over ranks, then the same steps on every rank.
    small = ex.max_over_ranks(msg)
    timings.lap("comm")
    if msg[-1] > 0:  # some rank holds an inf or NaN: nothing is quantized or sent
        ex.abandon()
        tensor.fill_(float("nan"))
        state.record(calls=1, nonfinite_calls=1, comm_s=timings.comm_s, bytes_sent=small)
        return tensor
    steps = block_steps(state, msg[:nb], msg[nb : 2 * nb], world)

    # 3-5. Quantize and code, exchange, decode and dequantize (the exchange orders them). The new
    #    residual goes to a second buffer, never over the live one: the call may still fail.
    cpu = fused(flat)  # the CPU kernels: new residual into a second buffer, result into out
    call = Call(
        state=state,
        x=x,
        residual=residual,
        steps=steps,
        amax=msg[nb : 2 * nb],
        block=block,
        average=average,
        err=state.residual_buffer(key, n) if cpu and state.cfg.error_feedback else None,
        out=(flat if flat.dtype == torch.float32 else torch.empty(n)) if cpu else None,
        timings=timings,
        sig_sq=sig_sq,
        measure_entropy=state.entropy_due(key),
    )
    ex.reduce(call)

    # 6. Verdict: every rank learns whether any rank refused a stream (flags[r]: from rank r),
    #    and whether all ranks hold the same agreed statistics (max and -min of a checksum).
    crc = zlib.crc32(msg.cpu().numpy())
    flags = [1 if r in call.bad else 0 for r in range(world)] + [crc, -crc]
    agreed = torch.tensor(flags, dtype=torch.int64, device=msg.device)  # NCCL: on the device
    small += ex.agree_flags(agreed)
    flags = agreed.tolist()
    timings.lap("comm")
    bad_senders = [r for r in range(world) if flags[r] > 0]
    if bad_senders or flags[world] != -flags[world + 1]:
        state.record(calls=1, wire_errors=1, comm_s=timings.comm_s)
        raise _wire_error(group, key, bad_senders, call.bad)

    # 7. Commit: the new residual replaces the old one; the result goes to the caller.
    if call.new_residual is not None:
        state.set_residual(key, call.new_residual, recycle=cpu)
    if call.result is not flat:
        flat.copy_(call.result)
    if not aliased:
        tensor.copy_(flat.view_as(tensor))
    timings.lap("decode")

    wire_elements = 2.0 * n * (world - 1) / world  # ring-equivalent: fp32 = 32 bits
    if call.measure_entropy:
        state.record_entropy(key, call.entropy_bits, wire_elements)
    state.record(
        calls=1,
        elements=n,
        bytes_sent=int(call.bytes_sent + small),
        bytes_received=int(call.bytes_received + small),
        wire_elements=wire_elements,
        quant_sq_err=float(call.err_sq),
        signal_sq=float(call.sig_sq or 0.0),
        encode_s=timings.encode_s,
        comm_s=timings.comm_s,
        decode_s=timings.decode_s,
    )
    state.record_last(
        last_bytes_sent=int(call.bytes_sent + small),
        last_bytes_received=int(call.bytes_received + small),
        last_elements=n,
        last_step=float(steps.max()),
    )
    return tensor


def _wire_error(group, key: str, senders: list[int], seen: dict[int, str]) -> WireError:
    """The error every rank raises alike (``seen``: what this rank found, added as the cause)."""
    if senders:
        g = group if group is not None else dist.group.WORLD
        names = ", ".join(str(dist.get_global_rank(g, r)) for r in senders)
        what = f"a corrupted stream from rank {names}"
    else:
        what = "the ranks' agreed block statistics differ (a corrupted statistics message)"
    err = WireError(
        f"compressed_all_reduce: {what} in bucket {key!r}; the call is refused on every rank, "
        "no residual changed"
    )
    if seen:
        err.__cause__ = ValueError("; ".join(f"rank {r}: {e}" for r, e in seen.items()))
    return err
