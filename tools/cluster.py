"""A simulated cluster on one machine: nodes = network namespaces with shaped links, sshd on each.

    python tools/cluster.py up 2 --rate 100mbit --ranks-per-node 2   # needs root
    python tools/cluster.py exec 0 deepspeed --hostfile build/cluster/0/hostfile \\
        --master_addr 198.18.0.1 launch/pretrain_gpt.py ...
    python tools/cluster.py status
    python tools/cluster.py down

Each node is a namespace ``ggs-<id>-n<k>`` whose veth ``eth0`` (address 198.18.<id>.<k+1>/24,
from the benchmarking range 198.18.0.0/15) joins a bridge in the hub namespace ``ggs-<id>-hub``.
Each node's ``eth0`` egress is shaped (tbf; netem for latency where the kernel has it), so each
direction of each node has its own budget, as on a full-duplex link. Every node runs its own sshd
(config, host key and authorized key under build/cluster/<id>/, nothing in ~/.ssh), and ``exec``
puts an ``ssh`` wrapper first on PATH that reads the cluster's ssh_config: DeepSpeed's runner and
pdsh then reach the nodes with the real ``deepspeed --hostfile`` path. ``.deepspeed_env`` (found
through DS_ENV_FILE) gives every node GLOO_SOCKET_IFNAME=eth0 and the environment the ranks need.

Several clusters can coexist (``--id``, or GGSPEED_CLUSTER_ID); ``down`` ends only the processes
inside this cluster's namespaces and deletes only its namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "ggs"
MAX_ID = 511  # 198.18.0.0/15 holds 512 /24 subnets: one per cluster
PACKAGES = ["pdsh", "openssh-server", "openssh-client"]
SSHD = "/usr/sbin/sshd"
RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")
LATENCY_RE = re.compile(r"^\d+(\.\d+)?(us|ms)$")


class ClusterError(RuntimeError):
    """A cluster that cannot be brought up or used, with the reason in one line."""


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise ClusterError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def namespaces() -> set[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def ns_pids(ns: str) -> list[int]:
    r = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in r.stdout.split()]


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "the simulated cluster needs root (network namespaces, tc, sshd); run as root"
        )


def missing_packages() -> list[str]:
    missing = []
    if shutil.which("pdsh") is None:
        missing.append("pdsh")
    if not Path(SSHD).is_file():
        missing.append("openssh-server")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        missing.append("openssh-client")
    return missing


def ensure_packages() -> list[str]:
    """Install pdsh / openssh with apt when missing; returns what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    require_root()
    if shutil.which("apt-get") is None:
        raise ClusterError(f"missing {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env)
    if missing_packages():
        raise ClusterError(f"apt-get did not provide {', '.join(missing_packages())}")
    return missing


def has_netem() -> bool:
    """Whether the kernel offers the netem qdisc (latency); probed in a scratch namespace."""
    ns = f"{PREFIX}-probe-{os.getpid()}"
    _run(["ip", "netns", "add", ns])
    try:
        r = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                  "delay", "1ms"], check=False)  # fmt: skip
        return r.returncode == 0
    finally:
        _run(["ip", "netns", "del", ns], check=False)


