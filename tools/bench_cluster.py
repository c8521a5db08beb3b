"""Time to quality on the simulated cluster: plain DeepSpeed vs ggspeed, 2 nodes x 2 ranks.

    sudo python tools/bench_cluster.py --rates 100mbit,1gbit --steps 300   # root: namespaces

One cluster (tools/cluster.py) for every run; the trainer (launch/pretrain_gpt.py) is started
with the real ``deepspeed --hostfile`` path from node 0, same seed and data each run. Plain is the
shipped tiny ds_config without its "ggspeed" section; ggspeed is the same file with it (GG Init,
ACT, GCT). The compute-only reference is plain on the unshaped cluster, in the same run. For each
run: tokens/s, time to a target validation loss, final validation loss, and the bytes that crossed
node boundaries per step, read from the nodes' interface counters (each node's eth0 transmit
bytes, /proc/net/dev inside its namespace: every byte a node sends goes to another node). Writes
results.json, a markdown table and loss_vs_time.png under --out.

Layouts (2 ranks per node): ``dp`` = DP4 (data parallel within and across nodes); ``pp`` = PP2
across nodes x DP2 within; ``tp`` = TP2 within x DP2 across.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"dp": (1, 1), "pp": (1, 2), "tp": (2, 1)}  # name -> (tp, pp)
CONFIGS = ("plain", "ggspeed")


def _cluster_module():
    name = "ggspeed_tools_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "cluster.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@dataclass
class Run:
    """One trainer run on the cluster and what it measured."""

    layout: str
    config: str
    rate: str | None
    latency: str | None
    steps: int = 0
    tokens_per_s: float = float("nan")
    final_valid_loss: float = float("nan")
    bytes_per_step: float = float("nan")  # sum over nodes of eth0 tx, steady-state steps
    bytes_per_step_by_node: dict[str, float] = field(default_factory=dict)
    time_to_target_s: float | None = None
    valid: list[tuple[float, int, float]] = field(default_factory=list)  # (train s, step, loss)
    gct_bits_per_element: float | None = None
    act_bits_per_element: float | None = None
    wall_s: float = 0.0
    log_dir: str = ""

    @property
    def label(self) -> str:
        return f"{self.config} @ {self.rate or 'unshaped'}"


def ds_config(config: str, layout: str, out: Path, micro: int, global_batch: int) -> Path:
    """The shipped tiny ds_config; ``plain`` drops its ggspeed section."""
    ds = json.loads((ROOT / "configs" / "ds_tiny_cpu.json").read_text())
    tp, pp = LAYOUTS[layout]
    dp = 4 // (tp * pp)
    if global_batch % (micro * dp):
        raise SystemExit(
            f"--global-batch {global_batch} is not a multiple of micro x dp = {micro * dp}"
        )
    ds.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=global_batch // (micro * dp))  # fmt: skip
    ds.pop("csv_monitor", None)
    if config == "plain":
        ds.pop("ggspeed", None)
    path = out / f"ds_{config}_{layout}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


class Counters:
    """Samples (steps done, eth0 tx bytes per node) while a run goes; steps from metrics.jsonl."""

    def __init__(self, cluster: Any, metrics: Path, period_s: float = 0.5) -> None:
        self.cluster, self.metrics, self.period_s = cluster, metrics, period_s
        self.samples: list[tuple[int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _steps(self) -> int:
        try:
            text = self.metrics.read_text()
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if '"loss"' in line)

    def _loop(self) -> None:
        while not self._stop.is_set():
            steps = self._steps()
            tx = {ns: t for ns, (_, t) in self.cluster.iface_bytes().items()}
            self.samples.append((steps, tx))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Counters:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def per_step(self, skip: int) -> tuple[float, dict[str, float]]:
        """Bytes per step between the first sample at >= ``skip`` steps and the last step."""
        done = [s for s in self.samples if s[0] >= skip]
        if len(done) < 2:
            return float("nan"), {}
        last_step = done[-1][0]
        first = done[0]
        last = next(s for s in done if s[0] == last_step)  # first sample that saw the last step
        n = last[0] - first[0]
        if n <= 0:
            return float("nan"), {}
        by_node = {ns: (last[1][ns] - first[1][ns]) / n for ns in first[1]}
        return sum(by_node.values()), by_node


def run_one(c: Any, args: argparse.Namespace, layout: str, config: str, rate: str | None,
            latency: str | None, out: Path) -> Run:  # fmt: skip
    tp, pp = LAYOUTS[layout]
    c.shape(rate, latency)
    name = f"{layout}_{config}_{rate or 'unshaped'}"
    log = out / name
    ds = ds_config(config, layout, out, args.micro_batch, args.global_batch)
    trainer = [
        str(ROOT / "launch" / "pretrain_gpt.py"),
        "--deepspeed_config", str(ds),
        "--model-config", str(args.model_config),
        "--data-path", str(args.data_path),
        "--tp", str(tp), "--pp", str(pp),
        "--train-iters", str(args.steps),
        "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters),
        "--seed", str(args.seed),
        "--lr", str(args.lr),
        "--no-progress",
        "--log-dir", str(log),
    ]  # fmt: skip
    run = Run(layout, config, rate, latency, log_dir=str(log))
    t0 = time.monotonic()
    with Counters(c, log / "metrics.jsonl") as counters, open(out / f"{name}.log", "w") as f:
        rc = c.popen(0, c.deepspeed(trainer), stdout=f, stderr=subprocess.STDOUT).wait()
    run.wall_s = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"{name}: the trainer failed ({rc}); see {out / (name + '.log')}")
    summary = json.loads((log / "summary.json").read_text())
    run.steps = summary["steps"]
    run.tokens_per_s = summary["tokens_per_s"]
    run.final_valid_loss = summary["final_valid_loss"]
    run.gct_bits_per_element = summary.get("gct_bits_per_element")
    run.act_bits_per_element = summary.get("act_bits_per_element")
    run.bytes_per_step, run.bytes_per_step_by_node = counters.per_step(skip=2)
    seq = json.loads(Path(args.model_config).read_text())["seq_len"]
    run.valid = valid_curve(log, args.global_batch * seq)
    return run


def valid_curve(log: Path, tokens_per_step: int) -> list[tuple[float, int, float]]:
    """(training time, step, validation loss) at each validation. Training time is the sum of
    the step times the trainer measured from step 2 on (as its tokens/s: step 1 pays one-time
    set-up such as JIT compilation); validation is excluded."""
    t, out = 0.0, []
    for m in map(json.loads, (log / "metrics.jsonl").read_text().splitlines()):
        if "tokens_per_s" in m and m["step"] > 1:
            t += tokens_per_step / m["tokens_per_s"]
        if "valid_loss" in m:
            out.append((t, m["step"], m["valid_loss"]))
    return out


def time_to(run: Run, target: float) -> float | None:
    return next((t for t, _, loss in run.valid if loss <= target), None)


def table(runs: list[Run], target: float) -> str:
    ref = {r.layout: r for r in runs if r.rate is None and r.config == "plain"}
    rows = [
        "| layout | link | config | tokens/s | vs unshaped plain | time to valid loss "
        f"{target:.3f} (s) | final valid loss | bytes across nodes / step | GCT bits/elt |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tt = f"{r.time_to_target_s:.1f}" if r.time_to_target_s is not None else "not reached"
        bits = f"{r.gct_bits_per_element:.2f}" if r.gct_bits_per_element is not None else "-"
        rows.append(
            f"| {r.layout} | {r.rate or 'unshaped'} | {r.config} | {r.tokens_per_s:.0f} | "
            f"{r.tokens_per_s / ref[r.layout].tokens_per_s:.2f} | {tt} | {r.final_valid_loss:.4f} | "
            f"{r.bytes_per_step / 1e6:.2f} MB | {bits} |"
        )
    return "\n".join(rows)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = sorted({r.layout for r in runs})
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 4.5), squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        for r in (r for r in runs if r.layout == layout):
            style = "-" if r.config == "ggspeed" else "--"
            ax.plot([v[0] for v in r.valid], [v[2] for v in r.valid], style, marker="o",
                    markersize=3, label=r.label)  # fmt: skip
        ax.set_title(f"layout {layout}: 2 nodes x 2 ranks")
        ax.set_xlabel("training time (s, validation excluded)")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100mbit,1gbit", help="shaped link rates, comma-separated")
    p.add_argument("--latency", default="1ms",
                   help="added one-way delay per node egress ('none': no netem)")  # fmt: skip
    p.add_argument("--layouts", default="dp", help=f"comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--target-loss", type=float, default=None,
                   help="default: the highest final validation loss of all runs (reached by all)")  # fmt: skip
    p.add_argument("--model-config", default=str(ROOT / "configs" / "model" / "tiny.json"))
    p.add_argument("--data-path", default=str(ROOT / "build" / "data" / "stdlib-v4096"))
    p.add_argument("--cluster-id", type=int, default=None, help="default: the first free id >= 20")
    p.add_argument("--out", default=str(ROOT / "build" / "bench_cluster"))
    p.add_argument("--replot", action="store_true",
                   help="only recompute the table and plot from --out/results.json and the logs")  # fmt: skip
    args = p.parse_args(argv)
    if args.replot:
        return replot(Path(args.out), args)
    layouts = args.layouts.split(",")
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts {','.join(bad)}: allowed {sorted(LAYOUTS)}")
    rates = [r for r in args.rates.split(",") if r]
    latency = None if args.latency in ("none", "0", "") else args.latency
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data_path) / "meta.json").is_file():
        print(f"[bench] building the dataset {args.data_path}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
                        "--output-dir", args.data_path, "--vocab-size", "4096"], check=True)  # fmt: skip

    cl = _cluster_module()
    try:
        if latency is not None and not cl.has_netem():
            raise cl.ClusterError(
                f"--latency {latency}: this kernel has no netem qdisc; pass --latency none"
            )
        start = args.cluster_id if args.cluster_id is not None else 20
        c = cl.create(2, start, ranks_per_node=2)
    except cl.ClusterError as e:
        print(f"bench_cluster.py: error: {e}", file=sys.stderr)
        return 1
    runs: list[Run] = []
    try:
        for layout in layouts:
            plan = [("plain", None, None)] + [
                (config, rate, latency) for rate in rates for config in CONFIGS
            ]
            for config, rate, lat in plan:
                print(f"[bench] {layout} {config} @ {rate or 'unshaped'}", flush=True)
                r = run_one(c, args, layout, config, rate, lat, out)
                print(f"[bench]   {r.tokens_per_s:.0f} tokens/s, valid {r.final_valid_loss:.4f}, "
                      f"{r.bytes_per_step / 1e6:.2f} MB/step across nodes, {r.wall_s:.0f} s",
                      flush=True)  # fmt: skip
                runs.append(r)
    finally:
        c.down()
    return report(runs, args, out)


def replot(out: Path, args: argparse.Namespace) -> int:
    saved = json.loads((out / "results.json").read_text())
    runs = [Run(**r) for r in saved["runs"]]
    seq = json.loads(Path(saved["args"]["model_config"]).read_text())["seq_len"]
    for r in runs:
        r.valid = valid_curve(Path(r.log_dir), saved["args"]["global_batch"] * seq)
    saved["args"]["target_loss"] = args.target_loss
    return report(runs, argparse.Namespace(**saved["args"]), out)


def report(runs: list[Run], args: argparse.Namespace, out: Path) -> int:
    target = args.target_loss
    if target is None:
        target = max(r.final_valid_loss for r in runs)
    for r in runs:
        r.time_to_target_s = time_to(r, target)
    md = table(runs, target)
    plot(runs, out / "loss_vs_time.png")
    (out / "results.json").write_text(
        json.dumps(
            {"target_loss": target, "args": vars(args), "runs": [asdict(r) for r in runs]}, indent=1
        )
    )
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(f"[bench] {out}/results.json, table.md, loss_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
