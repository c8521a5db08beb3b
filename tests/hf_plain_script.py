"""An ordinary DeepSpeed training loop around ``deepspeed.initialize``: nothing in it knows ggspeed.

A tiny randomly initialized GPT-2 with Hugging Face gradient checkpointing on, a torch AdamW,
``deepspeed.initialize(model=..., optimizer=..., config=<dict>)``. It trains ``--steps`` steps,
saving a checkpoint halfway, then builds a second engine from scratch, loads that checkpoint and
trains the second half again. It writes per-step losses of both, a digest of the final weights
of both and the kurtosis of one weight matrix after initialize to ``<report>.rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
from hf_common import LENGTH, VOCAB, digest, kurtosis, tiny_gpt2


def build(config: dict):
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, LENGTH), generator=g)


def train(engine, first: int, last: int) -> dict[str, float]:
    losses = {}
    rank = int(os.environ.get("RANK", "0"))
    for step in range(first, last + 1):
        x = batch(step, rank)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses[str(step)] = float(loss)
    return losses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--save_dir", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    half = args.steps // 2

    engine = build(config)
    report = {"start_kurtosis": kurtosis(engine.module.transformer.h[0].mlp.c_fc.weight)}
    report["losses"] = train(engine, 1, half)
    engine.save_checkpoint(args.save_dir)
    report["losses"].update(train(engine, half + 1, args.steps))
    report["digest"] = digest(engine.module)

    resumed = build(config)
    resumed.load_checkpoint(args.save_dir)
    report["resumed_losses"] = train(resumed, half + 1, args.steps)
    report["resumed_digest"] = digest(resumed.module)

    rank = int(os.environ.get("RANK", "0"))
    with open(f"{args.report}.rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
