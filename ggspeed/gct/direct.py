"""The direct exchange: a CPU bucket's coded levels sent point to point, in pieces (gloo).

``compressed_all_reduce``'s all-gather exchange uses it when the group's backend is gloo and the
bucket lives on the CPU (other backends, e.g. NCCL, keep the collectives of ``exchange.py``).
Each rank sends its per-block statistics, then its coded levels, then its verdict flags to every
other rank with ``isend`` / ``irecv``. Why (measurements in docs/gct.md):

* A gloo collective hands the work to the process group's worker thread and back; with ranks on
  shared cores every hand-off is a wake-up, which costs more than an isend/irecv pair.
* No lengths go first: gloo receives a message into a larger buffer (here the worst case of the
  codes), and the stream's header says how many bytes arrived (``stream_size``). The all-gather
  needed an all-gather of the lengths before the payload, and padded every payload to the
  longest.
* The bucket is quantized and coded in pieces, each sent as soon as it is coded: a piece's time on
  the wire overlaps the coding of the next, and decoding a piece overlaps the next one's arrival.

The levels, their integer sums and the dequantization are those of the all-gather exchange, so
the result is the same bit for bit (a test compares them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from ..codec import chunks
from . import common, kernels
from .common import EMPTY_F32, decode_add, entropy_bits, level_buffer, level_counts, rdoq_order
from .exchange import Call, Exchange
from .state import GCTState

__all__ = ["MAX_PIECES", "MIN_PIECE", "Direct", "piece_bounds", "usable"]

# Tags of this module's messages: _TAG for the block statistics, _TAG + 1 + p for piece p,
# _VERDICT_TAG for the verdict flags.
_TAG = 0x4743
MIN_PIECE = 1 << 20  # elements: a piece much smaller costs more in messages than it overlaps
MAX_PIECES = 4
_VERDICT_TAG = _TAG + 1 + MAX_PIECES


def usable(group, tensor: torch.Tensor) -> bool:
    """Whether the direct exchange serves ``tensor`` on ``group``: CPU tensors on gloo, whose
    receives may be larger than the message (NCCL's must match it)."""
    return tensor.device.type == "cpu" and dist.get_backend(group) == "gloo"


class _Posted(NamedTuple):
    """The receives of one call, posted before its statistics pass (see ``Direct.begin``)."""

    cuts: list[int]  # piece bounds
    stats: list[tuple[torch.Tensor, Any]]  # per peer: buffer, work
    pieces: dict[tuple[int, int], tuple[torch.Tensor, Any]]  # (piece, peer): buffer, work


class Direct(Exchange):
    """The all-gather exchange point to point (gloo, CPU buckets)."""

    name = "direct"

    def __init__(self, group: Any, me: int, world: int) -> None:
        super().__init__(group, me, world)
        self.peers = [r for r in range(world) if r != me]
        self.posted: _Posted | None = None

    def begin(self, state: GCTState, n: int, block: int, msg_numel: int) -> None:
        """Post every receive of the call on an n-element bucket: the peers' statistics and
        each piece of their coded levels.

        Why first: gloo writes a message inline in the sender's ``isend`` only if the receive is
        posted already (otherwise it waits for a round trip and the receiver's device thread),
        and posting takes the connection's lock, which the device thread holds while it reads a
        message: done before any message flows, it contends with nothing.
        """
        g = self.group
        cuts = piece_bounds(n, block)
        stats = []
        for r in self.peers:
            buf = state.workspace(f"direct_stats{r}", msg_numel, torch.float32)
            stats.append((buf, dist.irecv(buf, group=g, group_src=r, tag=_TAG)))
        pieces = {}
        for p in range(len(cuts) - 1):
            cap = chunks.stream_capacity(cuts[p + 1] - cuts[p]) + chunks.PAD  # decoder reads ahead
            for r in self.peers:
                buf = state.workspace(f"direct_recv{p}_{r}", cap, torch.uint8)
                pieces[p, r] = buf, dist.irecv(buf, group=g, group_src=r, tag=_TAG + 1 + p)
        self.posted = _Posted(cuts, stats, pieces)

    def max_over_ranks(self, msg: torch.Tensor) -> int:
        """``msg`` becomes the elementwise maximum over the ranks (the same on all of them: a
        maximum does not depend on the order), by one message to and from each other rank."""
        assert self.posted is not None
        self._max(msg, self.posted.stats, _TAG, self.outgoing(msg))
        return msg.numel() * 4 * len(self.peers)

    def agree_flags(self, flags: torch.Tensor) -> int:
        recvs = []
        for r in self.peers:
            buf = torch.empty_like(flags)
            recvs.append((buf, dist.irecv(buf, group=self.group, group_src=r, tag=_VERDICT_TAG)))
        self._max(flags, recvs, _VERDICT_TAG)
        return flags.numel() * 8 * len(self.peers)

    def _max(self, t: torch.Tensor, recvs: list[tuple[torch.Tensor, Any]], tag: int, send=None):
        """t = max(t, every peer's message), sending ``send`` (default: t) to every peer."""
        send = t if send is None else send
        sends = [dist.isend(send, group=self.group, group_dst=r, tag=tag) for r in self.peers]
        for w in [w for _, w in recvs] + sends:
            w.wait()
        for buf, _ in recvs:
            torch.maximum(t, buf, out=t)

    def abandon(self) -> None:
        """One byte per posted piece receive goes to each peer, so every receive completes and
        the next call's messages meet the next call's receives."""
        assert self.posted is not None
        token = torch.zeros(1, dtype=torch.uint8)
        pieces = self.posted.pieces
        sends = [
            dist.isend(token, group=self.group, group_dst=r, tag=_TAG + 1 + p) for p, r in pieces
        ]
        for w in [w for _, w in pieces.values()] + sends:
            w.wait()

    def reduce(self, call: Call) -> None:
        """Steps 3-5 piece by piece: quantize and code piece p (3) and send it to every peer
        (4) while the next piece is coded; then wait for each peer's pieces (4) and decode and
        add them (5), the last peer's decode writing the dequantized result."""
        assert self.posted is not None
        st, cfg, world = call.state, call.state.cfg, self.world
        n, block = call.n, call.block
        chunk = codec.DEFAULT_CHUNK
        cuts, peers, recvs = self.posted.cuts, self.peers, self.posted.pieces
        ks = np.asarray(chunks.kernel_orders(cfg.eg_order, cfg.zero_runs), np.int64)
        kk = chunks.stream_k(cfg.eg_order, cfg.zero_runs)
        k = rdoq_order(st)
        th = kernels.rdoq_thresholds(cfg.rdoq_mu, k, cfg.zero_runs)
        # two ranks: the decode forms the sums in its own buffer, q holds our levels alone
        q = level_buffer(st, n, call.amax, call.steps, narrow=len(peers) == 1)
        err = call.err if call.err is not None else st.workspace("err", n, torch.float32)
        xn, sn, qn, en = call.x.numpy(), call.steps.contiguous().numpy(), q.numpy(), err.numpy()
        rn = call.residual.numpy() if call.residual is not None else EMPTY_F32
        vb = st.workspace("block", block, torch.float32).numpy()
        sends, sent, err_sq = [], 0, 0.0
        for p in range(len(cuts) - 1):
            # 3. Quantize and code piece p into its send buffer, after room for the header.
            lo, hi = cuts[p], cuts[p + 1]
            m = hi - lo
            head = chunks.head_size(-(-m // chunk))
            buf = st.workspace(f"direct_send{p}", chunks.stream_capacity(m), torch.uint8)
            bn = buf.numpy()
            seg_bytes, bits, orders, code, esq = kernels.quantize_encode(
                xn[lo:hi],
                rn[lo:hi] if call.residual is not None else rn,
                sn[lo // block :],
                block,
                float(cfg.rdoq_mu),
                k,
                bool(cfg.zero_runs),
                th,
                np.asarray([0, m], np.int64),
                -1,
                chunk,
                ks,
                vb,
                qn[lo:hi],
                en[lo:hi],
                bn[head:],
            )
            if code != 0:
                raise ValueError(f"cannot encode the levels: {chunks.error_message(code)}")
            err_sq += esq
            size = chunks.write_stream_head(
                bn,
                m,
                kk,
                cfg.zero_runs,
                bits,
                orders,
                int(seg_bytes[1]),
                checksum=common.WIRE_CHECKSUM,
            )
            # 4. Send it to every peer.
            msg, g = self.outgoing(buf[:size]), self.group
            sends += [dist.isend(msg, group=g, group_dst=r, tag=_TAG + 1 + p) for r in peers]
            sent += size * len(peers)
        if call.measure_entropy:  # our levels (before the decodes add to them), to each peer
            call.entropy_bits = len(peers) * entropy_bits(level_counts([q]))
        call.timings.lap("encode")
        received = 0
        for p in range(len(cuts) - 1):
            lo, hi = cuts[p], cuts[p + 1]
            for r in peers:  # integer sums: the order does not matter
                # 4. Wait for peer r's piece p.
                buf, work = recvs[p, r]
                work.wait()
                call.timings.lap("comm")
                # 5. Decode it and add its levels to ours; the last peer's decode writes the
                #    dequantized result (no pass over the sums).
                fin = (call.steps[lo // block :], block, world, call.average, call.out[lo:hi])
                fin = fin if r == peers[-1] else None
                call.receive(r, _decode_piece, buf, hi - lo, q[lo:hi], fin)
                received += _claimed_size(buf)
                call.timings.lap("decode")
        for w in sends:  # the send buffers are reused by the next call
            w.wait()
        call.timings.lap("comm")
        call.result = call.out
        call.new_residual = call.err if cfg.error_feedback else None
        call.err_sq = err_sq
        call.bytes_sent, call.bytes_received = sent, received
        self.posted = None


def _decode_piece(buf: torch.Tensor, m: int, q: torch.Tensor, fin) -> None:
    """q += the levels of the stream at the start of the receive buffer ``buf``, which says its
    own size; ValueError if that exceeds what was received or the stream is bad."""
    size = chunks.stream_size(buf.numpy())
    if size > buf.numel() - chunks.PAD:
        raise ValueError(f"a stream of {size} bytes for {m} levels")
    decode_add(buf, 0, size, q, fin)


def _claimed_size(buf: torch.Tensor) -> int:
    """The size a received stream's header claims (0 if it is no stream header)."""
    try:
        return chunks.stream_size(buf.numpy())
    except ValueError:
        return 0


def piece_bounds(n: int, block: int) -> list[int]:
    """Where the pieces of an n-element bucket start (and n): whole blocks (a piece's steps are
    a slice of the bucket's), whole codec chunks where blocks divide them, at least
    ``MIN_PIECE`` elements each, at most ``MAX_PIECES``."""
    chunk = codec.DEFAULT_CHUNK
    unit = chunk if chunk % block == 0 else block
    pieces = max(1, min(MAX_PIECES, n // MIN_PIECE))
    per = -(-n // pieces)
    per = -(-per // unit) * unit
    return [*range(0, n, per), n]
