"""The coded ZeRO-1/2 parameter all-gather on real DeepSpeed engines over gloo.

Replicas bit-identical after training (2 and 4 ranks, ZeRO-1 and 2, fp32 and bf16), training
close to plain DeepSpeed, resume exact, the bytes handed to the collectives counted (by a
pass-through counter on ``deepspeed.comm``'s all-gathers, the functions DeepSpeed itself calls),
bad settings refused naming the key.

``python -m tests.test_wire_zero`` prints the bits-per-element measurement of docs/wire.md.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.dist

STEPS = 12
SETTINGS = {"quant_step": 1.0, "block_size": 4096}


def _ds_config(stage: int, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 1),
    )  # fmt: skip


def _target(x: torch.Tensor) -> torch.Tensor:
    return x @ torch.linspace(-0.5, 0.5, 16, dtype=x.dtype)[:, None]


def _batch(step: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 16, generator=g)
    return x.to(dtype), _target(x).to(dtype)


class _Counter:
    """Bytes this rank hands to deepspeed.comm's all-gathers inside the optimizer step (a
    pass-through: the real collective runs)."""

    def __init__(self) -> None:
        import deepspeed.comm as dist

        self.bytes = 0
        self.on = False
        for name in ("all_gather", "all_gather_into_tensor"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        if getattr(fn, "_counted", False):
            fn = fn.__wrapped__

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.on:
                mine = (
                    args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
                )
                self.bytes += mine.numel() * mine.element_size()
            return fn(*args, **kwargs)

        counted._counted = True
        return counted


def _engine(stage: int, bf16: bool, coded: bool, settings: dict | None = None):
    import deepspeed

    from ggspeed.wire import ParamGatherSettings, install_coded_param_gather

    model = _model()
    if bf16:
        model = model.to(torch.bfloat16)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(stage, bf16)
    )
    state = None
    if coded:
        state = install_coded_param_gather(
            engine, ParamGatherSettings(**(SETTINGS if settings is None else settings))
        )
    return engine, state


def _train(engine, counter: _Counter, steps: int, start: int = 0) -> list[float]:
    rank = torch.distributed.get_rank()
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(step, rank, dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        counter.on = True
        engine.step()
        counter.on = False
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _eval_loss(engine) -> float:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(12345))
    dtype = next(engine.module.parameters()).dtype
    return float(torch.nn.functional.mse_loss(engine.module(x.to(dtype)).float(), _target(x)))


def _working(engine) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])


def _masters(engine) -> torch.Tensor:
    """This rank's fp32 master partitions."""
    return torch.cat(
        [p.detach().flatten() for p in engine.optimizer.single_partition_of_fp32_groups]
    )


def _run(engine, state, counter: _Counter, steps: int = STEPS) -> dict:
    counter.bytes = 0
    masters0 = _masters(engine).clone()
    before = _eval_loss(engine)
    losses = _train(engine, counter, steps)
    return {
        "working": _working(engine),
        "masters": _masters(engine),
        "masters0": masters0,
        "loss": (before, _eval_loss(engine)),
        "losses": losses,
        "bytes": counter.bytes,
        "stats": state.stats.scalars() if state else None,
        "calls": state.stats.calls if state else 0,
    }


