"""Two "nodes" on this machine: two `deepspeed --no_ssh --node_rank 0/1` invocations on loopback.

launch/multinode.sh starts each node's ranks; node 0 holds pipeline stage 0, node 1 stage 1, so
activations and gradients cross the "nodes" over gloo on 127.0.0.1. No /dev/shm segment may leak.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.dist import free_port
from tests.test_trainer import MODEL, ds_config

ROOT = Path(__file__).resolve().parents[1]


def _shm() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("deepspeed")}


@pytest.mark.dist
def test_two_nodes_no_ssh_on_loopback(tmp_path):
    from tests.test_data import _tool

    _tool().prepare(tmp_path / "data", vocab_size=512, max_files=12, valid_fraction=0.2)
    (tmp_path / "model.json").write_text(json.dumps({**MODEL, "dropout": 0.0}))
    (tmp_path / "ds.json").write_text(
        json.dumps(
            ds_config(
                train_batch_size=4,
                train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=2,
                ggspeed={},
            )
        )
    )
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    shm_before = _shm()
    env = {
        **os.environ,
        "HOSTFILE": str(tmp_path / "hostfile"),
        "DS_CONFIG": str(tmp_path / "ds.json"),
        "MODEL_CONFIG": str(tmp_path / "model.json"),
        "DATA_PATH": str(tmp_path / "data"),
        "TP": "1",
        "PP": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    args = ["bash", str(ROOT / "launch" / "multinode.sh"), "--train-iters", "3", "--eval-interval", "3",
            "--eval-iters", "1", "--no-progress", "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    procs = [
        subprocess.Popen(
            args,
            env={**env, "NODE_RANK": str(n)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for n, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {n}:\n{out[-4000:]}"
    assert "layout tp=1 pp=2 dp=1" in outs[0]
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    assert all(x == x for x in summary["losses"])  # finite, not NaN
    assert _shm() <= shm_before, "a deepspeed /dev/shm segment leaked"
