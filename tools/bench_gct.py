"""Benchmark GCT's compressed all-reduce against fp32, bf16 and PowerSGD (not a test).

    sudo python tools/bench_gct.py --out build/bench_gct --ar-repeats 2   # ~5 min, 2 quiet cores

Three parts, all on 2 data-parallel ranks over gloo:

1. capture: train the small GPT (ggspeed.models.nanogpt) on the embedded corpus in one process
   with exact data parallelism (two ranks' batches, averaged gradient) and keep both ranks'
   gradients at several steps: real gradients, not random data.
2. allreduce: for each link (unshaped loopback, 1 Gbit/s, 100 Mbit/s; a network namespace of
   ours, its loopback shaped with tc tbf), 2 ranks in the namespace reduce the captured
   gradients in order with each method as a torch DDP comm hook on a stand-in module whose
   gradients *are* the captured ones: fp32 all-reduce, bf16 all-reduce, PowerSGD rank 4, EG
   coding (no RDOQ) and GCT (RDOQ; steps agreed by a MAX all-reduce). Reported: bits/element on
   the wire (bytes counted at the collectives, ring-equivalent: fp32 = 32), the all-reduce time
   (the hook's call to its future's completion) and the backward + all-reduce time (medians,
   the slower rank's), GCT's per-call phases, and the relative error of the averaged gradient against the exact average.
3. e2e: the small GPT trained by 2 DDP ranks with fp32 all-reduce, PowerSGD rank 4, GCT, and
   GCT + gradient constraint, same data and seed: loss curves (PNG), final loss, average bits;
   step time on each link from short runs.

Results go to <out>/results.json and <out>/*.png; docs/gct.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINKS = {"loopback": None, "1gbit": "1gbit", "100mbit": "100mbit"}
METHODS_AR = ["fp32", "bf16", "powersgd4", "eg", "gct"]
METHODS_E2E = ["fp32", "powersgd4", "gct", "gct_constraint"]


# ---------------------------------------------------------------------------------------------
# GCT settings of the benchmark (the "gct" method, steps agreed by a MAX all-reduce); "eg" is the
# same without RDOQ.
def gct_config(method: str, args: argparse.Namespace):
    from ggspeed.config import GCTConfig

    kw: dict[str, Any] = {
        "enabled": True,
        "quant_step": args.quant_step,
        "block_size": args.block_size,
        "eg_order": 0,
    }
    if method in ("gct", "gct_constraint"):
        kw["rdoq_mu"] = args.rdoq_mu
    if method == "gct_constraint":
        kw.update(constraint_lambda=args.constraint_lambda, constraint_warmup_steps=50)
    return GCTConfig(**kw)


def gpt_config():
    from ggspeed.models.nanogpt import GPTConfig

    return GPTConfig(vocab_size=4096, seq_len=128, n_layer=4, n_head=4, d_model=128)


# ---------------------------------------------------------------------------------------------
# Byte counting at the collectives the all-reduce hooks use (ring-equivalent bytes).
class ByteCounter:
    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self._orig = dist.all_reduce

        def counting_all_reduce(tensor, *a, **kw):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *a, **kw)

        dist.all_reduce = counting_all_reduce


def bf16_hook(state, bucket):  # no annotations: DDP checks them as objects
    """bf16 all-reduce of the bucket (sum in bf16, as the fp16/bf16 compression hooks do)."""
    import torch.distributed as dist

    buf = bucket.buffer()
    t = buf.to(torch.bfloat16).div_(dist.get_world_size())
    dist.all_reduce(t)
    buf.copy_(t)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


def make_hook(method: str, args: argparse.Namespace, named_params=None):
    """(hook, state, stats_fn) for a DDP model; stats_fn() -> bits sent so far (None: counter)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from ggspeed.gct import GCTState, gct_hook

    if method == "fp32":
        return default_hooks.allreduce_hook, None, None
    if method == "bf16":  # torch's bf16_compress_hook refuses CPU; the same thing, over gloo
        return bf16_hook, None, None
    if method == "powersgd4":
        st = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=4,
            start_powerSGD_iter=2,
            use_error_feedback=True,
            warm_start=True,
        )
        return powerSGD_hook.powerSGD_hook, st, None
    if method == "gct_before":  # the same settings through an earlier allreduce.py
        st = GCTState(gct_config("gct", args))
        return _before_hook(args.before_impl), st, st
    st = GCTState(gct_config(method, args))
    return gct_hook, st, st


