"""The ZeRO-1/2 parameter all-gather of DeepSpeed 0.19.8, sent as coded updates.

After its optimizer step ``DeepSpeedZeroOptimizer.step`` copies each rank's fp32 master
partition into that rank's slice of the working (bit16 or fp32) weights and all-gathers the
slices at full width (``all_gather_dp_groups``, stage_1_and_2.py). Coded instead:

* every rank sends ``u = master - held``, ``held`` being its partition of the working weights as
  every replica holds it *before* the step (DeepSpeed overwrites the owner's copy just before
  the gather, so the step wrapper keeps it), quantized with per-block steps and Exp-Golomb coded;
* every rank, the owner included, sets each partition to ``held + decoded update`` (float32,
  rounded to the working dtype): the same operations on the same bits, so the working weights
  stay bit-identical on every rank, while the fp32 masters stay exactly what the optimizer made;
* the quantization error ``master - working`` is in the next step's ``u`` (error feedback), so
  the replicas track the masters instead of drifting. It lives in DeepSpeed's own checkpoint
  (the module's working weights and each rank's fp32 master partition), so a resume is exact.

A pipeline's tied weight (the embedding shared by the first and last stage) has one copy per
stage, each in its own stage's flat partitions: the copies get the same update ``u`` but blocks
cut in other places, so other steps, and differ by up to a quantization step (each within half a
step of the one master they share). DeepSpeed saves only the first stage's copy and, on load,
broadcasts it to the others; so the component saves the other stages' copies and puts them back
after DeepSpeed's load, and a resume stays exact.

Installed on one optimizer *instance*: ``step`` is wrapped to keep ``held`` and arm the coded
gather, and stage_1_and_2's module-level name ``all_gather_dp_groups`` (the function is
imported by name there, so patching ``deepspeed.runtime.utils`` would not reach it) becomes a
dispatcher that codes only the gather of an armed optimizer and hands every other call
(``update_lp_params`` after a universal-checkpoint load, other engines) to DeepSpeed's function.

The coded messages vary in length; the collective needs equal ones. Each rank sends one slot of
``8 + capacity`` bytes (its message length, then the message), the capacity being the previous
step's longest message plus slack; if a message does not fit, a second all-gather carries the
remainders. Collectives go through ``deepspeed.comm``, so DeepSpeed's comms logger sees them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ConfigError
from .coding import apply_update, decode_update, encode_update, entropy_bits, full_width_bits
from .settings import KEY, ParamGatherSettings

__all__ = [
    "CodedParamGather",
    "GatherStats",
    "check_ds_config",
    "install_coded_param_gather",
]

STATE_VERSION = 1
_SLOT_HEAD = 8  # int64 message length at the start of each slot
_ALIGN = 64


@dataclasses.dataclass
class GatherStats:
    """What this rank put into the parameter all-gather."""

    calls: int = 0
    elements: int = 0  # elements of this rank's partitions, summed over calls
    bytes_sent: int = 0  # bytes this rank handed to the collectives (slots, remainders)
    full_width_bytes: int = 0  # what the uncoded all-gather would have handed over
    message_bytes: int = 0  # the coded messages alone (steps, stream headers and codes)
    code_bits: int = 0  # the Exp-Golomb codes alone
    entropy_bits: float = 0.0  # elements x empirical entropy of the levels
    second_rounds: int = 0  # gathers whose longest message outgrew the slot
    update_sq: float = 0.0  # sum of u^2 (master minus held, before the gather)
    residual_sq: float = 0.0  # sum of (master - working)^2 after the gather

    def scalars(self) -> dict[str, float]:
        n = self.elements
        return {
            "calls": float(self.calls),
            "bytes_sent": float(self.bytes_sent),
            "bits_per_element": 8.0 * self.bytes_sent / n if n else 0.0,
            "message_bits_per_element": 8.0 * self.message_bytes / n if n else 0.0,
            "code_bits_per_element": self.code_bits / n if n else 0.0,
            "entropy_bits_per_element": self.entropy_bits / n if n else 0.0,
            "full_width_bits_per_element": 8.0 * self.full_width_bytes / n if n else 0.0,
            "ratio_to_full_width": self.bytes_sent / self.full_width_bytes
            if self.full_width_bytes
            else 0.0,
            "second_rounds": float(self.second_rounds),
            "rel_residual": math.sqrt(self.residual_sq / self.update_sq) if self.update_sq else 0.0,
        }

    def add(self, other: GatherStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class CodedParamGather:
    """Per-rank state of the coded parameter all-gather; the runtime's component.

    ``state_dict`` holds the counters and the slot capacities (they set how many bytes go out,
    not what arrives), and on a pipeline's later stages this rank's copies of the tied weights
    (DeepSpeed's checkpoint holds the first stage's only); the error-feedback residual is
    ``master - working`` and DeepSpeed's checkpoint restores both exactly.
    """

    name = "param_gather"

    def __init__(self, settings: ParamGatherSettings) -> None:
        self.settings = settings
        self.stats = GatherStats()
        self.capacity: list[int] = []  # per parameter group: the next slot's message capacity
        self.global_step = 0
        self._since = GatherStats()
        self._optimizer: Any = None
        self._held: list[torch.Tensor] | None = None  # armed: own partitions before the step
        self.tied: dict[str, torch.Tensor] = {}  # tied-weight copies DeepSpeed does not save

    # -- the runtime's component protocol --------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "settings": self.settings.coding(),
            "capacity": list(self.capacity),
            "global_step": self.global_step,
            "stats": dataclasses.asdict(self.stats),
            "tied": {k: w.detach().cpu().clone() for k, w in self.tied.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{KEY}: saved state version {state.get('version')!r} unsupported")
        saved = state.get("settings", {})
        for key, value in self.settings.coding().items():
            if saved.get(key) != value:
                raise ValueError(
                    f"{KEY}.{key}: the checkpoint was saved with {saved.get(key)!r}, this run "
                    f"has {value!r}; resume with the saved value"
                )
        self.capacity = [int(c) for c in state.get("capacity", [])]
        self.global_step = int(state.get("global_step", 0))
        self.stats = GatherStats(**state.get("stats", {}))
        self._since = GatherStats()
        saved_tied = state.get("tied", {})
        for key, weight in self.tied.items():
            if key not in saved_tied:  # saved before copies were kept: the first stage's copy
                continue
            if saved_tied[key].shape != weight.shape:
                raise ValueError(
                    f"{KEY}: tied weight {key} saved with shape {tuple(saved_tied[key].shape)}, "
                    f"this model's is {tuple(weight.shape)}"
                )
            with torch.no_grad():
                weight.copy_(saved_tied[key])

    def on_step(self, global_step: int) -> None:
        self.global_step = int(global_step)

    def scalars(self) -> dict[str, float]:
        """Statistics since the previous call (a log interval)."""
        out = self._since.scalars()
        self._since = GatherStats()
        return out

    # -- the gather ------------------------------------------------------------------------
    def _arm(self) -> None:
        opt = self._optimizer
        self._held = [
            parts[_rank(opt, i)].detach().clone()
            for i, parts in enumerate(opt.parallel_partitioned_bit16_groups)
        ]

    def _gather(self) -> None:
        """Replaces one ``all_gather_dp_groups`` call of the armed optimizer's step."""
        import deepspeed.comm as dist

        opt, held = self._optimizer, self._held
        self._held = None
        assert held is not None
        cfg = self.settings
        block = cfg.block_size
        while len(self.capacity) < len(held):
            self.capacity.append(0)
        g = GatherStats()
        for i, parts in enumerate(opt.parallel_partitioned_bit16_groups):
            group = opt.real_dp_process_group[i]
            world = dist.get_world_size(group=group)
            if world == 1:
                continue
            me = dist.get_rank(group=group)
            master = opt.single_partition_of_fp32_groups[i]
            mine = held[i]
            n = mine.numel()
            u = master.detach().float() - mine.float()
            coded = encode_update(u, cfg)
            msg = coded.message.to(mine.device)
            cap = self.capacity[i]
            slot = torch.zeros(_SLOT_HEAD + cap, dtype=torch.uint8, device=mine.device)
            slot[:_SLOT_HEAD] = torch.tensor([msg.numel()], dtype=torch.int64).view(torch.uint8)
            first = min(cap, msg.numel())
            slot[_SLOT_HEAD : _SLOT_HEAD + first] = msg[:first]
            slots = [torch.empty_like(slot) for _ in range(world)]
            dist.all_gather(slots, slot, group=group)
            sizes = [int(s[:_SLOT_HEAD].clone().view(torch.int64)) for s in slots]
            longest = max(sizes)
            sent = slot.numel()
            messages = [s[_SLOT_HEAD : _SLOT_HEAD + min(cap, sz)] for s, sz in zip(slots, sizes)]
            if longest > cap:
                rest = torch.zeros(longest - cap, dtype=torch.uint8, device=mine.device)
                rest[: msg.numel() - first] = msg[first:]
                rests = [torch.empty_like(rest) for _ in range(world)]
                dist.all_gather(rests, rest, group=group)
                sent += rest.numel()
                messages = [
                    torch.cat([m, r[: max(0, sz - cap)]])
                    for m, r, sz in zip(messages, rests, sizes)
                ]
                g.second_rounds += 1
            need = int(longest * (1.0 + cfg.capacity_slack))
            self.capacity[i] = -(-need // _ALIGN) * _ALIGN
            for r in range(world):
                if r == me:  # DeepSpeed put the master here: start from the held copy
                    parts[r].copy_(mine)
                    apply_update(parts[r], coded.q, coded.steps, block)
                else:
                    q, steps = decode_update(messages[r], parts[r].numel(), block)
                    apply_update(parts[r], q, steps, block)
            resid = master.detach().float() - parts[me].float()
            g.elements += n
            g.bytes_sent += sent
            g.full_width_bytes += n * full_width_bits(mine.dtype) // 8
            g.message_bytes += msg.numel()
            g.code_bits += coded.code_bits
            g.entropy_bits += n * entropy_bits(coded.q)
            g.update_sq += float(u.double().square().sum())
            g.residual_sq += float(resid.double().square().sum())
        g.calls = 1
        self.stats.add(g)
        self._since.add(g)


def _rank(opt: Any, i: int) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=opt.real_dp_process_group[i])


