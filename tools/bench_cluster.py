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
    window: tuple[int, int] | None = None  # the steps the counters and the budget compare over
    payload_per_step: float = float("nan")  # eth0 tx bytes - packets x HEADER_BYTES, all nodes
    budget_cross_per_step: float = float("nan")  # the wire budget over the same window
    budget: dict[str, Any] = field(default_factory=dict)  # summary.json's wire_budget
    scalars: dict[str, float] = field(default_factory=dict)  # the last ggspeed scalars
    cpu_s_per_step: float = float("nan")  # CPU seconds per step summed over all ranks
    wall_s: float = 0.0
    log_dir: str = ""

    @property
    def label(self) -> str:
        return f"{self.config} @ {self.rate or 'unshaped'}"


def _set(section: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` (JSON value) into the ggspeed section."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise SystemExit(f"--ggspeed-set {assignment!r}: expected key.path=json_value")
    *path, last = key.split(".")
    for part in path:
        section = section.setdefault(part, {})
    try:
        section[last] = json.loads(value)
    except ValueError:
        section[last] = value


def ds_config(config: str, layout: str, out: Path, micro: int, global_batch: int,
              overrides: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """The shipped tiny ds_config; ``plain`` drops its ggspeed section; ``overrides``
    (``key.path=value``) change ggspeed's."""
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
    else:
        for assignment in overrides:
            _set(ds.setdefault("ggspeed", {}), assignment)
    path = out / f"ds_{config}_{layout}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


HEADER_BYTES = 66
"""Ethernet (14) + IPv4 (20) + TCP with the timestamp option (32) per counted frame: a frame's
TCP payload is its length minus these (segmentation offload counts one header per frame)."""


class Counters:
    """Samples (steps done, eth0 tx bytes and packets per node) while a run goes; steps from
    metrics.jsonl."""

    def __init__(self, cluster: Any, metrics: Path, period_s: float = 0.1) -> None:
        self.cluster, self.metrics, self.period_s = cluster, metrics, period_s
        self.samples: list[tuple[int, dict[str, dict[str, int]]]] = []
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
            self.samples.append((self._steps(), self.cluster.iface_counters()))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Counters:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, skip: int) -> tuple[int, int, dict[str, dict[str, int]]] | None:
        """(first step, last step, counter deltas per node) between the first sample at >=
        ``skip`` steps and the first sample that saw the last step."""
        done = [s for s in self.samples if s[0] >= skip]
        if len(done) < 2:
            return None
        first = done[0]
        last = next(s for s in done if s[0] == done[-1][0])
        if last[0] <= first[0]:
            return None
        delta = {ns: {k: last[1][ns][k] - first[1][ns][k] for k in first[1][ns]} for ns in first[1]}
        return first[0], last[0], delta

    def per_step(self, skip: int) -> tuple[float, dict[str, float]]:
        """Transmitted bytes per step (all of eth0: headers, ACKs, ssh included) and by node."""
        w = self.window(skip)
        if w is None:
            return float("nan"), {}
        a, b, delta = w
        by_node = {ns: d["tx_bytes"] / (b - a) for ns, d in delta.items()}
        return sum(by_node.values()), by_node


def budget_between(budget: dict[str, Any], a: int, b: int) -> float:
    """The wire budget's crossing bytes per step between steps ``a`` and ``b``."""
    steps, cum = budget.get("steps", []), budget.get("cross_cumulative", [])
    if a not in steps or b not in steps or b <= a:
        return float("nan")
    return (cum[steps.index(b)] - cum[steps.index(a)]) / (b - a)


def run_one(c: Any, args: argparse.Namespace, layout: str, config: str, rate: str | None,
            latency: str | None, out: Path) -> Run:  # fmt: skip
    tp, pp = LAYOUTS[layout]
    c.shape(rate, latency)
    name = f"{layout}_{config}_{rate or 'unshaped'}"
    log = out / name
    ds = ds_config(config, layout, out, args.micro_batch, args.global_batch,
                   tuple(args.ggspeed_set) if config == "ggspeed" else ())  # fmt: skip
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
    run.cpu_s_per_step = (summary.get("cpu_s_per_step") or {}).get("sum_over_ranks", float("nan"))
    run.bytes_per_step, run.bytes_per_step_by_node = counters.per_step(skip=2)
    run.budget = summary.get("wire_budget") or {}
    run.scalars = summary.get("ggspeed_scalars") or {}
    w = counters.window(skip=2)
    if w is not None:
        a, b, delta = w
        run.window = (a, b)
        run.payload_per_step = sum(
            d["tx_bytes"] - HEADER_BYTES * d["tx_packets"] for d in delta.values()
        ) / (b - a)
        run.budget_cross_per_step = budget_between(run.budget, a, b)
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


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB" if x == x else "-"


def table(runs: list[Run], target: float) -> str:
    ref = {r.layout: r for r in runs if r.rate is None and r.config == "plain"}
    rows = [
        "| layout | link | config | tokens/s | vs unshaped plain | time to valid loss "
        f"{target:.3f} (s) | final valid loss | bytes across nodes / step | GCT bits/elt | "
        "budget across nodes / step | TCP payload / step | budget / payload | "
        "CPU s / step, all ranks | CPU vs plain |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tt = f"{r.time_to_target_s:.1f}" if r.time_to_target_s is not None else "not reached"
        bits = f"{r.gct_bits_per_element:.2f}" if r.gct_bits_per_element is not None else "-"
        base = ref.get(r.layout)
        vs = f"{r.tokens_per_s / base.tokens_per_s:.2f}" if base else "-"
        check = r.budget_cross_per_step / r.payload_per_step if r.payload_per_step else float("nan")
        cpu = r.cpu_s_per_step / base.cpu_s_per_step if base else float("nan")
        rows.append(
            f"| {r.layout} | {r.rate or 'unshaped'} | {r.config} | {r.tokens_per_s:.0f} | "
            f"{vs} | {tt} | {r.final_valid_loss:.4f} | {_mb(r.bytes_per_step)} | {bits} | "
            f"{_mb(r.budget_cross_per_step)} | {_mb(r.payload_per_step)} | {check:.3f} | "
            f"{r.cpu_s_per_step:.3f} | {cpu:.2f} |"
        )
    return "\n".join(rows)


COMPONENT_KINDS = {"gct": "dp_grad", "tied_grads": "tied_grad", "param_gather": "zero_param"}
"""Which budget kind each component's scalars describe (components that code pipeline traffic
name the direction in their keys: ``..act..`` / ``..grad..``). GCT and the tied gradients
(``ggspeed.wire.tied``, a GCT state of its own) publish ``entropy_bits_per_element`` on a
bucket's first call per telemetry window; the last window's value is the one shown."""


def _kind_of(key: str) -> str | None:
    comp, _, name = key.partition("/")
    if comp in COMPONENT_KINDS:
        return COMPONENT_KINDS[comp]
    if comp in ("pipe", "pipeline", "p2p"):
        return "pp_act" if "act" in name else "pp_grad" if "grad" in name else None
    return None


def plain_dtype(ds: dict[str, Any]) -> tuple[str, int]:
    """The dtype plain DeepSpeed sends, from the ds_config: (name, bits)."""
    for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            return name, 16
    return "fp32", 32


def bits_table(runs: list[Run], dtype: tuple[str, int]) -> str:
    """Per kind of traffic: bits per element on the wire (from the budget: plain's dtype bits x
    ggspeed's bytes / plain's bytes of that kind; and each component's own figure) beside the
    entropy of the coded levels where the component reports it."""
    plain = {r.layout: r for r in runs if r.config == "plain" and r.rate is None}
    rows = [
        f"| layout | link | kind | plain bytes / step ({dtype[0]}) | ggspeed bytes / step | "
        "wire bits/elt (budget) | component bits/elt | entropy bits/elt |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        base = plain.get(r.layout)
        if r.config != "ggspeed" or base is None:
            continue
        comp: dict[str, dict[str, float]] = {}
        for key, value in r.scalars.items():
            kind, name = _kind_of(key), key.rsplit("/", 1)[-1]
            if kind is None:
                continue
            if name.endswith("entropy_bits_per_element"):
                comp.setdefault(kind, {})["entropy"] = value
            elif name in ("bits_per_element", "act_bits_per_element", "grad_bits_per_element"):
                comp.setdefault(kind, {})["bits"] = value
        for kind, pk in base.budget.get("kinds", {}).items():
            gk = r.budget.get("kinds", {}).get(kind, {})
            pb, gb = pk.get("bytes_per_step", 0.0), gk.get("bytes_per_step", 0.0)
            if kind == "other" or (not pb and not gb):  # scalars, verdicts: no elements
                continue
            wire = f"{dtype[1] * gb / pb:.2f}" if pb else "-"
            c = comp.get(kind, {})
            cb = f"{c['bits']:.2f}" if "bits" in c else "-"
            ce = f"{c['entropy']:.2f}" if "entropy" in c else "n/a"
            rows.append(f"| {r.layout} | {r.rate or 'unshaped'} | {kind} | {_mb(pb)} | "
                        f"{_mb(gb)} | {wire} | {cb} | {ce} |")  # fmt: skip
    return "\n".join(rows)


def targets(runs: list[Run], dtype: tuple[str, int], min_steps: int = 300) -> list[str]:
    """One PASS/FAIL line per target and layout (docs/cluster.md, "Targets"), and the budget
    check of every run."""
    lines = []
    for layout in sorted({r.layout for r in runs}):
        ref = next((r for r in runs if r.layout == layout and r.config == "plain"
                    and r.rate is None), None)  # fmt: skip
        if ref is None:
            lines.append(f"{layout}: no plain unshaped run: targets not evaluated")
            continue
        for r in (r for r in runs if r.layout == layout and r.config == "ggspeed"):
            tag = f"{layout} ggspeed @ {r.rate or 'unshaped'}"
            speed = r.tokens_per_s / ref.tokens_per_s
            need = 0.9 if r.rate and r.rate.endswith("gbit") else 0.8
            cpu = r.cpu_s_per_step / ref.cpu_s_per_step
            lines.append(f"{'PASS' if speed >= need else 'FAIL'} {tag}: tokens/s {speed:.2f} "
                         f"of unshaped plain (target >= {need}; CPU per step, all ranks: "
                         f"{cpu:.2f} of plain's)")  # fmt: skip
            plain_x = ref.budget.get("cross_bytes_per_step", ref.bytes_per_step)
            mine_x = r.budget.get("cross_bytes_per_step", r.bytes_per_step)
            ratio = mine_x / plain_x if plain_x else float("nan")
            lines.append(
                f"{'PASS' if ratio <= 0.1 else 'FAIL'} {tag}: bytes across nodes per step "
                f"{_mb(mine_x)} = {ratio:.3f} of plain's {_mb(plain_x)} ({dtype[0]}) "
                "(target <= 0.1)"
            )
            # "Holds plain's loss": at most 1% above it. A lower loss is not a miss, so the
            # check is one-sided; the signed difference is printed either way.
            rel = (r.final_valid_loss - ref.final_valid_loss) / ref.final_valid_loss
            enough = r.steps >= min_steps
            verdict = "PASS" if rel <= 0.01 and enough else "FAIL"
            lines.append(
                f"{verdict} {tag}: final validation loss {r.final_valid_loss:.4f} vs plain "
                f"{ref.final_valid_loss:.4f} ({100 * rel:+.2f}%, target at most +1% after >= "
                f"{min_steps} steps; ran {r.steps})"
            )
    for r in runs:
        if r.payload_per_step == r.payload_per_step and r.payload_per_step > 0:
            dev = r.budget_cross_per_step / r.payload_per_step - 1
            lines.append(
                f"{'PASS' if abs(dev) <= 0.05 else 'FAIL'} budget check {r.layout} {r.label}: "
                f"budget {_mb(r.budget_cross_per_step)} vs eth0 TCP payload "
                f"{_mb(r.payload_per_step)} per step over steps {r.window} ({100 * dev:+.1f}%, "
                "target within 5%)"
            )
    return lines


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
    p.add_argument("--rates", default="100mbit,1gbit",
                   help="shaped link rates, comma-separated ('unshaped': the bare link)")  # fmt: skip
    p.add_argument("--latency", default="1ms",
                   help="added one-way delay per node egress ('none': no netem)")  # fmt: skip
    p.add_argument("--layouts", default="dp", help=f"comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--targets", action="store_true",
                   help="the targets' run set per layout: plain unshaped, then ggspeed at each "
                        "rate (add --plain-shaped for plain at each rate); prints PASS/FAIL "
                        "lines")  # fmt: skip
    p.add_argument("--plain-shaped", action="store_true",
                   help="with --targets: plain at each rate too (its losses do not depend on "
                        "the link)")  # fmt: skip
    p.add_argument("--skip-plain", action="store_true",
                   help="with --targets: no plain run (a ggspeed variant beside a plain run "
                        "measured before; the PASS/FAIL lines then need --replot with both)")  # fmt: skip
    p.add_argument("--ggspeed-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the ggspeed run's section, e.g. wire.param_gather.enabled=false "
                        "(repeatable; the value is JSON)")  # fmt: skip
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
    rates: list[str | None] = [
        None if r == "unshaped" else r for r in args.rates.split(",") if r
    ]  # "unshaped": ggspeed without shaping too
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
            if args.targets:
                plan = [("plain", None, None)] * (not args.skip_plain) + [
                    (config, rate, latency if rate else None)
                    for rate in rates
                    for config in (CONFIGS if args.plain_shaped and rate else ("ggspeed",))
                ]
            else:
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
    dtype = plain_dtype(json.loads((ROOT / "configs" / "ds_tiny_cpu.json").read_text()))
    md = "\n\n".join([table(runs, target), bits_table(runs, dtype)])
    checks = targets(runs, dtype)
    plot(runs, out / "loss_vs_time.png")
    (out / "results.json").write_text(
        json.dumps(
            {"target_loss": target, "args": vars(args), "runs": [asdict(r) for r in runs]}, indent=1
        )
    )
    (out / "table.md").write_text(md + "\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    print(md)
    print("\n".join(checks))
    print(f"[bench] {out}/results.json, table.md, loss_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