def _cases(cases: list[tuple[str, int, bool]], tmpdir: str | None) -> dict:
    import deepspeed

    from ggspeed.config import ConfigError
    from ggspeed.wire import install_coded_param_gather

    deepspeed.init_distributed("gloo")
    counter = _Counter()
    out: dict = {}
    for name, stage, bf16 in cases:
        for coded in (False, True):
            engine, state = _engine(stage, bf16, coded)
            out[(name, coded)] = _run(engine, state, counter)
    if tmpdir is not None:
        # Resume: N steps, save, N more; a fresh engine loads and does the same N steps.
        import os

        from ggspeed.wire import CodedParamGather, ParamGatherSettings

        n = STEPS // 2
        engine, state = _engine(2, True, True)
        _train(engine, counter, n)
        engine.save_checkpoint(tmpdir, tag="mid")
        path = os.path.join(tmpdir, f"gather{torch.distributed.get_rank()}.pt")
        torch.save(state.state_dict(), path)
        _train(engine, counter, n, start=n)
        out["full"] = (_working(engine), _masters(engine))
        engine, state = _engine(2, True, True)
        engine.load_checkpoint(tmpdir, tag="mid")
        state.load_state_dict(torch.load(path, weights_only=True))
        _train(engine, counter, n, start=n)
        out["resumed"] = (_working(engine), _masters(engine))
        out["resumed_calls"] = state.stats.calls
        # A resume whose working weights lost the quantization error (set from the masters, as
        # a universal checkpoint load does) differs: the check above can fail.
        engine.load_checkpoint(tmpdir, tag="mid")
        engine.optimizer.update_lp_params()
        _train(engine, counter, n, start=n)
        out["reset"] = _working(engine)
        # A state saved with other settings is refused, naming the key.
        other = CodedParamGather(ParamGatherSettings(**{**SETTINGS, "quant_step": 2.0}))
        try:
            other.load_state_dict(torch.load(path, weights_only=True))
            out["other_settings"] = None
        except ValueError as err:
            out["other_settings"] = str(err)
        # ZeRO-3 is refused, naming the key (ZeRO-0: test_settings_refused_naming_the_key).
        engine, _ = _engine(3, False, False)
        try:
            install_coded_param_gather(engine)
            out["zero3"] = None
        except ConfigError as err:
            out["zero3"] = str(err)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    """One launch of 2 fresh ranks (DeepSpeed engines stay on fresh ranks): both cases, the
    resume, and the refusals."""
    cases = [("z1_fp32", 1, False), ("z2_bf16", 2, True)]
    tmp = tmp_path_factory.mktemp("gather")
    return run_ranks(_cases, 2, cases, str(tmp), init_pg=False, timeout=500)


@pytest.fixture(scope="module")
def four() -> list[dict]:
    cases = [("z2_fp32", 2, False), ("z1_bf16", 1, True)]
    return run_ranks(_cases, 4, cases, None, init_pg=False, timeout=500)


# (ranks, case, full width in bits)
CASES = [(2, "z1_fp32", 32), (2, "z2_bf16", 16), (4, "z2_fp32", 32), (4, "z1_bf16", 16)]


@pytest.fixture(params=CASES, ids=[f"{w}ranks-{name}" for w, name, _ in CASES])
def case(request) -> tuple[list[dict], list[dict], str, int]:
    """(plain runs per rank, coded runs per rank, case name, full width)."""
    world, name, full_bits = request.param
    res = request.getfixturevalue("two" if world == 2 else "four")
    return [r[(name, False)] for r in res], [r[(name, True)] for r in res], name, full_bits


class TestCodedParamGather:
    def test_replicas_stay_equal(self, case) -> None:
        plain, coded, name, _ = case
        for rank, r in enumerate(coded[1:], 1):
            assert torch.equal(r["working"], coded[0]["working"]), f"{name}: rank {rank} diverged"
        for rank, r in enumerate(plain[1:], 1):
            assert torch.equal(r["working"], plain[0]["working"]), (
                f"{name}: plain rank {rank} diverged"
            )

    def test_trains_as_plain_deepspeed(self, case) -> None:
        plain, coded, name, _ = case
        p, c = plain[0], coded[0]
        # the same loss curve within a few percent
        assert c["loss"][1] < 0.5 * c["loss"][0], f"{name}: coded loss {c['loss']}"
        assert abs(c["loss"][1] - p["loss"][1]) < 0.05 * p["loss"][1] + 1e-3, (
            f"{name}: coded loss {c['loss']}, plain {p['loss']}"
        )

    def test_masters_follow_plain(self, case) -> None:
        plain, coded, name, _ = case
        # within a small part of how far training moved them
        for rank, (rp, rc) in enumerate(zip(plain, coded, strict=True)):
            assert torch.equal(rp["masters0"], rc["masters0"]), f"{name}: rank {rank} start"
            moved = (rp["masters"] - rp["masters0"]).norm()
            assert (rc["masters"] - rp["masters"]).norm() < 0.1 * moved, (
                f"{name}: rank {rank}'s masters left plain's"
            )

    def test_bytes_far_below_full_width(self, case) -> None:
        plain, coded, name, full_bits = case
        # the bytes handed to the collectives in the optimizer step
        for rank, (rp, rc) in enumerate(zip(plain, coded, strict=True)):
            s = rc["stats"]
            where = f"{name}: rank {rank}"
            assert rc["calls"] == STEPS and s["second_rounds"] <= 2, f"{where}: {rc['calls']}, {s}"
            assert rc["bytes"] == s["bytes_sent"], f"{where}: counted {rc['bytes']}, stats {s}"
            assert s["full_width_bits_per_element"] == full_bits, f"{where}: {s}"
            assert rp["bytes"] >= 4 * rc["bytes"], f"{where}: {rp['bytes']} vs {rc['bytes']}"
            assert s["bits_per_element"] < full_bits / 4, f"{where}: {s}"
            assert s["rel_residual"] < 0.5, f"{where}: replicas a step off the masters: {s}"


