"""An ordinary Hugging Face Trainer script: nothing in it knows about ggspeed.

Tiny randomly initialized GPT-2 (built from a GPT2Config, nothing downloaded), a tiny token
dataset made here, ``TrainingArguments(deepspeed=<ds_config>)``. It writes what any script might
record (per-step losses, a digest of its final weights, the kurtosis of one weight matrix at the
start of training) to ``<report>.rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from hf_common import LENGTH, VOCAB, digest, kurtosis, tiny_gpt2
from transformers import Trainer, TrainerCallback, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Record(TrainerCallback):
    def __init__(self) -> None:
        self.report: dict = {"losses": {}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.report["start_kurtosis"] = kurtosis(model.transformer.h[0].mlp.c_fc.weight)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.report["losses"][str(state.global_step)] = logs["loss"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--save_steps", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()

    model = tiny_gpt2()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        save_strategy="steps",
        logging_steps=1,
        learning_rate=1e-3,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    record = Record()
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens(), callbacks=[record])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    engine = trainer.model_wrapped
    rank = int(os.environ.get("RANK", "0"))
    record.report.update(rank=rank, digest=digest(engine.module), engine=type(engine).__name__)
    with open(f"{args.report}.rank{rank}.json", "w") as f:
        json.dump(record.report, f)


if __name__ == "__main__":
    main()
