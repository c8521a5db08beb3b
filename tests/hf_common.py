"""What tests/hf_trainer_script.py and tests/hf_plain_script.py share: the tiny model, two probes."""

from __future__ import annotations

import hashlib

import torch

VOCAB, LENGTH = 96, 16


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 from a config (nothing downloaded), seeded, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def kurtosis(w: torch.Tensor) -> float:
    """Excess kurtosis: 0 for a Gaussian init, 3 for a Laplace (GG shape 1) one."""
    x = w.detach().double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2 - 3.0)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
