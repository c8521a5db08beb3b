"""The progressive schedule of the activation rate multiplier lambda_a(t).

"Progressive" in ACT: the constraint starts at zero, so early training (when activations are
still reorganizing) is unconstrained, and ramps to its target over a warm-up. Optionally each
block gets its own slice of the warm-up, first block first, so the constraint sweeps through
the depth of the network instead of hitting every layer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ggspeed.config.act import ACTConfig


def ramp(progress: float, kind: str = "linear") -> float:
    """Fraction of the target at warm-up progress in [0, 1] (clamped): linear or cosine ease-in."""
    p = min(1.0, max(0.0, progress))
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ValueError(f"ggspeed.act.schedule: got {kind!r}; allowed: linear, cosine")


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda_a(step, block): zero before ``start``, ramped over ``warmup`` steps, then ``target``."""

    target: float
    start: int = 0
    warmup: int = 0
    kind: str = "linear"
    blockwise: bool = False
    num_blocks: int | None = None

    @classmethod
    def from_config(cls, cfg: ACTConfig) -> LambdaSchedule:
        return cls(
            target=cfg.lambda_target,
            start=cfg.start_step,
            warmup=cfg.warmup_steps,
            kind=cfg.schedule,
            blockwise=cfg.blockwise,
            num_blocks=cfg.num_blocks,
        )

    def __call__(self, step: int, block: int = 0) -> float:
        """The multiplier at optimizer step ``step`` (steps done so far) for block ``block``.

        Blockwise: block b ramps over [b, b + 1] * warmup / num_blocks after ``start``; blocks
        past ``num_blocks - 1`` are treated as the last block.
        """
        t = step - self.start
        if t < 0:
            return 0.0
        if self.warmup == 0:
            return self.target
        if self.blockwise and self.num_blocks:
            b = min(max(block, 0), self.num_blocks - 1)
            width = self.warmup / self.num_blocks
            progress = (t - b * width) / width
        else:
            progress = t / self.warmup
        return self.target * ramp(progress, self.kind)
