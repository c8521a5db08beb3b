"""The wire budget: the bytes every collective and point-to-point message of a step puts on
the wire, by kind of traffic and by whether it crosses a node boundary.

DeepSpeed's comms logger sees only ``deepspeed.comm``; ggspeed's coded streams and some of
DeepSpeed's own paths call ``torch.distributed`` directly. So the budget counts one level
lower: while a budget is installed, ``torch.distributed``'s collective and send functions are
wrapped once per process (both the public names and ``distributed_c10d``'s, which the
``*_object`` helpers call). Each call is charged to a *kind* (:data:`KINDS`): the innermost
:func:`charge` context around it (set by the hooks :func:`install` puts around DeepSpeed's
gradient reduction, ZeRO's parameter all-gather and the pipeline's instructions), or the kind
registered for its process group (tensor parallel), else ``other``.

What a rank sends, per call, on the group's ``P`` ranks (gloo's algorithms; ``n`` = bytes of
this rank's tensor):

* ``all_reduce``: ring reduce-scatter + all-gather: ``2 (P-1)/P n`` to the next rank of the ring;
* ``all_gather`` / ``all_gather_into_tensor``: ring, ``(P-1) n`` to the next rank;
* ``reduce_scatter`` / ``reduce_scatter_tensor``: ring, ``(P-1) n_out`` to the next rank;
* ``reduce``: ring reduce-scatter, then the own reduced chunk to the root: ``(P-1)/P n`` to the
  next rank (+ ``n/P`` to the root);
* ``broadcast``: binomial tree from the root, ``n`` to each child;
* ``send`` / ``isend``: ``n`` to the peer; ``gather``: ``n`` to the root; ``scatter``: each
  chunk to its rank; ``all_to_all``: each chunk to its rank; receives send nothing.

The ring's next rank is the next group rank (group ranks are the sorted global ranks). A byte
crosses when its receiver is on another node. Message framing, TCP/IP headers, gloo's
handshakes and barriers, the rendezvous store's traffic are outside the model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

KINDS = ("dp_grad", "zero_param", "pp_act", "pp_grad", "tied_grad", "tp", "other")
"""dp_grad: the data-parallel gradient reduction (DeepSpeed's or GCT's coded streams);
zero_param: ZeRO-1/2's parameter all-gather (full width or ggspeed.wire.param_gather's coded
one); pp_act / pp_grad: pipeline activations forward / their gradients back; tied_grad: the
all-reduce of tied weights' gradients between pipeline stages; tp: tensor-parallel groups;
other: everything else (loss and overflow all-reduces, telemetry, ggspeed's verdicts)."""

_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_STATE = threading.local()
_LOCK = threading.Lock()
_CONTEXT: list[str] = []  # process-wide (hook worker threads inherit the caller's kind)
_ACTIVE: WireBudget | None = None
_WRAPPED: dict[str, Callable[..., Any]] = {}


@contextlib.contextmanager
def charge(kind: str) -> Iterator[None]:
    """Charge the collectives issued inside to ``kind`` (one of :data:`KINDS`)."""
    if kind not in _KIND_INDEX:
        raise ValueError(f"unknown wire budget kind {kind!r}; allowed: {', '.join(KINDS)}")
    _CONTEXT.append(kind)
    try:
        yield
    finally:
        _CONTEXT.pop()


def charged(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its collectives charged to ``kind``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with charge(kind):
            return fn(*args, **kwargs)

    wrapper._ggspeed_budget_kind = kind  # type: ignore[attr-defined]
    return wrapper


def node_rank_from_env() -> int | None:
    """This rank's node index from the launcher: ``CROSS_RANK`` (deepspeed.launcher.launch),
    ``GROUP_RANK`` (torchrun), or ``RANK // LOCAL_WORLD_SIZE``; None if none is set."""
    from ..gct.hierarchical import place_from_env  # the one reader of the launcher's layout

    node = place_from_env().node
    if node is not None:
        return node
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    rank = os.environ.get("RANK", "")
    if local.isdigit() and rank.isdigit() and int(local) > 0:
        return int(rank) // int(local)
    return None


def gather_nodes(node: int | None = None) -> list[int]:
    """Every global rank's node index (one all_gather_object; ``node`` defaults to the
    launcher's, else 0: one node)."""
    import torch.distributed as dist

    mine = node if node is not None else node_rank_from_env()
    mine = 0 if mine is None else int(mine)
    if not dist.is_initialized():
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [int(x) for x in everyone]


class WireBudget:
    """This rank's counts: bytes sent by kind and crossing, per optimizer step.

    ``nodes[r]`` is global rank r's node. ``history`` holds, after each :meth:`on_step`, the
    cumulative counts (a row per step: the step, then bytes by kind x {local, cross}).
    """

    def __init__(self, nodes: Sequence[int], rank: int) -> None:
        self.nodes = list(nodes)
        self.rank = rank
        self.world = len(self.nodes)
        self.totals = [[0, 0] for _ in KINDS]  # [kind][crossed] -> bytes
        self.calls = [0 for _ in KINDS]
        self.group_kinds: dict[Any, str] = {}
        self.history: list[tuple[int, list[int]]] = []
        self._groups: dict[Any, list[int]] = {}
        self._since_step = 0
        self._since_totals = self._flat()

    # -- counting -----------------------------------------------------------------------
    def set_group_kind(self, group: Any, kind: str) -> None:
        """Charge every collective on ``group`` to ``kind`` (e.g. tensor-parallel groups)."""
        if kind not in _KIND_INDEX:
            raise ValueError(f"unknown wire budget kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.group_kinds[group] = kind

    def ranks_of(self, group: Any) -> list[int]:
        import torch.distributed as dist

        key = group if group is not None else "world"
        ranks = self._groups.get(key)
        if ranks is None:
            if group is None or group is dist.GroupMember.WORLD:
                ranks = list(range(dist.get_world_size()))
            else:
                ranks = sorted(dist.get_process_group_ranks(group))
            self._groups[key] = ranks
        return ranks

    def add(self, kind: str, sends: Sequence[tuple[int, int]]) -> None:
        """Charge ``(peer global rank, bytes)`` sends to ``kind``."""
        k = _KIND_INDEX[kind]
        me = self.nodes[self.rank]
        with _LOCK:
            self.calls[k] += 1
            for peer, nbytes in sends:
                if nbytes > 0 and peer != self.rank:
                    self.totals[k][int(self.nodes[peer] != me)] += int(nbytes)

    # -- steps and telemetry ------------------------------------------------------------
    def _flat(self) -> list[int]:
        return [b for pair in self.totals for b in pair]

    def on_step(self, global_step: int) -> None:
        self.history.append((int(global_step), self._flat()))
        self._since_step += 1

    def scalars(self) -> dict[str, float]:
        """Bytes per step since the previous call, summed over the ranks: each rank reports
        its own x world size, and telemetry averages over the ranks."""
        now = self._flat()
        steps = max(self._since_step, 1)
        scale = self.world / steps
        delta = [a - b for a, b in zip(now, self._since_totals)]
        self._since_totals, self._since_step = now, 0
        out: dict[str, float] = {}
        for i, kind in enumerate(KINDS):
            local, cross = delta[2 * i], delta[2 * i + 1]
            if local or cross:
                out[f"{kind}_bytes"] = (local + cross) * scale
                out[f"{kind}_cross_bytes"] = cross * scale
        out["bytes"] = sum(delta) * scale
        out["cross_bytes"] = sum(delta[1::2]) * scale
        return out

    def summary(self, skip: int = 1) -> dict[str, Any]:
        """The whole job's budget (a collective: every rank calls it): bytes per step by kind
        (total and crossing) over the steps after the first ``skip``, and the cumulative
        crossing bytes of the job after each step (to compare windows with interface counters)."""
        import torch.distributed as dist

        rows = self.history
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, rows)
        else:
            everyone = [rows]
        steps = [s for s, _ in rows]
        n = min(len(r) for r in everyone)
        job = [[sum(r[i][1][j] for r in everyone) for j in range(2 * len(KINDS))] for i in range(n)]
        out: dict[str, Any] = {
            "model": "gloo ring/tree byte model (ggspeed.wire.budget)",
            "steps": steps[:n],
            "cross_cumulative": [sum(row[1::2]) for row in job],
            "bytes_cumulative": [sum(row) for row in job],
            "kinds": {},
        }
        if n > skip + 1:
            first, last = job[skip], job[n - 1]
            k = n - 1 - skip
            for i, kind in enumerate(KINDS):
                local = (last[2 * i] - first[2 * i]) / k
                cross = (last[2 * i + 1] - first[2 * i + 1]) / k
                out["kinds"][kind] = {
                    "bytes_per_step": local + cross,
                    "cross_bytes_per_step": cross,
                }
            out["bytes_per_step"] = sum(v["bytes_per_step"] for v in out["kinds"].values())
            out["cross_bytes_per_step"] = sum(
                v["cross_bytes_per_step"] for v in out["kinds"].values()
            )
            out["window"] = [steps[skip], steps[n - 1]]
        return out


# -- the byte model ---------------------------------------------------------------------------


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _ring(
    b: WireBudget, group: Any, nbytes_per_rank: Callable[[int], int]
) -> list[tuple[int, int]]:
    ranks = b.ranks_of(group)
    p = len(ranks)
    if p < 2 or b.rank not in ranks:
        return []
    i = ranks.index(b.rank)
    return [(ranks[(i + 1) % p], nbytes_per_rank(p))]


def _tree(b: WireBudget, group: Any, src: int, n: int) -> list[tuple[int, int]]:
    """Binomial tree from global rank ``src``: relative rank v sends to v + 2^k for 2^k > v."""
    ranks = b.ranks_of(group)
    p = len(ranks)
    if p < 2 or b.rank not in ranks or src not in ranks:
        return []
    root = ranks.index(src)
    v = (ranks.index(b.rank) - root) % p
    sends, mask = [], 1
    while mask < p:
        if v < mask and v + mask < p:
            sends.append((ranks[(v + mask + root) % p], n))
        mask <<= 1
    return sends


def _peer(b: WireBudget, a: dict[str, Any], key: str) -> int | None:
    """A global peer rank from ``dst``/``src`` or, where given instead, ``group_dst``/``group_src``."""
    if a.get(key) is not None:
        return int(a[key])
    local = a.get(f"group_{key}")
    return None if local is None else b.ranks_of(a.get("group"))[int(local)]


def _model(name: str, b: WireBudget, a: dict[str, Any]) -> list[tuple[int, int]]:
    g = a.get("group")
    for key in ("dst", "src"):
        if key in a or f"group_{key}" in a:
            a[key] = _peer(b, a, key)
    if name == "all_reduce":
        n = _nbytes(a["tensor"])
        return _ring(b, g, lambda p: 2 * (p - 1) * n // p)
    if name == "all_reduce_coalesced":
        n = sum(_nbytes(t) for t in a["tensors"])
        return _ring(b, g, lambda p: 2 * (p - 1) * n // p)
    if name == "all_gather":
        n = _nbytes(a["tensor"])
        return _ring(b, g, lambda p: (p - 1) * n)
    if name in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
        n = _nbytes(a["input_tensor"])
        return _ring(b, g, lambda p: (p - 1) * n)
    if name == "reduce_scatter":
        n = _nbytes(a["output"])
        return _ring(b, g, lambda p: (p - 1) * n)
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
        n = _nbytes(a["output"])
        return _ring(b, g, lambda p: (p - 1) * n)
    if name == "reduce":
        n = _nbytes(a["tensor"])
        sends = _ring(b, g, lambda p: (p - 1) * n // p)
        dst = a["dst"]
        if sends and dst != b.rank:
            sends.append((dst, n // len(b.ranks_of(g))))
        return sends
    if name == "broadcast":
        return _tree(b, g, a["src"], _nbytes(a["tensor"]))
    if name in ("send", "isend"):
        return [(a["dst"], _nbytes(a["tensor"]))]
    if name == "gather":
        return [] if a["dst"] == b.rank else [(a["dst"], _nbytes(a["tensor"]))]
    if name == "scatter":
        if a["src"] != b.rank or not a.get("scatter_list"):
            return []
        return list(zip(b.ranks_of(g), map(_nbytes, a["scatter_list"])))
    if name == "all_to_all":
        return list(zip(b.ranks_of(g), map(_nbytes, a["input_tensor_list"])))
    if name == "all_to_all_single":
        ranks, t = b.ranks_of(g), a["input"]
        splits = a.get("input_split_sizes")
        if not splits:  # equal chunks along dim 0
            return [(r, _nbytes(t) // len(ranks)) for r in ranks]
        row = _nbytes(t) // t.shape[0] if t.dim() and t.shape[0] else 0
        return [(r, int(k) * row) for r, k in zip(ranks, splits)]
    return []


MODELLED = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
    "_all_gather_base", "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "reduce_scatter_single",
    "reduce", "broadcast", "send", "isend", "gather", "scatter", "all_to_all",
    "all_to_all_single",
)  # fmt: skip
"""The torch.distributed functions the budget wraps (receives and barriers send no payload)."""


def _counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        budget = _ACTIVE
        if budget is None or getattr(_STATE, "inside", False):
            return original(*args, **kwargs)
        _STATE.inside = True  # the outermost call counts (no double counting of helpers)
        try:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            kind = budget.group_kinds.get(a.get("group")) or (_CONTEXT[-1] if _CONTEXT else "other")
            budget.add(kind, _model(name, budget, a))
            return original(*args, **kwargs)
        finally:
            _STATE.inside = False

    wrapper._ggspeed_budget_original = original  # type: ignore[attr-defined]
    return wrapper


def _patch_torch() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in MODELLED:
        original = getattr(c10d, name, None)
        if original is None or name in _WRAPPED:
            continue
        if hasattr(original, "_ggspeed_budget_original"):
            continue
        wrapped = _counting(name, original)
        _WRAPPED[name] = original
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    _rebind()
    try:  # deepspeed.comm binds these two when its backend is made
        import deepspeed.comm.comm as ds_comm

        cdb = getattr(ds_comm, "cdb", None)
        for attr, name in (
            ("all_gather_function", "all_gather_into_tensor"),
            ("reduce_scatter_function", "reduce_scatter_tensor"),
        ):
            if cdb is not None and getattr(cdb, attr, None) is _WRAPPED.get(name):
                setattr(cdb, attr, getattr(c10d, name))
    except ImportError:
        pass


_REBIND_PREFIXES = ("ggspeed", "deepspeed", "megatron")


def _rebind() -> None:
    """Point module-level names bound to an original function at import time
    (``all_gather = dist.all_gather_into_tensor``) at its counting wrapper."""
    import sys

    import torch.distributed.distributed_c10d as c10d

    originals = {id(f): getattr(c10d, name) for name, f in _WRAPPED.items()}
    for mod_name, module in list(sys.modules.items()):
        if module is None or not mod_name.startswith(_REBIND_PREFIXES):
            continue
        for attr, value in list(vars(module).items()):
            wrapped = originals.get(id(value)) if callable(value) else None
            if wrapped is not None:
                setattr(module, attr, wrapped)


def activate(budget: WireBudget | None) -> None:
    """Count into ``budget`` from now on (None: stop counting; the wrappers stay, idle)."""
    global _ACTIVE
    if budget is not None:
        _patch_torch()
    _ACTIVE = budget


def active() -> WireBudget | None:
    return _ACTIVE


# -- hooks on a DeepSpeed engine ----------------------------------------------------------------


def _wrap_module_gather(module: Any) -> None:
    current = getattr(module, "all_gather_dp_groups", None)
    if current is None or getattr(current, "_ggspeed_budget_kind", None):
        return
    wrapped = charged("zero_param", current)
    inner = getattr(current, "_ggspeed_original", None)
    if inner is not None:  # ggspeed.wire.param_gather's dispatcher: keep it findable
        wrapped._ggspeed_original = inner  # type: ignore[attr-defined]
    module.all_gather_dp_groups = wrapped


def _tp_groups() -> list[Any]:
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            return [ps.get_tensor_model_parallel_group()]
    except (ImportError, AssertionError, RuntimeError):
        pass
    return []


def install(engine: Any, nodes: Sequence[int] | None = None) -> WireBudget:
    """Count ``engine``'s traffic from now on; returns the budget (``engine.ggspeed.budget``).

    ``nodes``: every global rank's node (default: from the launcher's environment, exchanged
    once). Install after the features that replace DeepSpeed's methods (GCT, the coded gather,
    coded pipeline sends), so the kind hooks sit outside them.
    """
    import torch.distributed as dist

    node_list = list(nodes) if nodes is not None else gather_nodes()
    rank = dist.get_rank() if dist.is_initialized() else 0
    budget = WireBudget(node_list, rank)
    for group in _tp_groups():
        budget.set_group_kind(group, "tp")
    mpu = getattr(engine, "mpu", None)
    try:  # an mpu object without these methods (DeepSpeed's pipeline grid) has no TP group
        if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
            budget.set_group_kind(mpu.get_tensor_model_parallel_group(), "tp")
    except (AttributeError, AssertionError, RuntimeError):
        pass
    for name in ("allreduce_gradients",):
        if hasattr(engine, name):
            setattr(engine, name, charged("dp_grad", getattr(engine, name)))
    try:
        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        if isinstance(engine, PipelineEngine):
            kinds = {
                schedule.SendActivation: "pp_act",
                schedule.RecvActivation: "pp_act",
                schedule.SendGrad: "pp_grad",
                schedule.RecvGrad: "pp_grad",
                schedule.ReduceTiedGrads: "tied_grad",
                schedule.ReduceGrads: "dp_grad",
            }
            table = dict(engine._INSTRUCTION_MAP)
            for cmd, kind in kinds.items():
                if cmd in table:
                    table[cmd] = charged(kind, table[cmd])
            engine._INSTRUCTION_MAP = table
        elif hasattr(engine, "backward"):  # ZeRO-2's overlapped reduction runs in backward
            engine.backward = charged("dp_grad", engine.backward)
    except ImportError:
        pass
    from deepspeed.runtime.zero import stage_1_and_2

    _wrap_module_gather(stage_1_and_2)
    try:
        from deepspeed.runtime import bf16_optimizer

        _wrap_module_gather(bf16_optimizer)
    except ImportError:
        pass
    activate(budget)
    return budget
