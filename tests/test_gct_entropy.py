"""GCT's ``entropy_bits_per_element``: the empirical entropy of the levels a rank coded.

The level histogram against ``codec.empirical_entropy`` (fused CPU kernel and torch path), then
on real gloo ranks the published statistic against the entropy of levels recomputed
independently from every rank's input (2 ranks: the all-gather, point to point on the fused
path, collectives on the torch path; 4 ranks: reduce-scatter, own levels and chunk sums), and its
sampling (a bucket's first call per telemetry window)."""

from __future__ import annotations

import pytest
import torch

from ggspeed.codec import empirical_entropy
from ggspeed.gct import common
from ggspeed.gct.kernels import HIST_K
from ggspeed.wire import coding
from tests.dist import pool_ranks
from tests.test_gct_dist import _grad_like


def _levels(seed: int, n: int, scale: float, dtype=torch.int32) -> torch.Tensor:
    """Laplacian-like integer levels: mostly within +-HIST_K, with a tail beyond it."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return torch.round(-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).to(dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_level_counts_match_empirical_entropy(fused, monkeypatch):
    monkeypatch.setattr(common, "FUSED_CPU", fused)
    wide = _levels(1, 30_011, 40.0)
    assert int((wide.abs() > HIST_K).sum()) > 100  # the exact path for wide levels is used
    wide[:3] = torch.tensor([2**29, -(2**29), 2**29])  # far outside the binned range
    cases = [
        [wide],
        [_levels(2, 10_000, 1.5)],
        [_levels(3, 10_000, 1.5, torch.int8)],  # the direct exchange's narrow level buffer
        [wide[:7000], wide[9000:]],  # several parts count as one histogram
        [torch.zeros(5, dtype=torch.int32)],
    ]
    for parts in cases:
        joined = torch.cat(parts)
        counts = common.level_counts(parts)
        expected = torch.unique(joined, return_counts=True)[1]
        assert torch.equal(counts, expected)  # ascending order of value, as bincount's
        assert common.level_entropy(counts) == empirical_entropy(joined)
        assert common.entropy_bits(counts) == joined.numel() * empirical_entropy(joined)
        assert coding.entropy_bits(joined) == empirical_entropy(joined)  # the wire coders' helper
    assert common.level_counts([]).numel() == 0 and common.entropy_bits(torch.zeros(0)) == 0.0


def _entropy_checks() -> dict:
    """Per exchange and quantizer: the published entropy and the one recomputed here."""
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce
    from ggspeed.gct.exchange import chunk_bounds

    rank, world = dist.get_rank(), dist.get_world_size()
    n, block = 20_011, 4096
    exchanges = ["reduce_scatter"] if world > 2 else ["allgather"]  # 4 ranks: 2 chunks others

    def expected(cfg: GCTConfig, xs: list[torch.Tensor], exchange: str) -> dict[str, float]:
        """The entropy this rank's coded levels should have, from every rank's input alone."""
        st = GCTState(cfg)
        stats = [common.add_and_block_stats_torch(x, None, block) for x in xs]
        rms = torch.stack([s[1] for s in stats]).amax(0)
        amax = torch.stack([s[2] for s in stats]).amax(0)
        steps = common.block_steps_torch(st, rms, amax, world)
        qs = [common.quantize_torch(st, x, steps, block)[0] for x in xs]
        own, total = qs[rank], torch.stack(qs).sum(0)
        wire = 2.0 * n * (world - 1) / world
        alt = {
            "own": empirical_entropy(own),
            "sum": empirical_entropy(total),
            "own_x_sent": (world - 1) * n * empirical_entropy(own) / wire,
        }
        if exchange == "allgather":
            return {"want": alt["own_x_sent"], **alt}
        lo, hi = chunk_bounds(n, world)[rank : rank + 2]
        others = torch.cat([own[:lo], own[hi:]])
        sums = total[lo:hi]
        bits = others.numel() * empirical_entropy(others)
        bits += (world - 1) * sums.numel() * empirical_entropy(sums)
        return {"want": bits / wire, **alt}

    out: dict = {}
    try:
        for fused in (True, False):
            common.FUSED_CPU = fused
            for exchange in exchanges:
                for quant, kw in {"round": {"quant_step": 0.5}, "rdoq_fine": {"quant_step": 0.02,
                                  "rdoq_mu": 0.05}}.items():  # fmt: skip
                    cfg = GCTConfig(
                        enabled=True,
                        exchange=exchange,
                        block_size=block,
                        error_feedback=False,
                        **kw,
                    )
                    state = GCTState(cfg)
                    x = _grad_like(100 * rank + 1, n)
                    xs = [torch.empty_like(x) for _ in range(world)]
                    dist.all_gather(xs, x)
                    want = expected(cfg, xs, exchange)
                    compressed_all_reduce(x.clone(), state, key="a")
                    # a second call of the same bucket in the window is not measured
                    compressed_all_reduce(_grad_like(100 * rank + 7, n) * 9, state, key="a")
                    sc = state.scalars()
                    third = compressed_all_reduce(x.clone(), state, key="a")  # a new window
                    out[f"{'fused' if fused else 'torch'}/{exchange}/{quant}"] = {
                        **want,
                        "got": sc["entropy_bits_per_element"],
                        "bits": sc["bits_per_element"],
                        "after_window": state.scalars()["entropy_bits_per_element"],
                        "finite": bool(torch.isfinite(third).all()),
                    }
    finally:
        common.FUSED_CPU = True
    return out


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_published_entropy_is_that_of_the_coded_levels(world):
    results = pool_ranks(_entropy_checks, world)
    for rank, res in enumerate(results):
        assert len(res) == 4
        for name, r in res.items():
            what = f"rank {rank} {name}"
            assert r["got"] == pytest.approx(r["want"], rel=1e-12, abs=0), what
            # the same levels give the same value in the next window (the first call's inputs)
            assert r["after_window"] == pytest.approx(r["want"], rel=1e-12, abs=0), what
            assert r["finite"]
            # an entropy of the wrong levels would fail the check above: they differ
            wrong = [r["own"], r["sum"]] if "reduce_scatter" in name else [r["sum"]]
            for w in wrong:
                assert abs(w - r["want"]) > 1e-3 * r["want"], (what, w)
            # the coded bits lie above the entropy floor, and not far above it
            assert r["want"] < r["bits"] < 2 * r["want"] + 2, what
        for key in [k for k in res if k.startswith("fused/")]:  # the torch path: the same value
            assert res[key]["got"] == res[key.replace("fused/", "torch/")]["got"]


def test_pipe_messages_without_the_error_pass_are_the_same():
    """The pipe coder's send without its decode-back (the sampled sends' error statistics):
    the same message, codes and entropy; no error sums."""
    from ggspeed.config.wire import PipeCodingConfig
    from ggspeed.wire.pipe import encode_message

    cfg = PipeCodingConfig(enabled=True)
    x = _grad_like(5, 70_001).to(torch.bfloat16)
    full, lean = encode_message(x, cfg), encode_message(x, cfg, errors=False)
    assert torch.equal(full.message, lean.message) and full.kind == lean.kind
    assert (full.code_bits, full.entropy_bits) == (lean.code_bits, lean.entropy_bits)
    q = coding.encode_update(x.float(), cfg).q  # type: ignore[arg-type]
    assert full.entropy_bits == x.numel() * empirical_entropy(q)
    assert full.error_sq > 0 and lean.error_sq == 0 and lean.signal_sq == 0
