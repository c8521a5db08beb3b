"""tools/fuzz_codec.py: its reference decoder reads encoder output right, a bounded fuzz run
(exhaustive bit flips and random mutations, in worker subprocesses) finds nothing, and the
harness catches and saves a crashing and a hanging input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ggspeed.codec import MAX_ABS, EGStream, eg_decode, eg_encode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import fuzz_codec  # noqa: E402


def _fuzz(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "fuzz"
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz_codec.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (out / "summary.json").exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "summary.json").read_text())


def test_reference_decodes_encoder_output():
    """The reference reads what the encoder writes, in every mode, and applies the bound."""
    rng = np.random.default_rng(7)
    arrays = [
        rng.integers(-MAX_ABS, MAX_ABS + 1, 50),
        np.where(rng.random(500) < 0.1, rng.integers(-9, 10, 500), 0),
        np.zeros(70, np.int64),
    ]
    for a in arrays:
        for k, runs in ((0, False), (7, False), ("auto", False), (0, True), ("auto", True)):
            for chunk in (1, 9, 16384):
                b = eg_encode(torch.from_numpy(a), k, runs, chunk_size=chunk).to_bytes()
                assert fuzz_codec.reference_decode(b, require_crc=True) == a.tolist()
    z = eg_encode(torch.zeros(1 << 20, dtype=torch.int32), "auto", runs=True, chunk_size=1 << 20)
    with pytest.raises(fuzz_codec.Invalid, match="bound"):
        fuzz_codec.reference_decode(z.to_bytes())
    with pytest.raises(ValueError, match="bound"):
        eg_decode(EGStream.from_bytes(z.to_bytes()))


def test_corpus_covers_every_mode():
    bases = fuzz_codec.corpus()
    flags = {b.data[5] for b in bases}
    assert flags == {0, 1, 2, 3, 4, 5, 6, 7}, flags  # runs x auto x checksum
    assert {b.chunk for b in bases} == {1, 3, 16, 16384}
    assert any(fuzz_codec._two_full_chunks(b) for b in bases)


def test_bounded_fuzz_run(tmp_path):
    """Exhaustive single-bit flips and truncations, then every random mutation kind: only
    ValueError, equal values, or the values the format specifies; nothing else."""
    n_exh = len(fuzz_codec.exhaustive(fuzz_codec.corpus()))
    rc, s = _fuzz(tmp_path, "--inputs", "3000", "--start", str(n_exh - 800), "--batch", "3000")
    assert rc == 0 and s["failures"] == 0, s["counts"]
    c = s["counts"]
    assert sum(c.values()) == 3000 and s["exhaustive_inputs"] == 800
    assert c["refused"] > 1000 and c["equal"] > 50 and c["as_specified"] > 50, c
    kinds = {k.split("/")[0] for k in s["by_kind"]}
    assert kinds >= set(fuzz_codec.MUTATORS) | {"every_flip_kept", "every_truncation"}, kinds
    assert s["by_kind"].get("swap_chunks/as_specified", 0) > 0  # valid mutations decode


@pytest.mark.parametrize("kind", ["crash", "hang"])
def test_harness_saves_crashing_and_hanging_inputs(tmp_path, kind):
    """A worker that segfaults or stops making progress is caught; its input is saved."""
    at = 100_000
    rc, s = _fuzz(
        tmp_path, "--inputs", "1", "--start", str(at), "--inject", f"{kind}:{at}",
        "--hang-seconds", "2",
    )  # fmt: skip
    assert rc == 1 and s["counts"] == {kind: 1} and s["failures"] == 1, s
    saved = tmp_path / "fuzz" / "failures" / f"{kind}-seed0-input{at}"
    data, _, _, _ = fuzz_codec.make_input(fuzz_codec.corpus(), [], 0, at)
    assert saved.with_suffix(".bin").read_bytes() == data
    assert json.loads(saved.with_suffix(".json").read_text())["outcome"] == kind
