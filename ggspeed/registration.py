"""Registration: every ``deepspeed.initialize`` whose ds_config has a ``"ggspeed"`` section runs
through :func:`ggspeed.initialize`, with no change to the training script.

How it gets armed (see docs/integration.md for why this way):

- installing ggspeed puts ``ggspeed-registration.pth`` into site-packages; Python runs its one
  line at start-up, which calls :func:`arm` unless ``GGSPEED_DISABLE`` is set;
- :func:`arm` imports neither torch nor DeepSpeed. If DeepSpeed is already imported it wraps
  ``deepspeed.initialize`` at once; otherwise it puts a finder on ``sys.meta_path`` that waits for
  the ``import deepspeed`` statement, lets the real loader run, then wraps the attribute and
  leaves ``sys.meta_path``. A script (or accelerate, or the Hugging Face Trainer) that then says
  ``deepspeed.initialize(...)`` or ``from deepspeed import initialize`` gets the wrapper;
- ``python -m ggspeed.run script.py`` (and ``deepspeed --module ggspeed.run script.py``) arms it
  explicitly, for interpreters that skip site-packages' ``.pth`` files.

The wrapper reads the config the way DeepSpeed will (dict, ``config``/``config_params``, path or
base64 string, or ``args.deepspeed_config``). Without a ``"ggspeed"`` section it calls the
original with the very same arguments and nothing else happens; with one it calls
:func:`ggspeed.runtime.initialize`, which calls the original ``deepspeed.initialize`` itself
(:func:`original_initialize`), so there is no recursion and no double installation.
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType

# Imported at every interpreter start (through the .pth file): only modules Python has already
# loaded by then (no typing, logging, importlib.abc: several milliseconds each).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from typing import Any

__all__ = [
    "DISABLE_ENV",
    "arm",
    "disabled",
    "is_registered",
    "original_initialize",
    "register",
]

DISABLE_ENV = "GGSPEED_DISABLE"
SECTION_KEY = "ggspeed"
_ORIGINAL = "__ggspeed_original__"
_FALSE = ("", "0", "false", "no", "off")


def disabled() -> bool:
    """True when ``GGSPEED_DISABLE`` is set to anything but empty/0/false/no/off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in _FALSE


# ----------------------------------------------------------------------------- arming
class _Loader:
    """The real loader of ``deepspeed``, plus :func:`register` once its module has run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: importlib.resources and friends ask the spec's loader.
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        _leave_meta_path()
        register(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _DeepSpeedFinder:
    """Waits on ``sys.meta_path`` for the first ``import deepspeed``; never finds anything else."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "deepspeed":
            return None
        # Stay on sys.meta_path until the module has run: importlib.util.find_spec("deepspeed")
        # (transformers' availability check) asks finders without importing anything.
        for finder in sys.meta_path:
            if isinstance(finder, _DeepSpeedFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def _leave_meta_path() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _DeepSpeedFinder)]


def arm() -> bool:
    """Make the next (or the current) ``deepspeed`` module route through ggspeed; idempotent.

    Returns False, and does nothing, when ``GGSPEED_DISABLE`` is set. Cheap: no torch, no
    DeepSpeed import; at most one finder on ``sys.meta_path`` until DeepSpeed is imported.
    """
    if disabled():
        return False
    module = sys.modules.get("deepspeed")
    if module is not None and hasattr(module, "initialize"):
        register(module)
    elif not any(isinstance(f, _DeepSpeedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedFinder())
    return True


# ----------------------------------------------------------------------------- the wrapper
def is_registered(module: ModuleType | None = None) -> bool:
    """True when ``module.initialize`` (default: the imported ``deepspeed``) is ggspeed's wrapper."""
    module = module if module is not None else sys.modules.get("deepspeed")
    return module is not None and hasattr(getattr(module, "initialize", None), _ORIGINAL)


def original_initialize() -> Callable[..., Any]:
    """DeepSpeed's own ``initialize``, whether or not the registered wrapper is in place."""
    import deepspeed

    fn = deepspeed.initialize
    return getattr(fn, _ORIGINAL, fn)


def register(module: ModuleType) -> None:
    """Replace ``module.initialize`` (DeepSpeed's) by the routing wrapper; idempotent."""
    original = module.initialize
    if hasattr(original, _ORIGINAL):
        return

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        if disabled():
            return original(*args, **kwargs)
        routed = _route(original, args, kwargs)
        if routed is None:
            return original(*args, **kwargs)
        return _initialize_with_ggspeed(routed)

    setattr(initialize, _ORIGINAL, original)
    module.initialize = initialize


def _route(
    original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """The call's arguments by name when its config holds a ggspeed section, else None.

    None also when the arguments do not bind or the config cannot be read: DeepSpeed then raises
    its own error for them, exactly as without ggspeed.
    """
    import inspect
    from collections.abc import Mapping

    try:
        bound = inspect.signature(original).bind(*args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    key = next((k for k in ("config", "config_params") if named.get(k) is not None), None)
    source = named[key] if key else None
    if source is None:
        cli = named.get("args")
        source = getattr(cli, "deepspeed_config", None) or getattr(cli, "deepscale_config", None)
    loaded = _load(source)
    if loaded is None or SECTION_KEY not in loaded:
        return None
    if key is not None and not isinstance(source, Mapping) and not os.path.exists(str(source)):
        named[key] = loaded  # a base64 string: hand ggspeed the decoded dict
    return named


def _load(source: Any) -> Mapping[str, Any] | None:
    """The ds_config as DeepSpeed reads it (dict, JSON/hjson path, base64), or None."""
    from collections.abc import Mapping

    if source is None:
        return None
    if isinstance(source, Mapping):
        return source
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

        loaded = load_ds_config(os.fspath(source) if isinstance(source, os.PathLike) else source)
    except Exception:  # unreadable: DeepSpeed reports it itself
        return None
    return loaded if isinstance(loaded, Mapping) else None


def _initialize_with_ggspeed(named: dict[str, Any]) -> Any:
    """``ggspeed.runtime.initialize`` for a routed call; a refusal is logged with the rank first."""
    import logging

    from .config import ConfigError
    from .runtime import initialize as ggspeed_initialize

    log = logging.getLogger("ggspeed")
    _ensure_handler(log)
    try:
        result = ggspeed_initialize(**named)
    except ConfigError as e:
        log.error("ggspeed (rank %s) refused the ds_config: %s", _rank(), e)
        raise
    engine = result[0]
    handle = getattr(engine, "ggspeed", None)
    if handle is not None and _rank() in ("0", "?"):
        cfg = handle.config
        on = [n for n in ("gg_init", "act", "gct") if getattr(cfg, n).enabled]
        log.info(
            "[ggspeed] deepspeed.initialize ran through ggspeed (registered): %s",
            ", ".join(on) if on else "no feature enabled",
        )
    return result


def _rank() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_rank())
    return os.environ.get("RANK", "?")


def _ensure_handler(log: Any) -> None:
    """Make ggspeed's INFO lines (refusals, telemetry) visible in a script that set up no logging.

    Only when neither the ``ggspeed`` logger nor the root logger has a handler: a script that
    configured logging keeps its own choices.
    """
    import logging

    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