@dataclass
class Cluster:
    """N nodes of R ranks each; ``state`` (json under build/cluster/<id>) records what ``up`` made."""

    nodes: int = 2
    cluster_id: int = 0
    rate: str | None = None  # e.g. "100mbit"; None: unshaped
    latency: str | None = None  # e.g. "1ms" one-way, per node egress; None: none added
    ranks_per_node: int = 1
    pids: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ names and paths
    @property
    def dir(self) -> Path:
        return ROOT / "build" / "cluster" / str(self.cluster_id)

    @property
    def hub(self) -> str:
        return f"{PREFIX}-{self.cluster_id}-hub"

    def ns(self, k: int) -> str:
        return f"{PREFIX}-{self.cluster_id}-n{k}"

    def host(self, k: int) -> str:
        """The node's hostname in the hostfile (an ssh_config alias for its address)."""
        return self.ns(k)

    def addr(self, k: int) -> str:
        return f"198.{18 + self.cluster_id // 256}.{self.cluster_id % 256}.{k + 1}"

    @property
    def master_addr(self) -> str:
        return self.addr(0)

    @property
    def hostfile(self) -> Path:
        return self.dir / "hostfile"

    @property
    def env_file(self) -> Path:
        return self.dir / ".deepspeed_env"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def all_ns(self) -> list[str]:
        return [self.hub, *(self.ns(k) for k in range(self.nodes))]

    # ------------------------------------------------------------------ state
    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, cluster_id: int) -> Cluster:
        path = ROOT / "build" / "cluster" / str(cluster_id) / "state.json"
        if not path.is_file():
            raise ClusterError(f"cluster {cluster_id} is not up (no {path})")
        return cls(**json.loads(path.read_text()))

    def check(self) -> None:
        if not 0 <= self.cluster_id <= MAX_ID:
            raise ClusterError(f"cluster id {self.cluster_id}: allowed 0..{MAX_ID}")
        if not 1 <= self.nodes <= 250:
            raise ClusterError(f"nodes {self.nodes}: allowed 1..250")
        if self.ranks_per_node < 1:
            raise ClusterError(f"ranks per node {self.ranks_per_node}: allowed >= 1")
        if self.rate is not None and not RATE_RE.match(self.rate):
            raise ClusterError(f"rate {self.rate!r}: allowed <number><bit|kbit|mbit|gbit>")
        if self.latency is not None and not LATENCY_RE.match(self.latency):
            raise ClusterError(f"latency {self.latency!r}: allowed <number><us|ms>")

    # ------------------------------------------------------------------ up / down
    def up(self) -> Cluster:
        """Namespaces, bridge, shaped veths, sshd per node, keys, hostfile, .deepspeed_env."""
        self.check()
        require_root()
        ensure_packages()
        if self.latency is not None and not has_netem():
            raise ClusterError(
                f"latency {self.latency}: this kernel has no netem qdisc (sch_netem); "
                "leave latency out, or use a kernel with netem"
            )
        # Claim the id: `ip netns add` fails when another cluster holds it.
        r = _run(["ip", "netns", "add", self.hub], check=False)
        if r.returncode != 0:
            raise ClusterError(
                f"cluster id {self.cluster_id} is in use (namespace {self.hub} exists); "
                "bring it down or pick another --id"
            )
        try:
            self._save()
            self._network()
            self._ssh()
            self._save()
        except BaseException:
            self.down()
            raise
        return self

    def _ip(self, ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def _network(self) -> None:
        hub = self.hub
        self._ip(hub, "link", "set", "lo", "up")
        self._ip(hub, "link", "add", "br0", "type", "bridge")
        self._ip(hub, "link", "set", "br0", "up")
        for k in range(self.nodes):
            ns = self.ns(k)
            _run(["ip", "netns", "add", ns])
            # Made inside the hub so nothing appears in the caller's namespace.
            self._ip(hub, "link", "add", f"n{k}", "type", "veth", "peer", "name", "eth0",
                     "netns", ns)  # fmt: skip
            self._ip(hub, "link", "set", f"n{k}", "master", "br0")
            self._ip(hub, "link", "set", f"n{k}", "up")
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(ns, "addr", "add", f"{self.addr(k)}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
        self.shape(self.rate, self.latency)

    def shape(self, rate: str | None, latency: str | None = None) -> None:
        """(Re)shape every node's eth0 egress: tbf at ``rate``, netem ``latency`` under it."""
        self.rate, self.latency = rate, latency
        self.check()
        for k in range(self.nodes):
            tc = ["ip", "netns", "exec", self.ns(k), "tc", "qdisc"]
            _run([*tc, "del", "dev", "eth0", "root"], check=False)
            if rate is not None:
                _run([*tc, "add", "dev", "eth0", "root", "handle", "1:", "tbf", "rate", rate,
                      "burst", "256kb", "latency", "100ms"])  # fmt: skip
                if latency is not None:
                    _run([*tc, "add", "dev", "eth0", "parent", "1:1", "handle", "10:", "netem",
                          "delay", latency, "limit", "100000"])  # fmt: skip
            elif latency is not None:
                _run([*tc, "add", "dev", "eth0", "root", "netem", "delay", latency,
                      "limit", "100000"])  # fmt: skip
        if (self.dir / "state.json").is_file():
            self._save()

    def _ssh(self) -> None:
        d = self.dir
        for name in ("id_ed25519", "ssh_host_ed25519_key"):
            for f in (d / name, d / f"{name}.pub"):
                f.unlink(missing_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"ggspeed-cluster-{self.cluster_id}",
                  "-f", str(d / name)])  # fmt: skip
        (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
        (d / "sshd_config").write_text(
            f"Port 22\nHostKey {d}/ssh_host_ed25519_key\nAuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
            "PrintMotd no\nMaxStartups 100\nMaxSessions 100\n"
        )
        hosts = "".join(
            f"Host {self.host(k)}\n  HostName {self.addr(k)}\n" for k in range(self.nodes)
        )
        (d / "ssh_config").write_text(
            f"{hosts}Host *\n  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            "  BatchMode yes\n  ConnectTimeout 10\n"
        )
        self.bin_dir.mkdir(exist_ok=True)
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        self.hostfile.write_text(
            "".join(f"{self.host(k)} slots={self.ranks_per_node}\n" for k in range(self.nodes))
        )
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.node_env().items()))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        for k in range(self.nodes):
            log = open(d / f"sshd-n{k}.log", "w")  # noqa: SIM115 (the child holds it)
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(k), SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
            log.close()
            self.pids[self.ns(k)] = p.pid
        for k in range(self.nodes):  # wait until each sshd answers
            deadline = time.monotonic() + 20
            while True:
                r = self.run(0, ["ssh", self.host(k), "true"], check=False, timeout=15)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    log = (d / f"sshd-n{k}.log").read_text()[-2000:]
                    raise ClusterError(f"sshd on {self.host(k)} does not answer: {r.stderr}{log}")
                time.sleep(0.3)

    def node_env(self) -> dict[str, str]:
        """What every node's ranks need; the ssh session on a node starts with a fresh env."""
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")])
        env = {
            "PATH": path,
            "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")
            ),
            "NUMBA_CACHE_DIR": os.environ.get(
                "NUMBA_CACHE_DIR", str(ROOT / "build" / "numba_cache")
            ),
        }
        if os.environ.get("VIRTUAL_ENV"):
            env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
        return env

    def down(self) -> list[str]:
        """End every process inside this cluster's namespaces (by PID), then delete them."""
        existing = namespaces()
        ours = [ns for ns in self.all_ns() if ns in existing]
        ended: list[str] = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = {pid for ns in ours for pid in ns_pids(ns)}
            pids |= {p for p in self.pids.values() if _alive(p)}
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    ended.append(str(pid))
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if _alive(p)}
                time.sleep(0.05)
            if not pids:
                break
        for ns in ours:
            _run(["ip", "netns", "del", ns], check=False)
        state = self.dir / "state.json"
        state.unlink(missing_ok=True)
        return ended

    # ------------------------------------------------------------------ use
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The launching environment on a node: the ssh wrapper first on PATH, DS_ENV_FILE."""
        env = {**os.environ, **self.node_env()}
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env["PATH"]])
        env["DS_ENV_FILE"] = str(self.env_file)  # absolute: DeepSpeed's runner then reads it
        env.update(extra or {})
        return env

    def command(self, node: int, cmd: list[str]) -> list[str]:
        if not 0 <= node < self.nodes:
            raise ClusterError(f"node {node}: allowed 0..{self.nodes - 1}")
        return ["ip", "netns", "exec", self.ns(node), *cmd]

    def popen(self, node: int, cmd: list[str], env: dict[str, str] | None = None, **kw):
        return subprocess.Popen(self.command(node, cmd), env=self.env(env), **kw)

    def run(self, node: int, cmd: list[str], check: bool = True, env=None, **kw):
        r = subprocess.run(
            self.command(node, cmd), env=self.env(env), capture_output=True, text=True, **kw
        )
        if check and r.returncode != 0:
            raise ClusterError(f"node {node}: {shlex.join(cmd)} failed: {r.stderr.strip()}")
        return r

    def deepspeed(self, script_and_args: list[str], node: int = 0, **kw) -> list[str]:
        """``deepspeed --hostfile`` over pdsh/ssh from ``node``; pass to popen/run."""
        return ["deepspeed", "--hostfile", str(self.hostfile), "--master_addr", self.master_addr,
                *[a for k, v in kw.items() for a in (f"--{k}", str(v))], *script_and_args]  # fmt: skip

    def iface_counters(self) -> dict[str, dict[str, int]]:
        """Each node's eth0 rx/tx bytes and packets (``/proc/net/dev`` inside its namespace)."""
        out = {}
        for k in range(self.nodes):
            pid = self.pids.get(self.ns(k))
            try:  # the node's sshd sees the node's namespace: no process to start
                text = Path(f"/proc/{pid}/net/dev").read_text() if pid else ""
            except OSError:
                text = ""
            if "eth0" not in text:
                text = self.run(k, ["cat", "/proc/net/dev"]).stdout
            for line in text.splitlines():
                name, _, rest = line.partition(":")
                if name.strip() == "eth0":
                    f = [int(x) for x in rest.split()]
                    out[self.ns(k)] = {"rx_bytes": f[0], "rx_packets": f[1],
                                       "tx_bytes": f[8], "tx_packets": f[9]}  # fmt: skip
        return out

    def iface_bytes(self) -> dict[str, tuple[int, int]]:
        """(rx, tx) bytes of each node's eth0, from /proc/net/dev inside its namespace."""
        return {ns: (c["rx_bytes"], c["tx_bytes"]) for ns, c in self.iface_counters().items()}

    def rank_pids(self, node: int) -> dict[int, int]:
        """{global rank: pid} of the processes in ``node`` that carry a RANK (the trainer ranks)."""
        found = {}
        for pid in ns_pids(self.ns(node)):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            kv = dict(e.split(b"=", 1) for e in env if b"=" in e)
            if b"RANK" in kv and b"LOCAL_RANK" in kv:
                found[int(kv[b"RANK"])] = pid
        return found

    def status(self) -> dict:
        existing = namespaces()
        return {
            "id": self.cluster_id,
            "nodes": {
                self.ns(k): {
                    "up": self.ns(k) in existing,
                    "addr": self.addr(k),
                    "pids": ns_pids(self.ns(k)) if self.ns(k) in existing else [],
                }
                for k in range(self.nodes)
            },
            "rate": self.rate,
            "latency": self.latency,
            "hostfile": str(self.hostfile),
            "deepspeed_env": str(self.env_file),
        }

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def create(nodes: int, start_id: int = 0, **kw) -> Cluster:
    """Bring up a cluster on the first free id from ``start_id`` (ids claimed concurrently are
    skipped)."""
    cid = start_id
    while True:
        cid = free_id(cid)
        try:
            return Cluster(nodes, cid, **kw).up()
        except ClusterError as e:
            if "is in use" not in str(e):
                raise
            cid += 1


