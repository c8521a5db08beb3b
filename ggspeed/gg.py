"""Generalized-Gaussian (GG) statistics: sampling, shape fitting, entropies, goodness of fit.

Density with scale ``alpha`` and shape ``nu`` (location 0)::

    f(x) = nu / (2 alpha Gamma(1/nu)) * exp(-(|x| / alpha)^nu),   Var = alpha^2 Gamma(3/nu) / Gamma(1/nu)

``shape`` = 2 is the Gaussian, 1 the Laplacian. Names follow ggspeed's convention: ``shape`` and
``scale`` (scipy's ``gennorm`` calls the shape ``beta``).

Sampling draws one 31-bit integer per element from the *target device's* generator and maps it
through the tabulated inverse CDF (quantile) of |X|, since |X|^shape ~ Gamma(1/shape, 1): one bit
gives the sign, one picks the table half (probabilities near 0 or near 1 of |X|'s CDF), 29 bits
the probability. Each half has 2048 cells per octave of probability (built once per shape with
``scipy.special.gammainc(c)inv``), linear inside a cell, so every sampled quantile is within a
relative 1e-6 of the exact one (tests check it); the tail is resolved down to probability 2^-31.
One integer draw and a table lookup per value (a Marsaglia-Tsang rejection sampler costs several
normal draws); it honours the caller's ``torch.Generator`` and is deterministic for a given
generator state.

Fitting, entropies and goodness of fit run on the host with ``scipy.stats.gennorm`` (its
``beta`` is our ``shape``), ``scipy.stats.kstest`` and ``scipy.optimize``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import optimize, special, stats

__all__ = [
    "SHAPE_MAX",
    "SHAPE_MIN",
    "entropy",
    "fit_shape",
    "goodness_of_fit",
    "quantized_entropy",
    "rho",
    "sample",
    "scale_for_std",
]

SHAPE_MIN = 0.05
SHAPE_MAX = 5.0

_LN2 = math.log(2.0)
_MANT_BITS = 11  # table cells per octave = 2**_MANT_BITS
_OCTAVES = 30  # the uniform integer m is odd in [1, 2^30)
_SIDE_STRIDE = 1 << 16  # entries per table half (>= _OCTAVES * 2^_MANT_BITS + 1)
_SIDE_SHIFT = 15  # (r & 2) << 15 == side * _SIDE_STRIDE
_LOW_BITS = 23 - _MANT_BITS
_BASE_BITS = 127 << 23  # float32 bit pattern of 1.0
_BLOCK = 1 << 18  # elements per block: the temporaries stay in cache


def _check_shape(shape: float, name: str = "shape") -> float:
    shape = float(shape)
    if not (math.isfinite(shape) and SHAPE_MIN <= shape <= SHAPE_MAX):
        raise ValueError(f"{name} must be in [{SHAPE_MIN}, {SHAPE_MAX}], got {shape!r}")
    return shape


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def scale_for_std(shape: float, std: float) -> float:
    """The scale ``alpha`` whose GG(0, alpha, shape) has standard deviation ``std``."""
    shape = _check_shape(shape)
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"std must be a non-negative finite number, got {std!r}")
    return float(std) * math.exp(0.5 * (math.lgamma(1.0 / shape) - math.lgamma(3.0 / shape)))


def rho(shape: float) -> float:
    """E[x^2] / E[|x|]^2 of a GG with this shape: Gamma(1/v) Gamma(3/v) / Gamma(2/v)^2."""
    return math.exp(_log_rho(_check_positive(shape, "shape")))


def _log_rho(v: float) -> float:
    return math.lgamma(1.0 / v) + math.lgamma(3.0 / v) - 2.0 * math.lgamma(2.0 / v)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _quantile_table(shape: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell (value at cell start, slope per float32 ulp) of the unit-scale |X| quantile.

    Two halves, ``_SIDE_STRIDE`` entries apart: the tail half maps u in (0, 1/2) to the quantile
    at upper-tail probability u, the centre half to the quantile at lower probability u. The
    cell index is the float32 bit pattern of the odd integer m in [1, 2^30) (u = m / 2^31)
    shifted right by ``_LOW_BITS`` (exponent and top mantissa bits), so cells are log-spaced in
    the probability on both ends; the offset inside a cell is the low mantissa bits, in ulps.
    """
    a = 1.0 / shape
    cells = _OCTAVES << _MANT_BITS
    j = np.arange(cells + 1, dtype=np.float64)
    octave = np.floor(j / (1 << _MANT_BITS))
    frac = j / (1 << _MANT_BITS) - octave
    m = np.exp2(octave) * (1.0 + frac)  # cell boundaries, as values of m
    u = m / 2.0**31  # a probability in (0, 1/2]
    ulp = np.exp2(octave[:-1] - 23.0)
    y0 = np.zeros(2 * _SIDE_STRIDE)
    slope = np.zeros(2 * _SIDE_STRIDE)
    for side, g in enumerate((special.gammainccinv(a, u), special.gammaincinv(a, u))):
        y = np.power(g, 1.0 / shape)  # unit-scale |X| = G^(1/shape)
        base = side * _SIDE_STRIDE
        y0[base : base + cells + 1] = y  # the last entry: m rounded up to 2^30 in float32
        slope[base : base + cells] = (y[1:] - y[:-1]) / (m[1:] - m[:-1]) * ulp
    return y0, slope


