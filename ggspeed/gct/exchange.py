"""How the ranks of one compressed all-reduce exchange their messages: one small interface.

:class:`Exchange` has one implementation per way of moving the coded levels, chosen once per
call by :func:`choose`:

* :class:`AllGather`: every rank's stream to every rank by an all-gather (fewest bytes and
  collectives for 2 ranks; the received volume grows with the world size);
* :class:`ReduceScatter`: chunk r of the levels coded and sent to rank r, which sums the
  integers exactly, then an all-gather of the coded sums (volume independent of world size);
* ``direct.Direct``: CPU buckets on gloo, the all-gather's messages point to point, in pieces
  that overlap coding, transfer and decoding.

Each also carries the call's two tiny agreements: step 2's MAX of the block statistics, and the
verdict at the end (did any rank receive a bad stream; do all ranks hold the same agreed
statistics?), so that every rank accepts or refuses a call alike.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .common import (
    decode_add,
    dequantize,
    encode_levels,
    entropy_bits,
    fused,
    level_counts,
    quantize_encode,
    with_slack,
)
from .state import GCTState

__all__ = ["AllGather", "Call", "Exchange", "ReduceScatter", "Timings", "choose"]

EXCHANGES = ("auto", "allgather", "reduce_scatter")

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass
class Timings:
    """Seconds one call spent coding (statistics, quantize and code), waiting for messages, and
    decoding (decode, add, dequantize)."""

    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    _mark: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``: "encode", "comm" or "decode"."""
        now = time.perf_counter()
        name = phase + "_s"
        setattr(self, name, getattr(self, name) + now - self._mark)
        self._mark = now


