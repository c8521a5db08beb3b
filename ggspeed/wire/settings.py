"""Settings of the coded ZeRO-1/2 parameter all-gather: the ds_config section's own model.

``ParamGatherSettings`` is :class:`ggspeed.config.wire.ParamGatherConfig`, the model of
``ggspeed.wire.param_gather``: one definition of each setting, its bounds and its description,
whether it comes from a ds_config or is passed to ``install_coded_param_gather``.
"""

from __future__ import annotations

from ..config.wire import KEY, ParamGatherConfig

__all__ = ["KEY", "ParamGatherSettings"]

ParamGatherSettings = ParamGatherConfig
