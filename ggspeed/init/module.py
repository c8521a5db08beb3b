"""GG Init of a whole ``torch.nn.Module`` (plain torch, Hugging Face style, megatron-core layers).

Layer types are recognised by class so the fan convention is right for each: torch ``Linear``
stores (out, in), GPT-2's ``Conv1D`` stores (in, out), embeddings (num, dim); megatron-core's
Column/RowParallelLinear hold a shard, so their fan comes from the full layer size.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import sys
from typing import Any

import torch
from torch import nn

from ..config.gg_init import DEFAULT_OUTPUT_LAYERS, GGInitConfig
from .methods import GGInitMethod, std_for_fan

__all__ = ["apply_gg_init", "is_gg_initialized", "mark_gg_initialized"]

_MARK = "_ggspeed_gg_initialized"
_LAYER_ATTRS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers", "num_hidden_layer")


def mark_gg_initialized(module: nn.Module) -> nn.Module:
    """Record that ``module``'s weights already come from GG Init (ggspeed.initialize skips it)."""
    setattr(module, _MARK, True)
    return module


def is_gg_initialized(module: Any) -> bool:
    """True when ``module`` (or the module a wrapper holds as ``.module``) was marked."""
    return bool(
        getattr(module, _MARK, False) or getattr(getattr(module, "module", None), _MARK, False)
    )


def _num_layers(model: nn.Module, cfg: GGInitConfig) -> int:
    if cfg.num_layers is not None:
        return cfg.num_layers
    for holder in (getattr(model, "cfg", None), getattr(model, "config", None), model):
        for attr in _LAYER_ATTRS:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(
        "ggspeed.gg_init.num_layers: output_layer_scaling needs the number of transformer layers "
        f"and {type(model).__name__} does not say (no {'/'.join(_LAYER_ATTRS)}); set num_layers "
        "or output_layer_scaling: false"
    )


def _param_seed(seed: int, name: str, extra: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{extra}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _tp_info() -> tuple[int, int]:
    # Only when the caller already uses megatron-core: importing it costs seconds.
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return 0, 1


def _kind(module: nn.Module) -> str | None:
    cls = type(module).__name__
    if cls in ("ColumnParallelLinear", "RowParallelLinear"):
        return cls
    if cls == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding) or cls in ("VocabParallelEmbedding", "Embedding"):
        return "embedding"
    if "Norm" in cls:
        return "norm"
    return None


def _fans(kind: str, w: torch.Tensor, module: nn.Module, tp: int) -> tuple[int, int]:
    """(fan_in, fan_out) of the whole layer (not of this rank's shard)."""
    if kind == "conv1d":
        return int(w.shape[0]), int(w.shape[1])
    if kind == "ColumnParallelLinear":
        return int(w.shape[1]), int(getattr(module, "output_size", w.shape[0] * tp))
    if kind == "RowParallelLinear":
        return int(getattr(module, "input_size", w.shape[1] * tp)), int(w.shape[0])
    if kind == "embedding":  # fan-in of a one-hot lookup is not useful: use the embedding dim
        return int(w.shape[1]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def apply_gg_init(
    model: nn.Module,
    cfg: GGInitConfig | dict[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, str]:
    """Initialize ``model``'s weights in place from GG (see ``ggspeed.config.GGInitConfig``).

    2-D weights of Linear / Conv1D / Embedding (and megatron parallel) layers get GG draws with
    the configured std rule, output projections scaled by 1/sqrt(2 L) when asked; their biases
    are zeroed; norm gains are set to 1 and norm biases to 0. Other parameters stay as built.
    Rule 'paper' reproduces the method authors' rule instead: every 2-D parameter (embeddings
    included) with Var = xi / shape[0], 1-D weights 1, biases 0. Returns a description of what
    each parameter got (for logs). Marks the model as GG-initialized.
    """
    if cfg is None:
        cfg = GGInitConfig(enabled=True)
    elif isinstance(cfg, dict):
        cfg = GGInitConfig.model_validate(cfg)
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        raise ValueError(
            "apply_gg_init: parameters are ZeRO-3 partitioned (built under deepspeed.zero.Init); "
            "apply GG Init before partitioning or build the model outside zero.Init"
        )
    tp_rank, tp_size = _tp_info()
    report: dict[str, str] = {}

    def gen_for(name: str, p: torch.Tensor) -> torch.Generator | None:
        if cfg.seed is None:
            return generator
        parallel = bool(getattr(p, "tensor_model_parallel", False))
        g = torch.Generator(device=p.device)
        return g.manual_seed(_param_seed(cfg.seed, name, tp_rank if parallel else 0))

    def draw(name: str, p: torch.Tensor, std: float, gaussian: bool = False) -> None:
        g = gen_for(name, p)
        with torch.no_grad():
            if gaussian:
                p.normal_(0.0, std, generator=g)
                report[name] = f"normal(std={std:.4g})"
            else:
                GGInitMethod(cfg.shape, std, g)(p)
                report[name] = f"gg(shape={cfg.shape:g}, std={std:.4g})"

    def const(name: str, p: torch.Tensor, value: float) -> None:
        with torch.no_grad():
            p.fill_(value)
        report[name] = f"const({value:g})"

    if cfg.rule == "paper":
        xi = cfg.effective_xi
        for name, p in params:
            if p.dim() == 2:
                draw(name, p, std_for_fan(p.shape[0], xi))
            elif p.dim() == 1:
                const(name, p, 0.0 if name.endswith("bias") else 1.0)
        return _finish(model, report, params)

    scaled = cfg.output_layer_scaling
    depth = _num_layers(model, cfg) if scaled else 1
    if cfg.output_layers is not None:
        out_patterns = list(cfg.output_layers)
    elif callable(getattr(model, "output_layer_names", None)):
        out_patterns = list(model.output_layer_names())
    else:
        out_patterns = list(DEFAULT_OUTPUT_LAYERS)
    names = {id(p): n for n, p in params}  # named_parameters() names tied weights once
    done: set[int] = set()
    for _, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in done or id(p) not in names:
                continue
            done.add(id(p))
            name = names[id(p)]
            if kind == "norm":
                const(name, p, 1.0 if pname == "weight" and p.dim() == 1 else 0.0)
                continue
            if pname == "bias":
                const(name, p, 0.0)
                continue
            if pname != "weight" or p.dim() != 2:
                continue
            fan_in, fan_out = _fans(kind, p, module, tp_size)
            if kind == "embedding":
                if cfg.embeddings == "untouched":
                    report[name] = "untouched"
                    continue
                if cfg.embedding_std is not None:
                    std = cfg.embedding_std
                elif cfg.rule == "megatron":
                    std = cfg.effective_std
                else:
                    std = std_for_fan(fan_in, cfg.effective_xi)
                draw(name, p, std, gaussian=cfg.embeddings == "gaussian")
                continue
            if cfg.rule == "megatron":
                std = cfg.effective_std
            else:
                std = std_for_fan(fan_in if cfg.fan == "in" else fan_out, cfg.effective_xi)
            if scaled and any(fnmatch.fnmatchcase(name, pat) for pat in out_patterns):
                std /= math.sqrt(2.0 * depth)
            draw(name, p, std)
    return _finish(model, report, params)


def _finish(
    model: nn.Module, report: dict[str, str], params: list[tuple[str, torch.Tensor]]
) -> dict[str, str]:
    for name, _ in params:
        report.setdefault(name, "untouched")
    mark_gg_initialized(model)
    return report
