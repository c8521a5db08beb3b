"""Settings of the coded ZeRO-1/2 parameter all-gather, checked when they are made."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..config import ConfigError

__all__ = ["KEY", "ParamGatherSettings"]

KEY = "ggspeed.wire.param_gather"
"""Where these settings live in a ds_config; errors name keys below it."""


@dataclass(frozen=True)
class ParamGatherSettings:
    """How each rank codes its updated partition for the all-gather after the optimizer step.

    ``quant_step``: the quantization step as a multiple of the RMS of each block of the update
    (the update being master weights minus the working weights every replica holds, so it
    carries the previous quantization error). Larger: fewer bits, replicas further behind the
    masters (by at most half a step per element; the error is sent again at the next step).
    ``block_size``: consecutive elements sharing one step (32 bits of steps per block).
    ``eg_order``: Exp-Golomb order, 0..15 or "auto" (the best per codec chunk).
    ``zero_runs``: code runs of zero levels (the codec's runs mode).
    ``capacity_slack``: the gather sends each rank's message in a slot sized for the previous
    step's longest message times (1 + capacity_slack); a longer one costs a second round.
    """

    quant_step: float = 1.0
    block_size: int = 4096
    eg_order: int | Literal["auto"] = "auto"
    zero_runs: bool = True
    capacity_slack: float = 0.1

    def __post_init__(self) -> None:
        q = self.quant_step
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q <= 0:
            raise ConfigError(f"{KEY}.quant_step: got {q!r}; allowed: a positive finite number")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"{KEY}.block_size: got {b!r}; allowed: an integer >= 1")
        k = self.eg_order
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 15):
            raise ConfigError(f"{KEY}.eg_order: got {k!r}; allowed: an integer 0..15 or 'auto'")
        if not isinstance(self.zero_runs, bool):
            raise ConfigError(f"{KEY}.zero_runs: got {self.zero_runs!r}; allowed: true or false")
        s = self.capacity_slack
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 10:
            raise ConfigError(f"{KEY}.capacity_slack: got {s!r}; allowed: a number in [0, 10]")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> ParamGatherSettings:
        """From a ds_config sub-object (``enabled`` is the caller's switch and is ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"enabled"})
        if unknown:
            raise ConfigError(
                f"{KEY}: unknown key(s) {', '.join(unknown)}; allowed: "
                f"enabled, {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
