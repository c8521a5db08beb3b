"""The ``"ggspeed"`` section of a DeepSpeed ds_config.

DeepSpeed ignores unknown top-level keys, so ggspeed reads its own top-level ``"ggspeed"`` object
and leaves everything else to DeepSpeed's own validation. Errors name the full key path
(``ggspeed.gct.quant_step``), the bad value and what is allowed, before any training starts.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from .act import ACTConfig
from .base import Section
from .gct import GCTConfig
from .gg_init import GGInitConfig
from .wire import ParamGatherConfig, PipeCodingConfig, TiedGradsConfig, WireConfig

__all__ = [
    "ACTConfig",
    "ConfigError",
    "GCTConfig",
    "GGInitConfig",
    "GGSpeedConfig",
    "ParamGatherConfig",
    "PipeCodingConfig",
    "Section",
    "TiedGradsConfig",
    "WireConfig",
    "from_ds_config",
    "load_ds_config",
]

SECTION_KEY = "ggspeed"


class GGSpeedConfig(Section):
    """The whole ``"ggspeed"`` section. A missing sub-section means that feature is disabled."""

    log_interval: int = Field(
        10, ge=1, description="Steps between ggspeed log lines and monitor events."
    )
    gg_init: GGInitConfig = Field(default_factory=GGInitConfig)
    act: ACTConfig = Field(default_factory=ACTConfig)
    gct: GCTConfig = Field(default_factory=GCTConfig)
    wire: WireConfig = Field(default_factory=WireConfig)

    @property
    def any_enabled(self) -> bool:
        return (
            self.gg_init.enabled
            or self.act.enabled
            or self.gct.enabled
            or self.wire.param_gather.enabled
            or self.wire.pipe_activations.enabled
            or self.wire.pipe_grads.enabled
            or self.wire.tied_grads.enabled
        )


class ConfigError(ValueError):
    """A bad ``"ggspeed"`` section or ds_config file; the message names the key or file."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} in ds_config")
        seen[key] = value
    return seen


def load_ds_config(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read a ds_config as DeepSpeed does (a JSON file or a dict); errors name the file and line."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read ds_config file {path!r}: {e.strerror or e}") from e
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a ds_config must be a JSON object, got {type(data).__name__}")
    return data


def _model_at(path: tuple[Any, ...]) -> type[Section] | None:
    """The pydantic model that owns the key at ``path`` (for 'did you mean' suggestions)."""
    model: Any = GGSpeedConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            model = ann
        else:
            return None
    return model


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    key = ".".join([SECTION_KEY, *map(str, loc)])
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key{hint} (allowed keys: {', '.join(allowed)})"
    value = err.get("input")
    allowed = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"expected {ctx['expected']}"
    return f"{key}: got {value!r}; {allowed}"


def from_ds_config(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> GGSpeedConfig:
    """Validate the ``"ggspeed"`` section of a ds_config file or dict.

    A ds_config without the section yields a config with every feature disabled. Nothing else in
    the ds_config is read or validated here: that is DeepSpeed's job.
    """
    ds_config = load_ds_config(path_or_dict)
    section = ds_config.get(SECTION_KEY, {})
    if section is None:
        section = {}
    if isinstance(section, GGSpeedConfig):
        return section
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{SECTION_KEY}: got {section!r}; must be a JSON object with keys "
            f"{', '.join(GGSpeedConfig.model_fields)}"
        )
    try:
        return GGSpeedConfig.model_validate(dict(section))
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors(include_url=False)]
        head = "invalid ds_config 'ggspeed' section" if len(lines) > 1 else lines[0]
        body = "" if len(lines) == 1 else "\n  " + "\n  ".join(lines)
        raise ConfigError(head + body) from None
