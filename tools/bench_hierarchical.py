"""Flat vs hierarchical GCT on the simulated cluster: 2 nodes x 2 ranks, DP4 over both nodes.

    nice -n 5 python tools/bench_hierarchical.py --rate 100mbit --steps 40 --cluster-id 81

Runs the trainer with the shipped tiny ds_config (GG Init, ACT, GCT) twice on one cluster, the
same seed and data: ``ggspeed.gct.hierarchical: false`` (flat) and ``"auto"`` (which the
launcher's node layout turns on), through ``deepspeed --hostfile`` as
``tools/bench_cluster.py`` runs it (its trainer run and counters are reused). Reports tokens/s,
bytes crossing nodes per step (eth0 counters), the final validation loss and the line the
hierarchy's install logged. Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"flat": False, "hierarchical": "auto"}


def _bench_cluster():
    name = "ggspeed_tools_bench_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "bench_cluster.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="shaped link rate ('none': unshaped)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model-config", default=str(ROOT / "configs" / "model" / "tiny.json"))
    p.add_argument("--data-path", default=str(ROOT / "build" / "data" / "stdlib-v4096"))
    p.add_argument("--cluster-id", type=int, default=20, help="the first id to try")
    p.add_argument("--out", default=str(ROOT / "build" / "bench_hierarchical"))
    args = p.parse_args(argv)
    rate = None if args.rate in ("none", "") else args.rate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bc = _bench_cluster()
    shipped = bc.ds_config

    def ds_config(config: str, layout: str, where: Path, micro: int, global_batch: int) -> Path:
        ds = json.loads(shipped("ggspeed", layout, where, micro, global_batch).read_text())
        ds["ggspeed"]["gct"]["hierarchical"] = CONFIGS[config]
        path = where / f"ds_{config}_{layout}.json"
        path.write_text(json.dumps(ds, indent=1))
        return path

    bc.ds_config = ds_config  # run_one builds each run's ds_config through it
    cl = bc._cluster_module()
    c = cl.create(2, args.cluster_id, ranks_per_node=2)
    results = []
    try:
        for config in CONFIGS:
            print(f"[bench] dp {config} @ {rate or 'unshaped'}", flush=True)
            r = bc.run_one(c, args, "dp", config, rate, None, out)
            log = (out / f"dp_{config}_{rate or 'unshaped'}.log").read_text()
            said = [line.strip() for line in log.splitlines() if "[ggspeed] gct:" in line]
            row = {**dataclasses.asdict(r), "log": said[:1]}
            row.pop("valid")
            results.append(row)
            print(f"[bench]   {r.tokens_per_s:.0f} tokens/s, valid {r.final_valid_loss:.4f}, "
                  f"{r.bytes_per_step / 1e6:.2f} MB/step across nodes; log: {said[:1]}",
                  flush=True)  # fmt: skip
    finally:
        c.down()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    base = results[0]["tokens_per_s"]
    print("| config | link | tokens/s | vs flat | bytes across nodes / step | final valid loss "
          "| GCT bits/elt |\n|---|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for r in results:
        print(f"| {r['config']} | {r['rate'] or 'unshaped'} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base:.2f} | {r['bytes_per_step'] / 1e6:.2f} MB | "
              f"{r['final_valid_loss']:.4f} | {r['gct_bits_per_element'] or float('nan'):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
