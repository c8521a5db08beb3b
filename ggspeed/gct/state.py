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
    wire_errors: int = 0  # calls refused on every rank: a corrupted stream or statistics message
    # Hierarchical reduction: full-precision bytes sent within the node (ring-equivalent).
    intra_node_bytes: int = 0
    # Calls whose coded levels were histogrammed (``GCTState.entropy_due``): an ideal coder's
    # bits for what they sent coded, and their wire_elements.
    entropy_bits: float = 0.0
    entropy_elements: float = 0.0
    last_bytes_sent: int = 0
    last_bytes_received: int = 0
    last_elements: int = 0
    last_step: float = 0.0

    @property
    def bits_per_element(self) -> float:
        """Bits this rank put on the wire per element it sent (32 for an fp32 ring all-reduce)."""
        return 8.0 * self.bytes_sent / self.wire_elements if self.wire_elements else 0.0

    @property
    def entropy_bits_per_element(self) -> float:
        """The empirical entropy of the levels this rank coded, as bits per element counted as
        ``bits_per_element`` counts them, over the calls that measured it: the bits an ideal
        coder of each coded part's level histogram would have put on the wire, over those calls'
        ``wire_elements``. The parts: this rank's own levels (all-gather and direct exchanges:
        sent to each of the other ranks; reduce-scatter: the other ranks' chunks, once each),
        and, with reduce-scatter, the summed levels of the chunk it owns (sent to each of the
        other ranks). The gap to ``bits_per_element`` is what the Exp-Golomb codes, stream
        headers, padding and statistics messages cost beyond that floor."""
        return self.entropy_bits / self.entropy_elements if self.entropy_elements else 0.0

    @property
    def rel_quant_error(self) -> float:
        """RMS quantization error over RMS of the quantized signal (this rank, before averaging)."""
        return (self.quant_sq_err / self.signal_sq) ** 0.5 if self.signal_sq else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {k: float(v) for k, v in dataclasses.asdict(self).items()}
        d["bits_per_element"] = self.bits_per_element
        d["entropy_bits_per_element"] = self.entropy_bits_per_element
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
        self.hierarchy: Any = None  # hierarchical.Hierarchy when the reduction is hierarchical
        self.residuals: dict[str, torch.Tensor] = {}
        self.stats = GCTStats()
        self.global_step = 0
        # Gradient-constraint memory: previous (param, grad) per parameter key.
        self.constraint_prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._since = GCTStats()
        self._constraint_sum = 0.0
        self._constraint_n = 0
        self._workspace: dict[str, torch.Tensor] = {}
        self._spares: dict[str, torch.Tensor] = {}  # CPU residuals' second buffers
        self._restored: set[str] = set()  # residuals loaded from a checkpoint, not yet used
        self._entropy_keys: set[str] = set()  # buckets whose entropy this window has measured

    # ---- error feedback -------------------------------------------------------------------
    def residual(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """The residual for ``key`` if error feedback is on and it matches ``like``'s size.

        A residual of another size is dropped (its bucket changed), except one restored from a
        checkpoint and not used since: that one belongs to another model or bucket layout, and
        dropping it would lose the checkpoint's state silently, so it is refused."""
        if not self.cfg.error_feedback:
            return None
        r = self.residuals.get(key)
        if r is not None and r.numel() != like.numel():
            if key in self._restored:
                raise ValueError(
                    f"GCT state: the checkpoint's residual {key!r} has {r.numel()} elements, "
                    f"but this bucket has {like.numel()}: the checkpoint was written with another "
                    "model or bucket layout"
                )
            del self.residuals[key]
            r = None
        elif r is not None and r.device != like.device:  # restored from a CPU checkpoint
            r = self.residuals[key] = r.to(like.device)
        return r

    def has_restored(self) -> bool:
        """Whether residuals loaded from a checkpoint wait for their first use."""
        return bool(self._restored)

    def restored_keys(self) -> list[str]:
        """The keys of residuals loaded from a checkpoint and not used since."""
        return sorted(self._restored)

    def pop_restored(self, key: str) -> torch.Tensor:
        """Remove and return the restored residual ``key`` (folded into another form)."""
        self._restored.discard(key)
        self._spares.pop(key, None)
        return self.residuals.pop(key)

    def mark_restored(self, key: str) -> None:
        """Treat residual ``key`` as restored: its size is checked at its bucket's next use."""
        self._restored.add(key)

    def residual_buffer(self, key: str, n: int) -> torch.Tensor:
        """A float32 CPU buffer of n elements for ``key``'s next residual that is not its live
        one (contents undefined): a call writes the new residual there and makes it live only
        once every rank has accepted the exchange, so a failed call leaves the old one intact.
        After ``set_residual(..., recycle=True)`` it is the replaced residual's memory."""
        buf, cur = self._spares.get(key), self.residuals.get(key)
        if (
            buf is None
            or buf.numel() != n
            or buf.dtype != torch.float32
            or buf.device.type != "cpu"
            or (cur is not None and buf.data_ptr() == cur.data_ptr())
        ):
            buf = self._spares[key] = torch.empty(n, dtype=torch.float32)
        return buf

    def set_residual(self, key: str, value: torch.Tensor, *, recycle: bool = False) -> None:
        """Make ``value`` the residual of ``key``. With ``recycle`` the replaced residual
        becomes the buffer ``residual_buffer`` hands out next (the CPU path's double buffer);
        otherwise it is released (the torch path allocates each new residual)."""
        if not self.cfg.error_feedback:
            return
        old = self.residuals.get(key)
        self.residuals[key] = value
        self._restored.discard(key)
        if recycle and old is not None and old is not value and old.numel() == value.numel():
            self._spares[key] = old
        else:
            self._spares.pop(key, None)

    def workspace(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable CPU buffer of n elements (contents undefined), grown on demand.

        A fresh bucket-sized tensor per call costs more in page faults than the pass that fills
        it; calls on one state run one after another, so one buffer per name is enough. Not saved.
        """
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._workspace[name] = torch.empty(n, dtype=dtype)
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

    def entropy_due(self, key: str) -> bool:
        """Whether the call reducing bucket ``key`` should histogram its levels: the first
        successful call of each bucket after each ``scalars()``.

        Why sampled: a histogram pass over every bucket of every call costs a noticeable part
        of a call on compute-bound ranks. One call per bucket per telemetry window covers every
        bucket with its size's weight (a step's worth of gradients; the level distribution
        drifts slowly next to a window), on every rank alike (the ranks call ``scalars()``
        together)."""
        return key not in self._entropy_keys

    def record_entropy(self, key: str, bits: float, wire_elements: float) -> None:
        """Count a measured call of bucket ``key``: its ideal-coder ``bits`` and its
        ``wire_elements`` (see ``GCTStats.entropy_bits_per_element``)."""
        self._entropy_keys.add(key)
        self.record(entropy_bits=bits, entropy_elements=wire_elements)

    def record_constraint(self, rel_magnitude: float) -> None:
        self._constraint_sum += rel_magnitude
        self._constraint_n += 1

    def scalars(self) -> dict[str, float]:
        """Telemetry since the previous call (runtime writes it to DeepSpeed's monitor).
        ``entropy_bits_per_element`` covers the window's first call of each bucket
        (``entropy_due``)."""
        s = self._since
        out = {
            "bits_per_element": s.bits_per_element,
            "entropy_bits_per_element": s.entropy_bits_per_element,
            "bytes_sent": float(s.bytes_sent),
            "bytes_received": float(s.bytes_received),
            "elements": float(s.elements),
            "rel_quant_error": s.rel_quant_error,
            "quant_step": s.last_step,
            "encode_s": s.encode_s,
            "comm_s": s.comm_s,
            "decode_s": s.decode_s,
            "nonfinite_calls": float(s.nonfinite_calls),
            "wire_errors": float(s.wire_errors),
            "intra_node_bytes": float(s.intra_node_bytes),
            "lambda": self.constraint_lambda,
        }
        if self._constraint_n:
            out["constraint_rel"] = self._constraint_sum / self._constraint_n
        self._since = GCTStats()
        self._constraint_sum, self._constraint_n = 0.0, 0
        self._entropy_keys = set()
        return out

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, Python numbers, strings, lists and dicts only: loadable with
        ``torch.load(weights_only=True)``."""
        return {
            "version": 1,
            "global_step": int(self.global_step),
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "constraint_prev": {
                k: (p.detach().cpu().clone(), g.detach().cpu().clone())
                for k, (p, g) in self.constraint_prev.items()
            },
            "stats": _plain_stats(self.stats),
        }

    def load_state_dict(self, d: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Restore ``state_dict()``'s output; ValueError naming the key and what is wrong with it
        (nothing is changed then). A residual's size is checked against its bucket when the
        bucket is next reduced (``residual``)."""
        residuals, prev, stats = _checked(d)
        move = (lambda t: t.to(device)) if device else (lambda t: t.clone())
        self.global_step = int(d["global_step"])
        self.residuals = {k: move(v) for k, v in residuals.items()}
        self._restored = set(self.residuals)
        self._spares = {}
        self.constraint_prev = {k: (move(p), move(g)) for k, (p, g) in prev.items()}
        self.stats = stats

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["group"] = None  # process groups do not pickle; re-attach after unpickling
        d["hierarchy"] = None
        d["_workspace"] = {}
        d["_spares"] = {}
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.__dict__.setdefault("_entropy_keys", set())  # pickled before it existed


def _plain_stats(stats: GCTStats) -> dict[str, int | float]:
    """The statistics as Python ints and floats (counters may arrive as numpy integers)."""
    out: dict[str, int | float] = {}
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        out[f.name] = int(v) if f.type in (int, "int") else float(v)
    return out


def _checked(d: Any) -> tuple[dict, dict, GCTStats]:
    """The residuals, constraint memory and statistics of a GCT state dict, checked."""

    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"GCT state: {key} {what}")

    if not isinstance(d, dict):
        raise bad("(the whole state)", f"must be a dict, got {type(d).__name__}")
    if d.get("version") != 1:
        raise ValueError(f"GCT state: unsupported version {d.get('version')!r} (expected 1)")
    for key in ("global_step", "residuals", "constraint_prev", "stats"):
        if key not in d:
            raise bad(key, "is missing")
    if isinstance(d["global_step"], bool) or not isinstance(d["global_step"], int):
        raise bad("global_step", f"must be an int, got {type(d['global_step']).__name__}")
    residuals = d["residuals"]
    if not isinstance(residuals, dict):
        raise bad("residuals", f"must be a dict, got {type(residuals).__name__}")
    for k, v in residuals.items():
        name = f"residuals[{k!r}]"
        if not isinstance(k, str):
            raise bad(name, "has a key that is not a string")
        if not isinstance(v, torch.Tensor):
            raise bad(name, f"must be a tensor, got {type(v).__name__}")
        if v.dtype != torch.float32 or v.dim() != 1:
            raise bad(name, f"must be a 1-D float32 tensor, got {v.dim()}-D {v.dtype}")
        if not bool(torch.isfinite(v).all()):
            raise bad(name, "holds inf or NaN values")
    prev = d["constraint_prev"]
    if not isinstance(prev, dict):
        raise bad("constraint_prev", f"must be a dict, got {type(prev).__name__}")
    for k, pair in prev.items():
        name = f"constraint_prev[{k!r}]"
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(t, torch.Tensor) for t in pair)
        ):
            raise bad(name, "must be a (parameter, gradient) pair of tensors")
        if pair[0].shape != pair[1].shape:
            raise bad(name, f"pairs shapes {tuple(pair[0].shape)} and {tuple(pair[1].shape)}")
    raw = d["stats"]
    if not isinstance(raw, dict):
        raise bad("stats", f"must be a dict, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(GCTStats)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise bad("stats", f"has unknown fields {unknown}; allowed: {sorted(names)}")
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"stats[{k!r}]", f"must be a number, got {type(v).__name__}")
    return residuals, prev, GCTStats(**raw)
