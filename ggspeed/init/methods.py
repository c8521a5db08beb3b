"""GG init methods of the kind megatron-core's ``TransformerConfig.init_method`` takes.

An init method fills a tensor in place. Megatron calls it on the full master weight (CPU
initialization, then splits it) or on this rank's shard inside the tensor-parallel RNG tracker
(GPU initialization). So the std is fixed when the method is made, never derived from the
tensor's shape, and the draws come from the generator of the tensor's own device (the one
Megatron seeded), never from a CPU tensor copied over.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import gg

__all__ = [
    "GGInitMethod",
    "gg_init_method",
    "gg_kaiming_init_method",
    "gg_lecun_init_method",
    "gg_scaled_init_method",
    "megatron_init_methods",
    "normal_init_method",
    "std_for_fan",
]


class GGInitMethod:
    """``init(tensor)``: fill ``tensor`` in place from GG(0, scale, shape) with standard deviation
    ``std``. shape = 2 is exactly ``torch.nn.init.normal_(tensor, 0, std)`` (same draws)."""

    def __init__(self, shape: float, std: float, generator: torch.Generator | None = None) -> None:
        self.shape = gg._check_shape(shape)
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a positive finite number, got {std!r}")
        self.std = float(std)
        self.scale = gg.scale_for_std(self.shape, self.std)
        self.generator = generator

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.shape == 2.0:
                return tensor.normal_(0.0, self.std, generator=self.generator)
            return gg.sample(self.shape, self.scale, out=tensor, generator=self.generator)

    def __repr__(self) -> str:
        return f"GGInitMethod(shape={self.shape:g}, std={self.std:g})"


class _NormalInitMethod:
    """Megatron's ``init_method_normal`` as a picklable object with an optional generator."""

    def __init__(self, std: float, generator: torch.Generator | None = None) -> None:
        self.std = float(std)
        self.generator = generator

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(0.0, self.std, generator=self.generator)

    def __repr__(self) -> str:
        return f"NormalInitMethod(std={self.std:g})"


def gg_init_method(
    shape: float, std: float, generator: torch.Generator | None = None
) -> GGInitMethod:
    """GG init with a given std (Megatron's ``init_method_std``); ``generator`` None uses the
    default generator of the tensor's device, which Megatron's callers seed."""
    return GGInitMethod(shape, std, generator)


def gg_scaled_init_method(
    shape: float, std: float, num_layers: int, generator: torch.Generator | None = None
) -> GGInitMethod:
    """Output-layer variant: std / sqrt(2 * num_layers), as Megatron's scaled_init_method_normal."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return GGInitMethod(shape, std / math.sqrt(2.0 * num_layers), generator)


def normal_init_method(std: float, generator: torch.Generator | None = None) -> _NormalInitMethod:
    """Gaussian init with a given std (for embeddings when ``gg_init.embeddings`` = gaussian)."""
    return _NormalInitMethod(std, generator)


def std_for_fan(fan: int, xi: float) -> float:
    """std = sqrt(xi / fan): LeCun (xi = 1), Kaiming (xi = 2), LeakyReLU (xi = 2 / (1 + k^2))."""
    if int(fan) < 1:
        raise ValueError(f"fan must be a positive integer, got {fan!r}")
    if not (math.isfinite(xi) and xi > 0):
        raise ValueError(f"xi must be positive, got {xi!r}")
    return math.sqrt(xi / int(fan))


def gg_lecun_init_method(
    shape: float, fan: int, xi: float = 1.0, generator: torch.Generator | None = None
) -> GGInitMethod:
    """GG with Var = xi / fan, xi = 1. The fan is given by the caller (a shard's shape is not the
    layer's fan)."""
    return GGInitMethod(shape, std_for_fan(fan, xi), generator)


def gg_kaiming_init_method(
    shape: float, fan: int, xi: float = 2.0, generator: torch.Generator | None = None
) -> GGInitMethod:
    """GG with Var = xi / fan, xi = 2 (ReLU); the fan is given by the caller."""
    return GGInitMethod(shape, std_for_fan(fan, xi), generator)


def megatron_init_methods(
    cfg: Any, num_layers: int, *, hidden_size: int | None = None
) -> tuple[Any, Any, Any]:
    """``(init_method, output_layer_init_method, embedding_init_method)`` for TransformerConfig.

    ``cfg`` is a :class:`ggspeed.config.GGInitConfig`. Rule 'megatron' uses ``std``; the fan
    rules (lecun, kaiming, paper) need ``hidden_size``: Megatron passes one init method for all
    hidden layers, so every one uses fan = hidden_size (exact for QKV, attention output and
    MLP up; the MLP down projection's true fan-in is ffn_hidden_size). Embeddings are always
    set explicitly (else Megatron would reuse the GG init_method for them).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if cfg.rule == "megatron":
        std = cfg.effective_std
        emb_std = cfg.embedding_std if cfg.embedding_std is not None else std
    else:
        if hidden_size is None:
            raise ValueError(
                f"ggspeed.gg_init.rule {cfg.rule!r} needs the layer fan: pass hidden_size to "
                "megatron_init_methods, or use rule 'megatron' with std"
            )
        std = std_for_fan(hidden_size, cfg.effective_xi)
        emb_std = cfg.embedding_std if cfg.embedding_std is not None else std
    init = gg_init_method(cfg.shape, std)
    out_init = (
        gg_scaled_init_method(cfg.shape, std, num_layers)
        if cfg.output_layer_scaling and cfg.rule != "paper"
        else init
    )
    if cfg.embeddings == "gg":
        emb = gg_init_method(cfg.shape, emb_std)
    else:  # gaussian, or untouched: Megatron's own default, normal(0, embedding std)
        emb = normal_init_method(emb_std)
    return init, out_init, emb
