"""Token datasets in megatron-core's indexed format (.bin/.idx) and the trainer's batch order.

A prepared dataset is a folder with ``train.bin/.idx``, ``valid.bin/.idx`` (megatron-core
``IndexedDataset``: one sequence per document, each ending with the EOD token),
``tokenizer.json`` and ``meta.json`` (vocab size, EOD id, source files and their fingerprint).

Batch order is a pure function of (seed, step), independent of the parallel layout: the token
stream is cut into non-overlapping windows of ``seq_len + 1`` tokens, each epoch visits them in
a seeded permutation, global batch ``t`` is global samples ``[t*G, (t+1)*G)``, and data-parallel
rank ``r`` takes the r-th contiguous slice of it, cut into micro-batches. So a run resumed at step
``t`` sees exactly the batches an uninterrupted run sees, and a TP x PP x DP run trains on the
same global batches as a single process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "valid")
META = "meta.json"


class DataError(ValueError):
    """Missing or inconsistent dataset files; the message names the file."""


def check_dataset_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset folder's meta.json; DataError naming the first missing file."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"--data-path {root}: no such directory (make one with tools/preprocess_data.py)"
        )
    needed = [root / META] + [root / f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]
    for f in needed:
        if not f.is_file():
            raise DataError(
                f"--data-path {root}: missing {f.name} (make it with tools/preprocess_data.py)"
            )
    try:
        meta = json.loads((root / META).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{root / META}: invalid JSON: {e}") from e
    for key in ("vocab_size", "eod"):
        if key not in meta:
            raise DataError(f"{root / META}: missing key {key!r}")
    return meta


def write_indexed(
    prefix: str | os.PathLike[str], docs: Sequence[np.ndarray], vocab_size: int
) -> None:
    """Write documents (token id arrays) as megatron-core ``prefix.bin`` / ``prefix.idx``."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = os.fspath(prefix)
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype).tolist(), lengths=[len(doc)])
    builder.finalize(prefix + ".idx")


class TokenStream:
    """A megatron-core IndexedDataset read as one concatenated token stream."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = os.fspath(prefix)
        self.ds = IndexedDataset(self.prefix)
        lengths = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across document boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        doc = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = 0
        while pos < length:
            offset = start + pos - int(self.starts[doc])
            take = min(length - pos, int(self.starts[doc + 1]) - (start + pos))
            if take > 0:
                out[pos : pos + take] = self.ds.get(doc, offset=offset, length=take)
                pos += take
            doc += 1
        return out


class SequenceSampler:
    """Sample ``g`` (any non-negative int) -> ``seq_len + 1`` tokens; epochs reshuffled by seed."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = (stream.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(
                f"{stream.prefix}: {stream.num_tokens} tokens is fewer than seq_len + 1 = {seq_len + 1}"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_samples, generator=g).numpy())
        return self._perm[1]

    def __getitem__(self, g: int) -> torch.Tensor:
        epoch, i = divmod(int(g), self.num_samples)
        j = int(self._order(epoch)[i]) if self.shuffle else i
        return torch.from_numpy(self.stream.window(j * self.seq_len, self.seq_len + 1))


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: micro_batch x grad_accum x dp == global_batch."""

    micro_batch: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def micro_batches(self, step: int, dp_rank: int) -> list[range]:
        """Global sample indices of each micro-batch rank ``dp_rank`` runs at ``step``."""
        first = step * self.global_batch + dp_rank * self.micro_batch * self.grad_accum
        return [
            range(first + m * self.micro_batch, first + (m + 1) * self.micro_batch)
            for m in range(self.grad_accum)
        ]


def collate(sampler: SequenceSampler, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of a micro-batch: inputs and next-token targets, int64."""
    rows = torch.stack([sampler[g] for g in indices])
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainBatches:
    """Endless micro-batches for one DP rank, resumable: ``step`` is the next optimizer step.

    ``next()`` returns the next micro-batch; PipelineEngine.train_batch pulls ``grad_accum`` of
    them per step (only on its first and last stages; others never advance it, so ``step`` is
    set from the trainer's iteration count, not counted here).
    """

    def __init__(
        self, sampler: SequenceSampler, plan: BatchPlan, dp_rank: int, start_step: int = 0
    ) -> None:
        self.sampler, self.plan, self.dp_rank = sampler, plan, dp_rank
        self.step = start_step
        self._queue: list[range] = []

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._queue:
            self._queue = self.plan.micro_batches(self.step, self.dp_rank)
            self.step += 1
        return collate(self.sampler, self._queue.pop(0))


def eval_batches(
    sampler: SequenceSampler, plan: BatchPlan, dp_rank: int, eval_iters: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``eval_iters`` global batches every evaluation (an unshuffled sampler's first)."""
    for step in range(eval_iters):
        for idx in plan.micro_batches(step, dp_rank):
            yield collate(sampler, [g % sampler.num_samples for g in idx])
