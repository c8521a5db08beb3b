"""The ``ggspeed.wire`` section: coding the traffic DeepSpeed sends at full width.

``param_gather`` is also the settings object of :func:`ggspeed.wire.install_coded_param_gather`
(``ggspeed.wire.ParamGatherSettings`` is this class), so a ds_config key and the library argument
are checked by the same code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from .base import Section


def _eg_order(value: Any) -> Any:
    if value == "auto" or (type(value) is int and 0 <= value <= 15):
        return value
    raise ValueError("allowed: an integer 0..15 or 'auto'")


EgOrder = Annotated[int | Literal["auto"], BeforeValidator(_eg_order)]
"""An Exp-Golomb order of the coded sections: an integer 0..15, or "auto" (chosen per chunk)."""

KEY = "ggspeed.wire.param_gather"
"""Where the parameter all-gather's settings live in a ds_config; errors name keys below it."""

PIPE_KEYS = {"activations": "ggspeed.wire.pipe_activations", "grads": "ggspeed.wire.pipe_grads"}
"""Where each direction of the coded pipeline sends is switched, by direction."""

TIED_KEY = "ggspeed.wire.tied_grads"
"""The switch of the coded tied-weight gradient all-reduce of a pipeline."""


def _block_size_field() -> Any:
    """The fields both coded sections share (one description for the README table)."""
    return Field(
        4096,
        ge=1,
        strict=True,
        description="Consecutive elements sharing one quantization step (32 bits of step per block).",
    )


def _eg_order_field() -> Any:
    return Field(
        "auto",
        description="Exp-Golomb order of the coded chunks: an integer 0..15, or 'auto' (per chunk).",
    )


def _zero_runs_field(default: bool) -> Any:
    return Field(
        default, strict=True, description="Code runs of zero levels (the codec's runs mode)."
    )


class ParamGatherConfig(Section):
    """The ZeRO-1/2 parameter all-gather after each optimizer step, sent as coded updates."""

    enabled: bool = Field(
        False,
        strict=True,
        description=(
            "Send each rank's updated ZeRO-1/2 partition as Exp-Golomb-coded quantized updates "
            "against the weights every replica holds, instead of DeepSpeed's full-width "
            "all-gather; replicas stay bit-identical, the fp32 master weights exact. Needs "
            "zero_optimization.stage 1 or 2 without offload_optimizer."
        ),
    )
    quant_step: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        strict=True,
        description=(
            "Quantization step as a multiple of the RMS of each block of the update (master "
            "minus the working weights, so it carries the previous step's quantization error). "
            "Larger: fewer bits, replicas further behind the masters (at most half a step per "
            "element; the error is sent again at the next step)."
        ),
    )
    block_size: int = _block_size_field()
    eg_order: EgOrder = _eg_order_field()
    zero_runs: bool = _zero_runs_field(True)
    capacity_slack: float = Field(
        0.1,
        ge=0,
        le=10,
        strict=True,
        description=(
            "Each rank's message goes out in a slot sized for the previous step's longest "
            "message x (1 + capacity_slack); a longer message costs a second all-gather of the "
            "remainders."
        ),
    )

    def coding(self) -> dict[str, Any]:
        """The settings that shape the coded messages (all but ``enabled``): a resume must
        match them."""
        return self.model_dump(exclude={"enabled"})


class PipeCodingConfig(Section):
    """One direction of a pipeline's stage-to-stage sends (activations forward, or their
    gradients back), sent as Exp-Golomb-coded quantized tensors."""

    enabled: bool = Field(
        False,
        strict=True,
        description=(
            "Send this direction of DeepSpeed's PipelineEngine stage-to-stage tensors as "
            "Exp-Golomb-coded levels with per-block steps relative to the block's RMS (shapes, "
            "dtypes and the schedule stay DeepSpeed's; non-float tensors and an attention mask "
            "go uncoded). Nothing to code without pipeline parallelism (a warning says so)."
        ),
    )
    quant_step: float = Field(
        0.25,
        gt=0,
        allow_inf_nan=False,
        strict=True,
        description=(
            "Quantization step as a multiple of the RMS of each block of the tensor. The error "
            "is at most half a step per element and is not sent again (each micro-batch's "
            "tensor is new). Larger: fewer bits, noisier activations or gradients."
        ),
    )
    block_size: int = _block_size_field()
    eg_order: EgOrder = _eg_order_field()
    zero_runs: bool = _zero_runs_field(False)
    capacity_slack: float = Field(
        0.1,
        ge=0,
        le=10,
        strict=True,
        description=(
            "Each message goes out in one slot sized, at both ends alike, for the previous "
            "message of its kind x (1 + capacity_slack); a longer message costs a second send of "
            "the remainder."
        ),
    )


class TiedGradsConfig(Section):
    """The all-reduce of tied weights' gradients between the pipeline stages that share them."""

    enabled: bool = Field(
        False,
        strict=True,
        description=(
            "Reduce the gradients of weights tied across pipeline stages (e.g. a tied embedding "
            "and output head) with GCT's compressed all-reduce and error feedback per tied "
            "weight, quantized as the ggspeed.gct section says (whether or not ggspeed.gct is "
            "enabled); the result stays bit-identical on the stages that share the weight."
        ),
    )


class WireConfig(Section):
    """Coded collectives beyond the data-parallel gradient reduction (which ggspeed.gct codes)."""

    param_gather: ParamGatherConfig = Field(
        default_factory=ParamGatherConfig,
        description="The ZeRO-1/2 parameter all-gather after each optimizer step, coded.",
    )
    pipe_activations: PipeCodingConfig = Field(
        default_factory=PipeCodingConfig,
        description="A pipeline's activations sent to the next stage, coded.",
    )
    pipe_grads: PipeCodingConfig = Field(
        default_factory=PipeCodingConfig,
        description="The gradients of a pipeline's activations sent to the previous stage, coded.",
    )
    tied_grads: TiedGradsConfig = Field(
        default_factory=TiedGradsConfig,
        description="The all-reduce of tied weights' gradients across pipeline stages, coded.",
    )
