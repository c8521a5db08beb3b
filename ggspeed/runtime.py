"""``ggspeed.initialize``: ``deepspeed.initialize`` with GG Init, ACT and GCT from the ds_config.

The order matters and is the whole point of this module:

1. read and validate the ``"ggspeed"`` section (errors name the key, before anything is built);
2. ask each enabled feature whether it can serve the DeepSpeed settings (e.g. GCT refuses ZeRO-3);
3. check that every rank was started with the same section (a hash, then the differing key);
4. GG Init the model *before* DeepSpeed builds its optimizer (and broadcasts rank 0's weights);
5. ``deepspeed.initialize`` with the caller's arguments, unchanged;
6. install ACT and GCT on the engine *instance* (DeepSpeed 0.19.8 has no comm-hook registry);
7. hook the engine's optimizer step (schedules, telemetry) and its checkpoint save/load, so the
   per-rank ggspeed state (error-feedback residuals, schedules) survives a restart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from . import telemetry
from .config import ConfigError, GGSpeedConfig, from_ds_config, load_ds_config
from .registration import original_initialize

logger = logging.getLogger("ggspeed")

STATE_FILE = "ggspeed_rank{rank:05d}.pt"
STATE_VERSION = 1


@runtime_checkable
class Component(Protocol):
    """What runtime drives on an installed feature (GCTState, the ACT state)."""

    name: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def on_step(self, global_step: int) -> None: ...

    def scalars(self) -> dict[str, float]: ...


class GGSpeedHandle:
    """``engine.ggspeed``: the validated config, the installed components, the latest scalars."""

    def __init__(self, config: GGSpeedConfig) -> None:
        self.config = config
        self.components: dict[str, Component] = {}
        self._latest: dict[str, float] = {}

    def add(self, component: Component) -> None:
        if not isinstance(component, Component):
            raise TypeError(f"{component!r} does not implement the ggspeed component protocol")
        self.components[component.name] = component

    def scalars(self) -> dict[str, float]:
        """The scalars of the last log interval, flat: ``{"gct/bits_per_element": ...}``."""
        return dict(self._latest)

    def collect(self) -> dict[str, float]:
        """Every component's scalars since its last call, averaged over the ranks (collective)."""
        local = {
            f"{name}/{key}": float(value)
            for name, comp in self.components.items()
            for key, value in comp.scalars().items()
        }
        self._latest = telemetry.gather_mean(local)
        return self._latest

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config_hash": config_hash(self.config),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "components": {n: c.state_dict() for n, c in self.components.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{source}: ggspeed state version {state.get('version')!r} unsupported"
            )
        saved = state.get("components", {})
        for name, comp in self.components.items():
            if name in saved:
                comp.load_state_dict(saved[name])
            else:
                logger.warning(
                    "%s holds no ggspeed %s state (saved without it): %s starts fresh",
                    source,
                    name,
                    name,
                )


