"""Benchmark ggspeed.codec: bits/element against the entropy, and CPU (numba) throughput.

    python tools/bench_codec.py                 # markdown tables
    python tools/bench_codec.py --json          # one JSON document
    python tools/bench_codec.py --n 1000000 --repeats 3

Data: generalized-Gaussian samples (ggspeed.gg.sample) of shapes 0.5, 1, 2, quantized with the
step whose theoretical quantized entropy (ggspeed.gg.quantized_entropy) is 2, 4 and 8
bits/element, and, for the zero-run mode, 0.1 to 1 bit/element.

Throughput is MB/s of fp32-equivalent input (4 bytes per element), the median of ``--repeats``
runs, single thread and all numba threads, beside a memcpy (``torch.clone``) of the same fp32
buffer timed in the same run. On a shared machine wall-clock times include waiting for a core,
so single-thread rows also report the thread's CPU time (``time.thread_time``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import numba
import torch

from ggspeed import codec, gg
from ggspeed.codec import cpu

SHAPES = (0.5, 1.0, 2.0)
RATES = (2.0, 4.0, 8.0)
LOW_RATES = (0.1, 0.25, 0.5, 1.0)


def step_for_entropy(shape: float, target: float) -> float:
    """Quantizer step giving ``target`` bits/element of quantized entropy (bisection in log step)."""
    lo, hi = math.log(1e-6), math.log(1e3)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if gg.quantized_entropy(shape, 1.0, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds, min thread CPU seconds) of fn over repeats (after one warm-up)."""
    fn()
    wall, cpu_t = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu_t.append(time.thread_time() - c0)
    return statistics.median(wall), min(cpu_t)


def throughput(q_np, n: int, chunk: int, runs: bool, ks, repeats: int, parallel: bool) -> dict:
    mb = 4 * n / 1e6
    data, bits, orders = cpu.encode(q_np, chunk, runs, ks, parallel=parallel)
    enc = timed(lambda: cpu.encode(q_np, chunk, runs, ks, parallel=parallel), repeats)
    dec = timed(lambda: cpu.decode(data, n, chunk, runs, bits, orders, parallel=parallel), repeats)
    return {
        "enc_wall": mb / enc[0],
        "dec_wall": mb / dec[0],
        "enc_cpu": mb / enc[1],
        "dec_cpu": mb / dec[1],
    }


def row(shape: float, target: float, n: int, repeats: int, speed: bool, low: bool) -> dict:
    step = step_for_entropy(shape, target)
    gen = torch.Generator().manual_seed(1234)
    x = gg.sample(shape, 1.0, n, generator=gen, dtype=torch.float32)
    q = codec.quantize(x, step)
    h_emp = codec.empirical_entropy(q)
    r = {
        "shape": shape,
        "step": step,
        "h_theory": gg.quantized_entropy(shape, 1.0, step),
        "h_empirical": h_emp,
        "zeros": float((q == 0).float().mean()),
    }
    for name, k, runs in (("order0", 0, False), ("auto", "auto", False), ("runs", "auto", True)):
        s = codec.eg_encode(q, k, runs)
        assert torch.equal(codec.eg_decode(s), q)
        r[f"bits_{name}"] = s.nbits / n
        r[f"wire_{name}"] = 8 * s.nbytes / n
        r[f"eff_{name}"] = h_emp / r[f"bits_{name}"]
    if speed:
        q_np = q.numpy()
        chunk = codec.DEFAULT_CHUNK
        ks = (-1, -1, -1) if low else (-1, 0, 0)
        runs = low
        torch.set_num_threads(1)
        clone = timed(lambda: x.clone(), repeats)
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        r["memcpy_wall"] = 4 * n / 1e6 / clone[0]
        numba.set_num_threads(1)
        r["t1"] = throughput(q_np, n, chunk, runs, ks, repeats, parallel=False)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        r["tall"] = throughput(q_np, n, chunk, runs, ks, repeats, parallel=True)
    return r


def markdown(rows: list[dict], low: list[dict], info: dict) -> str:
    out = [
        f"Machine: {info['machine']}; n = {info['n']} elements; numba threads (all) = "
        f"{info['threads']}; medians of {info['repeats']} runs.",
        "",
        "### Bits/element and coding efficiency (efficiency = empirical entropy / code bits)",
        "",
        "| shape | target H | step | H theory | H empirical | order 0 | auto | zero runs "
        "| eff order 0 | eff auto | eff runs | auto incl. header |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + low:
        out.append(
            f"| {r['shape']} | {r['target']} | {r['step']:.4g} | {r['h_theory']:.3f} "
            f"| {r['h_empirical']:.3f} | {r['bits_order0']:.3f} | {r['bits_auto']:.3f} "
            f"| {r['bits_runs']:.3f} | {100 * r['eff_order0']:.1f}% | {100 * r['eff_auto']:.1f}% "
            f"| {100 * r['eff_runs']:.1f}% | {r['wire_auto']:.3f} |"
        )
    out += [
        "",
        "### Throughput, MB/s of fp32-equivalent input (4 bytes/element)",
        "",
        'Mode: k="auto" (plain) for 2-8 bits, k="auto", runs=True for the low rates. '
        '"cpu": from the thread\'s CPU time (what one core does, free of the wait for a core on '
        'a shared machine); "wall": wall clock.',
        "",
        "| shape | target H | mode | bits/elem | enc 1T cpu | dec 1T cpu | enc 1T wall "
        "| dec 1T wall | enc all wall | dec all wall | memcpy wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + low:
        if "t1" not in r:
            continue
        mode = "runs auto" if r in low else "auto"
        bits = r["bits_runs"] if r in low else r["bits_auto"]
        t1, ta = r["t1"], r["tall"]
        out.append(
            f"| {r['shape']} | {r['target']} | {mode} | {bits:.3f} | {t1['enc_cpu']:.0f} "
            f"| {t1['dec_cpu']:.0f} | {t1['enc_wall']:.0f} | {t1['dec_wall']:.0f} "
            f"| {ta['enc_wall']:.0f} | {ta['dec_wall']:.0f} | {r['memcpy_wall']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1 << 22, help="elements per data set")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--no-speed", action="store_true", help="bits/element only")
    args = ap.parse_args()
    if args.n <= 0 or args.repeats <= 0:
        ap.error("--n and --repeats must be positive")
    rows, low = [], []
    for shape in SHAPES:
        for target in RATES:
            r = row(shape, target, args.n, args.repeats, not args.no_speed, low=False)
            r["target"] = target
            rows.append(r)
        for target in LOW_RATES:
            r = row(shape, target, args.n, args.repeats, not args.no_speed, low=True)
            r["target"] = target
            low.append(r)
    info = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "n": args.n,
        "threads": numba.config.NUMBA_NUM_THREADS,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps({"info": info, "rates": rows, "low_rates": low}, indent=1))
    else:
        print(markdown(rows, low, info))


if __name__ == "__main__":
    main()
