"""tools/fit_gg.py: checkpoint formats, fits and plots, and the GPT activation/gradient mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fit_gg  # noqa: E402

from ggspeed.init import apply_gg_init  # noqa: E402
from ggspeed.models.nanogpt import GPT, GPTConfig  # noqa: E402

CFG = {"vocab_size": 256, "seq_len": 16, "n_layer": 2, "n_head": 2, "d_model": 32}


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    apply_gg_init(model, {"enabled": True, "shape": 0.6, "seed": 3})
    return model


def test_loads_every_checkpoint_format(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = _model()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({"model": sd, "step": 3}, tmp_path / "wrapped.pt")
    flat = {k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}
    save_file(flat, tmp_path / "w.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(flat, hf / "model.safetensors")
    for path in ("sd.pt", "wrapped.pt", "w.safetensors", "hf"):
        got = fit_gg.load_tensors(tmp_path / path)
        assert torch.equal(got["blocks.1.fc.weight"], sd["blocks.1.fc.weight"]), path
    # DeepSpeed checkpoint folders: tests/test_init_megatron.py (a real engine in its launch).
    with pytest.raises(FileNotFoundError, match="nope"):
        fit_gg.load_tensors(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no checkpoint files"):
        fit_gg.load_tensors(empty)


def test_checkpoint_fit_recovers_init_shape(tmp_path: Path, capsys: Any) -> None:
    torch.save(_model().state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "fit.json"
    fit_gg.main([str(tmp_path / "sd.pt"), "--json", str(out), "--plot", str(tmp_path / "f.png")])
    res = json.loads(out.read_text())["weights"]
    assert "lm_head.weight" not in res["tensors"]  # tied to wte: counted once
    assert res["pooled_standardized"]["shape"] == pytest.approx(0.6, rel=0.1)
    assert res["tensors"]["blocks.0.fc.weight"]["shape"] == pytest.approx(0.6, rel=0.15)
    assert (tmp_path / "f.png").stat().st_size > 10_000
    assert "Set gg_init.shape to 0.6" in capsys.readouterr().out


def test_gpt_mode_captures_activations_and_gradients(tmp_path: Path) -> None:
    out = tmp_path / "gpt.json"
    args = ["--gpt", "--steps", "2", "--capture-steps", "2", "--d-model", "32", "--layers", "2"]
    fit_gg.main([*args, "--heads", "2", "--seq", "16", "--batch", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["activations"]["tensors"]) == {"block0.out", "block1.out"}
    assert res["activations"]["tensors"]["block0.out"]["numel"] == 2 * 4 * 16 * 32
    assert "blocks.1.fc.weight" in res["gradients"]["tensors"]
    assert 0.05 <= res["gradients"]["pooled"]["shape"] <= 5