def config_hash(config: GGSpeedConfig) -> str:
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "ggspeed") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def check_same_config(config: GGSpeedConfig) -> None:
    """Raise on every rank if any rank was started with a different ``"ggspeed"`` section."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = config.model_dump(mode="json")
    digest = config_hash(config)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (digest, mine))
    reference_hash, reference = everyone[0]
    for rank, (other_hash, other) in enumerate(everyone):
        if other_hash == reference_hash:
            continue
        ref_flat, other_flat = _flatten(reference), _flatten(other)
        diffs = [
            f"{key}: rank 0 has {ref_flat.get(key)!r}, rank {rank} has {other_flat.get(key)!r}"
            for key in sorted(set(ref_flat) | set(other_flat))
            if ref_flat.get(key) != other_flat.get(key)
        ]
        raise ConfigError("ranks were started with different ggspeed settings: " + "; ".join(diffs))


def _ds_config_of(args: Any, config: Any, config_params: Any) -> dict[str, Any]:
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if source is None:
        raise ConfigError(
            "no ds_config: pass config=<dict or path> or args with --deepspeed_config"
        )
    if isinstance(source, Mapping):
        return dict(source)
    return load_ds_config(source)


def _state_path(directory: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return os.path.join(directory, STATE_FILE.format(rank=rank))


def _install_step_hook(engine: Any, handle: GGSpeedHandle) -> None:
    """After every optimizer step: advance schedules; every log_interval: telemetry.

    ``_take_model_step`` is where both DeepSpeedEngine.step and the PipelineEngine's optimizer
    step end, on every rank, once per global step: the one place to hook both.
    """
    original = engine._take_model_step
    interval = handle.config.log_interval

    @functools.wraps(original)
    def take_model_step(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        step = engine.global_steps
        for comp in handle.components.values():
            comp.on_step(step)
        if handle.components and step % interval == 0:
            telemetry.emit(engine, step, handle.collect())
        return result

    engine._take_model_step = take_model_step


def _install_checkpoint_hooks(engine: Any, handle: GGSpeedHandle) -> None:
    """Save/restore the per-rank ggspeed state next to DeepSpeed's checkpoint files."""
    save_original, load_original = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(save_original)
    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
        result = save_original(save_dir, tag, *args, **kwargs)
        if handle.components:
            folder = os.path.join(save_dir, tag)
            os.makedirs(folder, exist_ok=True)
            path = _state_path(folder)
            torch.save(handle.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            if dist.is_initialized():
                dist.barrier()
        return result

    @functools.wraps(load_original)
    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        load_path, client_state = load_original(load_dir, tag, *args, **kwargs)
        if load_path is None or not handle.components:
            return load_path, client_state
        path = _state_path(os.path.dirname(load_path))
        if not os.path.exists(path):
            logger.warning(
                "%s has no ggspeed state for this rank: error feedback and schedules start fresh",
                os.path.dirname(load_path),
            )
            return load_path, client_state
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved_world = state.get("world_size")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved_world != world:
            logger.warning(
                "%s was saved by %s ranks, this run has %s: per-rank ggspeed state is not "
                "transferable, error feedback and schedules start fresh",
                path,
                saved_world,
                world,
            )
            return load_path, client_state
        handle.load_state_dict(state, source=path)
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    *init_args: Any,
    config: Any = None,
    config_params: Any = None,
    **init_kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """Same arguments and return values as ``deepspeed.initialize``; switches on ggspeed's features.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``; ``engine.ggspeed`` is the
    :class:`GGSpeedHandle` (config, installed components, latest scalars).
    """
    import deepspeed

    from .cpu_threads import limit_codec_threads

    ds_config = _ds_config_of(args, config, config_params)
    cfg = from_ds_config(ds_config)
    limit_codec_threads()  # this rank's share of the CPUs for the codec's parallel kernels

    if cfg.gct.enabled:
        from . import gct

        gct.check_ds_config(ds_config, cfg.gct)
    if cfg.act.enabled:
        from . import act, hf

        act.check_ds_config(ds_config, cfg.act)
        hf.use_act_checkpointing(model)  # Hugging Face layers checkpoint through ggspeed's

    if init_kwargs.get("dist_init_required") is not False and not dist.is_initialized():
        deepspeed.init_distributed()
    check_same_config(cfg)

    if cfg.gg_init.enabled:
        from . import init as gg_init

        if model is None:
            raise ConfigError("ggspeed.gg_init.enabled is true but no model was passed")
        if not gg_init.is_gg_initialized(model):
            gg_init.apply_gg_init(model, cfg.gg_init)

    if config is not None:
        init_kwargs["config"] = config
    if config_params is not None:
        init_kwargs["config_params"] = config_params
    # DeepSpeed's own initialize: deepspeed.initialize may be ggspeed's registered wrapper.
    engine, optimizer, dataloader, lr_scheduler = original_initialize()(
        args, model, *init_args, **init_kwargs
    )

    handle = GGSpeedHandle(cfg)
    if cfg.act.enabled:
        handle.add(act.install(engine, cfg.act))
    if cfg.gct.enabled:
        handle.add(gct.install(engine, cfg.gct))
    engine.ggspeed = handle
    _install_step_hook(engine, handle)
    _install_checkpoint_hooks(engine, handle)
    return engine, optimizer, dataloader, lr_scheduler
