"""ggspeed: generalized-Gaussian priors for large-scale pretraining on DeepSpeed and Megatron-Core.

``import ggspeed`` is cheap and has no side effects: submodules (and DeepSpeed) load on first use.
The one entry point for training scripts is :func:`ggspeed.initialize`, a drop-in for
``deepspeed.initialize`` that switches on GG Init, ACT and GCT from the ds_config's
``"ggspeed"`` section.
"""

from __future__ import annotations

import importlib

# The registration .pth imports this package at every interpreter start: no typing import here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "act",
    "codec",
    "config",
    "cpu_threads",
    "data",
    "gct",
    "gg",
    "hf",
    "init",
    "models",
    "registration",
    "runtime",
    "telemetry",
}

__all__ = ["__version__", "initialize", *sorted(_SUBMODULES)]


def initialize(*args: Any, **kwargs: Any) -> Any:
    """``deepspeed.initialize`` with ggspeed's features applied; see :func:`ggspeed.runtime.initialize`."""
    from .runtime import initialize as _initialize

    return _initialize(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ggspeed' has no attribute {name!r}")