# -- installing -----------------------------------------------------------------------------


def _stage(ds_config: Mapping[str, Any]) -> int:
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def _refuse_stage(stage: int) -> None:
    if stage not in (1, 2):
        raise ConfigError(
            f"zero_optimization.stage: got {stage}; {KEY}.enabled codes the parameter all-gather "
            "of ZeRO stages 1 and 2 (ZeRO-0 has none, ZeRO-3 gathers on its own paths): use "
            f"stage 1 or 2, or set {KEY}.enabled to false"
        )


def check_ds_config(ds_config: Mapping[str, Any]) -> None:
    """Refuse DeepSpeed settings the coded gather cannot serve, naming the key (before
    ``deepspeed.initialize``): ZeRO-0/3, optimizer offload, bf16 ZeRO-1 with fp32 gradient
    accumulation (DeepSpeed's BF16_Optimizer)."""
    _refuse_stage(_stage(ds_config))
    zero = ds_config.get("zero_optimization") or {}
    off = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
    device = off.get("device", "none") if isinstance(off, Mapping) else off
    if off and str(device).lower() not in ("none", "null"):
        raise ConfigError(
            f"zero_optimization.offload_optimizer: got {off!r}; {KEY}.enabled does not support "
            f"optimizer offload: remove it or set {KEY}.enabled to false"
        )
    bf16 = ds_config.get("bf16") or ds_config.get("bfloat16") or {}
    types = ds_config.get("data_types") or {}
    accum = types.get("grad_accum_dtype") if isinstance(types, Mapping) else None
    if (
        isinstance(bf16, Mapping)
        and bf16.get("enabled") is True
        and _stage(ds_config) == 1
        and str(accum).lower() in _FP32_NAMES
    ):
        raise ConfigError(
            f"data_types.grad_accum_dtype: got {accum!r}; with bf16 and ZeRO-1 it makes "
            f"DeepSpeed use BF16_Optimizer, whose gather {KEY}.enabled does not code: drop "
            f"data_types.grad_accum_dtype or set {KEY}.enabled to false"
        )


