"""4 gloo ranks, one launch: the compressed all-reduce (also on 2-rank subgroups), the DDP hook,
and a DeepSpeed PipelineModule with 2 stages x 2 data-parallel ranks."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.test_gct_deepspeed import STEPS

pytestmark = pytest.mark.dist


def _grad_like(seed: int, n: int) -> torch.Tensor:
    """Heavy-tailed, gradient-like values (Laplacian scale 1e-3), different on each rank."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-1e-3 * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _collective_checks() -> dict:
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce, gct_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"rank": rank}
    # 1. Results identical on every rank; error vs the exact average within half a step.
    n = 10007
    for name, cfg, bound in [
        ("round", GCTConfig(enabled=True, error_feedback=False, quant_step=0.5), 0.5),
        ("rdoq", GCTConfig(enabled=True, error_feedback=False, quant_step=0.5, rdoq_mu=0.1), 1.0),
        # 4 ranks default to reduce_scatter: the other exchange (the config key) must give
        # the same bits
        (
            "rdoq_allgather",
            GCTConfig(
                enabled=True,
                error_feedback=False,
                quant_step=0.5,
                rdoq_mu=0.1,
                exchange="allgather",
            ),
            1.0,
        ),
        # steps from the previous call's largest RMS (here the first call: each rank's own),
        # sent with the levels: within half of the largest step
        (
            "previous",
            GCTConfig(
                enabled=True,
                error_feedback=False,
                quant_step=0.5,
                exchange="allgather",
                step_agreement="previous",
            ),
            0.5,
        ),
        (
            "abs_auto",
            GCTConfig(
                enabled=True,
                step_mode="absolute",
                quant_step=3e-4,
                eg_order="auto",
                error_feedback=False,
            ),
            0.5,
        ),
    ]:
        state = GCTState(cfg)
        x = _grad_like(rank, n)
        exact = x.clone()
        dist.all_reduce(exact)
        exact /= world
        y = compressed_all_reduce(x.clone(), state)
        step = state.stats.last_step
        out[name] = {
            "result": y,
            "max_err_steps": float((y - exact).abs().max()) / step,
            "bound": bound,
            "bits": state.stats.bits_per_element,
            "rel_err": float((y - exact).norm() / exact.norm()),
        }
    # 2. bf16 buckets and a 2-rank subgroup (ranks {0,1} and {2,3}); sums instead of averages.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sub = groups[rank // 2]
    state = GCTState(GCTConfig(enabled=True, quant_step=0.25, error_feedback=False))
    xb = _grad_like(100 + rank, 999).to(torch.bfloat16)
    exact = xb.float()
    dist.all_reduce(exact, group=sub)
    yb = compressed_all_reduce(xb.clone(), state, sub, average=False)
    out["sub"] = {
        "result": yb,
        "dtype": str(yb.dtype),
        "max_err_steps": float((yb.float() - exact).abs().max()) / state.stats.last_step,
    }
    # 3. Error feedback over many steps: the accumulated output tracks the accumulated exact
    #    average (bounded), while without it a small bias is lost entirely (drift).
    drift = {}
    for ef in (True, False):
        state = GCTState(
            GCTConfig(enabled=True, step_mode="absolute", quant_step=1e-2, error_feedback=ef)
        )
        acc = torch.zeros(512)
        acc_exact = torch.zeros(512)
        for t in range(30):
            x = 2e-3 + _grad_like(1000 * t + rank, 512)  # bias well below the step
            e = x.clone()
            dist.all_reduce(e)
            acc_exact += e / world
            acc += compressed_all_reduce(x, state, key="b")
        drift[ef] = float((acc - acc_exact).abs().max()) / 1e-2
    out["drift_ef"], out["drift_no_ef"] = drift[True], drift[False]
    # 4. Non-finite: one rank's NaN reaches every rank; residuals are left as they were.
    state = GCTState(GCTConfig(enabled=True))
    compressed_all_reduce(_grad_like(rank, 100), state, key="b")
    before = state.residuals["b"].clone()
    x = _grad_like(7 + rank, 100)
    if rank == 1:
        x[3] = float("inf")
    y = compressed_all_reduce(x, state, key="b")
    out["nonfinite_all_nan"] = bool(torch.isnan(y).all())
    out["residual_kept"] = bool(torch.equal(before, state.residuals["b"]))
    # The same with steps from the previous call (2-rank subgroups): the flag travels in the
    # payload header, after this rank has quantized (its new residual must not be kept).
    state = GCTState(GCTConfig(enabled=True, exchange="allgather", step_agreement="previous"))
    compressed_all_reduce(_grad_like(rank, 100), state, sub, key="b")
    before = state.residuals["b"].clone()
    x = _grad_like(7 + rank, 100)
    if rank in (1, 2):
        x[3] = float("nan")
    y = compressed_all_reduce(x, state, sub, key="b")
    out["nonfinite_sub"] = (
        bool(torch.isnan(y).all()),
        bool(torch.equal(before, state.residuals["b"])),
    )
    y = compressed_all_reduce(_grad_like(9 + rank, 100), state, sub, key="b")  # and goes on
    out["after_nonfinite"] = y
    # 5. The DDP comm hook: replicas stay identical while training.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    hstate = GCTState(GCTConfig(enabled=True, quant_step=1.0, rdoq_mu=0.05))
    ddp.register_comm_hook(hstate, gct_hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(32, 1, generator=torch.Generator().manual_seed(42))
    losses = []
    for _ in range(25):
        xb = torch.randn(64, 32, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(xb), xb @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out["ddp_params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    out["ddp_loss"] = (sum(losses[:5]) / 5, sum(losses[-5:]) / 5)
    out["ddp_bits"] = hstate.stats.bits_per_element
    out["ddp_calls"] = hstate.stats.calls
    return out


def _four_ranks() -> dict:
    import deepspeed

    from tests.test_gct_deepspeed import _pipeline

    deepspeed.init_distributed("gloo")
    return {**_collective_checks(), "pipeline": _pipeline(True)}


def test_four_ranks_collective_hook_pipeline() -> None:
    res = run_ranks(_four_ranks, 4, init_pg=False, timeout=300)
    _check_pipeline([r["pipeline"] for r in res])
    for name in ("round", "rdoq", "rdoq_allgather", "previous", "abs_auto"):
        for r in res[1:]:
            assert torch.equal(r[name]["result"], res[0][name]["result"]), name
        for r in res:
            assert r[name]["max_err_steps"] <= r[name]["bound"] * 1.0001, (name, r[name])
            assert 0 < r[name]["bits"] < 8, (name, r[name]["bits"])
    assert res[0]["rdoq"]["bits"] < res[0]["round"]["bits"]
    # same levels, exact integer sums: the two exchanges agree bit for bit
    assert torch.equal(res[0]["rdoq"]["result"], res[0]["rdoq_allgather"]["result"])
    assert torch.equal(res[0]["sub"]["result"], res[1]["sub"]["result"])
    assert torch.equal(res[2]["sub"]["result"], res[3]["sub"]["result"])
    assert torch.equal(res[0]["after_nonfinite"], res[1]["after_nonfinite"])
    assert not torch.equal(res[0]["sub"]["result"], res[2]["sub"]["result"])
    for r in res:
        assert r["sub"]["dtype"] == "torch.bfloat16"
        # sum of 2 ranks: 2 x half a step, plus bf16 rounding of the result
        assert r["sub"]["max_err_steps"] <= 1.0 + 0.05
        assert r["drift_ef"] <= 0.5 + 1e-3, r["drift_ef"]  # bounded by the residual
        assert r["drift_no_ef"] > 8 * r["drift_ef"] and r["drift_no_ef"] > 4
        assert r["nonfinite_all_nan"] and r["residual_kept"]
        assert r["nonfinite_sub"] == (True, True)
        assert torch.isfinite(r["after_nonfinite"]).all()
        assert torch.equal(r["ddp_params"], res[0]["ddp_params"])
        first, last = r["ddp_loss"]
        assert last < 0.5 * first, r["ddp_loss"]
        assert r["ddp_calls"] >= 25 and 0 < r["ddp_bits"] < 8


def _check_pipeline(res: list[dict]) -> None:
    for name in res[0]:
        by_stage: dict[int, list] = {}
        for r in res:
            by_stage.setdefault(r[name]["stage"], []).append(r[name])
        assert sorted(by_stage) == [0, 1]
        for reps in by_stage.values():
            assert len(reps) == 2
            assert torch.equal(reps[0]["params"], reps[1]["params"]), f"{name}: DP replicas differ"
            # stage 1 holds 65 parameters: the 54-byte stream headers dominate its bits
            assert reps[0]["calls"] >= STEPS and 0 < reps[0]["bits"] < 32, reps[0]
        last = next(r[name] for r in res if r[name]["stage"] == 1)
        assert last["loss"][1] < 0.5 * last["loss"][0], (name, last["loss"])


def _exchanges_agree() -> dict:
    """Both exchanges over 3 steps with error feedback, on a non-contiguous tensor, for several
    code settings: the same bits (the all-gather path's fused kernels against the other)."""
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce

    rank = dist.get_rank()
    out = {}
    settings = {
        "plain_auto_no_ef": {"zero_runs": False, "eg_order": "auto", "error_feedback": False},
        "runs_k3_rdoq": {"eg_order": 3, "rdoq_mu": 0.2},
        "absolute": {"step_mode": "absolute", "quant_step": 1e-3},
        "one_block": {"block_size": 0},
    }
    for i, (name, kw) in enumerate(settings.items()):
        results = {}
        for exchange in ("allgather", "reduce_scatter"):
            state = GCTState(GCTConfig(enabled=True, exchange=exchange, **kw))
            g = torch.Generator().manual_seed(100 * i + rank)
            x = torch.randn(300, 70, generator=g) * (torch.rand(300, 70, generator=g) < 0.4)
            results[exchange] = [compressed_all_reduce(x.t() * (1 + t), state) for t in range(3)]
        out[name] = all(
            torch.equal(a, b) and a.shape == (70, 300)
            for a, b in zip(results["allgather"], results["reduce_scatter"], strict=True)
        )
    return out


def _previous_steps_against_reference() -> dict:
    """Steps from the previous call, over 3 error-feedback steps: each rank's result and
    residual equal what torch ops compute from both ranks' inputs (steps from the previous
    call's largest RMS, in the first call each rank's own; quantize; rank-ordered float sum)."""
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce
    from ggspeed.gct.common import block_stats, block_steps, quantize_torch

    rank, world, n = dist.get_rank(), dist.get_world_size(), 70_001
    out = {}
    prev = {"exchange": "allgather", "step_agreement": "previous"}
    settings = {
        "round": {"quant_step": 0.5, **prev},
        "rdoq_auto": {"rdoq_mu": 0.1, "eg_order": "auto", **prev},
        "plain_k2": {"zero_runs": False, "eg_order": 2, "quant_step": 0.3, **prev},
        "absolute": {"step_mode": "absolute", "quant_step": 1e-3, **prev},
        "big_block": {"block_size": 50_000, **prev},
    }
    for name, kw in settings.items():
        state, ref = (GCTState(GCTConfig(enabled=True, **kw)) for _ in range(2))
        block = min(state.cfg.block_size or n, n)
        residuals = [torch.zeros(n) for _ in range(world)]
        basis = None
        rows = []
        for t in range(3):
            xs = [_grad_like(100 * t + r, n) * (1 + 3 * t * r) for r in range(world)]
            y = compressed_all_reduce(xs[rank].clone(), state, key="g")
            acc, rms_all = None, []
            for r in range(world):
                v = xs[r] + residuals[r]
                rms, amax, _ = block_stats(v, block)
                s = block_steps(ref, basis if basis is not None else rms, amax, 1)
                q, residuals[r], *_ = quantize_torch(ref, v, s, block)
                term = q.float() * s.repeat_interleave(block)[:n]
                acc = term if acc is None else acc + term
                rms_all.append(rms)
            basis = torch.stack(rms_all).amax(0)
            rows.append(
                torch.equal(y, acc / world) and torch.equal(state.residuals["g"], residuals[rank])
            )
        out[name] = all(rows)
    # Resuming from state_dict (residual and step basis) continues bit for bit.
    cfg = GCTConfig(enabled=True, rdoq_mu=0.1, exchange="allgather", step_agreement="previous")
    xs = [_grad_like(500 + t + 10 * rank, 5000) for t in range(4)]
    straight = GCTState(cfg)
    want = [compressed_all_reduce(x.clone(), straight, key="g") for x in xs]
    first = GCTState(cfg)
    got = [compressed_all_reduce(x.clone(), first, key="g") for x in xs[:2]]
    resumed = GCTState(cfg)
    resumed.load_state_dict(first.state_dict())
    got += [compressed_all_reduce(x.clone(), resumed, key="g") for x in xs[2:]]
    out["resume"] = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    return out


def _direct_exchange() -> dict:
    """The direct exchange (CPU on gloo: point-to-point pieces) against the all-gather through
    collectives, over 3 error-feedback steps: the same results and residuals bit for bit; the
    bytes one rank counts as sent are those the other counts as received; a stream whose
    header lies is refused naming the sender and the piece."""
    import torch.distributed as dist

    from ggspeed.codec import stream as codec_stream
    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce, direct

    rank, n = dist.get_rank(), 100_000
    usable, min_piece = direct.usable, direct.MIN_PIECE
    direct.MIN_PIECE = 2 * 16384  # 3 pieces of 100,000 elements
    assert len(direct.piece_bounds(n, 4096)) == 4
    out: dict = {"same": {}, "bytes": {}, "int8": {}}
    settings = {
        "rdoq_auto": {"rdoq_mu": 0.1, "eg_order": "auto"},
        "plain_k2": {"zero_runs": False, "eg_order": 2, "quant_step": 0.3},
        "block_5000": {"block_size": 5000, "rdoq_mu": 0.2},  # pieces cut at whole blocks
        "bf16": {"rdoq_mu": 0.1},
        "fine_absolute": {"step_mode": "absolute", "quant_step": 1e-5},  # int32 levels
    }
    for name, kw in settings.items():
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        results = {}
        for path in ("direct", "collectives"):
            direct.usable = usable if path == "direct" else (lambda *_: False)
            state = GCTState(GCTConfig(enabled=True, exchange="allgather", **kw))
            ys = []
            for t in range(3):
                x = _grad_like(10 * t + rank, n).to(dtype) * (1 + t)
                ys.append(compressed_all_reduce(x, state, key="g"))
            results[path] = (ys, state.residuals["g"].clone(), state.stats)
            if path == "direct":  # levels kept as int8 where they fit
                out["int8"][name] = "levels8" in state._workspace
        (ya, ra, sa), (yb, rb, _) = results["direct"], results["collectives"]
        out["same"][name] = all(
            torch.equal(a, b) and a.dtype == dtype for a, b in zip(ya, yb)
        ) and torch.equal(ra, rb)
        out["bytes"][name] = [int(sa.bytes_sent), int(sa.bytes_received)]
    direct.usable = usable
    # rank 1's header claims more code bits than its chunks hold
    write_head = codec_stream.write_head

    def lying_head(buf, *a):
        size = write_head(buf, *a)
        buf[24:32] = (buf[24:32].view("<u8") + 8).view("u1")
        return size

    if rank == 1:
        codec_stream.write_head = lying_head
    try:
        compressed_all_reduce(_grad_like(7, n), GCTState(GCTConfig(enabled=True)), key="g")
        out["corrupt"] = None
    except ValueError as e:
        out["corrupt"] = str(e)
    codec_stream.write_head = write_head
    # the connection stays usable: the next call's messages meet the next call's receives
    y = compressed_all_reduce(_grad_like(8, n), GCTState(GCTConfig(enabled=True)), key="g")
    out["after_corrupt"] = bool(torch.isfinite(y).all() and y.abs().sum() > 0)
    direct.MIN_PIECE = min_piece
    return out


def _two_ranks() -> dict:
    return {
        "agree": _exchanges_agree(),
        "previous": _previous_steps_against_reference(),
        "direct": _direct_exchange(),
    }


def test_exchanges_agree_and_previous_steps() -> None:
    res = run_ranks(_two_ranks, 2)
    for r in res:
        assert all(r["agree"].values()), r
        assert all(r["previous"].values()), r
        assert all(r["direct"]["same"].values()) and len(r["direct"]["same"]) == 5, r
        assert r["direct"]["int8"]["rdoq_auto"] and not r["direct"]["int8"]["fine_absolute"], r
    for name in res[0]["direct"]["bytes"]:
        (sent0, got0), (sent1, got1) = (r["direct"]["bytes"][name] for r in res)
        assert sent0 == got1 and sent1 == got0 and sent0 > 0, (name, sent0, got0, sent1, got1)
    assert res[1]["direct"]["corrupt"] is None  # rank 0's streams were sound
    assert res[0]["direct"]["after_corrupt"] and res[1]["direct"]["after_corrupt"]
    assert "rank 1's piece 0" in res[0]["direct"]["corrupt"], res[0]["direct"]["corrupt"]
    assert "header says" in res[0]["direct"]["corrupt"], res[0]["direct"]["corrupt"]
