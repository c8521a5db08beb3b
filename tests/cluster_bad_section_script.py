"""Run by tests/test_cluster.py on every rank of the simulated cluster: ``ggspeed.initialize``
where the ranks of node 1 (global ranks >= the ranks per node) hold a bad ``"ggspeed"`` section.

Each rank prints one line with what ``initialize`` did and exits 3 on an error, so the test can
tell that the ranks of node 0, which nothing on node 1 can kill, stopped on their own.

DeepSpeed's per-node launcher kills a node's other ranks as soon as one of them exits non-zero,
so a rank waits (bounded) until every rank of its node has printed before it exits: otherwise
the first rank's exit can cut off its node peer's line. With a folder argument, each rank
marks there that it printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

WAIT_S = 30.0


def _say(line: str) -> None:
    """One write of the whole line: the node's ranks share one pipe, and under ``python -u``
    ``print`` writes the text and its newline separately, so two ranks' lines could merge."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def _wait_for_node(marks: Path, rank: int, per_node: int) -> None:
    """Mark that ``rank`` printed; wait until every rank of its node did (at most WAIT_S)."""
    marks.mkdir(parents=True, exist_ok=True)
    (marks / str(rank)).touch()
    first = rank - rank % per_node
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if all((marks / str(r)).exists() for r in range(first, first + per_node)):
            return
        time.sleep(0.05)


def main() -> int:
    import torch

    import ggspeed

    rank = int(os.environ["RANK"])
    per_node = int(os.environ.pop("LOCAL_SIZE", "2"))  # popped: no never-freed /dev/shm segment
    section: dict = {"gct": {"enabled": True}}
    if rank >= per_node:
        section["log_interval"] = 0
    config = {
        "train_batch_size": int(os.environ["WORLD_SIZE"]),
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "ggspeed": section,
    }
    model = torch.nn.Linear(4, 4)
    try:
        ggspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    except Exception as e:  # the verdict every rank must reach
        _say(f"[bad-section] rank {rank}: {type(e).__name__}: {e}")
        code = 3
    else:
        _say(f"[bad-section] rank {rank}: initialized")
        code = 0
    # deepspeed's launcher passes --local_rank=N first; the marks folder is the one positional
    marks = [a for a in sys.argv[1:] if not a.startswith("--")]
    if marks:
        _wait_for_node(Path(marks[0]), rank, per_node)
    return code


if __name__ == "__main__":
    sys.exit(main())
