"""Coding the traffic DeepSpeed sends at full width: the ZeRO-1/2 parameter all-gather, a
pipeline's activations and their gradients, and its tied-weight gradient all-reduce.

    state = install_coded_param_gather(engine, ParamGatherSettings(quant_step=1.0))
    ...train...; state.scalars()["bits_per_element"]

In a ds_config: ``"ggspeed": {"wire": {"param_gather": {"enabled": true}}}`` with
``ggspeed.initialize``. :mod:`ggspeed.wire.budget` counts the bytes every collective of a step
sends, by kind and across nodes (``engine.ggspeed.budget``). See docs/wire.md.
"""

from __future__ import annotations

from . import budget
from .coding import apply_update, decode_update, encode_update
from .pipe import CodedPipe, PipeStats, PipeWireError, install_coded_pipe
from .settings import KEY, ParamGatherSettings
from .tied import TiedGradState, install_coded_tied_grads
from .zero_gather import CodedParamGather, GatherStats, check_ds_config, install_coded_param_gather

__all__ = [
    "KEY",
    "CodedParamGather",
    "CodedPipe",
    "GatherStats",
    "ParamGatherSettings",
    "PipeStats",
    "PipeWireError",
    "TiedGradState",
    "apply_update",
    "budget",
    "check_ds_config",
    "decode_update",
    "encode_update",
    "install_coded_param_gather",
    "install_coded_pipe",
    "install_coded_tied_grads",
]