@dataclasses.dataclass
class Call:
    """One call of the compressed all-reduce after step 2: what steps 3-5 read and write."""

    state: GCTState
    x: torch.Tensor  # float32: v itself, or on the CPU the gradient (the kernels add residual)
    residual: torch.Tensor | None
    steps: torch.Tensor  # agreed, per block
    amax: torch.Tensor  # agreed max |v| per block
    block: int
    average: bool
    err: torch.Tensor | None  # where the CPU kernels write the new residual (not the live one)
    out: torch.Tensor | None  # float32 buffer for the result on the CPU (may be the input)
    timings: Timings
    measure_entropy: bool = False  # histogram the coded levels (``GCTState.entropy_due``)
    # written by the exchange:
    result: torch.Tensor | None = None
    new_residual: torch.Tensor | None = None
    err_sq: float = 0.0
    sig_sq: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    # with measure_entropy: an ideal coder's bits for what this rank sent coded, counted as
    # bytes_sent counts the coded bytes (``GCTStats.entropy_bits_per_element``)
    entropy_bits: float = 0.0
    bad: dict[int, str] = dataclasses.field(default_factory=dict)  # sender -> what was wrong

    @property
    def n(self) -> int:
        return self.x.numel()

    def receive(self, sender: int, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` (a decode of ``sender``'s stream) unless a stream of this call was
        refused already; a ValueError marks ``sender``'s stream bad instead of escaping, so the
        rank goes on with the exchange's remaining messages and reaches the verdict."""
        if self.bad:
            return
        try:
            fn(*args)
        except ValueError as e:
            self.bad[sender] = str(e)


class Exchange(ABC):
    """How one call's messages travel between the ranks of ``group``."""

    name: ClassVar[str]
    # Fault injection for tests: sees every buffer this process is about to send (coded
    # streams; the direct exchange's statistics messages too) and may change it in place or
    # return a replacement to send instead.
    send_hook: ClassVar[Callable[[torch.Tensor], torch.Tensor | None] | None] = None

    def __init__(self, group: Any, me: int, world: int) -> None:
        self.group, self.me, self.world = group, me, world

    def begin(self, state: GCTState, n: int, block: int, msg_numel: int) -> None:
        """Before step 1: post what can be posted in advance (the direct exchange's receives)."""
        return None

    @abstractmethod
    def max_over_ranks(self, msg: torch.Tensor) -> int:
        """Step 2: ``msg`` becomes the elementwise maximum over the ranks. Returns the bytes
        this rank sent (ring-equivalent for collectives)."""

    def abandon(self) -> None:
        """End a call that sends no levels (a non-finite gradient, seen by every rank alike)."""
        return None

    @abstractmethod
    def reduce(self, call: Call) -> None:
        """Steps 3-5: quantize and code, exchange, decode and dequantize into ``call.result``
        the sum over ranks (/ world if averaging), identical on every rank. A stream that fails
        its checks lands in ``call.bad``; every message of the call is still sent and
        received, so the ranks stay in step for the verdict and the next call."""

    @abstractmethod
    def agree_flags(self, flags: torch.Tensor) -> int:
        """Step 6: ``flags`` (int64, on the bucket's device) becomes the elementwise maximum
        over the ranks. Returns the bytes this rank sent."""

    def outgoing(self, buf: torch.Tensor) -> torch.Tensor:
        """What to send for ``buf``: every outgoing buffer passes here right before it is handed
        to the transport (``send_hook``)."""
        hook = Exchange.send_hook
        if hook is None:
            return buf
        out = hook(buf)
        return buf if out is None else out


def choose(name: str, group: Any, flat: torch.Tensor, me: int, world: int) -> Exchange:
    """The exchange for ``name`` ("auto": allgather for 2 ranks, else reduce_scatter) on this
    group and device: the all-gather goes point to point (``direct``) for CPU tensors on gloo."""
    from . import direct

    if name == "reduce_scatter" or (name == "auto" and world != 2):
        return ReduceScatter(group, me, world)
    if fused(flat) and direct.usable(group, flat):
        return direct.Direct(group, me, world)
    return AllGather(group, me, world)


class _Collectives(Exchange):
    """The agreements as all-reduces (MAX)."""

    def max_over_ranks(self, msg: torch.Tensor) -> int:
        dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=self.group)
        return msg.numel() * 4 * 2 * (self.world - 1) // self.world  # ring-equivalent

    def agree_flags(self, flags: torch.Tensor) -> int:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags.numel() * 8 * 2 * (self.world - 1) // self.world


class AllGather(_Collectives):
    """Every rank's coded levels to every rank by an all-gather; each rank sums them itself."""

    name = "allgather"

    def reduce(self, call: Call) -> None:
        st, world, me = call.state, self.world, self.me
        # 3. Quantize and code the whole bucket as one stream.
        q, call.new_residual, call.err_sq, sig_sq, coded = quantize_encode(
            st, call.x, call.residual, call.steps, call.block, call.err, [0, call.n], -1
        )
        call.sig_sq = sig_sq if sig_sq is not None else call.sig_sq
        if call.measure_entropy:  # our levels, one stream to each other rank
            call.entropy_bits = (world - 1) * entropy_bits(level_counts([q]))
        call.timings.lap("encode")
        # 4. Exchange: all-gather of the streams, padded to the longest.
        gathered, lens, width = gather_coded([self.outgoing(coded[0])], self.group, world)
        call.timings.lap("comm")
        # 5. Decode every peer's stream and add its levels to ours (integer sums: any order);
        #    on the CPU the last decode writes the dequantized result (no pass over the sums).
        peers = [r for r in range(world) if r != me]
        cpu = fused(q)
        for r in peers:
            fin = (call.steps, call.block, world, call.average, call.out)
            fin = fin if cpu and r == peers[-1] else None
            call.receive(r, decode_add, gathered, r * width, lens[r], q, fin)
        if cpu:
            call.result = call.out
        else:
            call.result = dequantize(q, call.steps, call.block, world, call.average, None)
        call.timings.lap("decode")
        call.bytes_sent = call.bytes_received = (world - 1) * width + 8 * (world - 1)


class ReduceScatter(_Collectives):
    """Chunk r of every rank's levels to rank r, summed there exactly; then an all-gather of the
    coded sums."""

    name = "reduce_scatter"

    def reduce(self, call: Call) -> None:
        st, world, me, dev = call.state, self.world, self.me, call.x.device
        bounds = chunk_bounds(call.n, world)
        # 3. Quantize the bucket; code chunk r for its owner r (ours is summed in place).
        q, call.new_residual, call.err_sq, sig_sq, coded = quantize_encode(
            st, call.x, call.residual, call.steps, call.block, call.err, bounds, me
        )
        call.sig_sq = sig_sq if sig_sq is not None else call.sig_sq
        if call.measure_entropy:  # our levels of the other ranks' chunks, each sent once
            lo, hi = bounds[me], bounds[me + 1]
            call.entropy_bits = entropy_bits(level_counts([q[:lo], q[hi:]]))
        coded[me] = torch.empty(0, dtype=torch.uint8, device=dev)
        call.timings.lap("encode")
        # 4a. Exchange: all-to-all of the chunks (their lengths first).
        coded = [self.outgoing(c) for c in coded]
        in_sizes = [c.numel() for c in coded]
        out_len = torch.empty(world, dtype=torch.int64, device=dev)
        in_len = torch.tensor(in_sizes, dtype=torch.int64, device=dev)
        dist.all_to_all_single(out_len, in_len, group=self.group)
        out_sizes = out_len.tolist()
        recv = with_slack(sum(out_sizes), dev)
        dist.all_to_all_single(
            recv[: sum(out_sizes)], torch.cat(coded), out_sizes, in_sizes, group=self.group
        )
        call.timings.lap("comm")
        # 5a. Sum every rank's levels of our chunk into ours (int32 is exact: ``block_steps``
        #     keeps |level| x world below 2^29).
        mine = q[bounds[me] : bounds[me + 1]]
        offset = 0
        for r, size in enumerate(out_sizes):
            if size:
                call.receive(r, decode_add, recv, offset, size, mine)
            offset += size
        call.timings.lap("decode")
        # 3b. Code our chunk's sums (zeros after a refused stream: the call fails anyway, and a
        #     partial sum could leave the codec's range).
        if call.bad:
            mine.zero_()
        own = encode_levels(mine, st)
        if call.measure_entropy:  # our chunk's sums, sent to each other rank
            call.entropy_bits += (world - 1) * entropy_bits(level_counts([mine]))
        call.timings.lap("encode")
        # 4b. Exchange: all-gather of the coded sums.
        gathered, lens, width = gather_coded([self.outgoing(own)], self.group, world)
        call.timings.lap("comm")
        # 5b. The other chunks become their owners' sums; dequantize the whole bucket.
        for r in range(world):
            if r != me:
                theirs = q[bounds[r] : bounds[r + 1]]
                theirs.zero_()
                call.receive(r, decode_add, gathered, r * width, lens[r], theirs)
        call.result = dequantize(q, call.steps, call.block, world, call.average, call.out)
        call.timings.lap("decode")
        lengths = 2 * 8 * (world - 1)  # the two length exchanges
        call.bytes_sent = sum(in_sizes) + (world - 1) * width + lengths
        call.bytes_received = sum(out_sizes) + (world - 1) * width + lengths


def chunk_bounds(n: int, world: int) -> list[int]:
    """Where rank r's chunk of an n-element bucket starts (and n): sizes differ by at most 1."""
    base, extra = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def gather_coded(parts: list[torch.Tensor], group: Any, world: int):
    """All-gather of each rank's coded bytes (``parts`` joined), padded to the longest (the
    padding is sent).

    Returns (gathered, lengths, width): rank r's bytes are gathered[r * width:][:lengths[r]];
    ``gathered`` ends with ``chunks.PAD`` zero bytes more (the CPU decoder reads ahead).
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
