"""Installing the compressed all-reduce on a DeepSpeed 0.19.8 engine (on the instance).

DeepSpeed 0.19.8 has no comm-hook API, so the reduction methods are replaced on the engine and
optimizer *instances* (class-level patches are bypassed in places):

- ZeRO 0, fp32 and bf16, and the PipelineEngine's data-parallel reduction all end in
  ``engine.allreduce_bucket(bucket, dp_group, dp_world_size)``: returns the flat sum over
  ``dp_group`` divided by ``dp_world_size`` (the group's size, except for MoE expert
  gradients: their expert-data-parallel group is smaller than the data-parallel world).
- ZeRO 1/2 with ``reduce_scatter: false``: ``optimizer.gradient_reduction_w_predivide(tensor,
  dtype)`` reduces one flat bucket in place and returns it.
- ZeRO 1/2 with ``reduce_scatter: true`` (the default): ``optimizer.allreduce_bucket(bucket,
  dtype, rank, ..., divide, process_group)``. With ``rank`` set DeepSpeed wants a reduce to one
  rank; the compressed all-reduce serves it too (every rank gets the sum, the owner keeps it).

Error-feedback residuals are keyed on the ordinal of the reduction within a round (a round ends
after ``allreduce_gradients`` or the PipelineEngine's ``ReduceGrads`` instruction), which is stable
from step to step; ZeRO-2 reduces at every micro-batch, so its ordinals restart at every
backward.

With ``hierarchical`` (``hierarchical.py``) the data-parallel group's reductions go through the
node hierarchy: full precision within each node, coded across nodes; the subgroups are created
here, once, at install.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError, GCTConfig
from .constraint import apply_constraint
from .hierarchical import reduce_bucket, setup
from .state import GCTState

__all__ = ["check_ds_config", "install"]


def check_ds_config(ds_config: Mapping[str, Any], cfg: GCTConfig) -> None:
    """Refuse DeepSpeed settings the compressed backend cannot serve, naming the key."""
    if not cfg.enabled:
        return
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"zero_optimization.stage: got {stage}; ggspeed.gct supports ZeRO stages 0, 1 and 2 "
            "(ZeRO-3 reduces gradients on its own paths): lower the stage or set "
            "ggspeed.gct.enabled to false"
        )
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key) if isinstance(zero, Mapping) else None
        device = off.get("device", "none") if isinstance(off, Mapping) else off
        if off and str(device).lower() not in ("none", "null"):
            raise ConfigError(
                f"zero_optimization.{key}: got {off!r}; ggspeed.gct does not support offloading "
                "yet: remove it or set ggspeed.gct.enabled to false"
            )
    sp = ds_config.get("sequence_parallel_size", 1)
    if sp not in (None, 1):
        raise ConfigError(
            f"sequence_parallel_size: got {sp!r}; ggspeed.gct supports only 1 (no sequence "
            "parallelism)"
        )


class _Rounds:
    """Ordinals of the reductions within the current round, for stable residual keys."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n - 1}"

    def reset(self) -> None:
        self.n = 0


def _after(obj: Any, name: str, fn: Callable[[], None]) -> None:
    """Wrap method ``name`` of the instance ``obj`` to call ``fn`` after it returns."""
    orig = getattr(obj, name)

    @functools.wraps(orig)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return orig(*args, **kwargs)
        finally:
            fn()

    setattr(obj, name, wrapped)


