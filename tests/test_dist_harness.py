"""The multi-rank harness itself: real gloo collectives, results and failures come back, and a
pooled call starts from what a fresh rank has, whatever the call before it did."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import pool_ranks, run_ranks

pytestmark = pytest.mark.dist


def _sum_ranks() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("rank one failed on purpose")


def _hang_on_rank_one() -> None:
    if dist.get_rank() == 1:
        time.sleep(600)


def _pid() -> int:
    return os.getpid()


def _leave_state_behind() -> str:
    """Everything a careless test could change: environment, seed, dtype, grad mode, a subgroup,
    ggspeed's switches."""
    from ggspeed.gct import common
    from ggspeed.gct.exchange import Exchange

    os.environ["GGSPEED_HARNESS_PROBE"] = "set"
    torch.manual_seed(123)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    common.FUSED_CPU = False
    common.WIRE_CHECKSUM = False
    Exchange.send_hook = lambda t: t
    return dist.new_group([0, 1]).group_name


def _state_seen() -> dict:
    from ggspeed.gct import common
    from ggspeed.gct.exchange import Exchange

    return {
        "probe": os.environ.get("GGSPEED_HARNESS_PROBE"),
        "draw": torch.rand(4),
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "switches": (common.FUSED_CPU, common.WIRE_CHECKSUM, Exchange.send_hook),
        "group": dist.new_group([0, 1]).group_name,
        "master_port": os.environ["MASTER_PORT"],
        "world": (dist.get_rank(), dist.get_world_size(), os.environ["RANK"]),
    }


def _deepspeed_all_reduce() -> float:
    """DeepSpeed's communication backend on the call's own group (init_pg=False)."""
    import deepspeed
    import deepspeed.comm as ds_dist

    deepspeed.init_distributed("gloo")
    t = torch.tensor([float(ds_dist.get_rank() + 1)])
    ds_dist.all_reduce(t)
    return t.item()


def _env_var(name: str) -> str | None:
    return os.environ.get(name)


class TestFreshRanks:
    def test_all_reduce_over_gloo(self):
        assert run_ranks(_sum_ranks, 2) == [3.0, 3.0], "all-reduce of 1 + 2 on 2 fresh ranks"

    def test_rank_failure_is_reported_naming_the_rank(self):
        with pytest.raises(AssertionError, match=r"(?s)rank 1: .*rank one failed on purpose"):
            run_ranks(_fail_on_rank_one, 2, timeout=60)


class TestPooledRanks:
    def test_all_reduce_over_gloo(self):
        assert pool_ranks(_sum_ranks, 2) == [3.0, 3.0], "all-reduce of 1 + 2 on 2 pooled ranks"

    def test_ranks_are_reused(self):
        first, second = pool_ranks(_pid, 2), pool_ranks(_pid, 2)
        assert first == second, "a second call ran on other processes"
        assert len(set(first)) == 2 and os.getpid() not in first, "ranks are 2 other processes"

    def test_a_call_starts_from_a_fresh_rank_state(self):
        fresh = run_ranks(_state_seen, 2)
        pool_ranks(_leave_state_behind, 2)
        pooled = pool_ranks(_state_seen, 2)
        seeded = torch.rand(4, generator=torch.Generator().manual_seed(123))
        for rank, (f, p) in enumerate(zip(fresh, pooled, strict=True)):
            assert p["probe"] is None, f"rank {rank}: an environment variable leaked"
            assert not torch.equal(p["draw"], seeded), (
                f"rank {rank}: the seed set by the call before was kept"
            )
            assert p["dtype"] == f["dtype"] == torch.float32, f"rank {rank}: default dtype"
            assert p["grad"] and f["grad"], f"rank {rank}: grad mode"
            assert p["switches"] == f["switches"] == (True, True, None), f"rank {rank}: switches"
            assert p["group"] == f["group"], f"rank {rank}: subgroup names continue a past call"
            assert p["world"] == f["world"] == (rank, 2, str(rank)), f"rank {rank}: its place"
        assert fresh[0]["master_port"] == fresh[1]["master_port"], "one rendezvous per call"

    def test_deepspeed_comm_is_set_up_again_by_each_call(self):
        for call in range(2):
            got = pool_ranks(_deepspeed_all_reduce, 2, init_pg=False, timeout=240)
            assert got == [3.0, 3.0], f"call {call}: DeepSpeed's all-reduce gave {got}"

    def test_env_reaches_every_rank_for_one_call(self):
        assert pool_ranks(
            _env_var, 2, "GGSPEED_HARNESS_PROBE", env={"GGSPEED_HARNESS_PROBE": "x"}
        ) == [
            "x",
            "x",
        ], "env= was not set on every rank"
        assert pool_ranks(_env_var, 2, "GGSPEED_HARNESS_PROBE") == [None, None], (
            "env= outlived its call"
        )

    def test_rank_failure_is_reported_and_the_next_call_runs(self):
        before = pool_ranks(_pid, 2)
        with pytest.raises(AssertionError, match=r"(?s)rank 1: .*rank one failed on purpose"):
            pool_ranks(_fail_on_rank_one, 2, timeout=60)
        assert pool_ranks(_sum_ranks, 2) == [3.0, 3.0], "the call after a failure did not run"
        assert set(pool_ranks(_pid, 2)).isdisjoint(before), "a failed pool was not replaced"

    def test_a_hang_times_out_naming_the_rank_and_the_next_call_runs(self):
        with pytest.raises(
            TimeoutError,
            match=r"rank\(s\) \[1\] still running after 5 s \(rank\(s\) \[0\] returned",
        ):
            pool_ranks(_hang_on_rank_one, 2, timeout=5)
        assert pool_ranks(_sum_ranks, 2) == [3.0, 3.0], "the call after a hang did not run"
