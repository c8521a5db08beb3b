"""GCT as a torch DDP communication hook, for plain DistributedDataParallel users.

    state = GCTState(GCTConfig(enabled=True, quant_step=1.0), group=None)
    ddp.register_comm_hook(state, gct_hook)

Like PyTorch's PowerSGD hook, the state object carries the error-feedback memory between calls.
(No ``from __future__ import annotations`` here: DDP compares the return annotation with
``torch.futures.Future[torch.Tensor]`` as an object.)
"""

import torch
import torch.distributed as dist

from .allreduce import compressed_all_reduce
from .state import GCTState

__all__ = ["gct_hook"]


def gct_hook(state: GCTState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients with the compressed all-reduce; a completed future.

    Error feedback: the residual of this bucket (keyed on ``bucket.index()``, stable across
    iterations once DDP has rebuilt its buckets; a size change drops it) is added to the
    gradient before quantization, and what quantization drops now becomes the new residual.
    """
    buf = bucket.buffer()
    compressed_all_reduce(buf, state, state.group, key=f"ddp{bucket.index()}", average=True)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut
