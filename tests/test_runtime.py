"""ggspeed.initialize as a drop-in for deepspeed.initialize, on real gloo ranks."""

import pytest
import torch

from ggspeed.config import ConfigError
from tests.dist import pool_ranks, run_ranks


def _ds_config(ggspeed: dict | None = None) -> dict:
    cfg = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 1000,
    }
    if ggspeed is not None:
        cfg["ggspeed"] = ggspeed
    return cfg


def _train_plain_and_ggspeed() -> dict:
    """Same seed, same data: ggspeed.initialize with nothing enabled trains like DeepSpeed."""
    import deepspeed

    import ggspeed

    losses = {}
    for name, init in (("deepspeed", deepspeed.initialize), ("ggspeed", ggspeed.initialize)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        engine, *_ = init(model=model, model_parameters=model.parameters(), config=_ds_config())
        g = torch.Generator().manual_seed(1 + engine.global_rank)
        out = []
        for _ in range(3):
            x = torch.randn(2, 8, generator=g)
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        losses[name] = out
    return {**losses, "components": engine.ggspeed.components, "scalars": engine.ggspeed.scalars()}


def _mismatched_configs() -> str:
    import torch.distributed as dist

    import ggspeed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Linear(4, 4)
    try:
        ggspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=_ds_config({"log_interval": 5 + rank}),
        )
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.fixture(scope="module")
def without_features() -> list[dict]:
    return run_ranks(_train_plain_and_ggspeed, 2, init_pg=False, timeout=240)


@pytest.mark.dist
class TestWithoutFeatures:
    """ggspeed.initialize with an empty ggspeed section, against deepspeed.initialize."""

    def test_losses_equal_deepspeed(self, without_features):
        for rank, r in enumerate(without_features):
            assert r["deepspeed"] == r["ggspeed"], f"rank {rank}: losses differ from DeepSpeed's"

    def test_no_component_is_installed(self, without_features):
        for rank, r in enumerate(without_features):
            assert r["components"] == {}, f"rank {rank}: components {r['components']}"
            assert r["scalars"] == {}, f"rank {rank}: scalars {r['scalars']}"


@pytest.mark.dist
def test_ranks_with_different_sections_are_refused():
    messages = pool_ranks(_mismatched_configs, 2, init_pg=False, timeout=240)
    for rank, msg in enumerate(messages):
        assert "different ggspeed settings" in msg, f"rank {rank}: {msg}"
        assert "ggspeed.log_interval: rank 0 has 5, rank 1 has 6" in msg, f"rank {rank}: {msg}"


def test_missing_ds_config_is_an_error():
    import ggspeed

    with pytest.raises(ConfigError, match="no ds_config"):
        ggspeed.initialize(model=torch.nn.Linear(2, 2))


def test_act_state_loads_with_weights_only_and_refuses_bad_entries():
    """ACT's state is plain ints/floats (even with fitted rel_steps), so the checksummed file
    reads back with weights_only=True; wrong entries are refused naming the key."""
    from ggspeed.act.state import ACTState
    from ggspeed.checkpoint import decode, encode
    from ggspeed.config import ACTConfig

    st = ACTState(ACTConfig(enabled=True, bits_target=3.0))
    st.fit(0, torch.randn(4096))
    st.on_step(7)
    assert st.rel_steps, "the bits_target fit gives a rel_step"
    payload = decode(encode({"act": st.state_dict()}), "act.pt")["act"]
    fresh = ACTState(ACTConfig(enabled=True, bits_target=3.0))
    fresh.load_state_dict(payload)
    assert (fresh.step, fresh.shapes, fresh.rel_steps) == (7, st.shapes, st.rel_steps)
    for bad, key in (
        ([1], "must be a dict"),
        ({"step": "7"}, "'step'"),
        ({"step": 1, "shapes": {0: float("nan")}}, "'shapes'"),
        ({"step": 1, "rel_steps": [0.1]}, "'rel_steps'"),
    ):
        with pytest.raises(ValueError, match=key):
            fresh.load_state_dict(bad)
    assert fresh.step == 7, "a refused state leaves the loaded one in place"
