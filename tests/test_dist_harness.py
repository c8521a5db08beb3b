"""The multi-rank harness itself: real gloo collectives, results and failures come back."""

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks


def _sum_ranks() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("rank one failed on purpose")


def test_all_reduce_over_gloo():
    assert run_ranks(_sum_ranks, 2) == [3.0, 3.0]


def test_rank_failure_is_reported():
    with pytest.raises(AssertionError, match="rank one failed on purpose"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
