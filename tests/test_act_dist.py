"""ACT on real DeepSpeed engines, 2 fresh gloo ranks, one launch shared by the tests: data
parallel through ggspeed.initialize, a 2-stage PipelineModule, and partition_activations over a
2-rank group."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.dist import run_ranks

ACT = {
    "enabled": True,
    "lambda_target": 1e-2,
    "warmup_steps": 4,
    "compress": True,
    "rel_step": 0.25,
    "eg_order": "auto",
    "shape_refresh_interval": 3,
    "log_interval": 1,
}


def _base_config(**extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "steps_per_print": 1000,
        "ggspeed": {"log_interval": 2, "act": dict(ACT)},
    }
    cfg.update(extra)
    return cfg


def _digest(module: nn.Module) -> float:
    return float(
        sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(module.parameters()))
    )


def _data_parallel(rank: int) -> dict:
    import deepspeed

    import ggspeed
    import ggspeed.act as act
    from ggspeed.models.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=3, n_head=2, d_model=32, dropout=0.1)
    # looked up at call time, as Megatron does: install() must have swapped it
    model = GPT(cfg, checkpoint_fn=lambda f, x: deepspeed.checkpointing.checkpoint(f, x))
    engine, *_ = ggspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_base_config()
    )
    assert deepspeed.checkpointing.checkpoint is act.checkpoint, "install() did not swap it"
    state = engine.ggspeed.components["act"]
    assert state is act.active_state(), "the engine's ACT state is not the active one"
    assert state.grad_scale == 0.5, f"grad_scale {state.grad_scale}: 1 / accumulation steps"
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, 64, (2, 17), generator=g) for _ in range(2)]
    losses, scalars = [], []
    for _ in range(10):
        total = 0.0
        for b in batches:
            _, loss = engine(b[:, :-1], b[:, 1:])
            engine.backward(loss)
            engine.step()
            total += loss.item() / 2
        losses.append(total)
        if engine.global_steps % 2 == 0:
            scalars.append(engine.ggspeed.scalars())
    return {
        "losses": losses,
        "digest": _digest(engine.module),
        "scalars": scalars,
        "live": state.live_bytes,
        "lambda": state.lambda_for(0),
        "shapes": dict(state.shapes),
    }


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.emb(idx)


class PBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.drop = nn.LayerNorm(32), nn.Linear(32, 32), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.fc(self.ln(x))))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _pipeline(rank: int) -> dict:
    from deepspeed.pipe import LayerSpec, PipelineModule

    import ggspeed
    import ggspeed.act as act

    torch.manual_seed(0)
    layers = [LayerSpec(Embed), *[LayerSpec(PBlock) for _ in range(4)], LayerSpec(Head)]
    pipe = PipelineModule(
        layers=layers,
        num_stages=2,
        loss_fn=_ce,
        partition_method="uniform",
        activation_checkpoint_interval=1,
        activation_checkpoint_func=act.checkpoint,
        checkpointable_layers=["PBlock"],
    )
    engine, *_ = ggspeed.initialize(
        model=pipe, model_parameters=pipe.parameters(), config=_base_config()
    )
    state = engine.ggspeed.components["act"]
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 64, (2, 17), generator=g) for _ in range(2)]
    losses = []
    for _ in range(10):
        it = iter([(b[:, :-1], b[:, 1:]) for b in batches])
        losses.append(float(engine.train_batch(data_iter=it)))
    return {
        "losses": losses,
        "offset": state.block_offset,
        "blocks": sorted(state.shapes),
        "scalars": engine.ggspeed.scalars(),
        "stage": engine.stage_id,
        "live": state.live_bytes,
    }


class _WorldMPU:
    """The mpu interface deepspeed.checkpointing.configure reads: here the TP group is WORLD."""

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size()

    def get_model_parallel_group(self):
        return torch.distributed.group.WORLD


def _partitioned(rank: int) -> dict:
    """partition_activations: each rank holds half of each (replicated) input; the all-gathered
    recomputation gives exactly the unpartitioned gradients."""
    import deepspeed

    import ggspeed.act as act
    from ggspeed.config.act import ACTConfig

    torch.manual_seed(0)
    lin = nn.Linear(48, 48)
    x = torch.randn(32, 48)
    out = {}
    for partition in (False, True):
        deepspeed.checkpointing.configure(_WorldMPU(), partition_activations=partition)
        st = act.ACTState(ACTConfig(enabled=True, compress=True, rel_step=0.1, rate="l1"))
        act.activate(st)
        a = x.clone().requires_grad_(True)
        act.checkpoint(lin, a).pow(2).sum().backward()
        out[partition] = (a.grad.clone(), lin.weight.grad.clone(), st.scalars())
        lin.zero_grad()
    deepspeed.checkpointing.configure(None, partition_activations=False)
    act.activate(None)
    return {
        "equal": all(torch.equal(u, v) for u, v in zip(out[False][:2], out[True][:2])),
        "full_mb": out[False][2]["stored_mb"],
        "part_mb": out[True][2]["stored_mb"],
    }


def _all(rank_unused: int = 0) -> dict:
    import deepspeed

    deepspeed.init_distributed("gloo")
    rank = torch.distributed.get_rank()
    return {"dp": _data_parallel(rank), "pipe": _pipeline(rank), "part": _partitioned(rank)}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """One launch of 2 fresh ranks (DeepSpeed engines stay on fresh ranks) for all three parts."""
    return run_ranks(_all, 2, init_pg=False, timeout=240)


@pytest.mark.dist
class TestDataParallel:
    def test_replicas_stay_equal(self, ranks):
        assert ranks[0]["dp"]["digest"] == ranks[1]["dp"]["digest"], "data-parallel ranks diverged"

    def test_loss_falls(self, ranks):
        for rank, r in enumerate(ranks):
            losses = r["dp"]["losses"]
            assert losses[-1] < 0.9 * losses[0], f"rank {rank}: losses {losses}"

    def test_no_stored_activation_outlives_the_step(self, ranks):
        for rank, r in enumerate(ranks):
            assert r["dp"]["live"] == 0, f"rank {rank}: {r['dp']['live']} bytes still stored"

    def test_lambda_and_shapes_per_block(self, ranks):
        for rank, r in enumerate(ranks):
            assert r["dp"]["lambda"] == pytest.approx(1e-2), f"rank {rank}: {r['dp']['lambda']}"
            assert set(r["dp"]["shapes"]) == {0, 1, 2}, f"rank {rank}: {r['dp']['shapes']}"

    def test_scalars_are_averaged_over_ranks(self, ranks):
        # averaged over ranks by runtime
        assert ranks[0]["dp"]["scalars"][-1] == ranks[1]["dp"]["scalars"][-1], "ranks' scalars"

    def test_storage_is_compressed(self, ranks):
        last = ranks[0]["dp"]["scalars"][-1]
        assert 0 < last["act/bits_per_element"] < 8, f"bits/element {last}"
        assert last["act/ratio_vs_bf16"] > 2, f"ratio vs bf16 {last}"
        assert last["act/stored_mb"] < last["act/bf16_mb"], f"stored vs bf16 MB {last}"
        assert last["act/penalty"] > 0, f"penalty {last}"


@pytest.mark.dist
class TestPipeline:
    def test_stages_hold_their_blocks(self, ranks):
        p0, p1 = ranks[0]["pipe"], ranks[1]["pipe"]
        assert (p0["stage"], p1["stage"]) == (0, 1), "stage ids"
        assert (p0["offset"], p1["offset"]) == (0, 2), "block offsets"
        assert (p0["blocks"], p1["blocks"]) == ([0, 1], [2, 3]), "blocks per stage"

    def test_loss_agrees_and_falls(self, ranks):
        p0, p1 = ranks[0]["pipe"], ranks[1]["pipe"]
        assert p0["losses"] == p1["losses"], "stages report different losses"
        assert p0["losses"][-1] < 0.8 * p0["losses"][0], f"losses {p0['losses']}"

    def test_nothing_stored_after_the_batch_and_bits_reported(self, ranks):
        p0, p1 = ranks[0]["pipe"], ranks[1]["pipe"]
        assert p0["live"] == 0 == p1["live"], "activations still stored after train_batch"
        assert math.isfinite(p0["scalars"]["act/bits_per_element"]), "bits/element"


@pytest.mark.dist
class TestPartitionedActivations:
    def test_gradients_equal_the_unpartitioned_ones(self, ranks):
        for rank, r in enumerate(ranks):
            assert r["part"]["equal"], f"rank {rank}: partitioned gradients differ"

    def test_each_rank_stores_about_half(self, ranks):
        for rank, r in enumerate(ranks):
            part = r["part"]
            assert part["part_mb"] < 0.6 * part["full_mb"], f"rank {rank}: {part}"
