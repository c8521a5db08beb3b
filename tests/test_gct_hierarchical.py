"""Hierarchical data parallelism (ggspeed/gct/hierarchical.py) on real gloo ranks.

The node layout is emulated through the launcher's variables: each rank sets ``CROSS_RANK`` /
``LOCAL_RANK`` as deepspeed.launcher.launch would for 2 nodes x 2 ranks.

Bound tested (rounding, no RDOQ): each node's quantization error per element is at most half
its block's step, so the hierarchical average is within N x step_max / (2 W) of the exact mean
(N nodes, W ranks, step_max the largest step any rank used), the flat one within step_max / 2;
with error feedback the same bound holds for the sum over any number of calls.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.dist

N_EL = 3 * 4096 + 123  # uneven: the chunks end in a partial block and differ in size
W, NODES, PER = 4, 2, 2


def _emulate_node_layout(rank: int) -> None:
    os.environ.update(
        CROSS_RANK=str(rank // PER), CROSS_SIZE=str(NODES), LOCAL_RANK=str(rank % PER)
    )


def _grads(call: int) -> list[torch.Tensor]:
    """Every rank's gradient of ``call`` (each rank can compute all of them)."""
    out = []
    for r in range(W):
        g = torch.Generator().manual_seed(100 * call + r)
        scale = torch.linspace(0.1, 3.0, N_EL)  # blocks of different scales
        out.append(torch.randn(N_EL, generator=g) * scale)
    return out


def _exact(call: int) -> torch.Tensor:
    return torch.stack([g.double() for g in _grads(call)]).sum(0).div(W).float()


def _ranks_fn() -> dict:
    import torch.distributed as dist

    from ggspeed.config import ConfigError, GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce
    from ggspeed.gct.hierarchical import reduce_bucket, setup

    rank = dist.get_rank()
    out: dict = {}
    # No layout from the launcher: auto keeps the flat path, true is refused.
    os.environ.pop("CROSS_RANK", None)
    out["auto_no_env"] = setup("auto", None) is None
    try:
        setup(True, None)
        out["true_no_env"] = None
    except ConfigError as e:
        out["true_no_env"] = str(e)
    _emulate_node_layout(rank)
    h = setup("auto", None)
    out["layout"] = (h.nodes, h.per_node, h.index, h.ranks)
    # A strided data-parallel group (as with TP2 within the node): one rank per node.
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = strided[rank % 2]
    out["auto_strided"] = setup("auto", mine) is None
    try:
        setup(True, mine)
        out["true_strided"] = None
    except ConfigError as e:
        out["true_strided"] = str(e)

    def state(ef: bool, hier: bool) -> GCTState:
        cfg = GCTConfig(
            enabled=True, quant_step=1.0, error_feedback=ef, hierarchical=hier, exchange="allgather"
        )
        st = GCTState(cfg, group=dist.group.WORLD)
        st.hierarchy = h if hier else None
        return st

    # One call without error feedback: hierarchical, flat and the exact mean.
    sh, sf = state(False, True), state(False, False)
    hier = reduce_bucket(_grads(0)[rank].clone(), sh, None, key="b")
    # (the direct exchange: its kernels are the ones the hierarchy's 2-node calls use)
    flat = compressed_all_reduce(_grads(0)[rank].clone(), sf, None, key="b", exchange="allgather")
    out["hier"], out["flat"] = hier, flat
    out["hier_step"], out["flat_step"] = sh.stats.last_step, sf.stats.last_step
    out["intra_bytes"] = sh.stats.intra_node_bytes
    out["inter_elements"] = sh.stats.elements
    # bf16 buckets: the same chunks, the result cast back.
    bf = reduce_bucket(_grads(0)[rank].to(torch.bfloat16), state(False, True), None, key="b")
    out["bf16"] = bf

    # Error feedback over several calls: the sum of the results tracks the exact sum.
    se = state(True, True)
    acc = torch.zeros(N_EL)
    steps = []
    tail = torch.zeros(N_EL)
    for call in range(1, 7):
        got = reduce_bucket(_grads(call)[rank].clone(), se, None, key="b")
        acc += got
        tail += got if call > 4 else 0.0
        steps.append(se.stats.last_step)
        if call == 4:
            saved = se.state_dict()
    out["ef_acc"], out["ef_steps"], out["tail"] = acc, steps, tail
    out["ef_keys"] = sorted(se.residuals)
    # Resume with the same layout: call 5 and 6 again from the saved state, bit for bit.
    sr = state(True, True)
    sr.load_state_dict(saved)
    again = torch.zeros(N_EL)
    for call in (5, 6):
        again += reduce_bucket(_grads(call)[rank].clone(), sr, None, key="b")
    out["resumed_tail"] = again

    # Switching across a resume: the other form's residuals are folded in. With a zero gradient
    # the result is then the ranks' dropped error over W (within the reduction's own bound).
    def placed(st: GCTState) -> torch.Tensor:
        full = torch.zeros(N_EL)
        for k, v in st.residuals.items():
            lo, hi = (0, N_EL) if k == "b" else map(int, k[len("b@node[") : -1].split(":"))
            full[lo:hi] += v
        dist.all_reduce(full)
        return full / W

    for label, src, dst in [("hier_to_flat", True, False), ("flat_to_hier", False, True)]:
        a = state(True, src)
        reduce_bucket(_grads(7)[rank].clone(), a, None, key="b")
        dropped = placed(a)
        b = state(True, dst)
        b.load_state_dict(a.state_dict())
        got = reduce_bucket(torch.zeros(N_EL), b, None, key="b")
        out[label] = (got, dropped, b.stats.last_step, sorted(b.residuals))
    out["engine"] = _engine_run()
    return out


