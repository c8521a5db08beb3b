"""tools/preprocess_data.py and ggspeed.data.indexed: .bin/.idx round trip, split, batch order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ggspeed.data.indexed import (
    BatchPlan,
    DataError,
    SequenceSampler,
    TokenStream,
    TrainBatches,
    check_dataset_dir,
    eval_batches,
)
from tests.scripts import load_script


def _tool():
    return load_script("tools/preprocess_data.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    meta = _tool().prepare(out, vocab_size=512, max_files=20, valid_fraction=0.2)
    return out, meta


def test_stdlib_dataset_round_trip(dataset):
    from tokenizers import Tokenizer

    from ggspeed.data.corpus import read_text, split_documents

    out, meta = dataset
    assert check_dataset_dir(out)["vocab_size"] == meta["vocab_size"] == 512
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    files = [Path(f) for f in meta["files"]]
    train_idx, valid_idx = split_documents(len(files), 0.2)
    assert meta["splits"]["valid"]["documents"] == len(valid_idx) > 0
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        stream = TokenStream(out / split)
        expect = np.concatenate([[*tok.encode(read_text(files[i])).ids, meta["eod"]] for i in idx])
        assert stream.num_tokens == len(expect)
        # windows across document boundaries read the concatenated stream
        for start in (0, 1, len(expect) // 3, len(expect) - 70):
            np.testing.assert_array_equal(stream.window(start, 70), expect[start : start + 70])
    with pytest.raises(IndexError):
        stream.window(stream.num_tokens - 5, 10)


def test_preprocess_is_deterministic_and_takes_a_user_tokenizer(dataset, tmp_path):
    out, meta = dataset
    again = _tool().prepare(
        tmp_path / "b", tokenizer=str(out / "tokenizer.json"), max_files=20, valid_fraction=0.2
    )
    assert again["fingerprint"] == meta["fingerprint"]
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes(), name


def test_jsonl_input_and_errors(tmp_path, dataset):
    out, _ = dataset
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(10))
    )
    meta = _tool().prepare(
        tmp_path / "j", [str(src)], tokenizer=str(out / "tokenizer.json"), valid_fraction=0.2
    )
    assert meta["splits"]["train"]["documents"] == 8 and meta["splits"]["valid"]["documents"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no 'text' key"):
        _tool().prepare(tmp_path / "k", [str(bad)], tokenizer=str(out / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        _tool().prepare(tmp_path / "k", [str(tmp_path / "nope.txt")])
    assert (
        _tool().main(["--input", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "k")]) == 2
    )


def test_preprocess_refuses_bad_arguments_before_work(tmp_path, capsys):
    """Each bad argument: exit 2 with one line naming it, before the corpus is read."""
    tool = _tool()
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x\n")
    blob = tmp_path / "b.txt"
    blob.write_bytes(bytes(range(256)) * 4)
    afile = tmp_path / "plain"
    afile.write_text("x")
    cases = [
        (["--input", str(text), "--output-dir", str(afile / "sub")], "--output-dir", "is a file"),
        (["--input", str(text), "--output-dir", str(afile)], "--output-dir", "not a folder"),
        (["--vocab-size", "-5"], "--vocab-size -5", "must be >= 257"),
        (["--vocab-size", "0"], "--vocab-size 0", "must be >= 257"),
        (["--valid-fraction", "1.5"], "--valid-fraction 1.5", "(0, 1)"),
        (["--max-files", "0"], "--max-files 0", ">= 1"),
        (["--input", str(text), str(blob)], f"--input {blob}", "binary file"),
    ]
    for extra, arg, fault in cases:
        if "--output-dir" not in extra:
            extra = [*extra, "--output-dir", str(tmp_path / "out")]
        assert tool.main(extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, f"one line expected: {err}"
        assert err.startswith("preprocess_data.py: error: ") and arg in err and fault in err, err
    assert not (tmp_path / "out").exists(), "nothing written for a refused run"


def test_missing_dataset_files_are_named(tmp_path, dataset):
    with pytest.raises(DataError, match="no such directory"):
        check_dataset_dir(tmp_path / "absent")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text('{"vocab_size": 5, "eod": 0}')
    with pytest.raises(DataError, match=r"missing train\.bin"):
        check_dataset_dir(tmp_path / "d")


class Ids:
    """Sample g -> [g, g, ...]: makes the sample index visible in the batch."""

    seq_len = 4
    num_samples = 10**9

    def __getitem__(self, g):
        return torch.full((5,), int(g))


def _step_samples(plan: BatchPlan, step: int) -> list[int]:
    return sorted(g for r in range(plan.dp_size) for mb in plan.micro_batches(step, r) for g in mb)


def test_global_batches_do_not_depend_on_the_layout():
    layouts = [BatchPlan(8, 1, 1), BatchPlan(2, 2, 2), BatchPlan(2, 1, 4), BatchPlan(1, 4, 2)]
    for step in (0, 1, 7):
        want = list(range(step * 8, step * 8 + 8))
        for plan in layouts:
            assert _step_samples(plan, step) == want, plan


def test_train_batches_resume_where_they_left_off():
    plan = BatchPlan(2, 3, 2)
    for rank in range(2):
        straight = TrainBatches(Ids(), plan, rank)
        seen = [next(straight)[0][:, 0].tolist() for _ in range(5 * plan.grad_accum)]
        resumed = TrainBatches(Ids(), plan, rank, start_step=2)
        again = [next(resumed)[0][:, 0].tolist() for _ in range(3 * plan.grad_accum)]
        assert again == seen[2 * plan.grad_accum :]
    tokens, labels = next(TrainBatches(Ids(), plan, 0))
    assert tokens.shape == labels.shape == (2, 4)


def test_sampler_epochs_are_seeded_permutations(dataset):
    out, _ = dataset
    stream = TokenStream(out / "valid")
    a = SequenceSampler(stream, 16, seed=1)
    n = a.num_samples
    first = [tuple(a[g].tolist()) for g in range(n)]
    second = [tuple(a[g].tolist()) for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    assert first == [tuple(SequenceSampler(stream, 16, seed=1)[g].tolist()) for g in range(n)]
    assert first != [tuple(SequenceSampler(stream, 16, seed=2)[g].tolist()) for g in range(n)]
    with pytest.raises(DataError, match="fewer than seq_len"):
        SequenceSampler(stream, stream.num_tokens, seed=0)
    plain = SequenceSampler(stream, 16, seed=1, shuffle=False)
    e1 = [t.tolist() for t, _ in eval_batches(plain, BatchPlan(2, 1, 2), 1, 2)]
    e2 = [t.tolist() for t, _ in eval_batches(plain, BatchPlan(2, 1, 2), 1, 2)]
    assert e1 == e2 and len(e1) == 2
