"""Per-rank GCT state: error-feedback residuals, constraint memory, counters and statistics.

Residuals are keyed on a stable name chosen by the caller (the bucket's ordinal within a
reduction round on DeepSpeed engines, the bucket index for the DDP hook), never on a tensor's
data_ptr: ZeRO-0 reallocates gradient buffers between steps. A residual whose size no longer
matches its bucket (DDP rebuilds buckets after its first iteration) is dropped, not misapplied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import GCTConfig

__all__ = ["GCTState", "GCTStats"]


@dataclasses.dataclass
class GCTStats:
    """Communication and quantization statistics; ``last_*`` describe the latest call."""

    calls: int = 0
    elements: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # Elements whose coded form went on the wire; ring-equivalent, so fp32 counts 32 bits each.
    wire_elements: float = 0.0
    quant_sq_err: float = 0.0
    signal_sq: float = 0.0
    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    nonfinite_calls: int = 0
    last_bytes_sent: int = 0
    last_bytes_received: int = 0
    last_elements: int = 0
    last_step: float = 0.0

    @property
    def bits_per_element(self) -> float:
        """Bits this rank put on the wire per element it sent (32 for an fp32 ring all-reduce)."""
        return 8.0 * self.bytes_sent / self.wire_elements if self.wire_elements else 0.0

    @property
    def rel_quant_error(self) -> float:
        """RMS quantization error over RMS of the quantized signal (this rank, before averaging)."""
        return (self.quant_sq_err / self.signal_sq) ** 0.5 if self.signal_sq else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {k: float(v) for k, v in dataclasses.asdict(self).items()}
        d["bits_per_element"] = self.bits_per_element
        d["rel_quant_error"] = self.rel_quant_error
        return d


class GCTState:
    """Everything GCT keeps on one rank. Picklable; ``state_dict``/``load_state_dict`` round trip.

    Also the component runtime drives: ``name``, ``on_step``, ``scalars``.
    """

    name = "gct"

    def __init__(self, cfg: GCTConfig | None = None, *, group: Any = None) -> None:
        self.cfg = cfg if cfg is not None else GCTConfig(enabled=True)
        self.group = group
        self.residuals: dict[str, torch.Tensor] = {}
        self.stats = GCTStats()
        self.global_step = 0
        # Gradient-constraint memory: previous (param, grad) per parameter key.
        self.constraint_prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._since = GCTStats()
        self._constraint_sum = 0.0
        self._constraint_n = 0
        self._workspace: dict[str, torch.Tensor] = {}
        self._spares: dict[str, torch.Tensor] = {}  # the residuals' second buffers
        # Per bucket: the largest block RMS over ranks in its previous call (saved).
        self.step_bases: dict[str, torch.Tensor] = {}

    # ---- error feedback -------------------------------------------------------------------
    def residual(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """The residual for ``key`` if error feedback is on and it matches ``like``'s size."""
        if not self.cfg.error_feedback:
            return None
        r = self.residuals.get(key)
        if r is not None and r.numel() != like.numel():
            del self.residuals[key]
            r = None
        elif r is not None and r.device != like.device:  # restored from a CPU checkpoint
            r = self.residuals[key] = r.to(like.device)
        return r

    def set_residual(self, key: str, value: torch.Tensor) -> None:
        """Make ``value`` the residual of ``key``; the one it replaces becomes the buffer
        ``next_residual`` hands out for the following call (double buffering)."""
        if self.cfg.error_feedback:
            old = self.residuals.get(key)
            self.residuals[key] = value
            if old is not None and old is not value and old.numel() == value.numel():
                self.__dict__.setdefault("_spares", {})[key] = old

    def step_basis(self, key: str, nb: int) -> torch.Tensor | None:
        """The per-block RMS all ranks agreed on in ``key``'s previous call (float32, CPU), if
        it has ``nb`` blocks: the basis of this call's steps (``step_agreement`` "previous")."""
        basis = self.__dict__.setdefault("step_bases", {}).get(key)
        return basis if basis is not None and basis.numel() == nb else None

    def set_step_basis(self, key: str, basis: torch.Tensor) -> None:
        self.__dict__.setdefault("step_bases", {})[key] = basis.detach().to("cpu", torch.float32)

    def next_residual(self, key: str, n: int) -> torch.Tensor:
        """A float32 CPU buffer of n elements for ``key``'s next residual that is not its
        current one, so a call can write the new residual and still keep the old one if the
        call ends without a result (a peer's non-finite gradient). Contents undefined."""
        spares = self.__dict__.setdefault("_spares", {})
        buf, cur = spares.get(key), self.residuals.get(key)
        if (
            buf is None
            or buf.numel() != n
            or buf.dtype != torch.float32
            or buf.device.type != "cpu"
            or (cur is not None and buf.data_ptr() == cur.data_ptr())
        ):
            buf = spares[key] = torch.empty(n, dtype=torch.float32)
        return buf

    def workspace(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable CPU buffer of n elements (contents undefined), grown on demand.

        A fresh 5 MB tensor per call costs more in page faults than the pass that fills it;
        calls on one state run one after another, so one buffer per name is enough. Not saved.
        """
        spaces = self.__dict__.setdefault("_workspace", {})  # absent in older pickles
        buf = spaces.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = spaces[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    # ---- schedule -------------------------------------------------------------------------
    @property
    def constraint_lambda(self) -> float:
        """lambda_g at the current step: linear warm-up from 0 to ``constraint_lambda``."""
        lam, warm = self.cfg.constraint_lambda, self.cfg.constraint_warmup_steps
        if warm <= 0:
            return lam
        return lam * min(1.0, self.global_step / warm)

    def on_step(self, global_step: int) -> None:
        self.global_step = int(global_step)

    # ---- telemetry ------------------------------------------------------------------------
    def record(self, **delta: float) -> None:
        """Add to the running totals and to the since-last-``scalars()`` window."""
        for s in (self.stats, self._since):
            for k, v in delta.items():
                setattr(s, k, getattr(s, k) + v)

    def record_last(self, **values: float) -> None:
        for s in (self.stats, self._since):
            for k, v in values.items():
                setattr(s, k, v)

    def record_constraint(self, rel_magnitude: float) -> None:
        self._constraint_sum += rel_magnitude
        self._constraint_n += 1

    def scalars(self) -> dict[str, float]:
        """Telemetry since the previous call (runtime writes it to DeepSpeed's monitor)."""
        s = self._since
        out = {
            "bits_per_element": s.bits_per_element,
            "bytes_sent": float(s.bytes_sent),
            "bytes_received": float(s.bytes_received),
            "elements": float(s.elements),
            "rel_quant_error": s.rel_quant_error,
            "quant_step": s.last_step,
            "encode_s": s.encode_s,
            "comm_s": s.comm_s,
            "decode_s": s.decode_s,
            "nonfinite_calls": float(s.nonfinite_calls),
            "lambda": self.constraint_lambda,
        }
        if self._constraint_n:
            out["constraint_rel"] = self._constraint_sum / self._constraint_n
        self._since = GCTStats()
        self._constraint_sum, self._constraint_n = 0.0, 0
        return out

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "global_step": self.global_step,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "constraint_prev": {
                k: (p.detach().cpu().clone(), g.detach().cpu().clone())
                for k, (p, g) in self.constraint_prev.items()
            },
            "stats": dataclasses.asdict(self.stats),
            "step_bases": {k: v.clone() for k, v in self.__dict__.get("step_bases", {}).items()},
        }

    def load_state_dict(self, d: dict[str, Any], device: torch.device | str | None = None) -> None:
        if d.get("version") != 1:
            raise ValueError(f"GCT state: unsupported version {d.get('version')!r} (expected 1)")
        self.global_step = int(d["global_step"])
        self.residuals = {
            k: v.to(device) if device else v.clone() for k, v in d["residuals"].items()
        }
        self.constraint_prev = {
            k: (p.to(device) if device else p.clone(), g.to(device) if device else g.clone())
            for k, (p, g) in d["constraint_prev"].items()
        }
        self.stats = GCTStats(**d["stats"])
        # absent in checkpoints from before it existed: the next call starts from own RMS
        self.step_bases = {k: v.clone() for k, v in d.get("step_bases", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["group"] = None  # process groups do not pickle; re-attach after unpickling
        d["_workspace"] = {}
        d["_spares"] = {}
        return d
