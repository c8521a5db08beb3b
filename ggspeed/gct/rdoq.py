"""Quantization of (gradient + residual) to integers: plain rounding or RDOQ.

RDOQ (rate-distortion optimized quantization, as in video coders) picks for each element the
level among floor and ceil of |x|/step that minimizes  (x/step - q)^2 + mu * EG_bits(q).  Only
floor and ceil are candidates (floor is 0 for |x| < step), so the per-element error stays below
one step and error feedback can carry it; rounding is the mu = 0 case.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["eg_bits", "quantize_rdoq", "quantize_round"]


# Zero-run mode: a nonzero also pays for the run length before it; about this many bits at the
# sparsities RDOQ produces (the exact cost depends on the neighbours, which RDOQ does not see).
RUN_BITS = 3.0


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) of floats v >= 1 (exact for integers below 2^24), via the exponent."""
    return (torch.frexp(v).exponent - 1).to(torch.float32)


def eg_bits(q: torch.Tensor, k: int = 0, runs: bool = False) -> torch.Tensor:
    """Approximate code length of each level ``q`` in bits (float32), as the codec writes it.

    Plain mode: EG order k of zig-zag(q), exact. Zero-run mode: a zero is nearly free, a nonzero
    costs EG_k(|q| - 1) + a sign bit + ``RUN_BITS`` for its run.
    """
    qf = q.to(torch.float32)
    scale = float(2**k)
    if runs:
        a = qf.abs()
        v = torch.floor((a - 1).clamp_min(0) / scale) + 1
        nz = 2 * _floor_log2(v) + (k + 2 + RUN_BITS)
        return torch.where(a == 0, torch.zeros_like(nz), nz)
    u = torch.where(qf > 0, 2 * qf - 1, -2 * qf)
    return 2 * _floor_log2(torch.floor(u / scale) + 1) + (1 + k)


def quantize_round(x: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """Round to the nearest level (ties to even, as torch.round): int32."""
    return torch.round(x / step).to(torch.int32)


@numba.njit(cache=True, nogil=True)
def _rdoq_cpu(y: np.ndarray, mu: float, k: int, runs: bool, out: np.ndarray) -> None:
    """Per-element RDOQ on CPU (same decision rule as the torch path)."""
    scale = 2.0**k
    for i in range(y.size):
        a = abs(y[i])
        lo = np.floor(a)
        hi = lo + 1.0
        if a - lo <= 0.5:  # code lengths never shrink with the level: the floor wins
            out[i] = np.int32(lo) if y[i] >= 0 else -np.int32(lo)
            continue
        c_lo = (a - lo) ** 2 + mu * _bits(lo, scale, k, runs)
        c_hi = (hi - a) ** 2 + mu * _bits(hi, scale, k, runs)
        best = hi if c_hi < c_lo else lo
        out[i] = np.int32(best) if y[i] >= 0 else -np.int32(best)


@numba.njit(cache=True, inline="always")
def _bits(lev: float, scale: float, k: int, runs: bool) -> float:
    if runs:
        if lev == 0:
            return 0.0
        return 2 * np.floor(np.log2(np.floor((lev - 1) / scale) + 1)) + k + 2 + RUN_BITS
    u = 2 * lev - 1 if lev > 0 else 0.0
    return 2 * np.floor(np.log2(np.floor(u / scale) + 1)) + 1 + k


def quantize_rdoq(
    x: torch.Tensor, step: float | torch.Tensor, mu: float, k: int = 0, runs: bool = False
) -> torch.Tensor:
    """RDOQ levels of ``x`` (int32): floor or ceil of |x|/step, whichever has the lower RD cost.

    ``step`` is a number or a per-element tensor. ``mu`` is in step^2 per bit; ``k`` and
    ``runs`` describe the code (see :func:`eg_bits`).
    """
    if mu <= 0:
        return quantize_round(x, step)
    y = x.float() / step
    if y.device.type == "cpu":
        out = np.empty(y.numel(), dtype=np.int32)
        _rdoq_cpu(y.contiguous().view(-1).numpy(), float(mu), int(k), bool(runs), out)
        return torch.from_numpy(out).view(x.shape)
    a = y.abs()
    lo = torch.floor(a)
    hi = lo + 1.0
    cost_lo = (a - lo) ** 2 + mu * eg_bits(lo, k, runs)
    cost_hi = (hi - a) ** 2 + mu * eg_bits(hi, k, runs)
    level = torch.where(cost_hi < cost_lo, hi, lo)
    return (torch.sign(y) * level).to(torch.int32)