def _before_hook(path: str):
    """A DDP hook running ``compressed_all_reduce`` of another copy of ggspeed/gct/allreduce.py
    (e.g. ``git show <commit>:ggspeed/gct/allreduce.py > build/allreduce_before.py``), so a
    before/after comparison runs in one process pair under the same load."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ggspeed.gct._allreduce_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)

    def hook(state, bucket):  # no annotations: DDP checks them as objects
        buf = bucket.buffer()
        mod.compressed_all_reduce(buf, state, None, key=f"ddp{bucket.index()}", average=True)
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook


def methods_ar(args: argparse.Namespace) -> list[str]:
    return METHODS_AR + (["gct_before"] if args.before_impl else [])


def spawn(fn, world: int, *args) -> list[Any]:
    """Run fn(rank, world, *args) on ``world`` gloo ranks (ggspeed.testing); return their results."""
    from ggspeed.testing import run_ranks

    return run_ranks(_with_rank, world, fn, *args, timeout=24 * 3600.0)


def _with_rank(fn, *args):
    import torch.distributed as dist

    return fn(dist.get_rank(), dist.get_world_size(), *args)


# ---------------------------------------------------------------------------------------------
# 1. capture
def capture(args: argparse.Namespace) -> dict[str, Any]:
    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.models.nanogpt import GPT

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokens = load_corpus_tokens(vocab_size=4096).train
    model = GPT(gpt_config())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loaders = [random_batches(tokens, args.batch, 128, seed=r) for r in range(2)]
    names = [n for n, _ in model.named_parameters()]
    snaps: list[list[torch.Tensor]] = []
    keep = set(range(args.capture_every, args.capture_steps + 1, args.capture_every))
    for step in range(1, args.capture_steps + 1):
        grads = []
        for r in range(2):
            x, y = next(loaders[r])
            model.zero_grad()
            model(x, y)[1].backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        if step in keep:
            snaps.append([torch.cat([g.flatten() for g in gs]) for gs in grads])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    return {"names": names, "shapes": shapes, "snaps": snaps}


# ---------------------------------------------------------------------------------------------
# 2. allreduce
class StandIn(torch.nn.Module):
    """Parameters shaped like the GPT's; forward(g) = sum(p * g) so backward's grads are g."""

    def __init__(self, shapes) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, flat_grad: torch.Tensor) -> torch.Tensor:
        out, o = 0.0, 0
        for p in self.ps:
            n = p.numel()
            out = out + (p * flat_grad[o : o + n].view_as(p)).sum()
            o += n
        return out


def timed_hook(hook, sink: list[float]):
    """``hook`` with the time from its call to its future's completion appended to ``sink``:
    the gradient all-reduce alone (encode, exchange, decode), without the backward around it."""

    def wrapped(state, bucket):  # no annotations: DDP checks them as objects
        t0 = time.perf_counter()

        def done(fut):
            sink.append(time.perf_counter() - t0)
            return fut.value()

        return hook(state, bucket).then(done)

    return wrapped


def allreduce_rank(rank: int, world: int, cap_path: str, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    cap = torch.load(cap_path, weights_only=False)
    counter = ByteCounter()
    out = {}
    n = sum(torch.Size(s).numel() for s in cap["shapes"])
    for method in methods_ar(args):
        model = StandIn(cap["shapes"])
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64)
        hook, st, gct = make_hook(method, args)
        hook_times: list[float] = []
        ddp.register_comm_hook(st, timed_hook(hook, hook_times))
        times, errs, bits, phases = [], [], [], []
        for i, snap in enumerate(cap["snaps"] * args.ar_repeats):
            exact = (snap[0] + snap[1]) / 2
            ddp.zero_grad()
            dist.barrier()
            b0 = gct.stats.bytes_sent if gct else counter.bytes
            p0 = (gct.stats.encode_s, gct.stats.comm_s, gct.stats.decode_s) if gct else None
            t0 = time.perf_counter()
            ddp(snap[rank]).backward()
            dt = time.perf_counter() - t0
            sent = (gct.stats.bytes_sent if gct else counter.bytes) - b0
            got = torch.cat([p.grad.flatten() for p in model.ps])
            if i >= args.ar_warmup:
                times.append(dt)
                errs.append(float((got - exact).norm() / exact.norm()))
                # ring-equivalent normalization: an fp32 all-reduce counts 32 bits per element
                bits.append(8.0 * sent / n)
                if gct:
                    p1 = (gct.stats.encode_s, gct.stats.comm_s, gct.stats.decode_s)
                    phases.append([b - a for a, b in zip(p0, p1)])
        assert len(hook_times) == len(cap["snaps"]) * args.ar_repeats, "one bucket expected"
        out[method] = {
            "time_s": statistics.median(times),
            "allreduce_s": statistics.median(hook_times[args.ar_warmup :]),
            "rel_err": statistics.median(errs),
            "bits": statistics.mean(bits),
        }
        if gct:  # per-call medians of the phases (warm-up calls left out, like the times)
            out[method].update(
                {
                    name: statistics.median(p[j] for p in phases)
                    for j, name in enumerate(("encode_s", "comm_s", "decode_s"))
                }
            )
        dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# 3. e2e
def e2e_rank(
    rank: int, world: int, args: argparse.Namespace, steps: int, methods: list[str]
) -> dict:
    import torch.distributed as dist

    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.gct import apply_constraint
    from ggspeed.models.nanogpt import GPT

    tokens = load_corpus_tokens(vocab_size=4096).train
    counter = ByteCounter()
    out = {}
    for method in methods:
        torch.manual_seed(args.seed)
        model = GPT(gpt_config())
        n = sum(p.numel() for p in model.parameters())
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64)
        hook, st, gct = make_hook(method, args)
        ddp.register_comm_hook(st, hook)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        if gct is not None and gct.cfg.constraint_lambda > 0:
            named = [(name, p) for name, p in model.named_parameters()]
            opt.register_step_pre_hook(lambda *_, s=gct, nm=named: apply_constraint(s, nm))
        batches = random_batches(tokens, args.batch, 128, seed=rank + 10 * args.seed)
        losses, times = [], []
        b0 = counter.bytes
        for step in range(steps):
            x, y = next(batches)
            dist.barrier()
            t0 = time.perf_counter()
            loss = ddp(x, y)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if gct is not None:
                gct.on_step(step + 1)
            lt = loss.detach().clone()
            dist.all_reduce(lt)  # logging only (not counted: before the counter reads below)
            losses.append(float(lt) / world)
            if rank == 0 and (step + 1) % 25 == 0:
                print(f"{method} step {step + 1} loss {losses[-1]:.3f}", flush=True)
        sent = gct.stats.bytes_sent if gct else counter.bytes - b0 - 4 * steps
        out[method] = {
            "losses": losses,
            "step_time_s": statistics.median(times[min(2, steps - 1) :]),
            "bits": 8.0 * sent / (n * steps),
        }
        if gct is not None:
            out[method]["gct_scalars"] = gct.scalars()  # whole run: nobody else read the window
    return out


# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def namespace(rate: str | None):
    """A network namespace of ours with its loopback up and, if ``rate``, shaped with tc tbf."""
    name = f"ggspeed-gct-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        if rate:
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "lo",
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "256kb",
                    "latency",
                    "100ms",
                ],
                check=True,
            )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(ns: str, mode: str, args: argparse.Namespace, extra: list[str]) -> dict:
    res = Path(args.out) / f"_{mode}_{ns}.json"
    cmd = [
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--result",
        str(res),
        *sys.argv[1:],
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)
    data = json.loads(res.read_text())
    res.unlink()
    return data


def worker(args: argparse.Namespace) -> None:
    if args.worker == "allreduce":
        res = spawn(allreduce_rank, 2, str(Path(args.out) / "captured.pt"), args)
        data = res[0]
        for m in data:  # times: the slower rank's
            for key in ("time_s", "allreduce_s"):
                data[m][key] = max(r[m][key] for r in res)
    else:
        methods = args.methods.split(",")
        res = spawn(e2e_rank, 2, args, args.e2e_steps, methods)
        data = res[0]
        for m in data:
            data[m]["step_time_s"] = max(r[m]["step_time_s"] for r in res)
    Path(args.result).write_text(json.dumps(data))


def plot(e2e: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, r in e2e.items():
        ls = r["losses"]
        k = 10
        smooth = [
            sum(ls[max(0, i - k + 1) : i + 1]) / len(ls[max(0, i - k + 1) : i + 1])
            for i in range(len(ls))
        ]
        ax.plot(range(1, len(ls) + 1), smooth, label=f"{m} ({r['bits']:.2f} bits/el)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("small GPT, 2 DP ranks: gradient exchange methods")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict) -> str:
    """Markdown tables of a results.json (what docs/gct.md quotes)."""
    lines = []
    ar = results.get("allreduce", {})
    if ar:
        links = list(ar)
        # all-reduce alone (the hook, call to completion), then backward + all-reduce
        for key, what in (("allreduce_s", "all-reduce"), ("time_s", "backward + all-reduce")):
            if key not in ar[links[0]][next(iter(ar[links[0]]))]:
                continue  # results from before the all-reduce-alone timing
            lines.append(
                "| method | bits/element | rel. error | "
                + " | ".join(f"{what} {k} (ms) | vs bf16" for k in links)
                + " |"
            )
            lines.append("|---" * (3 + 2 * len(links)) + "|")
            for m in ar[links[0]]:
                r0 = ar[links[0]][m]
                cells = [m, f"{r0['bits']:.2f}", f"{r0['rel_err']:.3f}"]
                for k in links:
                    t, tb = ar[k][m][key], ar[k]["bf16"][key]
                    cells += [f"{1e3 * t:.1f}", f"{tb / t:.2f}x"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    e2e = results.get("e2e", {})
    if e2e:
        timing = results.get("e2e_timing", {})
        base = sum(e2e["fp32"]["losses"][-10:]) / 10 if "fp32" in e2e else None
        lines.append(
            "| method | avg bits/element | final loss (mean of last 10) | vs fp32 | "
            + " | ".join(f"step {k} (ms)" for k in timing)
            + " |"
        )
        lines.append("|---" * (4 + len(timing)) + "|")
        for m, r in e2e.items():
            fin = sum(r["losses"][-10:]) / 10
            rel = f"{100 * (fin / base - 1):+.2f}%" if base else "-"
            cells = [m, f"{r['bits']:.2f}", f"{fin:.4f}", rel]
            cells += [f"{1e3 * timing[k][m]:.0f}" for k in timing if m in timing[k]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="build/bench_gct")
    p.add_argument("--links", default="loopback,1gbit,100mbit")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--capture-steps", type=int, default=40)
    p.add_argument("--capture-every", type=int, default=5)
    p.add_argument("--ar-repeats", type=int, default=1)
    p.add_argument("--ar-warmup", type=int, default=2)
    p.add_argument("--e2e-steps", type=int, default=150)
    p.add_argument("--e2e-timing-steps", type=int, default=8)
    p.add_argument("--quant-step", type=float, default=1.0)
    p.add_argument("--rdoq-mu", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--constraint-lambda", type=float, default=1e-3)
    p.add_argument("--methods", default=",".join(METHODS_E2E))
    p.add_argument("--seed", type=int, default=0, help="e2e: model init and data seed")
    p.add_argument("--skip", default="", help="comma list of parts to skip: capture,allreduce,e2e")
    p.add_argument(
        "--before-impl",
        default=None,
        help="path of an earlier ggspeed/gct/allreduce.py: adds method gct_before to the all-reduce",
    )
    p.add_argument("--report", action="store_true", help="print the tables of <out>/results.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report:
        print(report(json.loads((Path(args.out) / "results.json").read_text())))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = "2-core CPU, shared, no GPU; gloo over loopback in a network namespace"
    results["args"] = {k: v for k, v in vars(args).items() if k not in ("worker", "result")}
    t0 = time.time()
    if "capture" not in skip:
        cap = capture(args)
        torch.save(cap, out / "captured.pt")
        results["numel"] = sum(torch.Size(s).numel() for s in cap["shapes"])
        print(
            f"captured {len(cap['snaps'])} gradient snapshots in {time.time() - t0:.0f} s",
            flush=True,
        )
    links = args.links.split(",")
    if "allreduce" not in skip:
        results["allreduce"] = {}
        for link in links:
            with namespace(LINKS[link]) as ns:
                results["allreduce"][link] = run_in(ns, "allreduce", args, [])
            print(link, json.dumps(results["allreduce"][link]), flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    if "e2e" not in skip:
        results["e2e_timing"] = {}
        for link in links:
            if link == "loopback":
                with namespace(None) as ns:
                    results["e2e"] = run_in(ns, "e2e", args, [])
                for m, r in results["e2e"].items():
                    print(
                        "e2e",
                        m,
                        "final",
                        sum(r["losses"][-10:]) / 10,
                        "bits",
                        r["bits"],
                        flush=True,
                    )
                plot(results["e2e"], out / "gct_loss.png")
                results["e2e_timing"][link] = {
                    m: r["step_time_s"] for m, r in results["e2e"].items()
                }
            else:
                with namespace(LINKS[link]) as ns:
                    r = run_in(ns, "e2e", args, ["--e2e-steps", str(args.e2e_timing_steps)])
                results["e2e_timing"][link] = {m: v["step_time_s"] for m, v in r.items()}
            print("step time", link, results["e2e_timing"][link], flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.time() - t0
    results_path.write_text(json.dumps(results, indent=1))
    print(f"done in {results['wall_s']:.0f} s -> {results_path}")


if __name__ == "__main__":
    main()
