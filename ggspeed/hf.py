"""ACT for Hugging Face models: their gradient checkpointing calls ggspeed's checkpoint function.

``transformers`` models checkpoint each layer through the module attribute
``_gradient_checkpointing_func`` (set by ``gradient_checkpointing_enable`` /
``activation_checkpointing_enable``, which the Trainer calls for ``gradient_checkpointing=True``
before it builds the DeepSpeed engine). That function is ``torch.utils.checkpoint.checkpoint``
with keyword options bound; ggspeed replaces it on every such module by
:func:`ggspeed.act.checkpoint`, so the rate gradient and the coded storage apply to the layer
inputs. Nothing here imports ``transformers``: models are recognised by those attributes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .config import ConfigError

__all__ = ["checkpointed_layers", "is_hf_model", "use_act_checkpointing"]

_FUNC = "_gradient_checkpointing_func"


def is_hf_model(model: Any) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (or a model built the same way)."""
    return isinstance(model, torch.nn.Module) and hasattr(model, "supports_gradient_checkpointing")


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward runs under Hugging Face gradient checkpointing."""
    return [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True and callable(getattr(m, _FUNC, None))
    ]


def _is_torch_checkpoint(fn: Any) -> bool:
    import torch.utils.checkpoint as tuc

    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is tuc.checkpoint


def _ggspeed_checkpoint(function: Any, *args: Any, **_options: Any) -> Any:
    """``ggspeed.act.checkpoint`` with the signature Hugging Face layers call.

    The keyword options of ``torch.utils.checkpoint.checkpoint`` (use_reentrant, ...) do not
    apply: ggspeed's function is always reentrant and restores the RNG states itself.
    """
    from .act import checkpoint

    return checkpoint(function, *args)


def use_act_checkpointing(model: Any) -> int:
    """Point a Hugging Face model's gradient checkpointing at ggspeed's; returns the layer count.

    A model that is not a Hugging Face model is left alone (0). Raises :class:`ConfigError`
    naming ``ggspeed.act.enabled`` when ACT could not act on a Hugging Face model: gradient
    checkpointing off (nothing would be checkpointed), or a checkpointing function other than
    torch's (e.g. ``offload=True``), which ggspeed would silently replace.
    """
    if not is_hf_model(model):
        return 0
    layers = checkpointed_layers(model)
    if not layers:
        raise ConfigError(
            "ggspeed.act.enabled: the Hugging Face model "
            f"{type(model).__name__} has gradient checkpointing off, so ACT would never run; "
            "set gradient_checkpointing=True in TrainingArguments (or call "
            "model.gradient_checkpointing_enable() before deepspeed.initialize), or set "
            "ggspeed.act.enabled to false"
        )
    for layer in layers:
        fn = getattr(layer, _FUNC)
        if fn is _ggspeed_checkpoint:
            continue
        if not _is_torch_checkpoint(fn):
            raise ConfigError(
                "ggspeed.act.enabled: the Hugging Face model "
                f"{type(model).__name__} checkpoints through {fn!r}, not "
                "torch.utils.checkpoint.checkpoint (e.g. activation offload); ggspeed would "
                "replace it. Turn that option off or set ggspeed.act.enabled to false"
            )
        setattr(layer, _FUNC, _ggspeed_checkpoint)
    return len(layers)
