"""The multi-rank test harness: real processes joined by a gloo process group.

It lives in :mod:`ggspeed.testing` (tools/ use it too); this module keeps the names that tests
import. ``run_ranks`` spawns fresh ranks per call; ``pool_ranks`` reuses a pool of ranks per world
size (the interpreters and their imports are paid once per test session) and is what tests use
unless their ranks leave state that cannot be undone (DeepSpeed engines, Megatron's parallel
state): see :mod:`ggspeed.testing`.
"""

from ggspeed.testing import RankPool, close_pools, free_port, pool_ranks, rank_env, run_ranks

__all__ = ["RankPool", "close_pools", "free_port", "pool_ranks", "rank_env", "run_ranks"]
