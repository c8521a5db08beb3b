"""``ggspeed.initialize``: ``deepspeed.initialize`` with GG Init, ACT, GCT and the coded
parameter all-gather (``ggspeed.wire``) from the ds_config.

The order matters and is the whole point of this module:

1. read and validate the ``"ggspeed"`` section (errors name the key, before anything is built);
2. ask each enabled feature whether it can serve the DeepSpeed settings (e.g. GCT and the coded
   parameter all-gather refuse ZeRO-3);
3. exchange every rank's verdict of 1-2 (a rank with a bad section must not leave its peers
   waiting), then check that every rank was started with the same section (a hash, then the
   differing key): every rank raises the same error;
4. GG Init the model *before* DeepSpeed builds its optimizer (and broadcasts rank 0's weights);
5. ``deepspeed.initialize`` with the caller's arguments, unchanged;
6. install ACT, GCT and the coded parameter all-gather on the engine *instance* (DeepSpeed
   0.19.8 has no comm-hook registry);
7. hook the engine's optimizer step (schedules, telemetry) and its checkpoint save/load, so the
   per-rank ggspeed state (error-feedback residuals, schedules) survives a restart, and a
   checkpoint counts only once every rank wrote it (see :mod:`ggspeed.checkpoint`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from . import checkpoint, consensus, telemetry
from .checkpoint import CheckpointError
from .config import ConfigError, GGSpeedConfig, from_ds_config, load_ds_config
from .registration import original_initialize

logger = logging.getLogger("ggspeed")

STATE_FILE = checkpoint.STATE_FILE
STATE_VERSION = 1


@runtime_checkable
class Component(Protocol):
    """What runtime drives on an installed feature (GCTState, the ACT state, CodedParamGather)."""

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
        self.extra_state: dict[str, tuple[Callable[[], dict], Callable[[dict], None]]] = {}
        self._latest: dict[str, float] = {}
        self.budget: Any = None  # ggspeed.wire.budget.WireBudget: bytes on the wire per step

    def add(self, component: Component) -> None:
        if not isinstance(component, Component):
            raise TypeError(f"{component!r} does not implement the ggspeed component protocol")
        self.components[component.name] = component

    def add_state(
        self, name: str, get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]
    ) -> None:
        """Save ``get()`` in this rank's checkpoint file and hand it to ``put`` on load.

        For per-rank state the caller owns (a trainer's RNG streams): it is then written and
        committed together with ggspeed's own, so a checkpoint holds all of it or does not count.
        Values must be tensors and plain Python data.
        """
        if name in self.components or name in self.extra_state:
            raise ValueError(f"ggspeed state {name!r} is already registered")
        self.extra_state[name] = (get, put)

    @property
    def has_state(self) -> bool:
        return bool(self.components or self.extra_state)

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
        if self.budget is not None:
            local.update({f"wire/{k}": v for k, v in self.budget.scalars().items()})
        self._latest = telemetry.gather_mean(local)
        return self._latest

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config_hash": config_hash(self.config),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "components": {
                **{n: c.state_dict() for n, c in self.components.items()},
                **{n: get() for n, (get, _) in self.extra_state.items()},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Hand each component its saved state; CheckpointError naming ``source`` and the fault."""
        state = checkpoint.check_state(state, source, STATE_VERSION)
        saved = state["components"]
        loaders = {n: c.load_state_dict for n, c in self.components.items()}
        loaders.update({n: put for n, (_, put) in self.extra_state.items()})
        for name, load in loaders.items():
            if name in saved:
                try:
                    load(saved[name])
                except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
                    raise CheckpointError(f"{source}: bad {name} state: {e!r}") from None
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


def check_same_config(config: GGSpeedConfig | None, error: str | None = None) -> None:
    """Raise on every rank if any rank's section was invalid (``error``) or differs from rank 0's.

    Both exchanges run on the bounded gloo side group (:mod:`ggspeed.consensus`): a rank whose
    section failed validation takes part too, so its peers learn of it instead of waiting.
    """
    consensus.agree(error, "invalid ggspeed configuration", ConfigError)
    assert config is not None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = config.model_dump(mode="json")
    digest = config_hash(config)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (digest, mine), group=consensus.side_group())
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


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _state_path(directory: str) -> str:
    return checkpoint.state_path(directory, _rank_world()[0])


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
        if handle.budget is not None:
            handle.budget.on_step(step)
        if (handle.components or handle.budget is not None) and step % interval == 0:
            telemetry.emit(engine, step, handle.collect())
        return result

    engine._take_model_step = take_model_step


