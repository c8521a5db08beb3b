"""Hierarchical data parallelism: only coded bytes cross the node boundary.

When a data-parallel group of W = N x R ranks spans N nodes with R of its ranks on each, one
reduction of a bucket runs in three steps (each marked where it happens in
:func:`hierarchical_all_reduce`):

1. Within the node, at full precision (float32): a reduce-scatter, so that the rank with index i
   among its node's ranks holds the node's sum of chunk i (1/R of the bucket, whole
   quantization blocks).
2. Across nodes, coded: :func:`compressed_all_reduce` of chunk i (summed, not averaged) over the
   group of the index-i ranks of every node, with its own error-feedback residual (key
   ``"<bucket>@node[lo:hi]"``). Each rank carries 1/R of the bucket across nodes, so no rank
   idles and each node sends what one flat rank would send, not R times that.
3. Within the node: the result divided by W (the flat path's averaging), then an all-gather at
   full precision, so every rank gets every chunk.

Every rank ends with the same bits: chunk i is the compressed all-reduce's result, identical
on its group, and step 3 only copies it. The node layout comes from the launcher (``CROSS_RANK``
from ``deepspeed.launcher.launch``, ``GROUP_RANK`` from torchrun): hostnames cannot tell nodes
apart (containers and network namespaces share them). :func:`setup` checks that every rank
reported a consistent layout and that every data-parallel group has the same number of ranks on
each of its nodes, then creates the subgroups once, on every rank in the same order.

Checkpoints: a residual saved under the other form of a bucket's key (flat ``"<bucket>"`` when
resuming hierarchically, ``"<bucket>@node[lo:hi]"`` when resuming flat or with another
layout) is folded in at the bucket's first reduction: added to what is sent (hierarchical), or
placed into the flat residual at its position (flat). Either way the sum over ranks of what
earlier steps dropped is sent, as error feedback requires.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError
from .allreduce import WireError, compressed_all_reduce
from .exchange import all_gather
from .state import GCTState

__all__ = [
    "Hierarchy",
    "Place",
    "hierarchical_all_reduce",
    "node_chunks",
    "place_from_env",
    "plan",
    "reduce_bucket",
    "setup",
]

logger = logging.getLogger("ggspeed")
# torch 2.13 renamed reduce_scatter_tensor (deprecated) to reduce_scatter_single.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
KEY = "ggspeed.gct.hierarchical"
_SEGMENT = re.compile(r"^(?P<key>.*)@node\[(?P<lo>\d+):(?P<hi>\d+)\]$")


@dataclasses.dataclass(frozen=True)
class Place:
    """Where the launcher says this rank runs: its node's index, its rank within the node and
    the counts the launcher gave (None where it gave nothing)."""

    node: int | None
    local_rank: int | None = None
    local_size: int | None = None
    nodes: int | None = None
    source: str = ""


def _int(environ: Mapping[str, str], name: str) -> int | None:
    v = environ.get(name)
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def place_from_env(environ: Mapping[str, str] | None = None) -> Place:
    """This rank's :class:`Place` from the launcher's variables: ``CROSS_RANK`` /
    ``CROSS_SIZE`` / ``LOCAL_SIZE`` (deepspeed.launcher.launch) or ``GROUP_RANK`` /
    ``GROUP_WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` (torchrun); ``LOCAL_RANK`` from either."""
    env = os.environ if environ is None else environ
    local_rank = _int(env, "LOCAL_RANK")
    if _int(env, "CROSS_RANK") is not None:
        return Place(
            _int(env, "CROSS_RANK"),
            local_rank,
            _int(env, "LOCAL_SIZE"),
            _int(env, "CROSS_SIZE"),
            "CROSS_RANK",
        )
    if _int(env, "GROUP_RANK") is not None:
        return Place(
            _int(env, "GROUP_RANK"),
            local_rank,
            _int(env, "LOCAL_WORLD_SIZE"),
            _int(env, "GROUP_WORLD_SIZE"),
            "GROUP_RANK",
        )
    return Place(None, local_rank)


def plan(
    places: Sequence[Place], dp_groups: Sequence[Sequence[int]]
) -> tuple[list[list[list[int]]] | None, str]:
    """The node partition of every data-parallel group, or None and why the hierarchy does not
    apply. ``places[r]``: global rank r's place; ``dp_groups``: the distinct data-parallel
    groups as global ranks. A pure function of what every rank gathered, so every rank decides
    alike. Returns, per group (sorted), its ranks by node (nodes by index, ranks sorted)."""
    missing = [r for r, p in enumerate(places) if p.node is None]
    if len(missing) == len(places):
        return None, (
            "the launcher gave no node layout (no CROSS_RANK from deepspeed's launcher, no "
            "GROUP_RANK from torchrun)"
        )
    if missing:
        return None, f"ranks {missing} have no node layout in their environment, the others do"
    sources = sorted({p.source for p in places})
    if len(sources) > 1:
        return None, f"the ranks read their node from different variables ({sources})"
    by_node: dict[int, list[int]] = {}
    for r, p in enumerate(places):
        by_node.setdefault(int(p.node), []).append(r)  # type: ignore[arg-type]
    for node, ranks in sorted(by_node.items()):
        locals_ = [places[r].local_rank for r in ranks]
        if None not in locals_ and len(set(locals_)) != len(locals_):
            return None, f"node {node}: ranks {ranks} report the same LOCAL_RANK twice {locals_}"
        sizes = {places[r].local_size for r in ranks} - {None}
        if sizes and sizes != {len(ranks)}:
            return (
                None,
                f"node {node}: the launcher says {sorted(sizes)} ranks, {len(ranks)} report it",
            )
    counts = {p.nodes for p in places} - {None}
    if counts and counts != {len(by_node)}:
        return None, f"the launcher says {sorted(counts)} nodes, ranks report {len(by_node)}"
    layouts = []
    for group in sorted(sorted(g) for g in {tuple(sorted(g)) for g in dp_groups}):
        parts: dict[int, list[int]] = {}
        for r in group:
            parts.setdefault(int(places[r].node), []).append(r)  # type: ignore[arg-type]
        sizes_on = sorted({len(v) for v in parts.values()})
        if len(parts) < 2:
            return None, f"the data-parallel group {group} lies within one node"
        if len(sizes_on) > 1:
            return None, (
                f"the data-parallel group {group} has different numbers of ranks on its nodes "
                f"({ {n: len(v) for n, v in sorted(parts.items())} })"
            )
        if sizes_on[0] < 2:
            return None, f"the data-parallel group {group} has one rank per node"
        layouts.append([sorted(parts[n]) for n in sorted(parts)])
    return layouts, ""


@dataclasses.dataclass
class Hierarchy:
    """This rank's part of the hierarchy of one data-parallel group."""

    group: Any  # the data-parallel group it serves
    ranks: tuple[int, ...]  # that group's global ranks, sorted
    nodes: int  # N
    per_node: int  # R
    index: int  # this rank's index among its node's ranks: the chunk it carries across
    intra: Any  # this node's R ranks of the group
    inter: Any  # the index-``index`` ranks of every node
    source: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def serves(self, group: Any) -> bool:
        if group is self.group:
            return True
        g = group if group is not None else dist.group.WORLD
        return tuple(sorted(dist.get_process_group_ranks(g))) == self.ranks


def setup(setting: bool | str, dp_group: Any) -> Hierarchy | None:
    """Decide on the hierarchy (``setting``: ``ggspeed.gct.hierarchical``) and create its
    subgroups; call on every rank, in the same order relative to other group creations.

    One all-gather of every rank's place and data-parallel group over the world; subgroups for
    every data-parallel group, on every rank (``dist.new_group`` must be called by all ranks
    alike). ConfigError naming the key when ``setting`` is true and the layout does not serve
    (on every rank alike: the decision is a function of the gathered data); "auto" then logs
    why the flat path is used."""
    if setting is False or not dist.is_initialized():
        return None
    g = dp_group if dp_group is not None else dist.group.WORLD
    mine = (place_from_env(), tuple(sorted(dist.get_process_group_ranks(g))))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    places = [p for p, _ in gathered]
    layouts, why = plan(places, [d for _, d in gathered])
    rank = dist.get_rank()
    if layouts is None:
        if setting is True:
            raise ConfigError(
                f"{KEY}: true, but {why}; set it to 'auto' (the flat path then) or false"
            )
        if rank == 0:
            _say(f"[ggspeed] gct: flat data-parallel reduction (hierarchical auto): {why}")
        return None
    own: Hierarchy | None = None
    for layout in layouts:  # every rank creates every group, in the same order
        nodes, per = len(layout), len(layout[0])
        intra = [dist.new_group(ranks) for ranks in layout]
        inter = [dist.new_group([node[i] for node in layout]) for i in range(per)]
        for k, node in enumerate(layout):
            if rank in node:
                i = node.index(rank)
                ranks = tuple(sorted(r for nd in layout for r in nd))
                own = Hierarchy(g, ranks, nodes, per, i, intra[k], inter[i], places[rank].source)
    if rank == 0:
        n, r = len(layouts[0]), len(layouts[0][0])
        _say(
            f"[ggspeed] gct: hierarchical data-parallel reduction: {len(layouts)} data-parallel "
            f"group(s) of {n} nodes x {r} ranks (node layout from {places[0].source}); each "
            f"rank carries 1/{r} of a bucket across nodes, coded"
        )
    return own


def _say(line: str) -> None:
    """The install decision on the ``ggspeed`` logger, or on stderr where no logging is set up
    (no handler is added: that would switch on every other ggspeed INFO line too)."""
    if logger.hasHandlers():
        logger.info(line)
    else:
        print(line, file=sys.stderr, flush=True)


def node_chunks(n: int, per_node: int, block: int) -> tuple[list[int], int]:
    """Where the chunk of each of a node's ``per_node`` ranks starts (and n), and the padded
    chunk width: whole quantization blocks (as the flat path's), sizes as equal as blocks allow;
    trailing chunks may be short or empty."""
    per = -(-n // per_node)
    width = -(-per // block) * block if block > 0 else per
    return [min(i * width, n) for i in range(per_node + 1)], width


def reduce_bucket(
    tensor: torch.Tensor, state: GCTState, group: Any, *, key: str, average: bool = True
) -> torch.Tensor:
    """Average (or sum) ``tensor`` over ``group`` in place: hierarchically when ``state`` holds
    a hierarchy for this group, else flat; what ``compressed_all_reduce`` returns."""
    h = getattr(state, "hierarchy", None)  # states pickled before hierarchies have none
    if h is not None and h.serves(group):
        return hierarchical_all_reduce(tensor, state, h, key=key, average=average)
    if state.has_restored():
        _fold_into_flat(state, key, tensor.numel())
    return compressed_all_reduce(tensor, state, group, key=key, average=average)


def hierarchical_all_reduce(
    tensor: torch.Tensor, state: GCTState, h: Hierarchy, *, key: str, average: bool = True
) -> torch.Tensor:
    """Average (or sum) ``tensor`` over ``h``'s data-parallel group in place; return it.

    Averaging divides by the whole group's size, as the flat path does. Any rank's inf/NaN
    makes the chunks holding it NaN on every rank. A corrupted coded message raises
    :class:`WireError` on every rank of the group (the chunk's residual unchanged; the other
    chunks' calls completed and keep their new residuals)."""
    n = tensor.numel()
    if n == 0:
        return tensor
    dev, per, i = tensor.device, h.per_node, h.index
    block = state.cfg.block_size
    bounds, width = node_chunks(n, per, block)
    lo, hi = bounds[i], bounds[i + 1]

    # 1. Within the node, float32: reduce-scatter; chunk i of the node's sum to index i.
    send = torch.zeros(per * width, dtype=torch.float32, device=dev)
    send[:n].copy_(tensor.reshape(-1))
    if state.has_restored() and state.cfg.error_feedback:
        _fold_into_send(state, key, send, n, f"{key}@node[{lo}:{hi}]")
    mine = torch.empty(width + 1, dtype=torch.float32, device=dev)  # + a refusal flag
    t0 = time.perf_counter()
    reduce_scatter(mine[:width], send, group=h.intra)
    node_s = time.perf_counter() - t0

    # 2. Across nodes, coded: the sum of chunk i over the nodes.
    failed: WireError | None = None
    try:
        compressed_all_reduce(
            mine[: hi - lo], state, h.inter, key=f"{key}@node[{lo}:{hi}]", average=False
        )
    except WireError as e:
        failed = e
    mine[width] = 1.0 if failed is not None else 0.0

    # 3. Within the node: the average, then every chunk to every rank.
    if average:
        mine[:width].div_(h.world)
    out = torch.empty(per * (width + 1), dtype=torch.float32, device=dev)
    t0 = time.perf_counter()
    all_gather(out, mine, group=h.intra)
    node_s += time.perf_counter() - t0
    got = out.view(per, width + 1)
    bad = [j for j in range(per) if float(got[j, width]) != 0.0]
    # ring-equivalent bytes sent within the node; its time counts as communication
    state.record(intra_node_bytes=4 * (per - 1) * (2 * width + 1), comm_s=node_s)
    if bad:
        err = WireError(
            f"compressed_all_reduce (hierarchical): chunk(s) {bad} of bucket {key!r} refused "
            "across nodes; the call is refused on every rank"
        )
        raise err from failed
    flat = tensor.view(-1) if tensor.is_contiguous() else None
    res = got[:, :width].reshape(-1)[:n]
    if flat is not None:
        flat.copy_(res)
    else:
        tensor.copy_(res.view_as(tensor))
    return tensor


def _restored_parts(state: GCTState, key: str, n: int, own: str) -> list[tuple[int, int, str]]:
    """The restored residuals of bucket ``key`` (n elements) in a form other than ``own``, as
    (lo, hi, residual key); ValueError when one does not fit the bucket (another model)."""
    parts = []
    for k in state.restored_keys():
        if k == own:
            continue
        if k == key:
            lo, hi = 0, n
        else:
            m = _SEGMENT.match(k)
            if m is None or m["key"] != key:
                continue
            lo, hi = int(m["lo"]), int(m["hi"])
        size = state.residuals[k].numel()
        if hi > n or size != hi - lo:
            raise ValueError(
                f"GCT state: the checkpoint's residual {k!r} has {size} elements, which do not "
                f"fit bucket {key!r} of {n}: the checkpoint was written with another model or "
                "bucket layout"
            )
        parts.append((lo, hi, k))
    return parts


def _fold_into_send(state: GCTState, key: str, send: torch.Tensor, n: int, own: str) -> None:
    """Add restored residuals of bucket ``key`` in another form to what this rank sends."""
    for lo, hi, k in _restored_parts(state, key, n, own):
        send[lo:hi] += state.pop_restored(k).to(send.device)


def _fold_into_flat(state: GCTState, key: str, n: int) -> None:
    """Place restored per-node-chunk residuals of bucket ``key`` into its flat residual."""
    if not state.cfg.error_feedback:
        return
    parts = _restored_parts(state, key, n, key)
    if not parts:
        return
    flat = state.residuals.get(key)
    if flat is not None and flat.numel() != n:
        return  # another model's residual: ``GCTState.residual`` refuses it
    flat = flat.clone() if flat is not None else torch.zeros(n)
    for lo, hi, k in parts:
        flat[lo:hi] += state.pop_restored(k).to(flat.device)
    state.residuals[key] = flat
    state.mark_restored(key)
