"""Registration: the installed .pth, the lazy hook on ``import deepspeed``, the off switch,
``python -m ggspeed.run``, and ``deepspeed.initialize`` with and without a section on 2 ranks.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
PTH = Path(sysconfig.get_paths()["purelib"]) / "ggspeed-registration.pth"


def _python(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "GGSPEED_DISABLE"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *args],
        env={**base, **(env or {})},
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


MODULES = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def test_pth_is_installed_and_arms_at_start_up_for_free():
    assert PTH.is_file(), f"{PTH} missing: install the package (pip install -e .)"
    assert "ggspeed.registration" in PTH.read_text() and "GGSPEED_DISABLE" in PTH.read_text()
    armed = set(json.loads(_python("-c", MODULES)))
    off = set(json.loads(_python("-c", MODULES, env={"GGSPEED_DISABLE": "1"})))
    # What start-up costs with registration on: ggspeed's package and this one module, nothing
    # else (no torch, no DeepSpeed, not even typing or logging).
    assert armed - off == {"ggspeed", "ggspeed.registration"}
    assert "torch" not in armed and "deepspeed" not in armed


@pytest.mark.slow
def test_hook_wraps_deepspeed_initialize_once_and_leaves_the_import_system_alone():
    code = """
import importlib.resources, importlib.util, json, sys
import ggspeed.registration as reg
reg.arm(); reg.arm()
finders = sum(type(f).__name__ == "_DeepSpeedFinder" for f in sys.meta_path)
assert importlib.util.find_spec("deepspeed") is not None  # a look, not an import
import deepspeed
from deepspeed import initialize
wrapper = deepspeed.initialize
reg.arm(); reg.register(deepspeed)
original = wrapper.__ggspeed_original__
print(json.dumps({
    "finders_before": finders,
    "finders_after": sum(type(f).__name__ == "_DeepSpeedFinder" for f in sys.meta_path),
    "same_wrapper": deepspeed.initialize is wrapper and initialize is wrapper,
    "original_is_deepspeeds": original.__module__ == "deepspeed" and not hasattr(original, "__ggspeed_original__"),
    "original_initialize": reg.original_initialize() is original,
    "loader_restored": type(deepspeed.__spec__.loader).__name__ != "_Loader",
    "resources": importlib.resources.files("deepspeed").joinpath("__init__.py").is_file(),
}))
"""
    got = json.loads(_python("-c", code))
    assert got == {
        "finders_before": 1,
        "finders_after": 0,
        "same_wrapper": True,
        "original_is_deepspeeds": True,
        "original_initialize": True,
        "loader_restored": True,
        "resources": True,
    }
    off = "import deepspeed, ggspeed.registration as r; print(r.is_registered())"
    assert _python("-c", off, env={"GGSPEED_DISABLE": "1"}) == "False"


@pytest.mark.slow
def test_ggspeed_run_arms_where_no_pth_is_read(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import json, sys\nimport deepspeed\nimport ggspeed.registration as r\n"
        "print(json.dumps([__name__, sys.argv[1:], r.is_registered(), sys.path[0]]))\n"
    )
    # -S: no site-packages processing, so no .pth; the packages come through PYTHONPATH.
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])}
    plain = json.loads(_python("-S", str(script), "x", env=env))
    assert plain[2] is False
    ran = json.loads(
        _python("-S", "-m", "ggspeed.run", "--local_rank=1", str(script), "x", "--y", env=env)
    )
    assert ran == ["__main__", ["--local_rank=1", "x", "--y"], True, str(tmp_path)]


# ----------------------------------------------------------------------------- 2 ranks
def _ds(**ggspeed) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**6,
    }
    if ggspeed:
        cfg["ggspeed"] = ggspeed
    return cfg


def _routes_by_section() -> dict:
    """On each rank: what deepspeed.initialize does with and without a section (registered)."""
    import deepspeed
    import torch

    import ggspeed
    from ggspeed.config import ConfigError
    from ggspeed.registration import is_registered

    out: dict = {"registered": is_registered()}

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))

    refusals = {
        "zero3": {**_ds(gct={"enabled": True}), "zero_optimization": {"stage": 3}},
        "fp16": {**_ds(act={"enabled": True}), "fp16": {"enabled": True}},
        "offload": {
            **_ds(gct={"enabled": True}),
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        },
    }
    for name, cfg in refusals.items():
        try:
            deepspeed.initialize(model=model(), config=cfg, optimizer=None)
            out[name] = "accepted"
        except ConfigError as e:
            out[name] = str(e)

    def train(engine) -> float:
        x = torch.ones(2, 8) * (1 + torch.distributed.get_rank())
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        return float(loss)

    plain = _ds()
    untouched = copy.deepcopy(plain)
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=plain)
    train(engine)
    out["plain"] = {
        "same_dict": engine.config is plain,
        "dict_unchanged": plain == untouched,
        "has_ggspeed": hasattr(engine, "ggspeed"),
    }

    section = _ds(gct={"enabled": True}, log_interval=1)
    m = model()
    engine, *_ = deepspeed.initialize(
        model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=section
    )
    train(engine)
    out["routed"] = sorted(engine.ggspeed.components)
    out["bits"] = engine.ggspeed.scalars()["gct/bits_per_element"]

    # ggspeed.initialize under registration: one installation, no recursion.
    m = model()
    engine, *_ = ggspeed.initialize(
        model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=section
    )
    train(engine)
    out["direct"] = sorted(engine.ggspeed.components)

    # The off switch, read at call time.
    os.environ["GGSPEED_DISABLE"] = "1"
    m = model()
    engine, *_ = deepspeed.initialize(
        model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=section
    )
    out["disabled_has_ggspeed"] = hasattr(engine, "ggspeed")
    return out


@pytest.fixture(scope="module")
def routed() -> list[dict]:
    """One launch of 2 fresh ranks (DeepSpeed engines stay on fresh ranks) for every case."""
    return run_ranks(_routes_by_section, 2, init_pg=False, timeout=600)


# The ranks share one verdict, naming the ranks that refused and why.
SHARED = "invalid ggspeed configuration: ranks 0, 1: "


@pytest.mark.dist
@pytest.mark.slow
class TestDeepSpeedInitializeOnTwoRanks:
    def test_registration_is_armed(self, routed):
        for rank, got in enumerate(routed):
            assert got["registered"] is True, f"rank {rank}: not registered"

    def test_refusals_are_one_shared_verdict(self, routed):
        for rank, got in enumerate(routed):
            assert got["zero3"].startswith(
                SHARED + "zero_optimization.stage: got 3; ggspeed.gct supports"
            ), f"rank {rank}: {got['zero3']}"
            assert got["fp16"].startswith(
                SHARED + "fp16.enabled: not supported with ggspeed.act.enabled"
            ), f"rank {rank}: {got['fp16']}"
            assert got["offload"].startswith(SHARED + "zero_optimization.offload_optimizer: got"), (
                f"rank {rank}: {got['offload']}"
            )

    def test_a_config_without_section_is_plain_deepspeed(self, routed):
        for rank, got in enumerate(routed):
            assert got["plain"] == {
                "same_dict": True,
                "dict_unchanged": True,
                "has_ggspeed": False,
            }, f"rank {rank}: {got['plain']}"

    def test_a_section_routes_through_ggspeed_once(self, routed):
        for rank, got in enumerate(routed):
            assert got["routed"] == ["gct"], f"rank {rank}: deepspeed.initialize {got['routed']}"
            assert got["direct"] == ["gct"], f"rank {rank}: ggspeed.initialize {got['direct']}"
            assert 0.0 < got["bits"] < 16.0, f"rank {rank}: {got['bits']} bits/element"

    def test_the_off_switch_is_read_at_call_time(self, routed):
        for rank, got in enumerate(routed):
            assert got["disabled_has_ggspeed"] is False, f"rank {rank}: GGSPEED_DISABLE ignored"


# ----------------------------------------------------------------------------- HF checkpointing
def _grads(model, x) -> list:
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_hf_gradient_checkpointing_goes_through_act():
    pytest.importorskip("transformers")
    import torch

    from ggspeed.act import ACTState, activate
    from ggspeed.config import ConfigError
    from ggspeed.config.act import ACTConfig
    from ggspeed.hf import _ggspeed_checkpoint, checkpointed_layers, use_act_checkpointing
    from tests.hf_common import LENGTH, VOCAB, tiny_gpt2

    model = tiny_gpt2()
    with pytest.raises(ConfigError, match=r"ggspeed.act.enabled: .* gradient checkpointing off"):
        use_act_checkpointing(model)
    assert use_act_checkpointing(torch.nn.Linear(2, 2)) == 0  # not a Hugging Face model

    x = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    model.train()
    model.gradient_checkpointing_enable()
    reference = _grads(model, x)  # torch's checkpoint
    count = use_act_checkpointing(model)
    assert count == len(checkpointed_layers(model)) >= 2
    assert use_act_checkpointing(model) == count  # idempotent
    for block in model.transformer.h:
        assert block._gradient_checkpointing_func is _ggspeed_checkpoint
    same = _grads(model, x)  # ggspeed's, no ACT state: a plain reentrant checkpoint
    for a, b in zip(reference, same):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    cfg = ACTConfig(enabled=True, lambda_target=1.0, warmup_steps=0, compress=True)
    state = ACTState(cfg)
    previous = activate(state)
    try:
        constrained = _grads(model, x)
        scalars = state.scalars()
    finally:
        activate(previous)
    assert scalars["stored_mb"] > 0 and scalars["bits_per_element"] > 0
    assert any(not torch.allclose(a, b) for a, b in zip(reference, constrained))

    offloaded = tiny_gpt2()
    offloaded.gradient_checkpointing_enable(offload=True)
    with pytest.raises(ConfigError, match=r"not torch\.utils\.checkpoint\.checkpoint"):
        use_act_checkpointing(offloaded)