def _commit_checkpoint(save_dir: str, tag: str, handle: GGSpeedHandle, save_latest: bool) -> None:
    """After DeepSpeed's files: this rank's ggspeed file, a verdict from all ranks, then rank 0
    records the checkpoint as complete and moves ``latest`` (see :mod:`ggspeed.checkpoint`)."""
    folder = os.path.join(save_dir, tag)
    rank, world = _rank_world()
    what = f"checkpoint {folder} not saved ('latest' still names the previous one)"
    error = None
    if handle.has_state:
        path = checkpoint.state_path(folder, rank)
        try:
            checkpoint.write_state(path, handle.state_dict())
        except Exception as e:  # OSError, or a component that cannot give its state
            error = f"{path}: {e!r}"
    consensus.agree(error, what, CheckpointError)
    if rank == 0:
        try:
            checkpoint.mark_complete(folder, world, handle.has_state)
            if save_latest:
                checkpoint.set_latest(save_dir, tag)
        except OSError as e:
            error = f"{folder}: {e!r}"
    consensus.agree(error, what, CheckpointError)


def _read_checkpoint_state(folder: str, handle: GGSpeedHandle) -> dict[str, Any] | None:
    """This rank's verified ggspeed state in ``folder``; None where the state starts fresh
    (saved without it, or by another number of ranks), with a warning; CheckpointError if the
    checkpoint is incomplete or this rank's file is damaged."""
    kind = checkpoint.completeness(folder)
    if kind == "incomplete":
        raise CheckpointError(
            f"{folder}: incomplete checkpoint (ggspeed files but no {checkpoint.COMPLETE_FILE}: "
            "a rank stopped while saving it); load an earlier tag"
        )
    if not handle.has_state:
        return None
    record: Any = {}
    if kind == "complete":
        marker = os.path.join(folder, checkpoint.COMPLETE_FILE)
        try:
            with open(marker, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{marker}: unreadable ({e})") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{marker}: holds a {type(record).__name__}, expected an object")
    if kind == "foreign" or not record.get("state_files"):
        logger.warning(
            "%s holds no ggspeed state (saved without it): error feedback, schedules and "
            "registered state (%s) start fresh",
            folder,
            ", ".join([*handle.components, *handle.extra_state]),
        )
        return None
    rank, world = _rank_world()
    if record.get("world_size") != world:
        logger.warning(
            "%s was saved by %s ranks, this run has %s: per-rank ggspeed state is not "
            "transferable, error feedback and schedules start fresh",
            folder,
            record.get("world_size"),
            world,
        )
        return None
    path = checkpoint.state_path(folder, rank)
    state = checkpoint.check_state(checkpoint.read_state(path), path, STATE_VERSION)
    if state["world_size"] != world:
        raise CheckpointError(
            f"{path}: saved by {state['world_size']} ranks but {checkpoint.COMPLETE_FILE} "
            f"says {world}"
        )
    return state