def _engine_run() -> dict:
    """A DeepSpeed ZeRO-1 engine with ``hierarchical: true`` on the emulated 2 x 2 layout."""
    import deepspeed

    import ggspeed

    deepspeed.init_distributed("gloo")  # joins the existing group
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
        "ggspeed": {
            "gct": {"enabled": True, "quant_step": 0.5, "block_size": 256, "hierarchical": True}
        },
    }
    engine, *_ = ggspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    w = torch.linspace(-1.0, 1.0, 16)[:, None] / 2
    ev = torch.randn(256, 16, generator=torch.Generator().manual_seed(7))
    losses = []
    for step in range(12):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * step + rank))
        loss = torch.nn.functional.mse_loss(engine(x), x @ w)
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            losses.append(float(torch.nn.functional.mse_loss(engine.module(ev), ev @ w)))
    st = engine.ggspeed.components["gct"]
    return {
        "params": torch.cat([p.detach().flatten() for p in engine.module.parameters()]),
        "losses": losses,
        "hierarchical": st.hierarchy is not None,
        "keys": sorted(st.residuals),
        "intra_node_bytes": st.stats.intra_node_bytes,
    }


def _bound(step: float, senders: int) -> float:
    return senders * step / (2 * W) * (1 + 1e-5) + 1e-6


def test_hierarchical_reduction_on_4_ranks() -> None:
    res = run_ranks(_ranks_fn, W, timeout=300)
    r0 = res[0]
    for r, o in enumerate(res):
        assert o["layout"] == (NODES, PER, r % PER, (0, 1, 2, 3))
    assert all(o["auto_no_env"] and o["auto_strided"] for o in res)
    for o in res:
        assert "ggspeed.gct.hierarchical" in o["true_no_env"] and "CROSS_RANK" in o["true_no_env"]
        assert "ggspeed.gct.hierarchical" in o["true_strided"]
        assert "one rank per node" in o["true_strided"]
    # Bit-identical on every rank.
    for key in ("hier", "flat", "bf16", "ef_acc"):
        for o in res[1:]:
            assert torch.equal(o[key], r0[key]), key
    exact = _exact(0)
    hstep = max(o["hier_step"] for o in res)
    fstep = max(o["flat_step"] for o in res)
    hier_err = (r0["hier"] - exact).abs()
    flat_err = (r0["flat"] - exact).abs()
    assert float(hier_err.max()) <= _bound(hstep, NODES)
    assert float(flat_err.max()) <= _bound(fstep, W)
    assert float((r0["hier"] - r0["flat"]).abs().max()) <= _bound(hstep, NODES) + _bound(fstep, W)
    # Not sloppier than the flat path: RMS errors alike (equal in expectation).
    ratio = float(hier_err.square().mean().sqrt() / flat_err.square().mean().sqrt())
    assert 0.5 < ratio < 2.0, ratio
    assert float(hier_err.max()) > 0  # it did quantize
    assert torch.allclose(r0["bf16"].float(), r0["hier"], rtol=2e-2, atol=hstep)
    # Each rank carried half the bucket across nodes; the node traffic was counted.
    assert [o["inter_elements"] for o in res] == [8192, N_EL - 8192] * 2
    assert all(o["intra_bytes"] > 0 for o in res)

    # Error feedback: the accumulated sum is within one call's bound of the exact sum.
    exact_acc = sum(_exact(c) for c in range(1, 7))
    ef_step = max(max(o["ef_steps"]) for o in res)
    err = float((r0["ef_acc"] - exact_acc).abs().max())
    assert err <= _bound(ef_step, NODES) + 1e-5 * float(exact_acc.abs().max()), err
    assert [o["ef_keys"] for o in res] == [["b@node[0:8192]"], ["b@node[8192:12411]"]] * 2
    # Resume with the same layout continues bit for bit.
    for o in res:
        assert torch.equal(o["resumed_tail"], o["tail"])

    for label, senders in [("hier_to_flat", W), ("flat_to_hier", NODES)]:
        for o in res:
            got, dropped, _, _ = o[label]
            assert torch.equal(got, r0[label][0])
            assert float(dropped.abs().max()) > 0
            assert float((got - dropped).abs().max()) <= _bound(
                max(p[label][2] for p in res), senders
            ), label
        segments = [["b@node[0:8192]"], ["b@node[8192:12411]"]] * 2
        expect = [["b"]] * W if label == "hier_to_flat" else segments
        assert [o[label][3] for o in res] == expect

    # The engine: hierarchical, trains, replicas identical.
    eng = [o["engine"] for o in res]
    assert all(e["hierarchical"] and e["intra_node_bytes"] > 0 for e in eng)
    assert all(e["keys"] and all("@node[" in k for k in e["keys"]) for e in eng)
    for e in eng[1:]:
        assert torch.equal(e["params"], eng[0]["params"])
    assert eng[0]["losses"][-1] < 0.5 * eng[0]["losses"][0], eng[0]["losses"]


