"""The ``ggspeed.act`` section: activation-constrained training settings.

ACT adds ``lambda_a(t) * R(a)`` for every tensor that ggspeed's activation-checkpoint function
stores (the inputs of checkpointed blocks), ramps ``lambda_a`` up over a warm-up, and optionally
keeps the stored tensors quantized and Exp-Golomb-coded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class ACTConfig(Section):
    """Activation-constrained training and compressed activation checkpoints."""

    enabled: bool = Field(
        False,
        description="Turn ACT on: ggspeed.act.checkpoint applies the rate constraint and "
        "(with compress) stores checkpoints EG-coded.",
    )
    lambda_target: float = Field(
        1e-3,
        ge=0.0,
        description="Target Lagrange multiplier lambda_a of the activation rate term, reached "
        "at the end of the warm-up. 0 keeps only compressed storage/telemetry.",
    )
    start_step: int = Field(
        0, ge=0, description="Optimizer steps with lambda_a = 0 before the warm-up starts."
    )
    warmup_steps: int = Field(
        500,
        ge=0,
        description="Optimizer steps over which lambda_a ramps from 0 to lambda_target "
        "(0: the full multiplier from start_step on).",
    )
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Shape of the warm-up ramp: linear, or cosine (half-cosine ease-in)."
    )
    blockwise: bool = Field(
        False,
        description="Switch the constraint on block by block, first to last: block b ramps over "
        "its own slice [b, b+1] * warmup_steps / num_blocks of the warm-up.",
    )
    num_blocks: int | None = Field(
        None,
        ge=1,
        description="Number of checkpointed blocks in the whole model (all pipeline stages); "
        "required with blockwise.",
    )
    rate: Literal["gg", "l1"] = Field(
        "gg",
        description="Rate term: gg = mean((|a| + eps)^nu) with nu re-estimated by moment "
        "matching; l1 = mean(|a|).",
    )
    initial_shape: float = Field(
        1.0,
        ge=0.1,
        le=3.0,
        description="GG shape nu used for the rate term until the first re-estimate.",
    )
    shape_refresh_interval: int = Field(
        100,
        ge=1,
        description="Optimizer steps between re-estimates of each block's GG shape nu "
        "(rate=gg, and the bits_target step search).",
    )
    eps: float = Field(
        1e-3,
        gt=0.0,
        description="Soft clipping of the GG rate, (|a| + eps)^nu: keeps dR/da finite for nu < 1.",
    )
    compress: bool = Field(
        False,
        description="Store checkpointed block inputs quantized and Exp-Golomb-coded (decoded "
        "for recomputation) instead of as full tensors.",
    )
    rel_step: float = Field(
        0.5,
        gt=0.0,
        le=4.0,
        description="Quantization step relative to each stored tensor's RMS (step = rel_step * "
        "RMS); also the step of the bits/element telemetry when compress is off. Scale-free: "
        "the stored bits then depend on the activations' shape only.",
    )
    bits_target: float | None = Field(
        None,
        gt=0.0,
        le=16.0,
        description="Instead of rel_step: pick each block's step so that the fitted GG's "
        "quantized entropy is this many bits/element (re-solved at every shape refresh).",
    )
    abs_step: float | None = Field(
        None,
        gt=0.0,
        description="Instead of rel_step: one fixed quantization step for every stored tensor. "
        "Then the rate constraint's shrinking of the activations lowers the stored bits "
        "directly (with a relative step only the shape matters).",
    )
    eg_order: int | Literal["auto"] = Field(
        "auto",
        description="Exp-Golomb order k of the stored streams: an integer 0-15, or auto (the "
        "codec picks k per chunk).",
    )
    log_interval: int = Field(
        10,
        ge=1,
        description="With compress off: optimizer steps between measurements of the "
        "checkpointed activations' EG code length (quantize + code-length costs time). "
        "With compress on every checkpoint is measured from its stored bytes.",
    )

    @model_validator(mode="after")
    def _check(self) -> ACTConfig:
        if self.blockwise and self.num_blocks is None:
            raise ValueError(
                "ggspeed.act.num_blocks: required when ggspeed.act.blockwise is true "
                "(the number of checkpointed blocks of the whole model)"
            )
        given = [k for k in ("rel_step", "bits_target", "abs_step") if k in self.model_fields_set]
        given = [k for k in given if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"ggspeed.act.{given[0]} and ggspeed.act.{given[1]}: give one of rel_step, "
                "bits_target, abs_step, not several"
            )
        if isinstance(self.eg_order, int) and not 0 <= self.eg_order <= 15:
            raise ValueError(
                f"ggspeed.act.eg_order: got {self.eg_order!r}; an integer 0-15 or 'auto'"
            )
        return self
