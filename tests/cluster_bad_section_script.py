"""Run by tests/test_cluster.py on every rank of the simulated cluster: ``ggspeed.initialize``
where the ranks of node 1 (global ranks >= the ranks per node) hold a bad ``"ggspeed"`` section.

Each rank prints one line with what ``initialize`` did and exits 3 on an error, so the test can
tell that the ranks of node 0, which nothing on node 1 can kill, stopped on their own.
"""

from __future__ import annotations

import os
import sys


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
        print(f"[bad-section] rank {rank}: {type(e).__name__}: {e}", flush=True)
        return 3
    print(f"[bad-section] rank {rank}: initialized", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
