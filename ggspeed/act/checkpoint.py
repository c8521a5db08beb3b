"""``ggspeed.act.checkpoint``: a reentrant activation checkpoint that carries ACT.

A drop-in for ``deepspeed.checkpointing.checkpoint(function, *args)``: the forward runs under
no_grad and keeps only the inputs; backward restores the RNG states of the forward (CPU, the
accelerator's, DeepSpeed's and, when loaded, Megatron's model-parallel trackers) so dropout
masks repeat, recomputes with grad, and backpropagates. On top of that, with an active
:class:`~ggspeed.act.state.ACTState`:

- every floating input that requires grad (a block-boundary activation) goes through
  :func:`~ggspeed.act.rate.apply_rate` inside the recomputation, so backward adds
  ``lambda_a(t, block) * dR/da``;
- with ``compress`` those inputs are held quantized and EG-coded, and the recomputation runs on
  the decoded tensors;
- DeepSpeed's ``partition_activations`` (hold 1/mp_size of each input, all-gather it back) and
  ``cpu_checkpointing`` (hold it in host memory) are read from ``deepspeed.checkpointing``'s
  configured globals at every call and applied the same way.

Blocks are numbered along the chain: a call whose input came out of an earlier call on this
rank is that call's block + 1; otherwise it is the state's ``block_offset`` (0, or the first
block of this pipeline stage).
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .rate import apply_rate, rate_value
from .state import ACTState, active_state
from .storage import CodedStored, Partition, PlainStored, Stored, eg_bits, step_for

_BLOCK_ATTR = "_ggspeed_act_block"


@functools.cache
def _ds_checkpointing():
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return checkpointing


@functools.cache
def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


# ----------------------------------------------------------------------------- RNG states
def _rng_states() -> dict[str, Any]:
    acc = _accelerator()
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        states["acc"] = acc.get_rng_state()
    states["ds"] = _ds_checkpointing().get_cuda_rng_tracker().get_states()
    mg = _megatron_tracker()
    if mg is not None:
        states["megatron"] = mg.get_states()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "acc" in states:
        _accelerator().set_rng_state(states["acc"])
    _ds_checkpointing().get_cuda_rng_tracker().set_states(states["ds"])
    mg = _megatron_tracker()
    if mg is not None and "megatron" in states:
        mg.set_states(states["megatron"])


def _megatron_tracker() -> Any:
    """Megatron's model-parallel RNG tracker, when megatron-core is in use (never imported here)."""
    mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if mod is None:
        return None
    try:
        return mod.get_cuda_rng_tracker()
    except Exception:  # not initialized for this device: nothing to save
        return None


# ----------------------------------------------------------------------------- storage
def _partition_for(a: torch.Tensor) -> Partition | None:
    ds = _ds_checkpointing()
    size = int(getattr(ds, "mp_size", 1) or 1)
    if not ds.PARTITION_ACTIVATIONS or size == 1 or ds.mp_group is None:
        return None
    if a.numel() % size:
        return None
    return Partition(rank=int(ds.mp_rank), size=size, group=ds.mp_group)


def _store(
    a: torch.Tensor, state: ACTState | None, block: int, rate: float | None, lam: float
) -> Stored:
    """Hold one input for recomputation; record what it costs when ACT is active."""
    cpu = bool(_ds_checkpointing().CPU_CHECKPOINT)
    part = _partition_for(a) if a.is_floating_point() else None
    is_activation = a.is_floating_point() and a.requires_grad
    if state is None or not is_activation:
        return PlainStored(a, cpu=cpu, part=part)
    step = state.cfg.abs_step or step_for(a, state.rel_step_for(block))
    k = state.cfg.eg_order
    stored: Stored | None = None
    if state.cfg.compress and step is not None:
        try:
            stored = CodedStored(a, step, k=k, cpu=cpu, part=part)
        except ValueError:  # non-finite values, or |a| / abs_step beyond the codec's range
            step = None
    if stored is None:
        stored = PlainStored(a, cpu=cpu, part=part)
        if step is not None and state.measuring():
            piece = a if part is None else a.reshape(-1).narrow(0, 0, stored.numel)
            try:
                stored.bits = eg_bits(piece, step, k)
            except ValueError:  # non-finite, or beyond the codec's range at abs_step
                stored.bits = None
    state.record(
        numel=stored.numel, stored_bytes=stored.nbytes, bits=stored.bits, rate=rate, lam=lam
    )
    state.hold(stored.nbytes)
    weakref.finalize(stored, state.release, stored.nbytes)
    return stored


