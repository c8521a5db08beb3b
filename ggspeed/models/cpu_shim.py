"""The one CPU shim megatron-core needs: its CUDA RNG tracker.

megatron-core's ``tensor_parallel.random`` keeps named RNG states for tensor-parallel regions
(dropout, GPU-side weight init) and reads/writes them through ``torch.cuda``; on a machine
without a GPU every ``fork()`` fails. DeepSpeed's tracker has the same interface (``add``,
``fork``, ``get_states``, ``set_states``, ``reset``) but goes through DeepSpeed's accelerator, so
it works on CPU, and it is the tracker DeepSpeed's activation checkpointing saves and restores
around recomputation. Where no GPU is present we therefore make megatron's
``get_cuda_rng_tracker()`` return DeepSpeed's tracker object: one set of TP RNG states for both
libraries. On a GPU nothing is patched (megatron's own tracker works there).
"""

from __future__ import annotations

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's and DeepSpeed's offset between the base seed and the TP-region seed.
TP_SEED_OFFSET = 2718


def needed() -> bool:
    """True where megatron-core's CUDA RNG tracker cannot work (no CUDA device)."""
    return not torch.cuda.is_available()


def install_cpu_rng_tracker() -> bool:
    """Point megatron-core's RNG tracker at DeepSpeed's (CPU-capable) one; no-op on a GPU.

    Returns True when the shim was installed. Idempotent.
    """
    if not needed():
        return False
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = ds_ckpt.get_cuda_rng_tracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """Seed the default RNG with ``seed`` and the TP-region state with ``seed + 2718 + tp_rank``.

    The same rule as ``model_parallel_cuda_manual_seed`` of both libraries (so dropout masks in
    tensor-parallel regions differ between TP ranks and agree across data-parallel replicas), but
    through DeepSpeed's tracker, which works on every device. On a GPU megatron's own tracker is
    seeded too, because megatron's GPU weight init forks it.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    torch.manual_seed(seed)
    get_accelerator().manual_seed(seed)
    tracker = ds_ckpt.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + tp_rank)
    if needed():
        install_cpu_rng_tracker()
    else:
        from megatron.core.tensor_parallel import random as mrandom

        mrandom.model_parallel_cuda_manual_seed(seed)


def tp_rng_fork():
    """Context manager running its body under the TP-region RNG state (DeepSpeed's tracker)."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    return ds_ckpt.get_cuda_rng_tracker().fork(MODEL_PARALLEL_RNG)