def free_id(start: int = 0) -> int:
    """The first id from ``start`` whose hub namespace does not exist (``up`` claims it)."""
    existing = namespaces()
    for i in range(start, MAX_ID + 1):
        if f"{PREFIX}-{i}-hub" not in existing:
            return i
    raise ClusterError(f"no free cluster id in {start}..{MAX_ID}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--id", type=int, default=int(os.environ.get("GGSPEED_CLUSTER_ID", "0")),
                   help=f"cluster id 0..{MAX_ID} (namespaces ggs-<id>-*, subnet 198.18.<id>.0/24)")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create N nodes")
    u.add_argument("nodes", type=int)
    u.add_argument(
        "--rate", default=None, help="egress rate per node, e.g. 100mbit (default: unshaped)"
    )
    u.add_argument(
        "--latency",
        default=None,
        help="added one-way delay per node egress, e.g. 1ms (needs netem)",
    )
    u.add_argument("--ranks-per-node", type=int, default=1, help="slots per node in the hostfile")
    sub.add_parser("down", help="end the cluster's processes, delete its namespaces")
    sub.add_parser("status", help="nodes, addresses, processes")
    e = sub.add_parser("exec", help="run a command on a node (with the cluster's ssh and env)")
    e.add_argument("node", type=int)
    e.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            c = Cluster(args.nodes, args.id, args.rate, args.latency, args.ranks_per_node)
            c.check()
            c.up()
            print(json.dumps(c.status(), indent=1))
            print(f"launch from node 0: python tools/cluster.py --id {c.cluster_id} exec 0 "
                  f"deepspeed --hostfile {c.hostfile} --master_addr {c.master_addr} SCRIPT ...")  # fmt: skip
        elif args.cmd == "down":
            try:
                c = Cluster.load(args.id)
            except ClusterError:  # no state: still remove namespaces of this id, if any
                c = Cluster(250, args.id)
            ended = c.down()
            print(f"cluster {args.id} down; ended {len(ended)} process(es)")
        elif args.cmd == "status":
            print(json.dumps(Cluster.load(args.id).status(), indent=1))
        else:
            if not args.command:
                p.error("exec NODE COMMAND...: the command is missing")
            c = Cluster.load(args.id)
            return subprocess.call(c.command(args.node, args.command), env=c.env())
    except ClusterError as err:
        print(f"cluster.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
