"""GCT: gradient-constrained training and an Exp-Golomb-coded compressed all-reduce.

- :func:`compressed_all_reduce` with a per-rank :class:`GCTState` (error feedback, statistics);
  :class:`WireError` when a corrupted message makes every rank refuse a call
- :func:`install` / :func:`check_ds_config`: the backend on DeepSpeed 0.19.8 engines
- :func:`gct_hook`: the same backend as a torch DDP communication hook
- :func:`apply_constraint`, :func:`exact_constraint_term`: the gradient constraint
"""

from .allreduce import WireError, compressed_all_reduce
from .constraint import apply_constraint, exact_constraint_term, secant_term
from .deepspeed import check_ds_config, install
from .hook import gct_hook
from .rdoq import eg_bits, quantize_rdoq, quantize_round
from .state import GCTState, GCTStats

__all__ = [
    "GCTState",
    "GCTStats",
    "WireError",
    "apply_constraint",
    "check_ds_config",
    "compressed_all_reduce",
    "eg_bits",
    "exact_constraint_term",
    "gct_hook",
    "install",
    "quantize_rdoq",
    "quantize_round",
    "secant_term",
]
