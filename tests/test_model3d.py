"""The 3D-parallel GPT: every layout trains like one process; the CPU RNG shim; same function as nanogpt.

Tolerance of the layout comparison: all runs are float32 with identical weights and data; what
differs is the order of floating-point sums (row-parallel partial products all-reduced over TP,
vocab-parallel softmax sums, gradients averaged over DP and accumulated over micro-batches,
pipeline-tied embedding gradients added across stages). Each reordering changes a result by a
few float32 ulps (eps = 1.2e-7 relative); Adam normalizes updates, so after 3 steps the loss
(~5.5) moves by at most ~1e-6 (the design spike measured <= 1.4e-6 over 15 steps). We allow
2e-5 absolute, ~20x that, while a real wiring error (a wrong split, a missing reduction, a
different init or data order) changes the first loss by far more (the loss itself changes by
~5e-2 per step here).
"""

from __future__ import annotations

import pytest

from tests.dist import run_ranks
from tests.test_model3d_ranks import reference_checks, train_losses

CFG = {"vocab_size": 256, "seq_len": 16, "n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 64}
STEPS = 3
GLOBAL_BATCH = 8
TOL = 2e-5


@pytest.fixture(scope="module")
def reference():
    return run_ranks(reference_checks, 1, CFG, STEPS, GLOBAL_BATCH, init_pg=False, timeout=600)[0]


@pytest.mark.dist
def test_cpu_shim_makes_megatron_tracker_work(reference):
    assert reference["megatron_tracker_without_shim"].startswith("failed"), (
        "Megatron's RNG tracker worked on CPU without the shim: the shim may be unneeded"
    )
    assert reference["shim_installed"], "the shim was not installed"
    assert reference["fork_restores_default"], "a fork left the default generator changed"
    assert reference["fork_differs_from_default"], "a fork drew the default stream"


@pytest.mark.dist
def test_same_function_as_nanogpt(reference):
    # Same weights (QKV re-laid-out per head): the TP1 pipeline model computes nanogpt's logits.
    for positions, diff in reference["nanogpt_max_abs_diff"].items():
        assert diff < 1e-5, f"{positions} positions: logits differ by {diff}"


LAYOUTS = [(2, 2, 8), (2, 1, 4), (1, 2, 4)]


@pytest.fixture(scope="module", params=LAYOUTS, ids=["TP2xPP2xDP2", "TP2xDP2", "PP2xDP2"])
def layout(request) -> tuple[int, int, list[dict]]:
    """(tp, pp, per-rank results) of one launch of fresh ranks per layout (Megatron's parallel
    state stays on fresh ranks)."""
    tp, pp, world = request.param
    results = run_ranks(
        train_losses, world, CFG, tp, pp, STEPS, GLOBAL_BATCH, 2, init_pg=False, timeout=600
    )
    return tp, pp, results


@pytest.mark.dist
def test_the_reference_run_trains(reference):
    ref = reference["losses"]
    assert abs(ref[-1] - ref[0]) > 1e-3, "the reference run must actually train"


@pytest.mark.dist
def test_layout_losses_equal_single_process(reference, layout):
    ref = reference["losses"]
    _, _, results = layout
    for r in results:
        assert len(r["losses"]) == STEPS, f"rank {r['rank']}: {len(r['losses'])} losses"
        for step, (a, b) in enumerate(zip(r["losses"], ref)):
            assert abs(a - b) <= TOL, f"rank {r['rank']} step {step}: {r['losses']} vs {ref}"


@pytest.mark.dist
def test_dropout_streams_per_tp_region(layout):
    # TP-region dropout streams: distinct per (stage, TP rank), shared by the DP replicas.
    tp, pp, results = layout
    draws = {}
    for r in results:
        draws.setdefault(r["tp_rank"], set()).add(tuple(r["tp_draw"]))
    assert all(len(v) == 1 for v in draws.values()), f"DP replicas drew differently: {draws}"
    assert len({next(iter(v)) for v in draws.values()}) == tp * pp, (
        f"expected {tp * pp} distinct streams, got {draws}"
    )
