"""GCT installed on real DeepSpeed engines over gloo: ZeRO 0/1/2, fp32/bf16, checkpoints.

The pipeline (2 stages x 2 data-parallel ranks) runs in the 4-rank launch of test_gct_dist.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.dist

GCT = {"enabled": True, "quant_step": 0.5, "rdoq_mu": 0.05}
STEPS = 20


def _ds_config(zero: dict, bf16: bool = False, gas: int = 1, gct: dict | None = None) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "ggspeed": {"gct": dict(GCT if gct is None else gct)},
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _batch(step: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 16, generator=g)
    return x.to(dtype), _target(x).to(dtype)


def _target(x: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, 16, dtype=x.dtype)[:, None] / 2
    return x @ w


def _train(engine, steps: int, start: int = 0) -> list[float]:
    rank = torch.distributed.get_rank()
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for step in range(start, start + steps):
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = _batch(step * 8 + micro, rank, dtype)
            loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _eval_loss(engine) -> float:
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(512, 16, generator=g)
    y = _target(x)
    dtype = next(engine.module.parameters()).dtype
    return float(torch.nn.functional.mse_loss(engine.module(x.to(dtype)).float(), y))


def _params(engine) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])


def _engines_and_checkpoint(tmpdir: str) -> dict:
    import deepspeed

    import ggspeed
    from ggspeed.config import ConfigError

    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    out: dict = {}
    cases = {
        "baseline_no_gct": _ds_config({"stage": 0}, gct={"enabled": False}),
        "zero0_fp32": _ds_config({"stage": 0}),
        "zero0_bf16": _ds_config({"stage": 0}, bf16=True),
        "zero1_fp32_noRS": _ds_config({"stage": 1, "reduce_scatter": False}),
        "zero1_bf16_RS": _ds_config({"stage": 1, "reduce_scatter": True}, bf16=True),
        "zero2_fp32_gas2": _ds_config({"stage": 2, "reduce_scatter": True}, gas=2),
        "zero2_fp32_noRS_gas2": _ds_config({"stage": 2, "reduce_scatter": False}, gas=2),
    }
    for name, cfg in cases.items():
        model = _model()
        engine, *_ = ggspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg
        )
        st = engine.ggspeed.components.get("gct")
        on_step_args: list[int] = []
        if st is not None:  # count the calls the engine makes (on the instance, as it does)
            on_step = st.on_step
            st.on_step = lambda step, f=on_step, seen=on_step_args: (seen.append(step), f(step))
        before = _eval_loss(engine)
        _train(engine, 2)
        keys_early = sorted(st.residuals) if st else []
        _train(engine, STEPS - 2, start=2)
        out[name] = {
            "params": _params(engine),
            "loss": (before, _eval_loss(engine)),
            "calls": st.stats.calls if st else 0,
            "bits": st.stats.bits_per_element if st else 32.0,
            "keys": sorted(st.residuals) if st else [],
            "keys_early": keys_early,
            "on_step": on_step_args,
            "global_steps": engine.global_steps,
        }
    # Checkpoint round trip: 2N steps == N steps, save, fresh engine, load, N steps.
    cfg = _ds_config({"stage": 1, "reduce_scatter": False}, gct={**GCT, "constraint_lambda": 1e-3})
    n = 6

    def fresh():
        model = _model()
        return ggspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

    e = fresh()
    _train(e, 2 * n)
    out["ckpt_full"] = _params(e)
    e = fresh()
    _train(e, n)
    e.save_checkpoint(tmpdir, tag="mid")
    e = fresh()
    e.load_checkpoint(tmpdir, tag="mid")
    out["ckpt_restored_keys"] = sorted(e.ggspeed.components["gct"].residuals)
    _train(e, n, start=n)
    out["ckpt_resumed"] = _params(e)
    # Same resume without the GCT state: shows the state matters (the check above can fail).
    e = fresh()
    e.load_checkpoint(tmpdir, tag="mid")
    st = e.ggspeed.components["gct"]
    st.residuals.clear()
    st.constraint_prev.clear()
    _train(e, n, start=n)
    out["ckpt_no_state"] = _params(e)
    out["scalars"] = st.scalars()
    # ZeRO-3 is refused at initialize, naming the key; so is a per-rank mismatch.
    for label, cfg in [
        ("zero3", _ds_config({"stage": 3})),
        ("mismatch", _ds_config({"stage": 0}, gct={**GCT, "quant_step": 1.0 + rank})),
    ]:
        model = _model()
        try:
            ggspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            out[label] = None
        except ConfigError as err:
            out[label] = str(err)
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> list[dict]:
    """One launch of 2 fresh ranks (DeepSpeed engines stay on fresh ranks) for every engine
    configuration, the checkpoint round trip and the refusals."""
    tmp = tmp_path_factory.mktemp("engines")
    return run_ranks(_engines_and_checkpoint, 2, str(tmp), init_pg=False, timeout=400)


def _runs(res: list[dict]) -> dict[str, tuple[dict, dict]]:
    """The GCT training runs by name: (rank 0's, rank 1's)."""
    return {
        name: (r0, res[1][name])
        for name, r0 in res[0].items()
        if isinstance(r0, dict) and "params" in r0 and name != "baseline_no_gct"
    }


class TestEngineTraining:
    """Each ZeRO stage / precision / accumulation setting trains 20 steps with GCT."""

    def test_the_exact_all_reduce_baseline_trains(self, engines) -> None:
        first, last = engines[0]["baseline_no_gct"]["loss"]
        assert last < 0.3 * first, f"baseline loss {first} -> {last}"

    def test_replicas_stay_equal(self, engines) -> None:
        for name, (r0, r1) in _runs(engines).items():
            assert torch.equal(r0["params"], r1["params"]), f"{name}: ranks diverged"

    def test_trains_about_as_well_as_the_exact_all_reduce(self, engines) -> None:
        base_last = engines[0]["baseline_no_gct"]["loss"][1]
        for name, (r0, _) in _runs(engines).items():
            first, last = r0["loss"]
            # bf16 runs carry bf16 rounding too
            assert last < 0.3 * first and last < 1.5 * base_last + 0.02, (
                f"{name}: loss {r0['loss']}, baseline ends at {base_last}"
            )

    def test_every_reduction_is_coded(self, engines) -> None:
        for name, (r0, _) in _runs(engines).items():
            assert r0["calls"] >= STEPS and 0 < r0["bits"] < 8, (
                f"{name}: {r0['calls']} calls, {r0['bits']} bits/element"
            )

    def test_residual_keys_are_stable(self, engines) -> None:
        for name, (r0, _) in _runs(engines).items():
            assert r0["keys"], f"{name}: no residual keys"
            assert r0["keys"] == r0["keys_early"], f"{name}: residual keys drift between steps"

    def test_on_step_runs_once_per_optimizer_step(self, engines) -> None:
        # the runtime drives on_step once per optimizer step (gas 2: once per 2 micro-batches)
        for name, (r0, _) in _runs(engines).items():
            assert r0["on_step"] == list(range(1, STEPS + 1)), f"{name}: on_step {r0['on_step']}"
            assert r0["global_steps"] == STEPS, f"{name}: {r0['global_steps']} global steps"

    def test_zero2_reduces_per_micro_batch(self, engines) -> None:
        # ZeRO-2 reduces per micro-batch: twice the calls of a ZeRO-1 run, same keys reused.
        calls = engines[0]["zero2_fp32_noRS_gas2"]["calls"]
        assert calls >= 2 * STEPS, f"ZeRO-2 with 2 micro-batches: {calls} calls"

    def test_no_shared_memory_segment_is_left(self, engines) -> None:
        assert not os.path.exists(os.path.join("/dev/shm", "deepspeed_allreduce_buffer_x")), (
            "DeepSpeed's CPU all-reduce segment was created"
        )


class TestEngineCheckpoint:
    def test_resume_equals_the_uninterrupted_run(self, engines) -> None:
        for rank, r in enumerate(engines):
            assert torch.equal(r["ckpt_full"], r["ckpt_resumed"]), (
                f"rank {rank}: checkpoint round trip differs"
            )

    def test_the_residuals_matter(self, engines) -> None:
        for rank, r in enumerate(engines):
            assert not torch.equal(r["ckpt_full"], r["ckpt_no_state"]), (
                f"rank {rank}: resuming without GCT state gave the same parameters"
            )

    def test_state_is_restored(self, engines) -> None:
        for rank, r in enumerate(engines):
            assert r["ckpt_restored_keys"], f"rank {rank}: no residual restored"
            assert r["scalars"]["lambda"] == pytest.approx(1e-3), f"rank {rank}: {r['scalars']}"


class TestEngineRefusals:
    def test_zero3_is_refused_naming_the_key(self, engines) -> None:
        for rank, r in enumerate(engines):
            assert "zero_optimization.stage: got 3" in r["zero3"], f"rank {rank}: {r['zero3']}"

    def test_ranks_with_different_settings_are_refused(self, engines) -> None:
        for rank, r in enumerate(engines):
            assert "ggspeed.gct.quant_step" in r["mismatch"], f"rank {rank}: {r['mismatch']}"


def _pipeline(with_bf16: bool) -> dict:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import ggspeed

    deepspeed.init_distributed("gloo")
    out: dict = {}
    variants = [("pp_zero0_fp32", 0, False), ("pp_zero1_bf16", 1, True), ("pp_zero0_bf16", 0, True)]
    for name, zero, bf16 in variants:
        if bf16 and not with_bf16:
            continue
        torch.manual_seed(0)
        layers = [
            torch.nn.Linear(16, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 64),
            torch.nn.Tanh(),
            torch.nn.Linear(64, 1),
        ]
        model = PipelineModule(
            layers=layers,
            num_stages=2,
            loss_fn=lambda out, y: torch.nn.functional.mse_loss(out.float(), y.float()),
            partition_method="uniform",
        )
        cfg = _ds_config({"stage": zero}, bf16=bf16, gas=2)
        engine, *_ = ggspeed.initialize(
            model=model, model_parameters=model.parameters(), config=cfg
        )
        dp = engine.grid.get_data_parallel_rank()
        dtype = torch.bfloat16 if bf16 else torch.float32

        def batches(dp=dp, dtype=dtype):
            i = 0
            while True:
                yield _batch(i, dp, dtype)
                i += 1

        it = batches()
        st = engine.ggspeed.components["gct"]
        losses = [float(engine.train_batch(it))]
        first_keys = sorted(st.residuals)
        losses += [float(engine.train_batch(it)) for _ in range(STEPS - 1)]
        out[name] = {
            "keys": (first_keys, sorted(st.residuals)),
            "optimizer": type(engine.optimizer).__name__,
            "stage": engine.grid.get_pipe_parallel_rank(),
            "params": _params(engine),
            "loss": (sum(losses[:3]) / 3, sum(losses[-3:]) / 3),
            "calls": st.stats.calls,
            "bits": st.stats.bits_per_element,
        }
    return out


class _MoENet(torch.nn.Module):
    """Linear -> DeepSpeed MoE (2 experts, one per rank: ep_size 2) -> Linear."""

    def __init__(self) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 32)
        self.moe = MoE(
            hidden_size=32,
            expert=torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh()),
            num_experts=2,
            ep_size=2,
            k=1,
            use_rts=False,  # no random token selection: the two engines must see the same routing
        )
        self.out = torch.nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _, _ = self.moe(torch.tanh(self.inp(x)).unsqueeze(0))
        return self.out(h.squeeze(0))


def _moe_expert_grads() -> dict:
    """Expert gradients after one backward, with and without GCT, on the same data."""
    import deepspeed
    from deepspeed.moe.utils import is_moe_param

    import ggspeed

    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    out: dict = {}
    for name, gct in [("exact", {"enabled": False}), ("gct", GCT)]:
        model = _MoENet()
        engine, *_ = ggspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=_ds_config({"stage": 0}, gct=gct),
        )
        x, y = _batch(0, rank, torch.float32)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        out[name] = {
            "expert": [p.grad.clone() for p in model.parameters() if is_moe_param(p)],
            "dense": torch.cat(
                [p.grad.flatten() for p in model.parameters() if not is_moe_param(p)]
            ),
        }
        engine.step()
    return out


def test_moe_expert_gradients_averaged_over_the_data_parallel_world() -> None:
    """DeepSpeed sums expert gradients over the expert-data-parallel group (here one rank) and
    divides by the data-parallel world size (2): GCT must hand back the same."""
    res = run_ranks(_moe_expert_grads, 2, init_pg=False, timeout=300)
    for rank, r in enumerate(res):
        assert r["exact"]["expert"], "the model has no expert parameters"
        for exact, gct in zip(r["exact"]["expert"], r["gct"]["expert"], strict=True):
            ratio = float(gct.abs().max() / exact.abs().max())
            assert torch.equal(exact, gct), f"rank {rank}: expert gradient differs ({ratio:.3f}x)"
    assert torch.equal(res[0]["gct"]["dense"], res[1]["gct"]["dense"]), "dense gradients differ"
