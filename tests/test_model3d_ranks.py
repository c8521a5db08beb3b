"""Rank functions for the 3D-parallel model tests (module-level so that spawned ranks import them)."""

from __future__ import annotations

from typing import Any

import torch


class PatternSamples:
    """Sample g -> seq_len + 1 learnable tokens (a per-sample arithmetic progression mod vocab)."""

    def __init__(self, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.seq_len, self.vocab, self.seed = seq_len, vocab, seed

    def __getitem__(self, g: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + int(g))
        start, stride = torch.randint(0, self.vocab, (2,), generator=gen).tolist()
        return (start + (1 + stride % 5) * torch.arange(self.seq_len + 1)) % self.vocab


def ds_config(micro: int, grad_accum: int, dp: int, zero: int = 1, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": micro * grad_accum * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 3e-3, "torch_adam": True, "weight_decay": 0.0},
        },
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    return cfg


def train_losses(
    model_cfg: dict[str, Any],
    tp: int,
    pp: int,
    steps: int,
    global_batch: int,
    micro: int,
    seed: int = 1,
) -> dict[str, Any]:
    """Train ``steps`` steps of the pipeline GPT on PatternSamples; return losses and a weight digest."""
    import deepspeed
    import torch.distributed as dist

    from ggspeed.data.indexed import BatchPlan, TrainBatches
    from ggspeed.models.gpt3d import GPTConfig, build_pipeline_model, init_parallel

    cfg = GPTConfig.from_dict(model_cfg)
    layout = init_parallel(cfg, tp, pp, seed=seed)
    grad_accum = global_batch // (micro * layout.dp)
    model = build_pipeline_model(cfg, layout, seed=seed)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(micro, grad_accum, layout.dp),
    )
    plan = BatchPlan(micro, grad_accum, layout.dp)
    batches = TrainBatches(
        PatternSamples(cfg.seq_len, cfg.vocab_size), plan, engine.grid.get_data_parallel_id()
    )
    losses = [float(engine.train_batch(batches)) for _ in range(steps)]
    from megatron.core import parallel_state as ps

    from ggspeed.models.cpu_shim import tp_rng_fork

    with tp_rng_fork():
        tp_draw = torch.rand(3).tolist()
    tp_rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())

    ps.destroy_model_parallel()
    dist.barrier()
    return {"losses": losses, "rank": dist.get_rank(), "tp_rank": tp_rank, "tp_draw": tp_draw}


def reference_checks(model_cfg: dict[str, Any], steps: int, global_batch: int) -> dict[str, Any]:
    """One rank: CPU shim behaviour, nanogpt == 3D model forward, and the TP1xPP1xDP1 losses."""
    from megatron.core.tensor_parallel import random as mrandom

    from ggspeed.models import nanogpt
    from ggspeed.models.gpt3d import GPTConfig, Layout, build_pipeline_model, nanogpt_state_to_3d

    out: dict[str, Any] = {}
    # Without the shim megatron's own tracker needs CUDA: forking it fails on this machine.
    mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = None, False
    try:
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("probe", 5)
        with tracker.fork("probe"):
            torch.rand(1)
        out["megatron_tracker_without_shim"] = "worked"
    except Exception as e:
        out["megatron_tracker_without_shim"] = f"failed: {type(e).__name__}"
    res = train_losses(model_cfg, 1, 1, steps, global_batch, global_batch)
    out["losses"] = res["losses"]
    # (the run above called init_parallel -> the shim; megatron's tracker is now DeepSpeed's)
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    out["shim_installed"] = mrandom.get_cuda_rng_tracker() is ds_ckpt.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with mrandom.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    out["fork_restores_default"] = bool(torch.equal(before, torch.get_rng_state()))
    out["fork_differs_from_default"] = not torch.equal(forked, torch.rand(4))

    # The same function as the plain model: load nanogpt weights, compare logits.
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    diffs = {}
    for positions in ("learned", "rotary"):
        cfg = GPTConfig.from_dict({**model_cfg, "positions": positions})
        torch.manual_seed(0)
        ref = nanogpt.GPT(cfg).eval()
        pipe = build_pipeline_model(cfg, Layout(1, 1, 1), seed=3).eval()
        state = nanogpt_state_to_3d(ref.state_dict(), cfg)
        pipe.load_state_dict(state, strict=True)
        tokens = torch.randint(
            0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            a = ref(tokens)[0]
            b = pipe(tokens)[..., : cfg.vocab_size]
        diffs[positions] = float((a - b).abs().max())
    out["nanogpt_max_abs_diff"] = diffs
    ps.destroy_model_parallel()
    return out