@functools.lru_cache(maxsize=32)
def _device_table(shape: float, scale: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    y0, slope = _quantile_table(shape)
    return (
        torch.from_numpy((y0 * scale).astype(np.float32)).to(device),
        torch.from_numpy((slope * scale).astype(np.float32)).to(device),
    )


def _fill_gg(flat: torch.Tensor, y0: torch.Tensor, slope: torch.Tensor, gen: Any) -> None:
    """Fill a contiguous 1-D float32 tensor block by block.

    Per element one 31-bit draw r: bit 0 the sign, bit 1 the table half (tail or centre), bits
    2-30 the magnitude m = (r >> 1) | 1, odd in [1, 2^30). Every temporary is preallocated and
    cache-sized: fresh large allocations per block cost page faults.
    """
    n = flat.numel()
    block = min(_BLOCK, n)
    dev = flat.device
    rbuf, ibuf, sbuf = (torch.empty(block, dtype=torch.int32, device=dev) for _ in range(3))
    fbuf, obuf, abuf, bbuf = (torch.empty(block, dtype=torch.float32, device=dev) for _ in range(4))
    for start in range(0, n, block):
        k = min(block, n - start)
        r, bits, side, mf, off, a, b = (t[:k] for t in (rbuf, ibuf, sbuf, fbuf, obuf, abuf, bbuf))
        dst = flat[start : start + k]
        r.random_(generator=gen)  # uniform in [0, 2^31)
        torch.bitwise_right_shift(r, 1, out=bits)
        bits.bitwise_or_(1)
        mf.copy_(bits)  # odd m -> float32 (exact up to float rounding)
        mbits = mf.view(torch.int32)
        torch.bitwise_and(mbits, (1 << _LOW_BITS) - 1, out=bits)
        off.copy_(bits)
        torch.bitwise_and(r, 2, out=side)
        side.bitwise_left_shift_(_SIDE_SHIFT)
        mbits.sub_(_BASE_BITS).bitwise_right_shift_(_LOW_BITS).add_(side)  # cell index
        torch.index_select(y0, 0, mbits, out=a)
        torch.index_select(slope, 0, mbits, out=b)
        torch.addcmul(a, b, off, out=dst)
        r.bitwise_left_shift_(31)
        dst.view(torch.int32).bitwise_xor_(r)


def _resolve_generator(generator: torch.Generator | None, device: torch.device) -> Any:
    if generator is None:
        return None
    gdev = torch.device(generator.device)
    if gdev.type != device.type or (
        device.type != "cpu"
        and gdev.index is not None
        and device.index is not None
        and gdev.index != device.index
    ):
        raise ValueError(
            f"generator is on {gdev} but the tensor is on {device}: sample with the generator "
            "of the tensor's own device (sampling elsewhere and copying breaks per-shard draws)"
        )
    return generator


def sample(
    shape: float,
    scale: float,
    size: int | Sequence[int] | torch.Size | None = None,
    *,
    out: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw GG(0, ``scale``, ``shape``) samples into ``out`` (in place) or a new tensor.

    Draws happen on the target device with ``generator`` (that device's default generator when
    None): the same generator state gives the same tensor. shape = 2 uses ``normal_`` directly.
    """
    shape = _check_shape(shape)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a non-negative finite number, got {scale!r}")
    if out is None:
        if size is None:
            raise ValueError("sample needs size or out")
        if isinstance(size, int):
            size = (size,)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        out = torch.empty(tuple(size), dtype=dtype or torch.get_default_dtype(), device=device)
    else:
        if size is not None:
            want = (size,) if isinstance(size, int) else tuple(size)
            if tuple(out.shape) != want:
                raise ValueError(f"size {want} does not match out.shape {tuple(out.shape)}")
        if dtype is not None and out.dtype != dtype:
            raise ValueError(f"dtype {dtype} does not match out.dtype {out.dtype}")
        if device is not None and torch.device(device) != out.device:
            raise ValueError(f"device {device} does not match out.device {out.device}")
    if not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
    gen = _resolve_generator(generator, out.device)
    with torch.no_grad():
        if out.numel() == 0 or out.device.type == "meta":
            return out
        if shape == 2.0:
            return out.normal_(0.0, scale / math.sqrt(2.0), generator=gen)
        y0, slope = _device_table(shape, float(scale), out.device)
        if out.dtype == torch.float32 and out.is_contiguous():
            _fill_gg(out.view(-1), y0, slope, gen)
        else:
            tmp = torch.empty(out.numel(), dtype=torch.float32, device=out.device)
            _fill_gg(tmp, y0, slope, gen)
            out.copy_(tmp.view(out.shape))
    return out


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


def _as_float64(x: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16)):
        raise ValueError(f"expected real numbers, got dtype {t.dtype}")
    t = t.reshape(-1).to(device="cpu", dtype=torch.float64)
    if t.numel() < 2:
        raise ValueError(f"need at least 2 values to fit, got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError("cannot fit data with NaN or infinite values")
    return t


def _shape_from_rho(r: float) -> float:
    """Solve rho(shape) = r on [SHAPE_MIN, SHAPE_MAX] (rho decreases in shape); clip outside.

    Brent's method on log(shape), to a relative precision of ~1e-14 in the shape."""
    lr = math.log(r)

    def f(ls: float) -> float:
        return _log_rho(math.exp(ls)) - lr

    lo, hi = math.log(SHAPE_MIN), math.log(SHAPE_MAX)
    if f(lo) <= 0:
        return SHAPE_MIN
    if f(hi) >= 0:
        return SHAPE_MAX
    return math.exp(optimize.brentq(f, lo, hi, xtol=1e-15))


def _mle_profile_nll(shape: float, logx: torch.Tensor, n: int) -> tuple[float, float]:
    """Negative log-likelihood per element at the best scale for this shape, and that scale.

    ``logx`` is log|x| (-inf for zeros): exp(shape * log|x|) is cheaper than pow per shape."""
    m = float(torch.exp(logx * shape).sum()) / n
    if m <= 0:
        return math.inf, 0.0
    scale = (shape * m) ** (1.0 / shape)
    nll = -math.log(shape / (2.0 * scale)) + math.lgamma(1.0 / shape) + 1.0 / shape
    return nll, scale


_MLE_MAX = 1 << 22
_MLE_TOL = 1e-6  # in log(shape): the shape to a relative ~1e-6


def fit_shape(
    x: torch.Tensor | np.ndarray | Sequence[float], method: str = "moment"
) -> tuple[float, float]:
    """Fit (shape, scale) of a zero-location GG to ``x``.

    ``moment``: the method authors' moment matching, rho(shape) = n sum(x^2) / (sum|x|)^2, solved
    on [0.05, 5] (result clipped to that range), scale from the second moment.
    ``mle``: maximum likelihood: the scale that maximizes the likelihood for a shape is closed
    form, so ``scipy.optimize.minimize_scalar`` maximizes that profile over log(shape), near the
    moment fit (scipy's generic ``gennorm.fit`` searches both parameters and is slower and less
    precise); uses a fixed subsample of 4M values for larger inputs.
    """
    if method not in ("moment", "mle"):
        raise ValueError(f"method must be 'moment' or 'mle', got {method!r}")
    t = _as_float64(x)
    absx = t.abs()
    s1 = float(absx.sum())
    s2 = float((t * t).sum())
    n = t.numel()
    if s1 == 0.0:
        raise ValueError("cannot fit a GG to all-zero data")
    shape = _shape_from_rho(n * s2 / (s1 * s1))
    if method == "moment":
        return shape, scale_for_std(shape, math.sqrt(s2 / n))
    if n > _MLE_MAX:
        g = torch.Generator().manual_seed(0)
        absx = absx[torch.randint(0, n, (_MLE_MAX,), generator=g)]
        n = _MLE_MAX
    logx = absx.log()
    # The profile NLL is unimodal in log(shape): widen a window around the moment estimate until
    # it holds the minimum (or reaches the shape range's end), then bounded Brent inside it.
    f = functools.lru_cache(maxsize=None)(lambda ls: _mle_profile_nll(math.exp(ls), logx, n)[0])
    lo = max(math.log(SHAPE_MIN), math.log(shape) - 0.5)
    hi = min(math.log(SHAPE_MAX), math.log(shape) + 0.5)
    while lo > math.log(SHAPE_MIN) and f(lo) < f(lo + 1e-3):
        lo = max(math.log(SHAPE_MIN), lo - 0.5)
    while hi < math.log(SHAPE_MAX) and f(hi) < f(hi - 1e-3):
        hi = min(math.log(SHAPE_MAX), hi + 0.5)
    res = optimize.minimize_scalar(
        f, bounds=(lo, hi), method="bounded", options={"xatol": _MLE_TOL}
    )
    best = math.exp(res.x)
    return best, _mle_profile_nll(best, logx, n)[1]


# ----------------------------------------------------------------------------------------------
# Entropies
# ----------------------------------------------------------------------------------------------


def entropy(shape: float, scale: float) -> float:
    """Differential entropy of GG(0, scale, shape), in bits."""
    v = _check_positive(shape, "shape")
    a = _check_positive(scale, "scale")
    return float(stats.gennorm.entropy(v, scale=a)) / _LN2


_MAX_BINS = 1 << 22


def quantized_entropy(shape: float, scale: float, step: float) -> float:
    """Bits/element of an ideal entropy coder for q = round(x / step), x ~ GG(0, scale, shape).

    Sums -p log2 p over the bins (k - 1/2, k + 1/2) * step with p from the regularized incomplete
    gamma function, until the remaining tail mass is below 1e-15. When that needs more than 4M
    bins (step far below the scale) the high-resolution limit h - log2(step) is exact to ~1e-6.
    """
    v = _check_positive(shape, "shape")
    a = _check_positive(scale, "scale")
    step = _check_positive(step, "step")
    kmax = math.ceil(float(stats.gennorm.isf(0.5e-16, v, scale=a)) / step) + 2  # P(|X|>.) 1e-16
    if kmax > _MAX_BINS:
        return entropy(v, a) - math.log2(step)
    edges = (np.arange(kmax + 1, dtype=np.float64) + 0.5) * step  # upper edges of bins 0..kmax
    tail = 2.0 * stats.gennorm.sf(edges, v, scale=a)  # P(|X| > edge)
    p0 = 1.0 - tail[0]
    pk = 0.5 * (tail[:-1] - tail[1:])  # each of the bins +k and -k, k >= 1
    pk = pk[pk > 0]
    h = -2.0 * float(np.sum(pk * np.log2(pk)))
    if p0 > 0:
        h -= p0 * math.log2(p0)
    return h


# ----------------------------------------------------------------------------------------------
# Goodness of fit
# ----------------------------------------------------------------------------------------------


def gg_logpdf(x: np.ndarray, shape: float, scale: float) -> np.ndarray:
    """Log density (nats) of GG(0, scale, shape) at ``x`` (scipy's ``gennorm``)."""
    return stats.gennorm.logpdf(x, shape, scale=scale)


_KS_MAX = 1 << 20


def goodness_of_fit(x: torch.Tensor | np.ndarray | Sequence[float]) -> dict[str, Any]:
    """GG (maximum likelihood) vs Gaussian (mean, std) fitted to the same data.

    Returns fitted parameters, negative log-likelihood per element (nats) and the
    Kolmogorov-Smirnov statistic of each (on a fixed subsample of 1M values for larger inputs),
    plus ``nll_gain`` = Gaussian NLL - GG NLL (positive: the GG describes the data better).
    """
    t = _as_float64(x)
    shape_m, scale_m = fit_shape(t, "moment")
    shape, scale = fit_shape(t, "mle")
    xs = t.numpy()
    n = xs.size
    mean = float(xs.mean())
    std = float(xs.std())
    if std == 0.0:
        raise ValueError("cannot fit constant data")
    gg_dist = stats.gennorm(shape, scale=scale)
    nll_gg = -float(np.mean(gg_dist.logpdf(xs)))
    nll_gauss = 0.5 * math.log(2.0 * math.pi * std * std) + 0.5
    sub = xs
    if n > _KS_MAX:
        rng = np.random.default_rng(0)
        sub = xs[rng.integers(0, n, _KS_MAX)]
    ks_gg = float(stats.kstest(sub, gg_dist.cdf).statistic)
    ks_gauss = float(stats.kstest(sub, stats.norm(mean, std).cdf).statistic)
    return {
        "n": int(n),
        "gg": {
            "shape": shape,
            "scale": scale,
            "shape_moment": shape_m,
            "scale_moment": scale_m,
            "nll": nll_gg,
            "ks": ks_gg,
        },
        "gaussian": {"mean": mean, "std": std, "nll": nll_gauss, "ks": ks_gauss},
        "nll_gain": nll_gauss - nll_gg,
    }
