"""The ``ggspeed.gct`` section: gradient-constrained training and compressed communication."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class GCTConfig(Section):
    """Gradient-constrained training with Exp-Golomb-coded gradient exchange."""

    enabled: bool = Field(
        False,
        description="Replace the data-parallel gradient all-reduce with ggspeed's compressed one.",
    )
    step_mode: Literal["relative", "absolute"] = Field(
        "relative",
        description=(
            "How the quantization step is set: 'relative' = quant_step x the largest per-rank "
            "RMS of (gradient + residual) in each block, agreed by a small MAX all-reduce before "
            "quantizing; 'absolute' = quant_step as is."
        ),
    )
    quant_step: float = Field(
        1.0,
        gt=0,
        description=(
            "Quantization step: a multiple of the gradient RMS (step_mode 'relative') or an "
            "absolute value (step_mode 'absolute', e.g. 1e-3 as in the authors' code)."
        ),
    )
    block_size: int = Field(
        4096,
        ge=0,
        description=(
            "Elements sharing one quantization step (consecutive, so roughly per layer): "
            "steps follow each block's scale at 2 x 32 bits of agreement per block; 0 = one "
            "step per bucket."
        ),
    )
    rdoq_mu: float = Field(
        0.0,
        ge=0,
        description=(
            "Rate-distortion optimized quantization multiplier, in step^2 per bit: each element "
            "takes floor or ceil of |x|/step minimizing (x/step - q)^2 + mu * EG bits. 0 = plain "
            "rounding."
        ),
    )
    eg_order: int | Literal["auto"] = Field(
        0,
        description="Exp-Golomb order of the coded chunks: an integer 0..15, or 'auto' (per chunk).",
    )
    zero_runs: bool = Field(
        True,
        description=(
            "Code runs of zeros (the codec's runs mode): what takes sparse gradients below "
            "1 bit/element."
        ),
    )
    exchange: Literal["auto", "allgather", "reduce_scatter"] = Field(
        "auto",
        description=(
            "How ranks exchange the coded levels: 'allgather' (every rank's stream to every "
            "rank: fewest bytes for 2 ranks, received volume grows with the world size; CPU "
            "buckets on gloo go point to point, with no collective after the step agreement), "
            "'reduce_scatter' (coded chunks summed by their owners, then an "
            "all-gather of the coded sums: volume independent of the world size), 'auto' "
            "(allgather for 2 ranks, else reduce_scatter). Same result bit for bit."
        ),
    )
    hierarchical: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Hierarchical data parallelism when the data-parallel group spans several nodes with "
            "several ranks on each: a full-precision reduce-scatter within the node, the "
            "compressed all-reduce across nodes (local rank i carries chunk i, 1/R of the "
            "bucket), an all-gather within the node; only coded bytes cross nodes. 'auto' = on "
            "when the launcher gives the node layout (CROSS_RANK from deepspeed's launcher, "
            "GROUP_RANK from torchrun) and every data-parallel group has the same number (> 1) of "
            "ranks on each of its nodes (> 1), else the flat path (logged); true = on or refused "
            "at install; false = the flat path."
        ),
    )
    error_feedback: bool = Field(
        True,
        description=(
            "Carry each rank's quantization error into its next reduction of the same bucket "
            "(saved in checkpoints)."
        ),
    )
    constraint_lambda: float = Field(
        0.0,
        ge=0,
        description=(
            "lambda_g of the gradient constraint g' = g + lambda_g sign(g) h (h the diagonal "
            "secant Hessian estimate); 0 disables the constraint."
        ),
    )
    constraint_warmup_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps over which lambda_g ramps linearly from 0 to constraint_lambda.",
    )
    constraint_eps: float = Field(
        1e-12,
        gt=0,
        description=(
            "Secant guard: elements whose parameter moved less than this get h = 0 (no "
            "division by a tiny difference)."
        ),
    )
    constraint_clip: float = Field(
        1e4,
        gt=0,
        description="Secant estimates h are clipped to [-constraint_clip, constraint_clip].",
    )

    @model_validator(mode="after")
    def _check(self) -> GCTConfig:
        if isinstance(self.eg_order, int) and not 0 <= self.eg_order <= 15:
            raise ValueError(f"eg_order: got {self.eg_order}; allowed: an integer 0..15 or 'auto'")
        if self.constraint_warmup_steps and not self.constraint_lambda:
            raise ValueError(
                "constraint_warmup_steps is set but constraint_lambda is 0: set constraint_lambda "
                "> 0 or remove constraint_warmup_steps"
            )
        return self
