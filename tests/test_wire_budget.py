"""The wire budget counts what real gloo ranks send: by kind, crossing or not (emulated nodes),
and a DeepSpeed ZeRO-1 engine's gradients and parameters at their known sizes."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks

pytestmark = pytest.mark.dist

NODES = [0, 0, 1, 1]  # 2 emulated nodes x 2 ranks


def _known_sends() -> dict[str, list[int]]:
    import torch
    import torch.distributed as dist

    from ggspeed.gct import exchange  # binds torch's all-gather at import, before the budget
    from ggspeed.wire import budget as wb

    rank = dist.get_rank()
    b = wb.WireBudget(NODES, rank)
    pair = dist.new_group([0, 2])
    b.set_group_kind(pair, "tp")
    wb.activate(b)
    try:
        with wb.charge("dp_grad"):
            dist.all_reduce(torch.ones(1000))  # 4000 B: ring, 2 x 3/4 x 4000 to the next rank
        with wb.charge("zero_param"):
            dist.all_gather([torch.empty(100) for _ in range(4)], torch.ones(100))  # 3 x 400
            out = torch.empty(4 * 50, dtype=torch.float16)
            dist.all_gather_into_tensor(out, torch.ones(50, dtype=torch.float16))  # 3 x 100
        with wb.charge("tied_grad"):
            exchange.all_gather(
                torch.empty(4 * 8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)
            )
            # uneven all-to-all: rank j gets j + 1 bytes from every rank
            inp = torch.ones(10, dtype=torch.uint8)
            dist.all_to_all_single(torch.empty(4 * (rank + 1), dtype=torch.uint8), inp,
                                   [rank + 1] * 4, [1, 2, 3, 4])  # fmt: skip
        with wb.charge("pp_act"):
            if rank == 0:
                dist.send(torch.ones(64, dtype=torch.int8), 3)  # crosses
            elif rank == 3:
                dist.recv(torch.empty(64, dtype=torch.int8), 0)
        with wb.charge("pp_grad"):
            if rank == 0:
                dist.send(torch.ones(16), 1)  # stays on node 0
            elif rank == 1:
                dist.recv(torch.empty(16), 0)
        if rank in (0, 2):
            with wb.charge("dp_grad"):  # the group's kind wins: tensor parallel
                dist.all_reduce(torch.ones(10), group=pair)  # 2 ranks: 40 B to the other
        dist.broadcast(torch.ones(200), src=0)  # tree: 0 -> 1, 0 -> 2, 1 -> 3; 800 B each
        b.on_step(1)
    finally:
        wb.activate(None)
    return {kind: list(pair_) for kind, pair_ in zip(wb.KINDS, b.totals)}


def test_counts_what_ranks_send_by_kind_and_crossing() -> None:
    totals = run_ranks(_known_sends, 4, timeout=300)
    # [local, crossed] per rank; the ring's next rank: 0->1 local, 1->2 crosses, 2->3 local,
    # 3->0 crosses.
    crosses = [False, True, False, True]

    def ring(n: int) -> list[list[int]]:
        return [[0, n] if c else [n, 0] for c in crosses]

    for rank, got in enumerate(totals):
        assert got["dp_grad"] == ring(6000)[rank], rank
        assert got["zero_param"] == ring(1200 + 300)[rank], rank
    assert [t["pp_act"] for t in totals] == [[0, 64], [0, 0], [0, 0], [0, 0]]
    assert [t["pp_grad"] for t in totals] == [[64, 0], [0, 0], [0, 0], [0, 0]]
    assert [t["tp"] for t in totals] == [[0, 40], [0, 0], [0, 40], [0, 0]]
    assert [t["other"] for t in totals] == [[800, 800], [0, 800], [0, 0], [0, 0]]
    # tied_grad: a ring all-gather of 8 B (3 x 8 to the next rank), then 1..4 B to ranks 0..3
    sends = {r: [j + 1 for j in range(4) if j != r] for r in range(4)}
    for rank, got in enumerate(totals):
        ring_local, ring_cross = ring(24)[rank]
        local = sum(j + 1 for j in range(4) if j != rank and NODES[j] == NODES[rank])
        assert got["tied_grad"] == [ring_local + local, ring_cross + sum(sends[rank]) - local]


def _zero1_engine(steps: int) -> dict:
    import torch

    import ggspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "ggspeed": {"log_interval": 2},
    }
    engine, *_ = ggspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(engine.global_rank)
    for _ in range(steps):
        loss = engine(torch.randn(2, 64, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    return {
        "summary": engine.ggspeed.budget.summary(),
        "scalars": engine.ggspeed.scalars(),
        "numel": sum(p.numel() for p in model.parameters()),
        "partition": sum(p.numel() for p in engine.optimizer.single_partition_of_fp32_groups),
    }


def test_deepspeed_zero1_gradients_and_parameters_at_known_sizes() -> None:
    """2 ranks on 2 emulated nodes (LOCAL_WORLD_SIZE=1), fp32 ZeRO-1 through ggspeed.initialize:
    per step each rank all-reduces its gradients (2 ranks: the whole tensor to the other) and
    all-gathers its parameter partition; everything crosses."""
    out = run_ranks(_zero1_engine, 2, 4, init_pg=False, env={"LOCAL_WORLD_SIZE": "1"}, timeout=300)
    summary = out[0]["summary"]
    assert summary == out[1]["summary"]  # the job's budget, the same on every rank
    assert summary["steps"] == [1, 2, 3, 4]
    kinds = summary["kinds"]
    grads = 2 * 4 * out[0]["numel"]  # two ranks x fp32 gradients
    params = 4 * (out[0]["partition"] + out[1]["partition"])  # each partition, fp32
    assert kinds["dp_grad"] == {"bytes_per_step": grads, "cross_bytes_per_step": grads}
    assert kinds["zero_param"] == {"bytes_per_step": params, "cross_bytes_per_step": params}
    for kind in ("pp_act", "pp_grad", "tied_grad", "tp"):
        assert kinds[kind]["bytes_per_step"] == 0, kind
    assert 0 < kinds["other"]["bytes_per_step"] < 0.02 * grads  # loss/overflow/norm scalars
    assert summary["cross_bytes_per_step"] == summary["bytes_per_step"]
    scalars = out[0]["scalars"]  # telemetry at step 4 (log_interval 2): the job's bytes per step
    assert scalars["wire/dp_grad_cross_bytes"] == grads
    assert scalars["wire/zero_param_bytes"] == params
