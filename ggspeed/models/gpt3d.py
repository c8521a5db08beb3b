"""The 3D-parallel GPT: megatron-core tensor-parallel layers laid out as a DeepSpeed PipelineModule.

The network is ``ggspeed.models.nanogpt.GPT`` (same ``GPTConfig``, same parameter names and
default init): pre-norm blocks, causal SDPA attention, GELU MLP, learned or rotary positions,
dropout, token embedding tied to the output head. Tensor parallelism comes from megatron-core
(VocabParallelEmbedding, Column/RowParallelLinear, vocab-parallel cross-entropy and its
``parallel_state`` groups); pipeline and data parallelism from DeepSpeed (PipelineModule /
PipelineEngine). The tied embedding/head is a ``TiedLayerSpec`` on the first and last stages.

The same weights come out on every layout (TP x PP x DP), which is what makes the losses of
different layouts comparable: weights are initialized as full master tensors on the CPU
(``use_cpu_initialization``) then split, every layer reseeds the RNG from (seed, layer index)
before it builds (PipelineModule builds only the local stage's layers), and the fused QKV weight
is laid out per head ([head, q|k|v, head_dim] rows) so that a TP split by rows hands each rank
whole heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_shim import tp_rng_fork
from .nanogpt import GPTConfig, apply_rotary, rotary_tables

__all__ = [
    "GPTConfig",
    "Layout",
    "build_pipeline_model",
    "check_layout",
    "init_parallel",
    "nanogpt_state_to_3d",
    "padded_vocab_size",
]

_VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class Layout:
    """Parallel sizes: tensor (tp), pipeline (pp) and data (dp) parallel degrees."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def check_layout(cfg: GPTConfig, world_size: int, tp: int, pp: int) -> Layout:
    """The layout for ``world_size`` ranks; ValueError naming the setting when it cannot divide."""
    if tp < 1 or pp < 1:
        raise ValueError(
            f"--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1, got {tp}, {pp}"
        )
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size "
            f"{tp} x {pp} = {tp * pp}; launch a multiple of {tp * pp} ranks"
        )
    if cfg.n_head % tp:
        raise ValueError(f"n_head={cfg.n_head} is not divisible by tensor-model-parallel size {tp}")
    if cfg.d_ff % tp:
        raise ValueError(f"d_ff={cfg.d_ff} is not divisible by tensor-model-parallel size {tp}")
    if cfg.n_layer % pp:
        raise ValueError(
            f"n_layer={cfg.n_layer} is not divisible by pipeline-model-parallel size {pp} "
            "(each stage gets the same number of blocks)"
        )
    return Layout(tp=tp, pp=pp, dp=world_size // (tp * pp))


def init_parallel(
    cfg: GPTConfig, tp: int, pp: int, seed: int, backend: str | None = None
) -> Layout:
    """Process groups for 3D parallelism, in the order that makes megatron and DeepSpeed agree.

    ``deepspeed.init_distributed`` -> layout checks -> megatron-core
    ``initialize_model_parallel(tp, pp)`` (tp fastest, then dp, then pp) -> an assertion that
    DeepSpeed's ``PipeModelDataParallelTopology`` puts every rank in the same TP / DP / PP groups
    -> RNG seeding (TP-region stream per TP rank; CPU shim for megatron's tracker).
    """
    import os

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    if not torch.cuda.is_available():
        # On CPU the launcher's LOCAL_SIZE makes init_distributed allocate DeepSpeed's /dev/shm
        # all-reduce buffer, which is never freed after the run; gloo does not need it.
        os.environ.pop("LOCAL_SIZE", None)
    if torch.cuda.is_available():  # megatron's GPU init allocates on the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo")
        )
    layout = check_layout(cfg, dist.get_world_size(), tp, pp)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=layout.dp)
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    ours = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
    )
    if (coord.model, coord.data, coord.pipe) != ours:
        raise RuntimeError(
            f"rank {rank}: DeepSpeed topology (tp, dp, pp) = {(coord.model, coord.data, coord.pipe)} "
            f"but megatron-core parallel_state says {ours}"
        )
    for axis, group in (
        ("model", ps.get_tensor_model_parallel_group()),
        ("data", ps.get_data_parallel_group()),
        ("pipe", ps.get_pipeline_model_parallel_group()),
    ):
        ranks = sorted(dist.get_process_group_ranks(group))
        if ranks not in [sorted(r) for r in topo.get_axis_comm_lists(axis)] and len(ranks) > 1:
            raise RuntimeError(
                f"rank {rank}: megatron {axis} group {ranks} is not a DeepSpeed {axis} group"
            )
    from .cpu_shim import seed_model_parallel_rng

    # Default RNG: equal within a TP group (non-TP dropout), different per pipeline stage.
    seed_model_parallel_rng(seed + 100 * coord.pipe, coord.model)
    return layout


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocab padded to a multiple of lcm(128, tp): the same for every layout with tp | 128."""
    m = _VOCAB_MULTIPLE * tp // math.gcd(_VOCAB_MULTIPLE, tp)
    return -(-vocab_size // m) * m


def _layer_norm(d: int) -> nn.Module:
    """apex's fused LayerNorm where apex imports and a GPU is present, else torch's."""
    if torch.cuda.is_available():
        try:
            from apex.normalization import FusedLayerNorm

            return FusedLayerNorm(d)
        except Exception:  # apex absent or built without its CUDA extensions
            pass
    return nn.LayerNorm(d)


def megatron_config(
    cfg: GPTConfig, tp: int, params_dtype: torch.dtype = torch.float32, cpu_init: bool | None = None
):
    """megatron-core TransformerConfig for ``cfg``; GG Init's init methods when it is enabled.

    Pipelining is DeepSpeed's, so megatron sees pipeline_model_parallel_size=1.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import init_method_normal, scaled_init_method_normal

    init = init_method_normal(cfg.init_std)
    out_init = scaled_init_method_normal(cfg.init_std, cfg.n_layer)
    emb_init = init_method_normal(cfg.init_std)
    return TransformerConfig(
        num_layers=cfg.n_layer,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_head,
        ffn_hidden_size=cfg.d_ff,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        use_cpu_initialization=(not torch.cuda.is_available()) if cpu_init is None else cpu_init,
        perform_initialization=True,
        params_dtype=params_dtype,
        init_method=init,
        output_layer_init_method=out_init,
        embedding_init_method=emb_init,
        init_method_std=cfg.init_std,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def apply_gg_init_methods(mcfg: Any, gg_init_cfg: Any, n_layer: int, hidden_size: int) -> bool:
    """Swap in GG Init's megatron init methods when ``ggspeed.init`` provides them and it is on."""
    if gg_init_cfg is None or not getattr(gg_init_cfg, "enabled", False):
        return False
    from ggspeed.init import megatron_init_methods

    init, out_init, emb_init = megatron_init_methods(gg_init_cfg, n_layer, hidden_size=hidden_size)
    mcfg.init_method, mcfg.output_layer_init_method = init, out_init
    mcfg.embedding_init_method = emb_init
    return True


def _reseed(seed: int, layer_idx: int) -> None:
    """Every layer draws its init from its own stream: independent of which layers a rank builds."""
    torch.manual_seed(seed * 1000 + layer_idx)


class EmbeddingPipe(nn.Module):
    """Token embedding (vocab-parallel) + learned positions + dropout; also the tied output head."""

    def __init__(self, cfg: GPTConfig, mcfg: Any, seed: int) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        _reseed(seed, 0)
        self.wte = VocabParallelEmbedding(
            padded_vocab_size(cfg.vocab_size, mcfg.tensor_model_parallel_size),
            cfg.d_model,
            init_method=mcfg.embedding_init_method,
            config=mcfg,
        )
        self.wpe = None
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
            with torch.no_grad():
                mcfg.embedding_init_method(self.wpe.weight)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        # Outside TP regions: the default RNG, equal on the ranks of a TP group.
        return self.drop(x)


def lm_head_forward(embed: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """The tied head: vocab-parallel logits x @ wte.T (this rank's vocab shard)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return F.linear(copy_to_tensor_model_parallel_region(x), embed.wte.weight)


class TransformerLayerPipe(nn.Module):
    """Pre-norm block; attention heads and MLP columns split over the TP group."""

    def __init__(self, cfg: GPTConfig, mcfg: Any, layer_idx: int, seed: int) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        _reseed(seed, 1 + layer_idx)
        tp = mcfg.tensor_model_parallel_size
        d = cfg.d_model
        self.local_heads = cfg.n_head // tp
        self.head_dim = d // cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = _layer_norm(d)
        self.qkv = ColumnParallelLinear(
            d, 3 * d, config=mcfg, init_method=mcfg.init_method, bias=True, gather_output=False
        )
        self.proj = RowParallelLinear(
            d,
            d,
            config=mcfg,
            init_method=mcfg.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.ln_2 = _layer_norm(d)
        self.fc = ColumnParallelLinear(
            d, cfg.d_ff, config=mcfg, init_method=mcfg.init_method, bias=True, gather_output=False
        )
        self.fc_out = RowParallelLinear(
            cfg.d_ff,
            d,
            config=mcfg,
            init_method=mcfg.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary = cfg.positions == "rotary"
        if self.rotary:
            cos, sin = rotary_tables(cfg.seq_len, self.head_dim)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv, _ = self.qkv(self.ln_1(x))
        q, k, v = qkv.view(b, t, self.local_heads, 3, self.head_dim).unbind(3)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.rotary:
            q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        # Attention dropout is inside the TP region: each TP rank owns different heads, so it
        # draws from the TP-region RNG stream (DeepSpeed's tracker, restored on recompute).
        p = self.dropout if self.training else 0.0
        if p > 0.0:
            with tp_rng_fork():
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y, _ = self.proj(y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim))
        x = x + self.drop(y)
        h, _ = self.fc(self.ln_2(x))
        h, _ = self.fc_out(F.gelu(h))
        return x + self.drop(h)


class FinalNormPipe(nn.Module):
    """The final LayerNorm before the head."""

    def __init__(self, cfg: GPTConfig, seed: int) -> None:
        super().__init__()
        _reseed(seed, 1 + cfg.n_layer)
        self.ln_f = _layer_norm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class LMHeadPipe(nn.Module):
    """Untied output head (tie_embeddings=False): a column-parallel projection to the vocab."""

    def __init__(self, cfg: GPTConfig, mcfg: Any, seed: int) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        _reseed(seed, 2 + cfg.n_layer)
        self.lm_head = ColumnParallelLinear(
            cfg.d_model,
            padded_vocab_size(cfg.vocab_size, mcfg.tensor_model_parallel_size),
            config=mcfg,
            init_method=mcfg.init_method,
            bias=False,
            gather_output=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)[0]


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over vocab-parallel logits (fp32, whatever the model dtype)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels).mean()


def build_pipeline_model(
    cfg: GPTConfig,
    layout: Layout,
    *,
    seed: int = 1234,
    params_dtype: torch.dtype = torch.float32,
    activation_checkpoint_interval: int = 0,
    activation_checkpoint_func: Callable[..., Any] | None = None,
    gg_init: Any = None,
    cpu_init: bool | None = None,
):
    """The GPT as a ``deepspeed.pipe.PipelineModule`` for ``layout``.

    Needs ``torch.distributed`` and megatron-core's ``parallel_state`` initialized with
    (layout.tp, layout.pp); see :func:`init_parallel`.
    Blocks are split evenly over the stages. ``activation_checkpoint_func`` (e.g.
    ``ggspeed.act.checkpoint``) wraps every ``activation_checkpoint_interval`` blocks; only
    transformer blocks are checkpointed (the embedding takes integer tokens).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    rng = torch.get_rng_state()  # layers reseed while building; dropout streams stay as seeded
    mcfg = megatron_config(cfg, layout.tp, params_dtype, cpu_init)
    gg = apply_gg_init_methods(mcfg, gg_init, cfg.n_layer, cfg.d_model)
    specs: list[Any] = []
    if cfg.tie_embeddings:
        specs.append(
            TiedLayerSpec("embed", EmbeddingPipe, cfg, mcfg, seed, tied_weight_attr="wte.weight")
        )
    else:
        specs.append(LayerSpec(EmbeddingPipe, cfg, mcfg, seed))
    specs += [LayerSpec(TransformerLayerPipe, cfg, mcfg, i, seed) for i in range(cfg.n_layer)]
    specs.append(LayerSpec(FinalNormPipe, cfg, seed))
    if cfg.tie_embeddings:
        specs.append(
            TiedLayerSpec(
                "embed",
                EmbeddingPipe,
                cfg,
                mcfg,
                seed,
                forward_fn=lm_head_forward,
                tied_weight_attr="wte.weight",
            )
        )
    else:
        specs.append(LayerSpec(LMHeadPipe, cfg, mcfg, seed))
    kwargs: dict[str, Any] = {}
    if activation_checkpoint_func is not None:
        kwargs["activation_checkpoint_func"] = activation_checkpoint_func
    model = PipelineModule(
        layers=specs,
        topology=PipeModelDataParallelTopology(
            num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp
        ),
        loss_fn=vocab_parallel_loss,
        partition_method="type:TransformerLayerPipe",
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["TransformerLayerPipe"],
        **kwargs,
    )
    torch.set_rng_state(rng)
    if gg:
        from ggspeed.init import mark_gg_initialized

        mark_gg_initialized(model)
    return model


def nanogpt_state_to_3d(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A ``nanogpt.GPT`` state dict renamed and re-laid-out for the TP=1 pipeline model.

    Keys become PipelineModule's (``<layer index>.<name>``, ``tied_modules.embed.<name>``); fused QKV rows go from
    [q | k | v] (heads inside each) to per-head [q_h | k_h | v_h]; the vocab is padded with zeros.
    Used to check that both models compute the same function.
    """
    d, h = cfg.d_model, cfg.n_head
    hd = d // h
    vocab = padded_vocab_size(cfg.vocab_size, 1)
    out: dict[str, torch.Tensor] = {}

    def qkv_rows(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(3, h, hd, *w.shape[1:]).transpose(0, 1).reshape(3 * d, *w.shape[1:])

    wte = torch.zeros(vocab, d, dtype=state["wte.weight"].dtype)
    wte[: cfg.vocab_size] = state["wte.weight"]
    emb = "tied_modules.embed." if cfg.tie_embeddings else "0."
    out[f"{emb}wte.weight"] = wte
    if cfg.positions == "learned":
        out[f"{emb}wpe.weight"] = state["wpe.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"{1 + i}."
        for name in ("ln_1", "ln_2", "proj", "fc", "fc_out"):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = state[f"{src}{name}.{p}"]
        out[f"{dst}qkv.weight"] = qkv_rows(state[f"{src}qkv.weight"])
        out[f"{dst}qkv.bias"] = qkv_rows(state[f"{src}qkv.bias"])
    last = 1 + cfg.n_layer
    out[f"{last}.ln_f.weight"] = state["ln_f.weight"]
    out[f"{last}.ln_f.bias"] = state["ln_f.bias"]
    if not cfg.tie_embeddings:
        head = torch.zeros(vocab, d, dtype=wte.dtype)
        head[: cfg.vocab_size] = state["lm_head.weight"]
        out[f"{last + 1}.lm_head.weight"] = head
    return out
