"""The direct exchange: a CPU bucket's coded levels sent point to point, in pieces (gloo).

``compressed_all_reduce``'s all-gather exchange uses it when the group's backend is gloo and the
bucket lives on the CPU (other backends, e.g. NCCL, keep the collectives of
``common.gather_coded``). Each rank sends its per-block statistics and then its coded levels to
every other rank with ``isend`` / ``irecv``. Why, measured on the 2-core VM (docs/gct.md):

* A gloo collective hands the work to the process group's worker thread and back; with ranks on
  shared cores every hand-off is a wake-up. A tiny MAX all-reduce took 0.6-0.8 ms (median), an
  isend/irecv pair 0.3 ms.
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

import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .. import codec
from ..codec import cpu as codec_cpu
from ..codec import stream as codec_stream
from . import kernels
from .common import EMPTY_F32, code_bound, decode_add_cpu, level_buffer, stream_orders
from .state import GCTState

__all__ = [
    "DirectResult",
    "Posted",
    "abandon",
    "all_gather_sum",
    "max_over_ranks",
    "piece_bounds",
    "post",
    "usable",
]

# Tags of this module's messages: _TAG for the block statistics, _TAG + 1 + p for piece p.
_TAG = 0x4743
MIN_PIECE = 1 << 20  # elements: a piece much smaller costs more in messages than it overlaps
MAX_PIECES = 4


class DirectResult(NamedTuple):
    q: torch.Tensor  # this rank's levels (the workspace; used up when the call returns)
    err_sq: float  # sum of the new residual's squares (a statistic)
    bytes_sent: int
    bytes_received: int
    encode_s: float
    comm_s: float  # waiting for messages
    decode_s: float


def usable(group, tensor: torch.Tensor) -> bool:
    """Whether the direct exchange serves ``tensor`` on ``group``: CPU tensors on gloo, whose
    receives may be larger than the message (NCCL's must match it)."""
    return tensor.device.type == "cpu" and dist.get_backend(group) == "gloo"


def _peers(me: int, world: int) -> list[int]:
    return [r for r in range(world) if r != me]


class Posted(NamedTuple):
    """The receives of one call, posted before its statistics pass (see ``post``)."""

    peers: list[int]
    cuts: list[int]  # piece bounds
    stats: list[tuple[torch.Tensor, Any]]  # per peer: buffer, work
    pieces: dict[tuple[int, int], tuple[torch.Tensor, Any]]  # (piece, peer): buffer, work


def post(state: GCTState, n: int, block: int, msg_numel: int, group, me: int, world: int):
    """Post every receive of a call on an n-element bucket at its start: the peers' statistics
    and each piece of their coded levels.

    Why first: gloo writes a message inline in the sender's ``isend`` only if the receive is
    posted already (otherwise it waits for a round trip and the receiver's device thread), and
    posting takes the connection's lock, which the device thread holds while it reads a
    message: done before any message flows, it contends with nothing.
    """
    peers = _peers(me, world)
    cuts = piece_bounds(n, block)
    stats = []
    for r in peers:
        buf = state.workspace(f"direct_stats{r}", msg_numel, torch.float32)
        stats.append((buf, dist.irecv(buf, group=group, group_src=r, tag=_TAG)))
    pieces = {}
    for p in range(len(cuts) - 1):
        cap = _capacity(cuts[p + 1] - cuts[p]) + codec_cpu.PAD  # the decoder reads ahead
        for r in peers:
            buf = state.workspace(f"direct_recv{p}_{r}", cap, torch.uint8)
            pieces[p, r] = buf, dist.irecv(buf, group=group, group_src=r, tag=_TAG + 1 + p)
    return Posted(peers, cuts, stats, pieces)


def max_over_ranks(msg: torch.Tensor, posted: Posted, group) -> None:
    """``msg`` becomes the elementwise maximum over the group's ranks (the same on all of them:
    a maximum does not depend on the order), by one message to and from each other rank."""
    sends = [dist.isend(msg, group=group, group_dst=r, tag=_TAG) for r in posted.peers]
    for w in [w for _, w in posted.stats] + sends:
        w.wait()
    for buf, _ in posted.stats:
        torch.maximum(msg, buf, out=msg)


def abandon(posted: Posted, group) -> None:
    """End a call that sends no levels (a non-finite gradient, seen by every rank alike): one
    byte per posted piece receive goes to each peer, so every receive completes and the next
    call's messages meet the next call's receives."""
    token = torch.zeros(1, dtype=torch.uint8)
    sends = [
        dist.isend(token, group=group, group_dst=r, tag=_TAG + 1 + p) for p, r in posted.pieces
    ]
    for w in [w for _, w in posted.pieces.values()] + sends:
        w.wait()


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


def _capacity(m: int) -> int:
    """Bytes a stream of m levels may take: header, tables and the kernels' worst case."""
    return codec_stream.head_size(-(-m // codec.DEFAULT_CHUNK)) + code_bound(m, 1)


def all_gather_sum(
    state: GCTState,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    steps: torch.Tensor,
    amax: torch.Tensor,
    block: int,
    err: torch.Tensor,
    group,
    me: int,
    world: int,
    average: bool,
    out: torch.Tensor,
    posted: Posted,
) -> DirectResult:
    """Quantize v = x + residual (float32, CPU) with the agreed ``steps`` (the new residual into
    ``err``, which may be ``residual``; ``amax``: the agreed per-block max |v|), send the coded
    levels to every other rank piece by piece, and write into ``out`` (float32) the sum over
    ranks dequantized (/ world if ``average``); the receives are ``post``'s."""
    cfg = state.cfg
    n = x.numel()
    chunk = codec.DEFAULT_CHUNK
    cuts, peers, recvs = posted.cuts, posted.peers, posted.pieces
    ks, kk = stream_orders(state)
    k = cfg.eg_order if isinstance(cfg.eg_order, int) else 0  # RDOQ's rate model
    th = kernels.rdoq_thresholds(cfg.rdoq_mu, k, cfg.zero_runs)
    # two ranks: the decode forms the sums in its own buffer, q holds our levels alone
    q = level_buffer(state, n, amax, steps, narrow=len(peers) == 1)
    xn, sn, qn, en = x.numpy(), steps.contiguous().numpy(), q.numpy(), err.numpy()
    rn = residual.numpy() if residual is not None else EMPTY_F32
    vb = state.workspace("block", block, torch.float32).numpy()
    t0 = time.perf_counter()
    sends, sent, err_sq = [], 0, 0.0
    for p in range(len(cuts) - 1):
        lo, hi = cuts[p], cuts[p + 1]
        m = hi - lo
        head = codec_stream.head_size(-(-m // chunk))
        buf = state.workspace(f"direct_send{p}", _capacity(m), torch.uint8)
        bn = buf.numpy()
        seg_bytes, bits, orders, code, esq = kernels.quantize_encode(
            xn[lo:hi],
            rn[lo:hi] if residual is not None else rn,
            sn[lo // block :],
            block,
            float(cfg.rdoq_mu),
            k,
            bool(cfg.zero_runs),
            th,
            np.asarray([0, m], np.int64),
            -1,
            chunk,
            np.asarray(ks, np.int64),
            vb,
            qn[lo:hi],
            en[lo:hi],
            bn[head:],
        )
        if code != 0:
            raise ValueError(f"cannot encode the levels: {codec_cpu.error_message(code, -1)}")
        err_sq += esq
        size = codec_stream.write_head(bn, m, kk, cfg.zero_runs, chunk, bits, orders, seg_bytes[1])
        sends += [dist.isend(buf[:size], group=group, group_dst=r, tag=_TAG + 1 + p) for r in peers]
        sent += size * len(peers)
    t1 = time.perf_counter()
    received, comm_s, decode_s = 0, 0.0, 0.0
    for p in range(len(cuts) - 1):
        lo, hi = cuts[p], cuts[p + 1]
        for r in peers:  # integer sums: the order does not matter
            buf, work = recvs[p, r]
            ta = time.perf_counter()
            work.wait()
            tb = time.perf_counter()
            # the last peer's decode writes the dequantized result (no pass over the sums)
            fin = (steps[lo // block :], block, world, average, out[lo:hi])
            try:
                size = codec_stream.stream_size(buf.numpy())
                if size > buf.numel() - codec_cpu.PAD:
                    raise ValueError(f"a stream of {size} bytes for {hi - lo} levels")
                decode_add_cpu(buf, 0, size, q[lo:hi], fin if r == peers[-1] else None)
            except ValueError as e:
                # every other message of the call still lands, so the connection stays usable
                # (a gloo work waited twice waits for a second message)
                rest = list(recvs)[list(recvs).index((p, r)) + 1 :]
                for w in [recvs[key][1] for key in rest] + sends:
                    w.wait()
                raise ValueError(f"rank {r}'s piece {p}: {e}") from None
            received += size
            comm_s += tb - ta
            decode_s += time.perf_counter() - tb
    ta = time.perf_counter()
    for w in sends:  # the send buffers are reused by the next call
        w.wait()
    comm_s += time.perf_counter() - ta
    return DirectResult(q, err_sq, sent, received, t1 - t0, comm_s, decode_s)
