"""GG Init with real megatron-core tensor-parallel layers over 2 gloo ranks."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ggspeed import gg
from ggspeed.config import GGInitConfig
from ggspeed.init import megatron_init_methods
from tests.dist import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fit_gg

pytestmark = pytest.mark.dist

HIDDEN, FFN, VOCAB, LAYERS, SEED = 64, 256, 512, 3, 1234


def megatron_shards(cfg_dict: dict[str, Any], ds_folder: str) -> dict[str, Any]:
    """(On each rank.) Column/RowParallelLinear and VocabParallelEmbedding, GG Init, CPU, TP 2."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.transformer import TransformerConfig

    from ggspeed.config import GGInitConfig
    from ggspeed.init import megatron_init_methods

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        init, out_init, emb_init = megatron_init_methods(GGInitConfig(**cfg_dict), LAYERS)
        tcfg = TransformerConfig(
            num_layers=LAYERS,
            hidden_size=HIDDEN,
            ffn_hidden_size=FFN,
            num_attention_heads=4,
            tensor_model_parallel_size=2,
            pipeline_model_parallel_size=1,
            use_cpu_initialization=True,
            perform_initialization=True,
            init_method=init,
            output_layer_init_method=out_init,
            embedding_init_method=emb_init,
        )
        torch.manual_seed(SEED)  # Megatron's CPU init path draws from the default CPU generator
        col = ColumnParallelLinear(
            HIDDEN, FFN, config=tcfg, init_method=tcfg.init_method, bias=True, gather_output=False
        )
        row = RowParallelLinear(
            FFN,
            HIDDEN,
            config=tcfg,
            init_method=tcfg.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        emb = VocabParallelEmbedding(
            VOCAB, HIDDEN, init_method=tcfg.embedding_init_method, config=tcfg
        )
        built = {
            "col": col.weight.detach().clone(),
            "row": row.weight.detach().clone(),
            "emb": emb.weight.detach().clone(),
        }
        # apply_gg_init on megatron layers: fans from the full layer, shards drawn per TP rank.
        from ggspeed.init import apply_gg_init

        box = torch.nn.Module()
        box.col, box.row = col, row
        rule = {"enabled": True, "rule": "kaiming", "seed": 5, "output_layer_scaling": False}
        apply_gg_init(box, rule)
        return {
            "applied": (col.weight.detach().clone(), row.weight.detach().clone()),
            "rank": ps.get_tensor_model_parallel_rank(),
            **built,
            "methods": (repr(init), repr(out_init), repr(emb_init)),
        }
    finally:
        ps.destroy_model_parallel()


def save_deepspeed_checkpoint(folder: str) -> dict[str, torch.Tensor]:
    """(On each rank, same launch.) A real DeepSpeed engine saves a checkpoint for fit_gg."""
    import deepspeed

    from ggspeed.init import apply_gg_init
    from ggspeed.models.nanogpt import GPT, GPTConfig

    deepspeed.init_distributed("gloo")  # reuses the launch's process group
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32))
    apply_gg_init(model, {"enabled": True, "shape": 0.6, "seed": 3})
    config = {
        "train_batch_size": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    engine.save_checkpoint(folder, tag="step0")
    return {k: v.clone() for k, v in model.state_dict().items()}


def megatron_and_deepspeed(cfg_dict: dict[str, Any], ds_folder: str) -> dict[str, Any]:
    """One launch for both multi-rank checks (each spawn costs seconds of imports)."""
    out = megatron_shards(cfg_dict, ds_folder)
    out["ds_state"] = save_deepspeed_checkpoint(ds_folder)
    return out


CFG = {"enabled": True, "shape": 0.7, "std": 0.05, "embedding_std": 0.1}


def _unsharded() -> dict[str, torch.Tensor]:
    """The same layers on one process: the master weights Megatron's CPU path would split."""
    init, out_init, emb_init = megatron_init_methods(GGInitConfig(**CFG), LAYERS)
    torch.manual_seed(SEED)
    col = torch.empty(FFN, HIDDEN)
    init(col)
    row = torch.empty(HIDDEN, FFN)
    out_init(row)
    emb = torch.empty(VOCAB, HIDDEN)
    emb_init(emb)
    return {"col": col, "row": row, "emb": emb}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[dict], Path]:
    """One launch of 2 fresh ranks (Megatron's parallel state and a DeepSpeed engine stay on
    fresh ranks): the TP shards, apply_gg_init's, and a DeepSpeed checkpoint folder."""
    ds = tmp_path_factory.mktemp("megatron") / "ds"
    results = run_ranks(megatron_and_deepspeed, 2, CFG, str(ds), timeout=300)
    return sorted(results, key=lambda r: r["rank"]), ds


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return _unsharded()