def test_plan_decides_for_given_layouts() -> None:
    from ggspeed.gct.hierarchical import Place, place_from_env, plan

    ds = {"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}
    assert place_from_env(ds) == Place(1, 0, 2, 2, "CROSS_RANK")
    tr = {"GROUP_RANK": "0", "GROUP_WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert place_from_env(tr) == Place(0, 1, 4, 3, "GROUP_RANK")
    assert place_from_env({"LOCAL_RANK": "0"}).node is None

    def places(nodes: int, per: int) -> list[Place]:
        return [Place(r // per, r % per, per, nodes, "CROSS_RANK") for r in range(nodes * per)]

    # DP4 over 2 nodes x 2: hierarchical.
    assert plan(places(2, 2), [[0, 1, 2, 3]] * 4) == ([[[0, 1], [2, 3]]], "")
    # TP2 within the node x DP4 over 2 nodes x 4: two strided groups, 2 ranks per node each.
    dp = [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert plan(places(2, 4), [dp[r % 2] for r in range(8)]) == (
        [[[0, 2], [4, 6]], [[1, 3], [5, 7]]],
        "",
    )
    # TP2 within x DP2 across: one rank per node; PP2 across x DP2 within: one node.
    assert "one rank per node" in plan(places(2, 2), [[0, 2], [1, 3]] * 2)[1]
    assert "within one node" in plan(places(2, 2), [[0, 1], [2, 3]] * 2)[1]
    # One node only (torchrun on one machine).
    assert "within one node" in plan(places(1, 4), [[0, 1, 2, 3]] * 4)[1]
    # Inconsistent layouts: refused with the reason.
    bad = places(2, 2)
    assert "ranks [3]" in plan([*bad[:3], Place(None, 1)], [[0, 1, 2, 3]] * 4)[1]
    dup = [*bad[:3], Place(1, 0, 2, 2, "CROSS_RANK")]
    assert "same LOCAL_RANK" in plan(dup, [[0, 1, 2, 3]] * 4)[1]
    uneven = [Place(0, 0, None, 2, "CROSS_RANK"), Place(0, 1, None, 2, "CROSS_RANK")]
    uneven.append(Place(1, 0, None, 2, "CROSS_RANK"))
    assert "different numbers" in plan(uneven, [[0, 1, 2]] * 3)[1]
    size = [Place(r // 2, r % 2, 4, 2, "CROSS_RANK") for r in range(4)]
    assert "the launcher says [4] ranks" in plan(size, [[0, 1, 2, 3]] * 4)[1]
    assert "no node layout" in plan([Place(None)] * 2, [[0, 1]] * 2)[1]


def test_chunks_are_whole_blocks() -> None:
    from ggspeed.gct.hierarchical import node_chunks

    assert node_chunks(N_EL, 2, 4096) == ([0, 8192, N_EL], 8192)
    assert node_chunks(100, 4, 4096) == ([0, 100, 100, 100, 100], 4096)
    assert node_chunks(10, 3, 0) == ([0, 4, 8, 10], 4)


def test_bad_setting_refused_naming_the_key() -> None:
    from ggspeed.config import ConfigError, from_ds_config

    with pytest.raises(ConfigError, match=r"ggspeed\.gct\.hierarchical"):
        from_ds_config({"ggspeed": {"gct": {"enabled": True, "hierarchical": "sometimes"}}})
    cfg = from_ds_config({"ggspeed": {"gct": {"enabled": True}}})
    assert cfg.gct.hierarchical == "auto"
