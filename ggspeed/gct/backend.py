"""The compressed-backend contract of DeepSpeed <= 0.19.6, served by the EG-coded all-reduce.

Until 0.19.6 DeepSpeed's 1-bit optimizers called ``backend.compressed_allreduce(buffer_m,
worker_error, server_error, local_rank) -> tensor`` on an ``NcclBackend`` / ``MpiBackend``
(both removed in 0.19.8). Code written against that contract (a vendored 1-bit Adam, a custom
optimizer) can use :class:`GCTBackend` in their place:

    backend = GCTBackend(GCTConfig(enabled=True, quant_step=1.0, rdoq_mu=0.1), mpu=mpu)
    buffer_m = backend.compressed_allreduce(buffer_m, worker_error, server_error, local_rank)

The caller owns the error-feedback memory, as in the old contract: ``worker_error`` (padded to
at least the buffer's size) is this rank's residual, read and overwritten in place.
``server_error`` is set to zero: the old backends re-quantized each chunk's average to one bit
on its owner and kept what that lost; here the owners sum exact integers and send the sums
losslessly coded, so nothing is lost on the server side.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..config import GCTConfig
from .allreduce import compressed_all_reduce
from .state import GCTState

__all__ = ["GCTBackend"]

_KEY = "compressed_allreduce"


class GCTBackend:
    """``compressed_allreduce`` over ``group`` (or ``mpu``'s data-parallel group, or WORLD)."""

    def __init__(
        self, cfg: GCTConfig | GCTState | None = None, *, mpu: Any = None, group: Any = None
    ) -> None:
        if group is None and mpu is not None:
            group = mpu.get_data_parallel_group()
        self.state = cfg if isinstance(cfg, GCTState) else GCTState(cfg, group=group)
        if group is not None:
            self.state.group = group
        self.world_group = self.state.group
        self.rank = dist.get_rank(self.world_group)
        self.size = dist.get_world_size(self.world_group)

    def compressed_allreduce(
        self,
        buffer_m: torch.Tensor,
        worker_error: torch.Tensor,
        server_error: torch.Tensor,
        local_rank: int | None = None,
    ) -> torch.Tensor:
        """The average of ``buffer_m`` over the group, in its shape; ``buffer_m`` is updated in
        place too. ``worker_error`` (>= ``buffer_m.numel()`` elements, float32, contiguous) is
        added before quantization and replaced by what quantization dropped; ``server_error``
        is zeroed (see the module docstring). ``local_rank`` is accepted for the contract."""
        del local_rank  # the old backends used it to pick a CUDA device; tensors carry theirs
        n, padded = buffer_m.numel(), worker_error.numel()
        if padded < n:
            raise ValueError(
                f"compressed_allreduce: worker_error has {padded} elements, buffer_m has {n}: "
                "worker_error must be at least as large (it may be padded)"
            )
        if worker_error.dtype != torch.float32 or not worker_error.is_contiguous():
            raise ValueError(
                f"compressed_allreduce: worker_error must be a contiguous float32 tensor, got "
                f"{worker_error.dtype}{'' if worker_error.is_contiguous() else ' (strided)'}"
            )
        flat = torch.zeros(padded, dtype=torch.float32, device=buffer_m.device)
        flat[:n] = buffer_m.reshape(-1)
        st = self.state
        st.residuals[_KEY] = worker_error.view(-1)  # read and overwritten in place on CPU
        try:
            compressed_all_reduce(flat, st, self.world_group, key=_KEY, average=True)
            new = st.residuals.get(_KEY)
            if new is not None and new.data_ptr() != worker_error.data_ptr():
                worker_error.view(-1).copy_(new)  # the torch path makes a new tensor
            elif not st.cfg.error_feedback:
                worker_error.zero_()
        finally:
            st.residuals.pop(_KEY, None)  # the caller owns this memory, not our checkpoints
        server_error.zero_()
        buffer_m.copy_(flat[:n].view_as(buffer_m))
        return buffer_m