class TestTensorParallelShards:
    def test_shards_are_real_shards(self, shards) -> None:
        results, _ = shards
        assert results[0]["col"].shape == (FFN // 2, HIDDEN), "column-parallel shard shape"
        assert results[0]["row"].shape == (HIDDEN, FFN // 2), "row-parallel shard shape"
        assert not torch.equal(results[0]["col"], results[1]["col"]), "shards are replicas"

    def test_shards_concatenate_to_the_unsharded_init(self, shards, ref) -> None:
        results, _ = shards
        # Column-parallel and the embedding split rows (dim 0), row-parallel splits columns (dim 1).
        assert torch.equal(torch.cat([r["col"] for r in results], 0), ref["col"]), "column"
        assert torch.equal(torch.cat([r["row"] for r in results], 1), ref["row"]), "row"
        assert torch.equal(torch.cat([r["emb"] for r in results], 0), ref["emb"]), "embedding"

    def test_statistics_are_the_configured_ones(self, shards, ref) -> None:
        results, _ = shards
        # std, depth scaling, GG shape
        assert float(ref["col"].std()) == pytest.approx(0.05, rel=0.05), "column std"
        assert float(ref["row"].std()) == pytest.approx(0.05 / math.sqrt(2 * LAYERS), rel=0.05), (
            "row std with depth scaling"
        )
        assert float(ref["emb"].std()) == pytest.approx(0.1, rel=0.05), "embedding std"
        shape, _ = gg.fit_shape(ref["emb"])
        assert shape == pytest.approx(0.7, rel=0.1), f"fitted shape {shape}"
        assert "shape=0.7" in results[0]["methods"][0], results[0]["methods"][0]

    def test_apply_gg_init_uses_the_whole_layers_fan_in(self, shards) -> None:
        results, _ = shards
        # Kaiming fan-in of the whole layer, distinct shards
        col = torch.cat([r["applied"][0] for r in results], 0)
        row = torch.cat([r["applied"][1] for r in results], 1)
        assert float(col.std()) == pytest.approx(math.sqrt(2 / HIDDEN), rel=0.05), "column std"
        assert float(row.std()) == pytest.approx(math.sqrt(2 / FFN), rel=0.05), "row std"
        assert not torch.equal(results[0]["applied"][1], results[1]["applied"][1]), (
            "row-parallel shards are replicas"
        )

    def test_fit_gg_reads_the_deepspeed_checkpoint_folder(self, shards) -> None:
        results, ds = shards
        got = fit_gg.load_tensors(ds)
        assert torch.equal(
            got["blocks.0.qkv.weight"], results[0]["ds_state"]["blocks.0.qkv.weight"]
        ), "tools/fit_gg.py read other weights than the launch saved"


def test_per_shard_path_draws_independent_shards_with_the_right_std() -> None:
    """Megatron's GPU path calls the init method on each rank's shard inside a per-rank RNG
    stream: shards must be independent and carry the full layer's std, whatever their shape."""
    init, _, _ = megatron_init_methods(GGInitConfig(**CFG), LAYERS)
    shards = []
    for tp_rank in range(2):
        shard = torch.empty(FFN * 4, HIDDEN)  # a shard-shaped tensor
        with torch.random.fork_rng():
            torch.manual_seed(2718 + tp_rank)  # what the TP RNG tracker does per rank
            init(shard)
        shards.append(shard)
    a, b = (s.flatten().double() for s in shards)
    assert float(a.std()) == pytest.approx(0.05, rel=0.03)
    assert float(b.std()) == pytest.approx(0.05, rel=0.03)
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(a.numel())
    # The scale never depends on the tensor's shape: a small tensor from the same stream gets
    # exactly the first draws of a large one.
    small, large = torch.empty(3, 5), torch.empty(40, 70)
    torch.manual_seed(1)
    init(small)
    torch.manual_seed(1)
    init(large)
    assert torch.equal(small.flatten(), large.flatten()[:15])


def test_fan_rules_need_hidden_size_and_shape_two_is_megatrons_normal() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        megatron_init_methods(GGInitConfig(enabled=True, rule="kaiming"), LAYERS)
    init, out_init, _ = megatron_init_methods(
        GGInitConfig(enabled=True, rule="kaiming", shape=1.0), LAYERS, hidden_size=HIDDEN
    )
    assert init.std == pytest.approx(math.sqrt(2 / HIDDEN))
    assert out_init.std == pytest.approx(math.sqrt(2 / HIDDEN) / math.sqrt(2 * LAYERS))
    # shape 2 reproduces megatron's init_method_normal draw for draw (megatron-core defines it
    # as functools.partial(torch.nn.init.normal_, mean=0.0, std=sigma); importing it here would
    # cost seconds of megatron imports in the test process).
    init2, _, _ = megatron_init_methods(GGInitConfig(enabled=True, shape=2.0), LAYERS)
    x, y = torch.empty(50, 60), torch.empty(50, 60)
    torch.manual_seed(3)
    init2(x)
    torch.manual_seed(3)
    torch.nn.init.normal_(y, mean=0.0, std=0.02)
    assert torch.equal(x, y)
    _, _, emb_g = megatron_init_methods(GGInitConfig(enabled=True, embeddings="gaussian"), LAYERS)
    assert "Normal" in repr(emb_g)