def _install_checkpoint_hooks(engine: Any, handle: GGSpeedHandle) -> None:
    """Save/restore the per-rank ggspeed state next to DeepSpeed's checkpoint files."""
    save_original, load_original = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(save_original)
    def save_checkpoint(
        save_dir: str,
        tag: Any = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
    ) -> Any:
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
        result = save_original(
            save_dir,
            tag,
            client_state={} if client_state is None else client_state,
            save_latest=False,  # moved by _commit_checkpoint once every rank's files are written
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        _commit_checkpoint(save_dir, tag, handle, save_latest)
        return result

    @functools.wraps(load_original)
    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        latest = os.path.join(load_dir, checkpoint.LATEST_FILE)
        if tag is None and os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
        if tag is None:
            return load_original(load_dir, tag, *args, **kwargs)
        folder = os.path.join(load_dir, str(tag))
        what = f"checkpoint {folder} not loaded"
        state, error = None, None
        try:
            state = _read_checkpoint_state(folder, handle)
        except CheckpointError as e:
            error = str(e)
        consensus.agree(error, what, CheckpointError)  # before anything is loaded
        load_path, client_state = load_original(load_dir, tag, *args, **kwargs)
        if load_path is None or state is None:
            return load_path, client_state
        try:
            handle.load_state_dict(state, source=_state_path(folder))
        except CheckpointError as e:
            error = str(e)
        consensus.agree(error, what, CheckpointError)
        return load_path, client_state

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def validate_ds_config(ds_config: Mapping[str, Any]) -> GGSpeedConfig:
    """Steps 1-2 of ``initialize`` on a ds_config dict, no process group needed: the validated
    ``"ggspeed"`` section, or ConfigError naming the key (e.g. GCT with ZeRO-3)."""
    cfg = from_ds_config(ds_config)
    if cfg.gct.enabled:
        from . import gct

        gct.check_ds_config(ds_config, cfg.gct)
    if cfg.act.enabled:
        from . import act

        act.check_ds_config(ds_config, cfg.act)
    if cfg.wire.param_gather.enabled:
        from . import wire

        wire.check_ds_config(ds_config)
    return cfg


def _validate(
    args: Any, config: Any, config_params: Any
) -> tuple[dict[str, Any] | None, GGSpeedConfig | None, ConfigError | None]:
    """Steps 1-2 on this rank: (ds_config, config, None), or (..., the ConfigError)."""
    ds_config = cfg = None
    try:
        ds_config = _ds_config_of(args, config, config_params)
        cfg = validate_ds_config(ds_config)
    except ConfigError as e:
        return ds_config, cfg, e
    return ds_config, cfg, None


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

    ds_config, cfg, error = _validate(args, config, config_params)
    multi_rank = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if error is not None and not multi_rank:
        raise error
    limit_codec_threads()  # this rank's share of the CPUs for the codec's parallel kernels

    if init_kwargs.get("dist_init_required") is not False and not dist.is_initialized():
        deepspeed.init_distributed()
    check_same_config(cfg, None if error is None else str(error))
    assert cfg is not None and ds_config is not None
    if cfg.act.enabled:
        from . import hf

        hf.use_act_checkpointing(model)  # Hugging Face layers checkpoint through ggspeed's

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
        from . import act

        handle.add(act.install(engine, cfg.act))
    if cfg.gct.enabled:
        from . import gct

        handle.add(gct.install(engine, cfg.gct))
    if cfg.wire.param_gather.enabled:
        from . import wire

        handle.add(wire.install_coded_param_gather(engine, cfg.wire.param_gather))
    w = cfg.wire
    if w.pipe_activations.enabled or w.pipe_grads.enabled or w.tied_grads.enabled:
        from . import wire

        pipe = wire.install_coded_pipe(
            engine,
            w.pipe_activations if w.pipe_activations.enabled else None,
            w.pipe_grads if w.pipe_grads.enabled else None,
        )
        tied = wire.install_coded_tied_grads(engine, cfg.gct) if w.tied_grads.enabled else None
        for component in (pipe, tied):
            if component is not None:
                handle.add(component)
    from .wire import budget

    handle.budget = budget.install(engine)  # last: its hooks sit outside the features' own
    engine.ggspeed = handle
    _install_step_hook(engine, handle)
    _install_checkpoint_hooks(engine, handle)
    return engine, optimizer, dataloader, lr_scheduler
