"""The tied-weight gradient all-reduce of a pipeline, coded with GCT's compressed all-reduce.

A weight used by several pipeline stages (a token embedding tied to the output head) has one
copy per stage; after the backward pass DeepSpeed 0.19.8's ``PipelineEngine._exec_reduce_tied_grads``
sums the copies' gradients with a full-width ``all_reduce`` over the stages that share it, so
they stay equal. In a layout with the pipeline across nodes that sum crosses the node boundary
every step. Coded instead: :func:`ggspeed.gct.compressed_all_reduce` (``average=False``: a
sum, as DeepSpeed's), one error-feedback residual per tied weight (keyed on its place in
``get_tied_weights_and_groups()``, stable across steps), quantized as the ``ggspeed.gct``
section says. Every rank of the tied group decodes the same levels and adds them the same way,
so the copies stay bit-identical; a corrupt stream raises ``WireError`` on every rank.

Installed on the engine instance as :mod:`ggspeed.wire.pipe` is: an instance copy of
``_INSTRUCTION_MAP`` maps ``ReduceTiedGrads`` to :func:`_reduce_tied_grads`, which does what
DeepSpeed's method does (the ZeRO-2 epilogue first, bf16's ``_hp_grad``), coded.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import GCTConfig
from ..config.wire import TIED_KEY
from ..gct.allreduce import compressed_all_reduce
from ..gct.state import GCTState

__all__ = ["TiedGradState", "install_coded_tied_grads"]

logger = logging.getLogger("ggspeed")


class TiedGradState(GCTState):
    """GCT's per-rank state (residuals, counters) for the tied gradients: the component
    ``tied_grads``, saved and restored with the checkpoint like ``gct``."""

    name = "tied_grads"


def _reduce_tied_grads(engine: Any, state: TiedGradState) -> None:
    if engine.zero_optimization_partition_gradients():
        engine.optimizer.overlapping_partition_gradients_reduce_epilogue()
    for i, (weight, group) in enumerate(engine.module.get_tied_weights_and_groups()):
        grad = weight._hp_grad if engine.using_bf16_optimizer else weight.grad
        if grad is not None:
            compressed_all_reduce(grad, state, group, key=f"tied{i}", average=False)


def install_coded_tied_grads(engine: Any, gct: GCTConfig) -> TiedGradState | None:
    """Code ``engine``'s tied-weight gradient all-reduce; returns the per-rank component, or None
    (with a warning naming the key) for an engine that is not a pipeline of two or more stages."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if not isinstance(engine, PipelineEngine) or engine.num_stages < 2:
        what = "a pipeline of one stage" if isinstance(engine, PipelineEngine) else "not a pipeline"
        logger.warning(
            "%s.enabled: the engine is %s, so no weight is tied across stages and there is no "
            "tied-weight gradient all-reduce to code; nothing installed (set it to false to "
            "silence this)",
            TIED_KEY,
            what,
        )
        return None
    if getattr(engine, "_ggspeed_tied_grads", None) is not None:
        raise RuntimeError(f"{TIED_KEY} is already installed on this engine")
    state = TiedGradState(gct.model_copy(update={"enabled": True}))
    table = dict(engine._INSTRUCTION_MAP)

    def reduce_tied_grads(eng: Any) -> None:
        _reduce_tied_grads(eng, state)

    table[schedule.ReduceTiedGrads] = reduce_tied_grads
    engine._INSTRUCTION_MAP = table
    engine._ggspeed_tied_grads = state
    return state