_FP32_NAMES = ("fp32", "float32", "float", "torch.float32")


_ARMED: CodedParamGather | None = None


def _dispatch(original: Any) -> Any:
    @functools.wraps(original)
    def all_gather_dp_groups(
        groups_flat, partitioned_param_groups, dp_process_group, *args: Any, **kwargs: Any
    ):
        armed = _ARMED
        if armed is not None and partitioned_param_groups is (
            armed._optimizer.parallel_partitioned_bit16_groups
        ):
            return armed._gather()
        return original(groups_flat, partitioned_param_groups, dp_process_group, *args, **kwargs)

    all_gather_dp_groups._ggspeed_original = original  # type: ignore[attr-defined]
    return all_gather_dp_groups


def _later_stage_tied_weights(engine: Any) -> dict[str, torch.Tensor]:
    """This rank's copies of a pipeline's tied weights where it is not the stage DeepSpeed
    saves and broadcasts them from (the lowest rank of the tied group), by ``<key>.<attr>``."""
    import deepspeed.comm as dist

    module = getattr(engine, "module", None)
    comms = getattr(module, "tied_comms", None) or {}
    me = dist.get_rank()
    out = {}
    for key, comm in comms.items():
        if me == min(comm["ranks"]):
            continue
        for attr in comm["weight_attr"]:
            out[f"{key}.{attr}"] = module._recursive_getattr(comm["module"], attr)
    return out


