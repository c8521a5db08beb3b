"""ggspeed's scalars -> DeepSpeed's monitor (csv / tensorboard / wandb from the ds_config) and logs.

Every ``log_interval`` optimizer steps each component's ``scalars()`` (values since its last
call) are averaged over the ranks that report them, so rank 0, which alone writes DeepSpeed's
monitor, shows the whole job: with pipelines, rank 0 sees only the first stage otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("ggspeed")


def gather_mean(scalars: Mapping[str, float], group: Any = None) -> dict[str, float]:
    """Mean of each key over the ranks that report it (one all_gather_object per call)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(scalars)
    everyone: list[Mapping[str, float] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, dict(scalars), group=group)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for per_rank in everyone:
        for key, value in (per_rank or {}).items():
            if value is None or not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sorted(sums)}


def format_scalars(step: int, scalars: Mapping[str, float]) -> str:
    body = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    return f"[ggspeed] step {step}: {body}"


def emit(engine: Any, step: int, scalars: Mapping[str, float]) -> None:
    """Write ``ggspeed/<key>`` events to the engine's monitor and one log line (rank 0)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        monitor.write_events([(f"ggspeed/{k}", float(v), step) for k, v in scalars.items()])
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(format_scalars(step, scalars))