class TestCodedParamGatherCheckpoint:
    def test_resume_equals_the_uninterrupted_run(self, two) -> None:
        for rank, r in enumerate(two):
            assert torch.equal(r["full"][0], r["resumed"][0]), f"rank {rank}: working weights"
            assert torch.equal(r["full"][1], r["resumed"][1]), f"rank {rank}: masters"
            assert r["resumed_calls"] == STEPS, f"rank {rank}: {r['resumed_calls']} calls"

    def test_resume_without_the_state_differs(self, two) -> None:
        for rank, r in enumerate(two):
            assert not torch.equal(r["full"][0], r["reset"]), f"rank {rank}: state made no change"


class TestCodedParamGatherRefusals:
    def test_ranks_with_different_settings(self, two) -> None:
        for rank, r in enumerate(two):
            msg = r["other_settings"]
            assert "ggspeed.wire.param_gather.quant_step" in msg, f"rank {rank}: {msg}"

    def test_zero3_naming_both_keys(self, two) -> None:
        for rank, r in enumerate(two):
            msg = r["zero3"]
            assert msg and "zero_optimization.stage: got 3" in msg, f"rank {rank}: {msg}"
            assert "ggspeed.wire.param_gather.enabled" in msg, f"rank {rank}: {msg}"


def test_settings_refused_naming_the_key() -> None:
    from ggspeed.config import ConfigError, from_ds_config
    from ggspeed.wire import check_ds_config

    for bad, key in [
        ({"quant_step": 0}, "quant_step"),
        ({"quant_step": float("nan")}, "quant_step"),
        ({"block_size": 0}, "block_size"),
        ({"eg_order": 16}, "eg_order"),
        ({"zero_runs": 1}, "zero_runs"),
        ({"capacity_slack": -1}, "capacity_slack"),
        ({"quant_stp": 1.0}, "quant_stp"),
    ]:
        with pytest.raises(ConfigError, match=rf"ggspeed\.wire\.param_gather.*{key}"):
            from_ds_config({"ggspeed": {"wire": {"param_gather": bad}}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: got 3"):
        check_ds_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: got 0"):
        check_ds_config({})
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_optimizer"):
        check_ds_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    check_ds_config({"zero_optimization": {"stage": 1}})


def _through_initialize(tmpdir: str) -> dict:
    """The ds_config switch: ggspeed.initialize installs the coded gather as a component (with
    GCT's coded gradient reduction, as a training run would use them together)."""
    import deepspeed

    import ggspeed

    deepspeed.init_distributed("gloo")
    ds_config = {
        **_ds_config(1),
        "ggspeed": {
            "log_interval": 2,
            "gct": {"enabled": True},
            "wire": {"param_gather": {"enabled": True, **SETTINGS}},
        },
    }
    out: dict = {}

    def build():
        model = _model()
        engine, *_ = ggspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )
        return engine

    counter = _Counter()
    engine = build()
    gather = engine.ggspeed.components["param_gather"]
    _train(engine, counter, 4)
    out["scalars"] = engine.ggspeed.scalars()
    out["calls"] = gather.stats.calls
    engine.save_checkpoint(tmpdir, tag="t4")  # ggspeed's per-rank file, loaded weights_only
    _train(engine, counter, 2, start=4)
    out["full"] = _working(engine)
    engine = build()
    engine.load_checkpoint(tmpdir, tag="t4")
    gather = engine.ggspeed.components["param_gather"]
    out["loaded"] = (gather.global_step, gather.stats.calls, list(gather.capacity))
    _train(engine, counter, 2, start=4)
    out["resumed"] = _working(engine)
    return out


@pytest.fixture(scope="module")
def through_initialize(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("initialize")
    return run_ranks(_through_initialize, 2, str(tmp), init_pg=False, timeout=300)


class TestSwitchedOnFromTheDsConfig:
    def test_replicas_stay_equal(self, through_initialize) -> None:
        for rank, r in enumerate(through_initialize):
            assert torch.equal(r["full"], through_initialize[0]["full"]), f"rank {rank} diverged"

    def test_resume_through_ggspeeds_checkpoint(self, through_initialize) -> None:
        for rank, r in enumerate(through_initialize):
            assert torch.equal(r["resumed"], r["full"]), f"rank {rank}: resume differs"
            assert r["calls"] == 4 and r["loaded"][:2] == (4, 4) and all(r["loaded"][2]), (
                f"rank {rank}: {r['calls']} calls, loaded {r['loaded']}"
            )

    def test_both_codings_report_bits(self, through_initialize) -> None:
        for rank, r in enumerate(through_initialize):
            s = r["scalars"]
            assert 0 < s["param_gather/bits_per_element"] < 32, f"rank {rank}: {s}"
            assert s["param_gather/full_width_bits_per_element"] == 32, f"rank {rank}: {s}"
            assert 0 < s["gct/bits_per_element"] < 32, f"rank {rank}: {s}"


def test_component_protocol() -> None:
    from ggspeed.runtime import Component
    from ggspeed.wire import CodedParamGather, ParamGatherSettings

    state = CodedParamGather(ParamGatherSettings(quant_step=2.0))
    assert isinstance(state, Component) and state.name == "param_gather"
    state.on_step(7)
    again = CodedParamGather(ParamGatherSettings(quant_step=2.0))
    again.load_state_dict(state.state_dict())
    assert again.global_step == 7 and again.scalars()["bits_per_element"] == 0.0


def test_coding_round_trip() -> None:
    from ggspeed.wire import ParamGatherSettings, apply_update, decode_update, encode_update

    settings = ParamGatherSettings(quant_step=0.5, block_size=1000)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2500, generator=g) * torch.linspace(1e-4, 1e-2, 2500)
    u[1000:2000] = 0  # an all-zero block
    coded = encode_update(u, settings)
    q, steps = decode_update(coded.message, u.numel(), settings.block_size)
    assert torch.equal(q, coded.q) and torch.equal(steps, coded.steps)
    assert steps[1] == 1.0 and not q[1000:2000].any()
    held = torch.zeros(2500)
    apply_update(held, q, steps, settings.block_size)
    step = steps.repeat_interleave(settings.block_size)[:2500]
    assert bool(((held - u).abs() <= step / 2 + 1e-9).all())
    with pytest.raises(ValueError, match="holds 2500 levels, expected 2400"):
        decode_update(coded.message, 2400, settings.block_size)
    with pytest.raises(ValueError):
        encode_update(torch.tensor([1.0, float("inf")]), settings)


def _measure(quant_steps: list[float], steps: int) -> dict:
    import deepspeed

    deepspeed.init_distributed("gloo")
    counter = _Counter()
    out = {}
    for bf16 in (False, True):
        engine, _ = _engine(1, bf16, False)
        out[(bf16, None)] = _run(engine, None, counter, steps)
        for qs in quant_steps:
            engine, state = _engine(1, bf16, True, {**SETTINGS, "quant_step": qs})
            out[(bf16, qs)] = _run(engine, state, counter, steps)
    return out


def main(argv: list[str]) -> None:
    """Bits per element of the coded gather against the full-width one, 2 ranks, ZeRO-1."""
    steps = int(argv[0]) if argv else 100
    quant_steps = [0.5, 1.0, 2.0]
    res = run_ranks(_measure, 2, quant_steps, steps, init_pg=False, timeout=1800)[0]
    n = sum(p.numel() for p in _model().parameters())
    print(f"{n} parameters, 2 ranks, ZeRO-1, Adam lr 3e-3, {steps} steps")
    print("| dtype | quant_step | bits/element sent | coded bits | entropy | eval loss |")
    print("|---|---|---|---|---|---|")
    for (bf16, qs), r in res.items():
        dtype = "bf16" if bf16 else "fp32"
        if qs is None:
            bits = 8 * r["bytes"] / (steps * n / 2)
            print(f"| {dtype} | plain | {bits:.2f} | - | - | {r['loss'][1]:.5f} |")
            continue
        s = r["stats"]
        print(
            f"| {dtype} | {qs} | {s['bits_per_element']:.3f} | {s['code_bits_per_element']:.3f} "
            f"| {s['entropy_bits_per_element']:.3f} | {r['loss'][1]:.5f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