def _patch_module() -> None:
    from deepspeed.runtime.zero import stage_1_and_2

    current = stage_1_and_2.all_gather_dp_groups
    if getattr(current, "_ggspeed_original", None) is None:
        stage_1_and_2.all_gather_dp_groups = _dispatch(current)


def install_coded_param_gather(
    engine: Any, settings: ParamGatherSettings | None = None
) -> CodedParamGather:
    """Send ``engine``'s ZeRO-1/2 parameter all-gather as coded updates; returns the per-rank
    component (save/restore it with the checkpoint, read its ``scalars()``).

    ConfigError, naming the key, for ZeRO-0/3, optimizer offload, or an optimizer other than
    DeepSpeed's ZeRO-1/2 one (e.g. bf16 ZeRO-1 with fp32 gradient accumulation).
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    settings = settings if settings is not None else ParamGatherSettings()
    _refuse_stage(int(engine.zero_optimization_stage()))
    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        raise ConfigError(
            f"{KEY}.enabled: the engine's optimizer is {type(opt).__name__}, not DeepSpeed's "
            "ZeRO-1/2 optimizer (bf16 ZeRO-1 with data_types.grad_accum_dtype fp32 selects "
            f"BF16_Optimizer): drop data_types.grad_accum_dtype or set {KEY}.enabled to false"
        )
    if getattr(opt, "cpu_offload", False):
        raise ConfigError(
            f"zero_optimization.offload_optimizer: {KEY}.enabled does not support optimizer "
            f"offload: remove it or set {KEY}.enabled to false"
        )
    if getattr(opt, "_ggspeed_param_gather", None) is not None:
        raise RuntimeError(f"{KEY} is already installed on this optimizer")

    state = CodedParamGather(settings)
    state._optimizer = opt
    state.tied = _later_stage_tied_weights(engine)
    _patch_module()
    step = opt.step

    @functools.wraps(step)
    def coded_step(*args: Any, **kwargs: Any) -> Any:
        global _ARMED
        state._arm()
        _ARMED = state
        try:
            return step(*args, **kwargs)
        finally:
            _ARMED = None
            state._held = None

    opt.step = coded_step
    opt._ggspeed_param_gather = state
    return state
