"""ACT: activation-constrained training through ggspeed's activation-checkpoint function.

Public API:

- :func:`checkpoint` -- drop-in for ``deepspeed.checkpointing.checkpoint`` that applies the rate
  constraint and (optionally) holds checkpoints Exp-Golomb-coded;
- :func:`install` / :func:`check_ds_config` -- what ``ggspeed.initialize`` calls;
- :class:`ACTState` (the runtime component ``"act"``), :func:`activate`, :func:`active_state`;
- :func:`apply_rate` / :class:`RateGrad` -- the gradient-injecting identity, usable on any tensor;
- :class:`LambdaSchedule` -- lambda_a(step, block).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ggspeed.config.act import ACTConfig

from .checkpoint import checkpoint
from .rate import RateGrad, apply_rate, rate_grad, rate_value
from .schedule import LambdaSchedule, ramp
from .state import ACTState, activate, active_state

__all__ = [
    "ACTState",
    "LambdaSchedule",
    "RateGrad",
    "activate",
    "active_state",
    "apply_rate",
    "check_ds_config",
    "checkpoint",
    "install",
    "ramp",
    "rate_grad",
    "rate_value",
]

logger = logging.getLogger("ggspeed")


def _enabled(section: Any) -> bool:
    return isinstance(section, Mapping) and bool(section.get("enabled", False))


def check_ds_config(ds_config: Mapping[str, Any], cfg: ACTConfig) -> None:
    """Refuse DeepSpeed settings ACT cannot serve (ConfigError naming the key).

    - ``fp16.enabled``: dynamic loss scaling multiplies the task gradient by a scale that
      changes every few steps; the injected rate gradient would not carry it (use bf16/fp32).
    - ``pipeline.use_reentrant: false``: DeepSpeed then replaces the PipelineModule's
      checkpoint function by its own non_reentrant_checkpoint, which bypasses ACT.
    - ``activation_checkpointing.contiguous_memory_optimization`` with ``compress``: coded
      checkpoints have data-dependent sizes and cannot live in DeepSpeed's fixed-size buffers
      (without compress the option is accepted and ignored: ggspeed holds inputs as they are).
    """
    from ggspeed.config import ConfigError

    if not cfg.enabled:
        return
    if _enabled(ds_config.get("fp16")):
        raise ConfigError(
            "fp16.enabled: not supported with ggspeed.act.enabled (dynamic loss scaling is not "
            "applied to the injected rate gradient); use bf16 or fp32"
        )
    pipeline = ds_config.get("pipeline")
    if isinstance(pipeline, Mapping) and pipeline.get("use_reentrant") is False:
        raise ConfigError(
            "pipeline.use_reentrant: false is not supported with ggspeed.act.enabled (DeepSpeed "
            "would swap in its own non_reentrant_checkpoint and bypass ACT); remove it and pass "
            "checkpointable_layers=[<block class>] to the PipelineModule instead"
        )
    ac = ds_config.get("activation_checkpointing")
    if cfg.compress and isinstance(ac, Mapping) and ac.get("contiguous_memory_optimization"):
        raise ConfigError(
            "activation_checkpointing.contiguous_memory_optimization: cannot be combined with "
            "ggspeed.act.compress (coded checkpoints have data-dependent sizes); set it to false"
        )


def _pipeline_block_offset(module: Any) -> int:
    """Index of this pipeline stage's first checkpointed block in the whole model.

    Counts the checkpointable layer specs before this stage (DeepSpeed's rule: class name in
    ``checkpointable_layers`` when given, else any LayerSpec), divided by the checkpoint interval.
    """
    from deepspeed.pipe import LayerSpec

    start = int(getattr(module, "_local_start", 0))
    names = getattr(module, "checkpointable_layers", None)
    count = 0
    for spec in module._layer_specs[:start]:
        if not isinstance(spec, LayerSpec):
            continue
        if names is None or spec.typename.__name__ in names:
            count += 1
    interval = max(1, int(getattr(module, "activation_checkpoint_interval", 1) or 1))
    return count // interval


def install(engine: Any, cfg: ACTConfig) -> ACTState:
    """Activate ACT for this process after ``deepspeed.initialize``; returns the component.

    Makes the state global for :func:`checkpoint`, assigns ``deepspeed.checkpointing.checkpoint
    = ggspeed.act.checkpoint`` for Megatron code paths that look it up at call time, and, on a
    PipelineEngine, points the module's ``activation_checkpoint_func`` at it (PipelineModule
    binds DeepSpeed's function as a default argument at definition time). The rate gradient is
    scaled by 1 / gradient_accumulation_steps, as DeepSpeed scales the loss.
    """
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    gas = int(engine.gradient_accumulation_steps())
    offset = 0
    if isinstance(engine, PipelineEngine):
        module = engine.module
        if module.activation_checkpoint_func is not checkpoint:
            if module.activation_checkpoint_interval > 0:
                logger.info("ggspeed.act: PipelineModule.activation_checkpoint_func -> ggspeed")
            module.activation_checkpoint_func = checkpoint
        offset = _pipeline_block_offset(module)
    state = ACTState(cfg, grad_scale=1.0 / gas, block_offset=offset)
    state.step = int(getattr(engine, "global_steps", 0))
    activate(state)
    deepspeed.checkpointing.checkpoint = checkpoint
    return state