def _after_pipeline_reduction(engine: Any, fn: Callable[[], None]) -> None:
    """Call ``fn`` after a PipelineEngine's ``ReduceGrads`` instruction.

    With DeepSpeed's BF16_Optimizer (bf16 with ZeRO-0, or ZeRO-1 accumulating in fp32) the
    instruction reduces through ``buffered_allreduce_fallback``, never ``allreduce_gradients``,
    so only this ends the round there. The engine runs instructions from the class-level
    ``_INSTRUCTION_MAP`` (an instance attribute on the method would never be called): the engine
    gets its own copy of the map, the entry wrapped, as ``ggspeed.wire.pipe`` does for the sends.
    """
    table = getattr(engine, "_INSTRUCTION_MAP", None)
    if table is None:
        return
    from deepspeed.runtime.pipe import schedule

    orig = table[schedule.ReduceGrads]

    @functools.wraps(orig)
    def reduce_grads(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return orig(self, *args, **kwargs)
        finally:
            fn()

    engine._INSTRUCTION_MAP = {**table, schedule.ReduceGrads: reduce_grads}


def _base_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    opt = engine.optimizer
    for _ in range(3):
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            return opt if isinstance(opt, torch.optim.Optimizer) else None
        opt = inner
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def install(engine: Any, cfg: GCTConfig, state: GCTState | None = None) -> GCTState:
    """Route ``engine``'s data-parallel gradient reduction through the compressed all-reduce.

    Returns the per-rank :class:`GCTState`: the runtime component, which ``ggspeed.initialize``
    saves and restores with the checkpoint and whose ``on_step`` it calls after every optimizer
    step (without ``ggspeed.initialize``, call ``state.on_step(engine.global_steps)`` yourself:
    it drives the constraint's warm-up). With ``constraint_lambda > 0`` the gradient constraint
    runs as a pre-step hook of the torch optimizer, on the averaged (master) gradients.
    """
    if getattr(engine, "_ggspeed_gct", None) is not None:
        raise RuntimeError("ggspeed.gct is already installed on this engine")
    if engine.zero_optimization_stage() not in (0, 1, 2):
        raise ConfigError(
            f"zero_optimization.stage: got {engine.zero_optimization_stage()}; ggspeed.gct "
            "supports ZeRO stages 0, 1 and 2"
        )
    state = state if state is not None else GCTState(cfg)
    rounds = _Rounds()

    def engine_allreduce_bucket(bucket, dp_group, dp_world_size=None):
        tensor = engine.flatten(bucket)
        key = rounds.next("e")
        average = engine.gradient_average
        if not average or dp_world_size is None or dp_world_size == dist.get_world_size(dp_group):
            return reduce_bucket(tensor, state, dp_group, key=key, average=average)
        # MoE expert gradients: summed over the expert-data-parallel group, divided by the whole
        # data-parallel world, as DeepSpeed does (their scale does not depend on the ep size).
        reduce_bucket(tensor, state, dp_group, key=key, average=False)
        return tensor.mul_(1.0 / dp_world_size)

    engine.allreduce_bucket = engine_allreduce_bucket
    opt = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2) and hasattr(
        opt, "gradient_reduction_w_predivide"
    ):

        def gradient_reduction_w_predivide(tensor, communication_data_type):
            return reduce_bucket(
                tensor,
                state,
                opt.dp_process_group,
                key=rounds.next("z"),
                average=opt.gradient_average,
            )

        def zero_allreduce_bucket(
            bucket, communication_data_type, rank=None, log=None, divide=True, process_group=None
        ):
            tensor = opt.flatten(bucket)
            group = opt.dp_process_group if process_group is None else process_group
            return reduce_bucket(
                tensor,
                state,
                group,
                key=rounds.next("z"),
                average=bool(divide and opt.gradient_average),
            )

        opt.gradient_reduction_w_predivide = gradient_reduction_w_predivide
        opt.allreduce_bucket = zero_allreduce_bucket

    # Every round of reductions ends in one of these (ZeRO-2's per-micro-batch rounds too).
    _after(engine, "allreduce_gradients", rounds.reset)
    _after_pipeline_reduction(engine, rounds.reset)

    if cfg.constraint_lambda > 0:
        base = _base_optimizer(engine)
        if base is None:
            raise ConfigError(
                "ggspeed.gct.constraint_lambda: the engine has no torch optimizer to attach the "
                "gradient constraint to; set constraint_lambda to 0"
            )
        named = [
            (f"g{gi}.p{pi}", p)
            for gi, group in enumerate(base.param_groups)
            for pi, p in enumerate(group["params"])
        ]
        base.register_step_pre_hook(lambda *_: apply_constraint(state, named))

    try:
        if hasattr(engine, "grid") and engine.grid is not None:
            state.group = engine.grid.get_data_parallel_group()
        else:
            from deepspeed.utils import groups

            state.group = groups._get_data_parallel_group()
    except Exception:  # the group is only a default for direct calls
        state.group = None
    state.hierarchy = setup(cfg.hierarchical, state.group)
    engine._ggspeed_gct = state
    return state
