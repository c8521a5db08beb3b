"""ggspeed.gg: the sampler's distribution, shape fitting, entropies and goodness of fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ggspeed import gg

N = 1 << 19


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [0.5, 1.0, 1.5, 2.0])
def test_sampler_moments_fit_and_ks(shape: float) -> None:
    std = 0.02
    x = gg.sample(shape, gg.scale_for_std(shape, std), N, generator=_gen(1))
    assert x.shape == (N,) and x.dtype == torch.float32
    se = std / math.sqrt(N)
    assert abs(float(x.double().mean())) < 5 * se
    # The variance estimate's spread grows with the kurtosis; 2% is > 5 sigma for shape >= 0.5.
    assert float(x.double().std()) == pytest.approx(std, rel=0.02)
    fitted, scale = gg.fit_shape(x)
    assert fitted == pytest.approx(shape, rel=0.03)
    assert scale == pytest.approx(gg.scale_for_std(shape, std), rel=0.03)
    fitted_mle, _ = gg.fit_shape(x, method="mle")
    assert fitted_mle == pytest.approx(shape, rel=0.02)
    # The whole distribution, not just two moments: KS against the exact CDF (scipy's gennorm).
    sub = x[:200_000].double().numpy()
    ks = stats.kstest(sub, stats.gennorm(shape, scale=gg.scale_for_std(shape, std)).cdf)
    assert ks.pvalue > 1e-3, ks


def test_extreme_tails_and_small_values() -> None:
    # Shape 0.5 has heavy tails: the largest of 4M draws must reach the expected tail region.
    shape, scale = 0.5, 1.0
    x = gg.sample(shape, scale, 1 << 21, generator=_gen(2)).abs().double().numpy()
    q = np.quantile(x, [1e-4, 0.01, 0.5, 0.99, 1 - 1e-5])
    exact = stats.gennorm(shape, scale=scale).ppf(
        0.5 + 0.5 * np.array([1e-4, 0.01, 0.5, 0.99, 1 - 1e-5])
    )
    np.testing.assert_allclose(q, exact, rtol=0.1)
    assert np.isfinite(x).all()


def test_rho_and_scale_for_std() -> None:
    assert gg.rho(1.0) == pytest.approx(2.0, rel=1e-12)
    assert gg.rho(2.0) == pytest.approx(math.pi / 2, rel=1e-12)
    assert gg.scale_for_std(2.0, 1.0) == pytest.approx(math.sqrt(2.0))
    assert gg.scale_for_std(1.0, 1.0) == pytest.approx(1 / math.sqrt(2.0))
    with pytest.raises(ValueError, match="shape"):
        gg.scale_for_std(0.01, 1.0)


def test_fit_shape_solves_rho_exactly() -> None:
    for shape in (0.1, 0.37, 1.0, 2.5, 4.0):
        assert gg._shape_from_rho(gg.rho(shape)) == pytest.approx(shape, rel=1e-6)
    assert gg._shape_from_rho(1e9) == gg.SHAPE_MIN
    with pytest.raises(ValueError, match="method"):
        gg.fit_shape(torch.randn(10), method="median")
    with pytest.raises(ValueError, match="all-zero"):
        gg.fit_shape(torch.zeros(10))


def test_entropy_closed_forms() -> None:
    sigma = 0.3
    gauss = 0.5 * math.log2(2 * math.pi * math.e * sigma**2)
    assert gg.entropy(2.0, math.sqrt(2) * sigma) == pytest.approx(gauss, rel=1e-12)
    assert gg.entropy(1.0, 0.5) == pytest.approx(math.log2(2 * math.e * 0.5), rel=1e-12)
    # Fine quantization: H(q) -> h - log2(step).
    h = gg.quantized_entropy(1.0, 1.0, 1e-3)
    assert h == pytest.approx(gg.entropy(1.0, 1.0) - math.log2(1e-3), abs=1e-4)


@pytest.mark.parametrize("shape", [0.5, 1.0, 2.0])
def test_quantized_entropy_matches_empirical(shape: float) -> None:
    std, step = 0.02, 0.01
    x = gg.sample(shape, gg.scale_for_std(shape, std), N, generator=_gen(3))
    q = torch.round(x / step).to(torch.int64)
    _, counts = torch.unique(q, return_counts=True)
    p = counts.double() / N
    empirical = float(-(p * p.log2()).sum())
    model = gg.quantized_entropy(shape, gg.scale_for_std(shape, std), step)
    # The plug-in estimate is biased low by about (bins - 1) / (2 N ln 2) bits.
    assert model == pytest.approx(empirical, abs=0.01)
    assert 0 < model < 8


def test_generator_determinism_and_default_generator() -> None:
    a = gg.sample(1.0, 1.0, 1000, generator=_gen(7))
    b = gg.sample(1.0, 1.0, 1000, generator=_gen(7))
    c = gg.sample(1.0, 1.0, 1000, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Larger than one block: the blocks continue the generator's stream.
    g = _gen(9)
    big = gg.sample(0.7, 1.0, gg._BLOCK + 123, generator=g)
    again = gg.sample(0.7, 1.0, gg._BLOCK + 123, generator=_gen(9))
    assert torch.equal(big, again) and big.unique().numel() > 0.99 * big.numel()
    torch.manual_seed(5)
    d = gg.sample(1.0, 1.0, 1000)
    torch.manual_seed(5)
    e = gg.sample(1.0, 1.0, 1000)
    assert torch.equal(d, e)


def test_out_dtype_layout_and_device() -> None:
    out = torch.empty(64, 32, dtype=torch.bfloat16)
    res = gg.sample(1.0, 0.02, out=out, generator=_gen(1))
    assert res is out and out.dtype == torch.bfloat16 and out.device.type == "cpu"
    assert float(out.float().abs().max()) > 0
    base = torch.zeros(32, 64, dtype=torch.float64)
    view = base.t()  # non-contiguous
    gg.sample(1.5, 0.02, out=view, generator=_gen(1))
    assert (base != 0).float().mean() > 0.99
    ref = gg.sample(1.5, 0.02, (64, 32), generator=_gen(1), dtype=torch.float64)
    assert torch.allclose(view, ref, rtol=1e-6)  # same draws, float32 then cast
    x = gg.sample(1.0, 1.0, (3, 4), device="cpu", dtype=torch.float64)
    assert x.shape == (3, 4) and x.dtype == torch.float64
    # The grad-requiring leaf is filled in place (init happens under no_grad).
    w = torch.nn.Parameter(torch.empty(8, 8))
    gg.sample(1.0, 1.0, out=w, generator=_gen(1))
    assert w.requires_grad and w.grad_fn is None
    with pytest.raises(ValueError, match="size"):
        gg.sample(1.0, 1.0, (3,), out=torch.empty(4))
    with pytest.raises(ValueError, match="shape"):
        gg.sample(7.0, 1.0, 4)
    with pytest.raises(ValueError, match="floating"):
        gg.sample(1.0, 1.0, out=torch.empty(4, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_and_device() -> None:
    out = torch.empty(1 << 20, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    gg.sample(1.0, 0.02, out=out, generator=g)  # scale 0.02: std 0.02 * sqrt(2) for shape 1
    assert out.device.type == "cuda"
    assert float(out.double().std()) == pytest.approx(0.02 * math.sqrt(2.0), rel=0.02)
    again = gg.sample(1.0, 0.02, 1 << 20, generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="generator"):
        gg.sample(1.0, 0.02, out=out, generator=_gen(1))


def test_goodness_of_fit_prefers_the_right_model() -> None:
    lap = gg.sample(1.0, 1.0, 200_000, generator=_gen(4))
    r = gg.goodness_of_fit(lap)
    assert r["gg"]["shape"] == pytest.approx(1.0, rel=0.03)
    assert r["nll_gain"] > 0.05
    assert r["gg"]["ks"] < 0.005 < r["gaussian"]["ks"]
    norm = torch.randn(200_000, generator=_gen(5), dtype=torch.float64)
    r = gg.goodness_of_fit(norm)
    assert r["gg"]["shape"] == pytest.approx(2.0, rel=0.05)
    assert abs(r["nll_gain"]) < 1e-3
    assert r["gaussian"]["ks"] < 0.005
    assert set(r) == {"n", "gg", "gaussian", "nll_gain"}


@pytest.mark.parametrize("shape", [0.05, 0.5, 1.0, 3.0])
def test_sampler_values_are_exact_quantiles(shape: float) -> None:
    """Replay the sampler's bit mapping on known draws: every value is the exact quantile of
    |X| at the probability the draw encodes, to float32 rounding, tails and centre alike."""
    from scipy import special

    g = _gen(6)
    x = gg.sample(shape, 1.0, 50_000, generator=g)
    r = torch.empty(50_000, dtype=torch.int32).random_(generator=_gen(6)).numpy().astype(np.int64)
    u = np.float32((r >> 1) | 1).astype(np.float64) / 2.0**31
    near_zero = (r & 2) > 0  # the centre half: lower probability u
    a = 1.0 / shape
    exact = np.where(near_zero, special.gammaincinv(a, u), special.gammainccinv(a, u))
    exact = np.power(exact, 1.0 / shape)
    exact = np.where((r & 1) > 0, -exact, exact)
    np.testing.assert_allclose(x.double().numpy(), exact, rtol=2e-6)


def test_moment_fit_solves_rho_to_machine_precision() -> None:
    for shape in np.exp(np.linspace(math.log(gg.SHAPE_MIN), math.log(gg.SHAPE_MAX), 60)):
        assert gg._shape_from_rho(gg.rho(shape)) == pytest.approx(shape, rel=1e-12)
    assert gg._shape_from_rho(gg.rho(gg.SHAPE_MAX) * 0.999) == gg.SHAPE_MAX
    assert gg._shape_from_rho(1.0) == gg.SHAPE_MAX


@pytest.mark.parametrize("shape", [0.6, 1.5])
def test_mle_at_least_as_likely_as_scipy_gennorm_fit(shape: float) -> None:
    """The profile-likelihood MLE against scipy's generic two-parameter fit: same shape, and a
    likelihood at least as high; nearby shapes (each at its best scale) are less likely."""
    x = gg.sample(shape, 0.7, 20_000, generator=_gen(11)).double().numpy()
    fitted, scale = gg.fit_shape(x, method="mle")
    beta, loc, scale_sp = stats.gennorm.fit(x, floc=0)
    assert loc == 0 and fitted == pytest.approx(beta, rel=1e-2)
    nll = -stats.gennorm.logpdf(x, fitted, scale=scale).mean()
    assert nll <= -stats.gennorm.logpdf(x, beta, scale=scale_sp).mean() + 1e-9
    for other in (fitted * 0.99, fitted * 1.01):
        best_scale = (other * np.mean(np.abs(x) ** other)) ** (1 / other)
        assert -stats.gennorm.logpdf(x, other, scale=best_scale).mean() > nll


def test_entropies_match_their_formulas() -> None:
    """entropy and quantized_entropy (through scipy's gennorm) against the closed form and the
    bin sum written out with the regularized incomplete gamma function."""
    from scipy import special

    for v in (0.05, 0.3, 1.0, 2.0, 3.7, 5.0):
        for a in (1e-3, 0.02, 1.0, 50.0):
            nats = 1 / v - math.log(v / (2 * a)) + math.lgamma(1 / v)
            assert gg.entropy(v, a) == pytest.approx(nats / math.log(2), rel=1e-12, abs=1e-12)
            for step in (0.01 * a, 0.3 * a, 2 * a):
                kmax = math.ceil(a * special.gammainccinv(1 / v, 1e-16) ** (1 / v) / step) + 2
                if kmax > 1 << 22:  # too many bins: the high-resolution limit
                    want = nats / math.log(2) - math.log2(step)
                    assert gg.quantized_entropy(v, a, step) == pytest.approx(want, rel=1e-12)
                    continue
                tail = special.gammaincc(1 / v, ((np.arange(kmax + 1) + 0.5) * step / a) ** v)
                pk = 0.5 * (tail[:-1] - tail[1:])
                pk = pk[pk > 0]
                p0 = 1 - tail[0]
                h = -2 * np.sum(pk * np.log2(pk)) - (p0 * math.log2(p0) if p0 > 0 else 0.0)
                assert gg.quantized_entropy(v, a, step) == pytest.approx(h, rel=1e-12, abs=1e-12)


def test_goodness_of_fit_ks_is_the_sup_distance() -> None:
    """The KS statistics (scipy's kstest) equal sup |F_n - F| written out."""
    x = gg.sample(0.8, 1.0, 30_000, generator=_gen(12)).double().numpy()
    r = gg.goodness_of_fit(x)
    xs = np.sort(x)
    n = xs.size

    def sup(cdf: np.ndarray) -> float:
        return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))

    cdf_gg = stats.gennorm.cdf(xs, r["gg"]["shape"], scale=r["gg"]["scale"])
    cdf_gauss = stats.norm.cdf(xs, r["gaussian"]["mean"], r["gaussian"]["std"])
    assert r["gg"]["ks"] == pytest.approx(sup(cdf_gg), abs=1e-12)
    assert r["gaussian"]["ks"] == pytest.approx(sup(cdf_gauss), abs=1e-12)
    assert r["gg"]["nll"] == pytest.approx(
        -stats.gennorm.logpdf(x, r["gg"]["shape"], scale=r["gg"]["scale"]).mean(), rel=1e-12
    )
