"""A plain single-process GPT, small enough to read in one sitting.

It is the reference the benchmarks train (GG Init, ACT, GCT measured on real gradients and
activations) and the "plain PyTorch loop" baseline of the trainer benchmark. ``GPTConfig`` is
also the hyperparameter record of the 3D-parallel model, so the two describe the same network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

CheckpointFn = Callable[..., torch.Tensor]


@dataclass
class GPTConfig:
    """Shape of a GPT. ``d_ff`` defaults to 4 * d_model."""

    vocab_size: int = 4096
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0
    dropout: float = 0.0
    positions: Literal["learned", "rotary"] = "learned"
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotary position embeddings (base 10000), shape (seq_len, head_dim/2)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of the last dim of x (B, H, T, D) by the position angle."""
    t = x.shape[-2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:t], sin[:t]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.rotary = cfg.positions == "rotary"
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        if self.rotary:
            cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_head)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.rotary:
            q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    """Token (+ learned position) embedding, ``n_layer`` blocks, final norm, (tied) LM head.

    ``checkpoint_fn``, when set, wraps every block call as ``checkpoint_fn(block, x)``: the hook
    point for activation checkpointing (``ggspeed.act.checkpoint`` or DeepSpeed's).
    """

    def __init__(self, cfg: GPTConfig, checkpoint_fn: CheckpointFn | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.checkpoint_fn = checkpoint_fn
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Megatron's default: normal(0, std), output projections std / sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2.0 * self.cfg.n_layer)
        norm_gains = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name in norm_gains else nn.init.zeros_(p)
            elif name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def output_layer_names(self) -> list[str]:
        """Parameters that write into the residual stream (scaled by depth at init)."""
        return [
            n for n, _ in self.named_parameters() if n.endswith(("proj.weight", "fc_out.weight"))
        ]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len={self.cfg.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = self.checkpoint_fn(block, x) if self.checkpoint_fn is not None else block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss
