"""Trainer throughput: framework overhead and the overhead of ggspeed's techniques.

    python tools/bench_train.py --steps 30 --repeats 3

Measures, on the same model shape (configs/model/tiny.json unless --model-config) and the same
data (the prepared stdlib dataset), tokens/s of

1. a plain single-process PyTorch loop: ``ggspeed.models.nanogpt.GPT`` + AdamW, one thread;
2. launch/pretrain_gpt.py on 1 rank (TP1 PP1 DP1), ggspeed off: (1) / (2) is the framework
   overhead (DeepSpeed PipelineEngine, megatron-core layers, data pipeline);
3. the trainer on --world ranks (--tp/--pp), ggspeed off, and
4. the same with the ds_config's ggspeed section on: (3) / (4) is the techniques' overhead.

Each configuration runs --repeats times; medians are reported (the machine may be shared). The
trainer's tokens/s excludes its first step (one-time set-up). Results go to stdout and --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def plain_loop(
    model_cfg: dict[str, Any], data: Path, batch: int, steps: int, lr: float, seed: int
) -> float:
    """tokens/s of nanogpt.GPT + AdamW on one thread, first step excluded."""
    import torch

    from ggspeed.data.indexed import BatchPlan, SequenceSampler, TokenStream, TrainBatches
    from ggspeed.models.nanogpt import GPT, GPTConfig

    torch.set_num_threads(1)
    meta = json.loads((data / "meta.json").read_text())
    cfg = GPTConfig.from_dict({"vocab_size": meta["vocab_size"], **model_cfg})
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    batches = TrainBatches(
        SequenceSampler(TokenStream(data / "train"), cfg.seq_len, seed), BatchPlan(batch, 1, 1), 0
    )
    times = []
    for _ in range(steps):
        tokens, labels = next(batches)
        t0 = time.perf_counter()
        _, loss = model(tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch * cfg.seq_len * (steps - 1) / sum(times[1:])


def trainer(
    ds: dict[str, Any],
    world: int,
    tp: int,
    pp: int,
    model_config: Path,
    data: Path,
    steps: int,
    work: Path,
    tag: str,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run launch/pretrain_gpt.py under the deepspeed launcher; its summary.json."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f"{tag}.json"
    cfg_path.write_text(json.dumps(ds))
    log = work / f"log-{tag}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if profile is not None:  # the trainer writes <profile>/<tag>/rank<N>.prof (cProfile)
        env["GGSPEED_PROFILE_DIR"] = str(profile / tag)
    cmd = [
        "deepspeed", "--num_gpus", str(world), "--master_port", str(29400 + os.getpid() % 500),
        str(ROOT / "launch" / "pretrain_gpt.py"),
        "--deepspeed_config", str(cfg_path), "--model-config", str(model_config), "--data-path", str(data),
        "--tp", str(tp), "--pp", str(pp), "--train-iters", str(steps), "--eval-interval", str(10**6),
        "--eval-iters", "1", "--lr", "1e-3", "--no-progress", "--log-dir", str(log),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{tag}: trainer failed\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads((log / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default=str(ROOT / "configs" / "model" / "tiny.json"))
    p.add_argument(
        "--ds-config",
        default=str(ROOT / "configs" / "ds_tiny_cpu.json"),
        help="its ggspeed section is 'on'",
    )
    p.add_argument("--data-path", default=str(ROOT / "build" / "data" / "stdlib-v4096"))
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "build" / "bench" / "bench_train.json"))
    p.add_argument(
        "--profile",
        default=None,
        help="folder: cProfile every rank of the 4-rank runs (<folder>/{off,on}/rank<N>.prof; "
        "read with python -m pstats)",
    )
    args = p.parse_args(argv)
    data = Path(args.data_path)
    if not (data / "meta.json").is_file():
        print(
            f"no dataset at {data}: run python tools/preprocess_data.py --output-dir {data}",
            file=sys.stderr,
        )
        return 2
    model_cfg = {
        k: v
        for k, v in json.loads(Path(args.model_config).read_text()).items()
        if not k.startswith("_")
    }
    ds_on = json.loads(Path(args.ds_config).read_text())
    ds_off = {k: v for k, v in ds_on.items() if k not in ("ggspeed", "csv_monitor", "tensorboard")}
    # The 1-rank comparison uses the same global batch as one micro-batch per step.
    gb = int(ds_on["train_batch_size"])
    ds_one = {
        **ds_off,
        "train_batch_size": gb,
        "train_micro_batch_size_per_gpu": gb,
        "gradient_accumulation_steps": 1,
    }
    work = Path(args.out).parent
    profile = Path(args.profile) if args.profile else None
    runs: dict[str, list[float]] = {
        "plain": [],
        "trainer_1rank_off": [],
        "trainer_off": [],
        "trainer_on": [],
    }
    bits: dict[str, Any] = {}

    def run_layout(ds_config: dict[str, Any], tag: str) -> dict[str, Any]:
        """The trainer at the benchmark's layout: ggspeed off and on differ only in ds_config."""
        return trainer(
            ds_config,
            args.world,
            args.tp,
            args.pp,
            Path(args.model_config),
            data,
            args.steps,
            work,
            tag,
            profile,
        )

    for _ in range(args.repeats):
        runs["plain"].append(plain_loop(model_cfg, data, gb, args.steps, 1e-3, 1234))
        runs["trainer_1rank_off"].append(
            trainer(ds_one, 1, 1, 1, Path(args.model_config), data, args.steps, work, "one")[
                "tokens_per_s"
            ]
        )
        runs["trainer_off"].append(run_layout(ds_off, "off")["tokens_per_s"])
        on = run_layout(ds_on, "on")
        runs["trainer_on"].append(on["tokens_per_s"])
        bits = {k: on[k] for k in ("gct_bits_per_element", "act_bits_per_element")}
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "tokens_per_s_median": med,
        "runs": runs,
        "framework_overhead_plain_over_trainer_1rank": med["plain"] / med["trainer_1rank_off"],
        "techniques_overhead_off_over_on": med["trainer_off"] / med["trainer_on"],
        "layout": {"world": args.world, "tp": args.tp, "pp": args.pp},
        "global_batch": gb,
        "steps": args.steps,
        "repeats": args.repeats,
        **bits,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
