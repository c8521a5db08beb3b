"""The embedded default corpus: the Python standard library of the running interpreter.

Nothing is downloaded: every machine that runs ggspeed has real text of a few MiB here. The file
list differs between installs (distributions split tests or tkinter out), so every prepared
artefact records the list's fingerprint. A byte-level BPE tokenizer is trained on it locally
(deterministic, a few seconds), and token streams are cached under ``build/corpus``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "build" / "corpus"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The stdlib's ``.py`` files, sorted; site-packages (large inside a venv's base) excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS
            and (
                include_tests
                or (d not in {"test", "tests", "idle_test"} and rel.parts[:1] != ("test",))
            )
        )
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    return files


def read_text(path: Path) -> str:
    """A file's text; undecodable bytes replaced (a few stdlib files carry legacy encodings)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def corpus_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the files' names and contents: identifies the corpus a dataset came from."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def train_bpe_tokenizer(files: Sequence[Path], vocab_size: int = 4096):
    """A byte-level BPE trained on ``files`` (deterministic for the same files and vocab size).

    ``<|endoftext|>`` is token 0 and separates documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in files), trainer=trainer, length=len(files))
    return tok


def tokenize_documents(tokenizer, files: Sequence[Path], batch: int = 64) -> list[np.ndarray]:
    """Token ids of each file, in order (``encode_batch`` uses the tokenizer's thread pool)."""
    docs: list[np.ndarray] = []
    for i in range(0, len(files), batch):
        texts = [read_text(f) for f in files[i : i + batch]]
        docs.extend(np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(texts))
    return docs


def split_documents(n_docs: int, valid_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split by document index: every k-th document validates."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_fraction == 0.0:
        return list(range(n_docs)), []
    every = max(2, round(1.0 / valid_fraction))
    valid = [i for i in range(n_docs) if i % every == every - 1]
    train = [i for i in range(n_docs) if i % every != every - 1]
    return train, valid


@dataclass
class CorpusTokens:
    """Concatenated token streams of the train and validation documents (EOD-separated)."""

    train: torch.Tensor
    valid: torch.Tensor
    vocab_size: int
    tokenizer_path: Path
    fingerprint: str


def load_corpus_tokens(
    vocab_size: int = 4096,
    valid_fraction: float = 0.05,
    include_tests: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CorpusTokens:
    """Tokenize the embedded corpus (cached: the first call takes a few seconds)."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    files = stdlib_files(include_tests)
    fp = corpus_fingerprint(files)
    key = f"v{vocab_size}-t{int(include_tests)}-f{valid_fraction}-{fp[:16]}"
    folder = cache / key
    meta = folder / "meta.json"
    if not meta.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tok = train_bpe_tokenizer(files, vocab_size)
        docs = tokenize_documents(tok, files)
        train_idx, valid_idx = split_documents(len(docs), valid_fraction)
        eod = np.zeros(1, dtype=np.int32)
        for name, idx in (("train", train_idx), ("valid", valid_idx)):
            parts = [p for i in idx for p in (docs[i], eod)]
            arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
            np.save(folder / f"{name}.npy", arr)
        tok.save(str(folder / "tokenizer.json"))
        meta_tmp = folder / "meta.json.tmp"
        meta_tmp.write_text(
            json.dumps(
                {"files": [str(f) for f in files], "fingerprint": fp, "vocab_size": vocab_size},
                indent=1,
            )
        )
        meta_tmp.replace(meta)
    return CorpusTokens(
        train=torch.from_numpy(np.load(folder / "train.npy")).long(),
        valid=torch.from_numpy(np.load(folder / "valid.npy")).long(),
        vocab_size=vocab_size,
        tokenizer_path=folder / "tokenizer.json",
        fingerprint=fp,
    )


def random_batches(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of random windows, a pure function of (seed, step).

    Step ``s`` draws from its own generator seeded by (seed, s), so a resumed run from
    ``start_step`` sees exactly the batches the uninterrupted run saw.
    """
    n = tokens.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than seq_len + 1")
    step = start_step
    offsets = torch.arange(seq_len + 1)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, n, (batch_size,), generator=g)
        windows = tokens[starts[:, None] + offsets]
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        step += 1
