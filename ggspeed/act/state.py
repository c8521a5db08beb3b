"""ACT's per-rank state: the schedule position, fitted shapes, steps, and telemetry counters.

One :class:`ACTState` is *active* per process (:func:`activate`): ``ggspeed.act.checkpoint`` is
called with the signature of ``deepspeed.checkpointing.checkpoint`` (no room for a state
argument), so it reads the active state. Without one, the checkpoint function is a plain
reentrant checkpoint. The state is also the runtime component (name ``"act"``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from ggspeed.config.act import ACTConfig

from .schedule import LambdaSchedule

FIT_SAMPLE = 1 << 16  # elements used for a shape fit: the fit is a ratio of two moments


class ACTState:
    """Runtime component ``"act"``: drives lambda_a(t), shape refresh and telemetry."""

    name = "act"

    def __init__(self, cfg: ACTConfig, *, grad_scale: float = 1.0, block_offset: int = 0) -> None:
        self.cfg = cfg
        self.schedule = LambdaSchedule.from_config(cfg)
        self.grad_scale = float(grad_scale)
        self.block_offset = int(block_offset)
        self.step = 0
        self.shapes: dict[int, float] = {}
        self.rel_steps: dict[int, float] = {}
        self._fit_due: set[int] | None = None  # None: every block is due (no fit yet)
        self._lock = threading.Lock()
        self.live_bytes = 0
        self._reset_counters()

    # ----------------------------------------------------------------- schedule and shapes
    def lambda_for(self, block: int) -> float:
        return self.schedule(self.step, block)

    def shape_for(self, block: int) -> float:
        if self.cfg.rate == "l1":
            return 1.0
        return self.shapes.get(block, self.cfg.initial_shape)

    def eps_for_rate(self) -> float:
        return 0.0 if self.cfg.rate == "l1" else self.cfg.eps

    def rel_step_for(self, block: int) -> float:
        if self.cfg.bits_target is None:
            return self.cfg.rel_step
        return self.rel_steps.get(block, self.cfg.rel_step)

    def wants_fit(self, block: int) -> bool:
        """A shape fit is due for this block (first sight, or a refresh since its last fit)."""
        if self.cfg.rate != "gg" and self.cfg.bits_target is None:
            return False
        if block in self.shapes:
            return self._fit_due is not None and block in self._fit_due
        return True

    def fit(self, block: int, a: torch.Tensor) -> None:
        """Re-estimate the block's GG shape from (a strided sample of) ``a`` by moment matching."""
        from ggspeed import gg

        flat = a.detach().reshape(-1)
        stride = max(1, flat.numel() // FIT_SAMPLE)
        sample = flat[::stride].float()
        try:
            shape, _scale = gg.fit_shape(sample)
        except ValueError:  # all-zero or non-finite sample: keep the previous shape
            return
        if not math.isfinite(shape):
            return
        shape = float(min(3.0, max(0.1, shape)))
        self.shapes[block] = shape
        if self.cfg.bits_target is not None:
            from .storage import rel_step_for_bits

            self.rel_steps[block] = rel_step_for_bits(shape, self.cfg.bits_target)
        if self._fit_due is not None:
            self._fit_due.discard(block)

    # ----------------------------------------------------------------- telemetry
    def _reset_counters(self) -> None:
        self._bits = 0
        self._coded_elems = 0
        self._stored_bytes = 0
        self._elems = 0
        self._penalty = 0.0
        self._rate = 0.0
        self._rate_n = 0
        self._peak = self.live_bytes
        self._steps = 0
        self._lambda_sum = 0.0
        self._rate_steps: set[int] = set()

    def measuring(self) -> bool:
        """Whether this step's checkpoints get their EG code length measured (compress off)."""
        return self.cfg.compress or self.rate_due()

    def rate_due(self) -> bool:
        """Whether this step's rate values R(a) are computed for telemetry (a pass over each
        input costs ~2% of a small model's step, so only every log_interval steps)."""
        return self.step % self.cfg.log_interval == 0

    def record(
        self, *, numel: int, stored_bytes: int, bits: int | None, rate: float | None, lam: float
    ):
        with self._lock:
            self._elems += numel
            self._stored_bytes += stored_bytes
            if bits is not None:
                self._bits += bits
                self._coded_elems += numel
            if rate is not None:
                self._rate += rate
                self._rate_n += 1
                self._penalty += lam * rate
                self._rate_steps.add(self.step)

    def hold(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes += nbytes
            self._peak = max(self._peak, self.live_bytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes

    # ----------------------------------------------------------------- component protocol
    def on_step(self, global_step: int) -> None:
        """After every optimizer step: advance the schedule; mark shape refits when due."""
        self.step = int(global_step)
        self._steps += 1
        self._lambda_sum += self.lambda_for(self.block_offset)
        if self.step % self.cfg.shape_refresh_interval == 0:
            self._fit_due = set(self.shapes)

    def scalars(self) -> dict[str, float]:
        """Telemetry since the last call; per optimizer step where it is a sum over checkpoints.

        bits_per_element: EG bits / element of the checkpointed block inputs (stored bytes with
        compress on; a measurement every log_interval steps otherwise). stored_mb, bf16_mb and
        fp32_mb: MB the checkpoints of one step hold, and what bf16/fp32 copies would hold.
        peak_live_mb: the most checkpoint bytes alive at once. penalty: lambda_a * R summed
        over a step's checkpoints and rate: mean R per checkpoint, both from the steps that are
        multiples of log_interval; lambda: lambda_a of the first local block (mean over the steps).
        """
        with self._lock:
            steps = max(1, self._steps)
            out = {
                "lambda": self._lambda_sum / steps
                if self._steps
                else self.lambda_for(self.block_offset),
                "stored_mb": self._stored_bytes / steps / 1e6,
                "bf16_mb": 2 * self._elems / steps / 1e6,
                "fp32_mb": 4 * self._elems / steps / 1e6,
                "peak_live_mb": self._peak / 1e6,
            }
            if self._rate_n:
                out["penalty"] = self._penalty / len(self._rate_steps)
                out["rate"] = self._rate / self._rate_n
            if self._coded_elems:
                out["bits_per_element"] = self._bits / self._coded_elems
            if self._stored_bytes:
                out["ratio_vs_bf16"] = 2 * self._elems / self._stored_bytes
            if self.cfg.rate == "gg" and self.shapes:
                out["shape"] = sum(self.shapes.values()) / len(self.shapes)
            self._reset_counters()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain Python ints and floats only: the file loads with ``torch.load(weights_only=True)``."""
        return {
            "step": int(self.step),
            "shapes": {int(k): float(v) for k, v in self.shapes.items()},
            "rel_steps": {int(k): float(v) for k, v in self.rel_steps.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """ValueError naming the entry when ``state`` is not what :meth:`state_dict` gives."""
        if not isinstance(state, dict):
            raise ValueError(f"ACT state must be a dict, got {type(state).__name__}")
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"ACT state 'step': got {step!r}, expected an integer >= 0")
        tables = {}
        for key in ("shapes", "rel_steps"):
            table = state.get(key, {})
            ok = isinstance(table, dict) and all(
                isinstance(k, int) and isinstance(v, int | float) and math.isfinite(v) and v > 0
                for k, v in table.items()
            )
            if not ok:
                raise ValueError(
                    f"ACT state {key!r}: expected {{block: positive finite number}}, "
                    f"got {table!r:.80}"
                )
            tables[key] = {int(k): float(v) for k, v in table.items()}
        self.step = step
        self.shapes, self.rel_steps = tables["shapes"], tables["rel_steps"]
        self._fit_due = set()


_ACTIVE: ACTState | None = None


def activate(state: ACTState | None) -> ACTState | None:
    """Make ``state`` the one ``ggspeed.act.checkpoint`` uses (None: plain checkpointing).

    Returns the previously active state.
    """
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, state
    return previous


def active_state() -> ACTState | None:
    return _ACTIVE
