"""GCT as a torch DDP communication hook, for plain DistributedDataParallel users.

    state = GCTState(GCTConfig(enabled=True, quant_step=1.0), group=None)
    ddp.register_comm_hook(state, gct_hook)

Like PyTorch's PowerSGD hook, the state object carries the error-feedback memory between calls,
and the hook returns at once with a future that completes when the bucket's average is in its
buffer: DDP goes on computing the gradients of the remaining buckets meanwhile and waits for the
futures at the end of backward.

Why a worker thread and not a chain of ``async_op=True`` collectives: the compressed all-reduce
alternates CPU work with collectives that depend on it (the agreed step decides the levels that
get coded and sent), so it is a sequence, not one collective. One worker thread per group of
ranks runs the buckets in the order DDP hands them over, the same order on every rank; its
numba kernels release the GIL, and gloo waits do too.

Why a private process group: the hook's collectives run on a copy of the state's group (made on
the hook's first call, which therefore waits for every rank of the group). DDP issues its own
collectives from the backward thread (the unused-parameter map with
``find_unused_parameters=True``); on one shared group the two threads' collectives could be
issued in different orders on different ranks and be paired wrongly.

(No ``from __future__ import annotations`` here: DDP compares the return annotation with
``torch.futures.Future[torch.Tensor]`` as an object.)
"""

import contextlib
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .allreduce import compressed_all_reduce
from .state import GCTState

__all__ = ["gct_hook"]


@dataclasses.dataclass
class _Channel:
    """A private process group over a set of ranks and the one thread that uses it."""

    world: object  # the default group it was made under: a new one (re-initialized) invalidates
    group: dist.ProcessGroup
    worker: ThreadPoolExecutor


_CHANNELS: dict[tuple[int, ...], _Channel] = {}
_LOCK = threading.Lock()


def _channel(group: dist.ProcessGroup | None) -> _Channel:
    """The channel over ``group``'s ranks, made on first use (a collective over those ranks)."""
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    with _LOCK:
        ch = _CHANNELS.get(ranks)
        if ch is None or ch.world is not dist.group.WORLD:
            if ch is not None:
                ch.worker.shutdown(wait=False)
            # The whole world makes the copy of WORLD together; a subgroup's ranks make theirs
            # alone (other ranks may be running other subgroups).
            local = len(ranks) != dist.get_world_size()
            private = dist.new_group(list(ranks), use_local_synchronization=local)
            worker = ThreadPoolExecutor(1, thread_name_prefix=f"ggspeed-gct-hook-{len(ranks)}")
            ch = _CHANNELS[ranks] = _Channel(dist.group.WORLD, private, worker)
        return ch


def gct_hook(state: GCTState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients with the compressed all-reduce; a future of the buffer.

    Error feedback: the residual of this bucket (keyed on ``bucket.index()``, stable across
    iterations once DDP has rebuilt its buckets; a size change drops it) is added to the
    gradient before quantization, and what quantization drops now becomes the new residual.
    The result is the one a synchronous call of :func:`compressed_all_reduce` on ``state.group``
    gives, bit for bit, on every rank.
    """
    buf = bucket.buffer()
    key = f"ddp{bucket.index()}"
    ch = _channel(state.group)
    # On a GPU the worker queues its kernels on the stream that produced the gradients.
    stream = torch.cuda.current_stream(buf.device) if buf.is_cuda else None
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def reduce() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                compressed_all_reduce(buf, state, ch.group, key=key, average=True)
        except BaseException as err:  # DDP re-raises it where it waits for the future
            fut.set_exception(err)
        else:
            fut.set_result(buf)

    ch.worker.submit(reduce)
    return fut