# ----------------------------------------------------------------------------- the function
class _Plan:
    """What one checkpoint call needs across forward and backward (no tensors)."""

    def __init__(self, function: Callable[..., Any], coef: float, shape: float, eps: float):
        self.function, self.coef, self.shape, self.eps = function, coef, shape, eps
        self.tensor_flags: tuple[bool, ...] = ()
        self.non_tensor_outputs: tuple[Any, ...] = ()
        self.single = False

    def run(self, *args: Any) -> Any:
        """The block with the rate gradient injected at its inputs (a no-op under no_grad)."""
        if self.coef:
            args = tuple(apply_rate(a, self.coef, self.shape, self.eps) for a in args)
        return self.function(*args)


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, holder: dict, *args: Any) -> Any:
        ds = _ds_checkpointing()
        if ds.SYNCHRONIZE:
            _accelerator().synchronize()
        ctx.plan = plan
        ctx.rng = _rng_states()
        with torch.no_grad():
            outputs = plan.run(*args)
        ctx.stored = holder.pop("stored")
        ctx.input_requires_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        if ds.SYNCHRONIZE:
            _accelerator().synchronize()
        plan.single = isinstance(outputs, torch.Tensor)
        outs = (outputs,) if plan.single else tuple(outputs)
        plan.tensor_flags = tuple(isinstance(o, torch.Tensor) for o in outs)
        plan.non_tensor_outputs = tuple(o for o in outs if not isinstance(o, torch.Tensor))
        tensors = tuple(o for o in outs if isinstance(o, torch.Tensor))
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "ggspeed.act.checkpoint does not support torch.autograd.grad(); use .backward()"
            )
        ds = _ds_checkpointing()
        if ds.SYNCHRONIZE:
            _accelerator().synchronize()
        inputs = []
        for s, req in zip(ctx.stored, ctx.input_requires_grad):
            if isinstance(s, Stored):
                s = s.load().detach().requires_grad_(req)
            inputs.append(s)
        ctx.stored = None  # the held bytes go now, not when the graph goes
        here = _rng_states()
        _set_rng_states(ctx.rng)
        try:
            with torch.enable_grad():
                outputs = ctx.plan.run(*inputs)
        finally:
            _set_rng_states(here)
        outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        outs = [o for o in outs if isinstance(o, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if ds.SYNCHRONIZE:
            _accelerator().synchronize()
        return (None, None, *[x.grad if isinstance(x, torch.Tensor) else None for x in inputs])


def _block_of(args: tuple[Any, ...], state: ACTState | None) -> int:
    tags = [getattr(a, _BLOCK_ATTR) for a in args if hasattr(a, _BLOCK_ATTR)]
    if tags:
        return max(tags) + 1
    return state.block_offset if state is not None else 0


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Checkpoint ``function(*args, **kwargs)``; same contract as deepspeed.checkpointing.checkpoint.

    Keyword tensors take part in autograd like positional ones. Under no_grad (evaluation) the
    function simply runs: nothing would be recomputed.
    """
    if kwargs:
        inner, keys, npos = function, tuple(kwargs), len(args)

        def function(*all_args: Any) -> Any:
            return inner(*all_args[:npos], **dict(zip(keys, all_args[npos:])))

        args = args + tuple(kwargs.values())
    if not torch.is_grad_enabled():
        return function(*args)
    state = active_state()
    block = _block_of(args, state)
    coef, shape, eps, lam = 0.0, 1.0, 0.0, 0.0
    if state is not None:
        lam = state.lambda_for(block)
        coef = lam * state.grad_scale
        shape, eps = state.shape_for(block), state.eps_for_rate()
    plan = _Plan(function, coef, shape, eps)
    stored: list[Any] = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            stored.append(a)
            continue
        rate = None
        if state is not None and a.is_floating_point() and a.requires_grad:
            if state.wants_fit(block):
                state.fit(block, a)
                shape = plan.shape = state.shape_for(block)
            if state.rate_due():
                rate = rate_value(a, shape, eps)
        stored.append(_store(a, state, block, rate, lam))
    holder = {"stored": stored}
    tensors = _CheckpointFunction.apply(plan, holder, *args)
    it = iter(tensors)
    nt = iter(plan.non_tensor_outputs)
    outs = tuple(next(it) if flag else next(nt) for flag in plan.tensor_flags)
    for o in outs:
        if isinstance(o, torch.Tensor):
            setattr(o, _BLOCK_ATTR, block)
    return outs[0] if plan.single else outs
