"""GG Init: generalized-Gaussian weight initialization.

Two entry points: init methods for megatron-core's ``TransformerConfig`` (``megatron_init_methods``)
and whole-module initialization for any torch model (``apply_gg_init``), which
``ggspeed.initialize`` calls before DeepSpeed builds the optimizer unless the model is marked.
"""

from .methods import (
    GGInitMethod,
    gg_init_method,
    gg_kaiming_init_method,
    gg_lecun_init_method,
    gg_scaled_init_method,
    megatron_init_methods,
    normal_init_method,
    std_for_fan,
)
from .module import apply_gg_init, is_gg_initialized, mark_gg_initialized

__all__ = [
    "GGInitMethod",
    "apply_gg_init",
    "gg_init_method",
    "gg_kaiming_init_method",
    "gg_lecun_init_method",
    "gg_scaled_init_method",
    "is_gg_initialized",
    "mark_gg_initialized",
    "megatron_init_methods",
    "normal_init_method",
    "std_for_fan",
]
