"""Uniform scalar quantization and the empirical entropy of the result.

``quantize`` rounds half to even (``torch.round``) so that CPU and GPU give the same integers, and
refuses values the Exp-Golomb format cannot carry rather than wrapping them silently.
"""

from __future__ import annotations

import math

import torch

from .cpu import MAX_ABS


def _check_step(step: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(step, torch.Tensor):
        if step.dim() != 0:
            raise ValueError(
                f"step must be a positive scalar or 0-dim tensor, got shape {tuple(step.shape)}"
            )
        s = float(step)
    else:
        s = float(step)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"step must be positive and finite, got {s}")
    return step


def quantize(x: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """``round(x / step)`` as int32 on x's device; ValueError for non-finite or too-large values.

    Division runs in float32 (float64 for float64 input), so half-precision inputs round the same
    way on every device. Supported range: ``|x / step| <= 2^30 - 1`` (see ``cpu.MAX_ABS``).
    """
    step = _check_step(step)
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {x.dtype}")
    xf = x if x.dtype == torch.float64 else x.float()
    if isinstance(step, torch.Tensor):
        step = step.to(device=x.device, dtype=xf.dtype)
    y = torch.round(xf / step)
    if y.numel():
        amax = y.abs().max()
        if not bool(torch.isfinite(amax)):
            raise ValueError("quantize: input has non-finite values (or x / step overflows)")
        if float(amax) > MAX_ABS:
            raise ValueError(
                f"quantize: |x / step| reaches {float(amax):.4g}, above the supported {MAX_ABS} "
                "(use a larger step)"
            )
    return y.to(torch.int32)


def dequantize(
    q: torch.Tensor, step: float | torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * step`` in ``dtype`` (computed in float32, or float64 when dtype is float64)."""
    step = _check_step(step)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(step, torch.Tensor):
        step = step.to(device=q.device, dtype=work)
    return (q.to(work) * step).to(dtype)


def empirical_entropy(q: torch.Tensor) -> float:
    """Bits per element of the histogram of q's values (0 for an empty tensor)."""
    n = q.numel()
    if n == 0:
        return 0.0
    flat = q.reshape(-1)
    if flat.is_floating_point():
        raise ValueError(f"empirical_entropy expects an integer tensor, got {flat.dtype}")
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < (1 << 24):
        counts = torch.bincount(flat.to(torch.int64) - lo)
    else:
        counts = torch.unique(flat, return_counts=True)[1]
    p = counts[counts > 0].to(torch.float64) / n
    return float(-(p * torch.log2(p)).sum())
