"""One verdict on every rank: a local check's outcome, exchanged before anyone acts on it.

A check that fails on one rank only (a bad config section, a corrupt state file, a failed write)
must not leave that rank raising while its peers wait in the next collective. Each rank reports
``None`` (fine) or an error text; every rank receives all reports and raises the same error,
naming each failing rank. The exchange runs on a gloo side group with a bounded timeout, so it
takes CPU objects on any backend (NCCL included) and a silent peer cannot hold the others
forever; a dead peer breaks the exchange at once and is reported as such.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("ggspeed")

TIMEOUT_S = 300.0
"""How long a rank waits for its peers' verdicts (and for a side-group collective)."""

_side: tuple[Any, Any] | None = None  # (default group it was made for, gloo side group)


def side_group() -> Any:
    """The gloo group over all ranks with a bounded timeout; made on first use (collective).

    Every rank must make its first call at the same point of the program (``ggspeed.initialize``
    does); later calls return the cached group while the default group lives.
    """
    global _side
    world = dist.group.WORLD
    if _side is None or _side[0] is not world:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        _side = (world, group)
    return _side[1]


def agree(error: str | None, what: str, exc_type: type[Exception] = RuntimeError) -> None:
    """Raise ``exc_type`` on every rank if any rank passes an ``error``; return on all otherwise.

    ``what`` says what failed (``"checkpoint build/ckpt/iter_0000003 not loaded"``); the message
    lists each failing rank's error. Without a process group this is a local check.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise exc_type(f"{what}: {error}")
        return
    verdicts: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(verdicts, error, group=side_group())
    except RuntimeError as e:
        mine = f"; this rank: {error}" if error is not None else ""
        raise exc_type(
            f"{what}: the ranks could not agree, a peer died or stopped answering "
            f"within {TIMEOUT_S:.0f} s ({e}){mine}"
        ) from None
    failures: dict[str, list[int]] = {}  # one line per distinct error, with its ranks
    for rank, err in enumerate(verdicts):
        if err is not None:
            failures.setdefault(err, []).append(rank)
    if failures:
        raise exc_type(
            f"{what}: "
            + "; ".join(
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {err}"
                for err, ranks in failures.items()
            )
        )
