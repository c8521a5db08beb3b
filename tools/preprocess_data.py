"""Text files / JSONL -> megatron-core indexed datasets (.bin/.idx) for launch/pretrain_gpt.py.

    python tools/preprocess_data.py --output-dir build/data/stdlib-v4096            # the stdlib corpus
    python tools/preprocess_data.py --input docs/ notes.txt --vocab-size 8192 --output-dir out
    python tools/preprocess_data.py --input data.jsonl --json-key text --tokenizer tokenizer.json --output-dir out

Every input file (or JSONL line) is one document, followed by the EOD token. Without
``--input`` the corpus is the running interpreter's standard library (``ggspeed.data.corpus``).
Without ``--tokenizer`` a byte-level BPE is trained on the inputs. Documents are split
deterministically (every k-th document validates) into ``train`` and ``valid``; ``meta.json``
records the vocabulary, EOD id, the inputs and their fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".c", ".h", ".html", ".tex"}
MIN_VOCAB = 257  # the byte-level BPE's 256 byte symbols + the EOD token
BINARY_PROBE = 8192  # bytes read to tell a binary file (a NUL byte) from text


def check_output_dir(output_dir: str | Path) -> None:
    """ValueError naming ``--output-dir`` when it cannot become a writable folder."""
    out = Path(output_dir)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == out else f" ({probe} is a file)"
        raise ValueError(f"--output-dir {out}: not a folder{where}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {out}: {probe} is not writable")


def check_text_file(path: Path, flag: str = "--input") -> None:
    """ValueError for a binary file (a NUL byte in its first bytes): tokenizing it trains on noise."""
    with open(path, "rb") as f:
        head = f.read(BINARY_PROBE)
    if b"\0" in head:
        raise ValueError(f"{flag} {path}: a binary file (NUL bytes), not text")


def check_arguments(
    vocab_size: int, valid_fraction: float, max_files: int | None, tokenizer: str | None
) -> None:
    """The numeric arguments, before any file is read; ValueError naming the argument."""
    if tokenizer is None and vocab_size < MIN_VOCAB:
        raise ValueError(
            f"--vocab-size {vocab_size}: must be >= {MIN_VOCAB} "
            "(256 byte symbols + the EOD token of the trained byte-level BPE)"
        )
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction {valid_fraction}: must be in (0, 1)")
    if max_files is not None and max_files < 1:
        raise ValueError(f"--max-files {max_files}: must be >= 1")


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files given, and text files under directories given (sorted); error naming a missing path."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no text files found")
    for f in files:
        check_text_file(f)
    return files


def read_documents(files: Sequence[Path], json_key: str) -> list[str]:
    """One document per text file; one per line of a .jsonl file (its ``json_key`` field)."""
    from ggspeed.data.corpus import read_text

    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(read_text(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: invalid JSON: {e.msg}") from e
                if not isinstance(obj, dict) or json_key not in obj:
                    raise ValueError(f"{f}:{n}: no {json_key!r} key (set --json-key)")
                docs.append(str(obj[json_key]))
        else:
            docs.append(read_text(f))
    return docs


def prepare(
    output_dir: str | Path,
    inputs: Sequence[str] | None = None,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    eod_token: str = "<|endoftext|>",
    valid_fraction: float = 0.05,
    json_key: str = "text",
    include_tests: bool = False,
    max_files: int | None = None,
) -> dict[str, Any]:
    """Build the dataset folder; returns its meta.json contents."""
    import numpy as np
    from tokenizers import Tokenizer

    from ggspeed.data.corpus import (
        corpus_fingerprint,
        split_documents,
        stdlib_files,
        train_bpe_tokenizer,
    )
    from ggspeed.data.indexed import write_indexed

    out = Path(output_dir)
    check_arguments(vocab_size, valid_fraction, max_files, tokenizer)
    check_output_dir(out)
    files = expand_inputs(inputs) if inputs else stdlib_files(include_tests)
    if max_files is not None:
        files = files[:max_files]
    texts = read_documents(files, json_key)
    if tokenizer:
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file")
        tok = Tokenizer.from_file(tokenizer)
    else:
        tok = (
            train_bpe_tokenizer(files, vocab_size)
            if not any(f.suffix == ".jsonl" for f in files)
            else None
        )
        if tok is None:  # JSONL: train on the documents, not on the raw JSON lines
            from tokenizers import decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=[eod_token],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eod = tok.token_to_id(eod_token)
    if eod is None:
        raise ValueError(f"tokenizer has no EOD token {eod_token!r} (set --eod-token)")
    vocab = tok.get_vocab_size()
    docs = [np.asarray([*e.ids, eod], dtype=np.int64) for e in tok.encode_batch(texts)]
    train_idx, valid_idx = split_documents(len(docs), valid_fraction)
    if not valid_idx:
        raise ValueError(
            f"no validation documents: {len(docs)} documents, --valid-fraction {valid_fraction}"
        )
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        write_indexed(out / split, [docs[i] for i in idx], vocab)
        counts[split] = {"documents": len(idx), "tokens": int(sum(len(docs[i]) for i in idx))}
    tok.save(str(out / "tokenizer.json"))
    meta = {
        "vocab_size": vocab,
        "eod": eod,
        "eod_token": eod_token,
        "valid_fraction": valid_fraction,
        "splits": counts,
        "source": "stdlib" if not inputs else "files",
        "files": [str(f) for f in files],
        "fingerprint": corpus_fingerprint(files),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        help="text files, folders of them, or .jsonl files (default: the stdlib)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--tokenizer", help="a Hugging Face tokenizers tokenizer.json (default: train a BPE)"
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE")
    p.add_argument("--eod-token", default="<|endoftext|>")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--json-key", default="text")
    p.add_argument(
        "--include-tests", action="store_true", help="stdlib corpus: add the test suites"
    )
    p.add_argument("--max-files", type=int, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = prepare(
            args.output_dir,
            args.input,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            eod_token=args.eod_token,
            valid_fraction=args.valid_fraction,
            json_key=args.json_key,
            include_tests=args.include_tests,
            max_files=args.max_files,
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    s = meta["splits"]
    print(
        f"wrote {args.output_dir}: vocab {meta['vocab_size']}, train {s['train']['tokens']} tokens "
        f"({s['train']['documents']} docs), valid {s['valid']['tokens']} tokens "
        f"({s['valid']['documents']} docs) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
