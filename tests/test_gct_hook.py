"""The GCT DDP comm hook on 2 real gloo ranks: asynchronous, and equal to the synchronous call.

(No ``from __future__ import annotations``: DDP checks a hook's return annotation as an object.)
"""

import time

import pytest
import torch

from tests.dist import pool_ranks

pytestmark = pytest.mark.dist

PEER_DELAY_S = 1.5


def _model(unused_branch: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh()
            )
            self.head = torch.nn.Linear(96, 1)
            self.unused = torch.nn.Linear(96, 1) if unused_branch else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    return Net()


def _sync_hook(state, bucket):
    """The reference: the same compressed all-reduce, done before the hook returns."""
    from ggspeed.gct import compressed_all_reduce

    buf = bucket.buffer()
    compressed_all_reduce(buf, state, state.group, key=f"ddp{bucket.index()}", average=True)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _train(hook, steps: int, find_unused: bool) -> tuple[torch.Tensor, float]:
    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState

    rank = torch.distributed.get_rank()
    model = _model(find_unused)
    # ~12k parameters in buckets of ~2.6k: several buckets in flight per backward
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=0.01, find_unused_parameters=find_unused
    )
    state = GCTState(GCTConfig(enabled=True, quant_step=1.0, rdoq_mu=0.05))
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(32, 1, generator=torch.Generator().manual_seed(42))
    for _ in range(steps):
        x = torch.randn(64, 32, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), x @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return params, state.stats.bits_per_element


def _overlap() -> dict:
    """Rank 1 starts its backward late; rank 0 records what its hook calls returned."""
    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, gct_hook

    rank = torch.distributed.get_rank()
    ddp = torch.nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.01)
    state = GCTState(GCTConfig(enabled=True, quant_step=1.0))
    calls: list[tuple[bool, float]] = []

    def watched(state, bucket):
        fut = gct_hook(state, bucket)
        calls.append((fut.done(), time.time()))
        return fut

    ddp.register_comm_hook(state, watched)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(rank))
    for it in range(3):  # 0: first call makes the private group; then DDP's rebuilt buckets
        calls.clear()
        ddp.zero_grad()
        loss = ddp(x).square().mean()
        if it == 2 and rank == 1:
            time.sleep(PEER_DELAY_S)
        started = time.time()
        loss.backward()  # waits for every bucket's future before it returns
    grads = torch.cat([p.grad.flatten() for p in ddp.parameters()])
    return {"calls": list(calls), "backward_started": started, "grads": grads}


def _async_and_sync(find_unused: bool) -> dict:
    from ggspeed.gct import gct_hook

    return {"async": _train(gct_hook, 12, find_unused), "sync": _train(_sync_hook, 12, find_unused)}


@pytest.fixture(scope="module")
def overlap() -> list[dict]:
    return pool_ranks(_overlap, 2, timeout=300)


@pytest.fixture(scope="module", params=[False, True], ids=["all_used", "find_unused"])
def trained(request) -> list[dict]:
    return pool_ranks(_async_and_sync, 2, request.param, timeout=300)


class TestAsynchronous:
    """Rank 1 starts its backward late: rank 0's hook calls must not wait for it."""

    def test_several_buckets_are_in_flight(self, overlap) -> None:
        calls = overlap[0]["calls"]
        assert len(calls) >= 2, f"expected several buckets, got {len(calls)}"

    def test_futures_are_pending_while_the_peer_is_absent(self, overlap) -> None:
        calls = overlap[0]["calls"]
        assert not any(done for done, _ in calls), "a future was complete while its peer was absent"

    def test_calls_return_before_the_peer_starts_its_backward(self, overlap) -> None:
        last_return = max(t for _, t in overlap[0]["calls"])
        assert last_return < overlap[1]["backward_started"], (
            "rank 0's hook calls did not all return before rank 1 began its backward"
        )

    def test_ranks_end_with_equal_gradients(self, overlap) -> None:
        assert torch.equal(overlap[0]["grads"], overlap[1]["grads"]), "ranks' gradients differ"


class TestEqualsTheSynchronousCall:
    """12 Adam steps with the asynchronous hook and with the synchronous reference."""

    def test_parameters_equal_the_synchronous_call(self, trained) -> None:
        for rank, r in enumerate(trained):
            assert torch.equal(r["async"][0], r["sync"][0]), f"rank {rank}: async != sync"

    def test_bits_per_element_equal_the_synchronous_call(self, trained) -> None:
        for rank, r in enumerate(trained):
            bits, ref_bits = r["async"][1], r["sync"][1]
            assert 0 < bits == ref_bits, f"rank {rank}: bits/element {bits} vs sync {ref_bits}"

    def test_ranks_stay_equal(self, trained) -> None:
        assert torch.equal(trained[0]["async"][0], trained[1]["async"][0]), "ranks diverged"
