"""The simulated cluster (tools/cluster.py): real `deepspeed --hostfile` over pdsh/ssh between
network namespaces, 2 nodes x 2 ranks.

- TP2 within a node x DP2 across nodes, then PP2 across nodes x DP2 within, all three ggspeed
  techniques on: the losses equal a 1-node run of the same layout on the same cluster (same rank
  order, so the same sums; the tolerance of tests/test_model3d.py).
- A rank killed on one node: every rank on every node and the launcher exit in bounded time,
  with a line naming the dead rank; ``--load`` then resumes from the last checkpoint.
- A bad ggspeed section on one node: the other node's ranks stop on their own with the error.
- ``up`` / ``down`` leave no namespace, sshd or /dev/shm segment behind.

Needs root (namespaces, tc, sshd); the cluster installs pdsh and openssh with apt when missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_model3d import TOL
from tests.test_trainer import MODEL, ds_config

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 600


def _cluster_module():
    name = "ggspeed_tools_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "cluster.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _shm() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("deepspeed")}


def _start_id() -> int:
    return 100 + os.getpid() % 300  # away from the tool's default id 0 and other runs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = _cluster_module()
    shm_before = _shm()
    c = cl.create(2, _start_id(), ranks_per_node=2)
    root = tmp_path_factory.mktemp("cluster")
    from tests.test_data import _tool

    _tool().prepare(root / "data", vocab_size=512, max_files=12, valid_fraction=0.2)
    (root / "model.json").write_text(json.dumps(MODEL))
    (root / "ds.json").write_text(json.dumps(ds_config()))  # GG Init, ACT and GCT on
    (root / "hostfile1").write_text(f"{c.host(0)} slots=4\n")  # the 1-node reference
    try:
        yield c, root
    finally:
        c.down()
        assert not {c.hub, c.ns(0), c.ns(1)} & _cluster_module().namespaces()
        assert _shm() <= shm_before, "a deepspeed /dev/shm segment leaked"


def trainer_args(root: Path, log: str, *extra: str) -> list[str]:
    return [
        str(ROOT / "launch" / "pretrain_gpt.py"),
        "--deepspeed_config", str(root / "ds.json"),
        "--model-config", str(root / "model.json"),
        "--data-path", str(root / "data"),
        "--train-iters", "3",
        "--eval-interval", "3",
        "--eval-iters", "1",
        "--lr", "3e-3",
        "--no-progress",
        "--log-dir", str(root / log),
        *extra,
    ]  # fmt: skip


def launch(c, args: list[str], hostfile: Path | None = None, timeout: float = RUN_TIMEOUT):
    """``deepspeed --hostfile`` from inside node 0; returns (returncode, output)."""
    cmd = ["deepspeed", "--hostfile", str(hostfile or c.hostfile), "--master_addr", c.master_addr]
    p = c.popen(0, [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0]
        pytest.fail(f"launcher still running after {timeout} s:\n{out[-4000:]}")
    return p.returncode, out


def summary(root: Path, log: str) -> dict:
    return json.loads((root / log / "summary.json").read_text())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the simulated cluster needs root")
@pytest.mark.parametrize(
    ("layout", "tp", "pp"),
    [("TP2-in-node_x_DP2-across", 2, 1), ("PP2-across_x_DP2-in-node", 1, 2)],
)
def test_two_nodes_equal_one_node(cluster, layout, tp, pp):
    c, root = cluster
    par = ["--tp", str(tp), "--pp", str(pp)]
    rc, out = launch(c, trainer_args(root, f"{layout}-2nodes", *par))
    assert rc == 0, out[-6000:]
    # pdsh prefixes each node's lines with its host: both nodes ran ranks.
    assert f"{c.host(0)}:" in out and f"{c.host(1)}:" in out
    assert "deepspeed.launcher.launch" in out and "pdsh" in out
    rc, out1 = launch(c, trainer_args(root, f"{layout}-1node", *par), hostfile=root / "hostfile1")
    assert rc == 0, out1[-6000:]
    two, one = summary(root, f"{layout}-2nodes"), summary(root, f"{layout}-1node")
    assert two["layout"] == one["layout"] == {"tp": tp, "pp": pp, "dp": 2}
    assert len(two["losses"]) == 3 and abs(two["losses"][-1] - two["losses"][0]) > 1e-3
    assert two["losses"] == pytest.approx(one["losses"], abs=TOL)
    assert two["final_valid_loss"] == pytest.approx(one["final_valid_loss"], abs=TOL)
    assert two["gct_bits_per_element"] is not None and two["act_bits_per_element"] is not None


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the simulated cluster needs root")
def test_killed_rank_stops_every_node_then_resumes(cluster):
    c, root = cluster
    ck = root / "ck"
    args = trainer_args(root, "kill", "--tp", "2", "--save", str(ck), "--save-interval", "2")
    args[args.index("--train-iters") + 1] = "100000"
    p = c.popen(0, c.deepspeed(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (ck / "latest").is_file():
            assert p.poll() is None, p.communicate()[0][-6000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.5)
        victim = 2  # node 1's local rank 0
        pid = c.rank_pids(1)[victim]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out = p.communicate(timeout=180)[0]  # the bound: gloo errors, then each launcher exits
        took = time.monotonic() - killed_at
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    left = {n: c.rank_pids(n) for n in range(c.nodes)}
    assert not any(left.values()), f"ranks still running after the launcher exited: {left}"
    named = [line for line in out.splitlines() if "ranks lost" in line]
    assert named, out[-6000:]
    assert all(line.rstrip().endswith(f"ranks lost: {victim}") for line in named), out[-8000:]
    assert took < 180
    # Resume from the last checkpoint written before the kill.
    tag = (ck / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    args = trainer_args(root, "resume", "--tp", "2", "--load", str(ck))
    args[args.index("--train-iters") + 1] = str(step + 2)
    rc, out = launch(c, args)
    assert rc == 0, out[-6000:]
    s = summary(root, "resume")
    assert s["steps"] == step + 2 and len(s["losses"]) == 2
    assert all(x == x for x in s["losses"])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the simulated cluster needs root")
def test_bad_section_on_one_node_stops_every_rank(cluster):
    """Node 1's ranks hold a bad ggspeed section. Node 1's launcher can stop only its own ranks;
    node 0's ranks must reach the same verdict and exit on their own, in bounded time."""
    c, root = cluster
    bound = 240
    start = time.monotonic()
    script = str(ROOT / "tests" / "cluster_bad_section_script.py")
    rc, out = launch(c, [script, str(root / "bad-section-marks")], timeout=bound)
    took = time.monotonic() - start
    assert rc != 0 and took < bound, out[-6000:]
    lines = {}
    for line in out.splitlines():
        if "[bad-section] rank " in line:
            host, _, rest = line.partition(": [bad-section] rank ")
            rank, _, verdict = rest.partition(": ")
            lines[int(rank)] = (host.strip(), verdict)
    for rank in (0, 1):  # node 0: nothing killed them, they stopped with the verdict
        host, verdict = lines.get(rank, ("", ""))
        assert host == c.host(0), (rank, out[-6000:])
        assert verdict.startswith("ConfigError") and "ggspeed.log_interval: got 0" in verdict, (
            rank,
            verdict,
        )
    assert not any(c.rank_pids(n) for n in range(c.nodes)), "ranks still running"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the simulated cluster needs root")
def test_up_down_leaves_nothing():
    cl = _cluster_module()
    shm_before = _shm()
    c = cl.create(2, _start_id() + 1, rate="100mbit", ranks_per_node=1)
    try:
        assert c.pids and all(cl._alive(pid) for pid in c.pids.values())
        qdisc = c.run(1, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        # node 1 reaches node 0 over ssh through the cluster's own config (not ~/.ssh)
        r = c.run(1, ["ssh", c.host(0), "cat /proc/net/dev"])
        assert "eth0" in r.stdout
        assert c.iface_bytes()[c.ns(0)][0] > 0
        pids = list(c.pids.values())
    finally:
        c.down()
    assert not {c.hub, c.ns(0), c.ns(1)} & cl.namespaces()
    assert not any(cl._alive(pid) for pid in pids)
    assert not (c.dir / "state.json").exists()
    assert _shm() <= shm_before


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"rate": "fast"}, "rate 'fast'"), ({"latency": "1s"}, "latency '1s'"),
     ({"cluster_id": 512}, "cluster id 512"), ({"nodes": 0}, "nodes 0"),
     ({"ranks_per_node": 0}, "ranks per node 0")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_them(kw, key):
    cl = _cluster_module()
    with pytest.raises(cl.ClusterError, match="allowed") as e:
        cl.Cluster(**kw).check()
    assert key in str(e.value)
