"""Unchanged training scripts get ggspeed from the ds_config alone (the registered path).

Each test starts 2 CPU ranks through the DeepSpeed launcher on scripts that never mention
ggspeed: tests/hf_trainer_script.py (the Hugging Face Trainer, ``TrainingArguments(deepspeed=
...)``) and tests/hf_plain_script.py (its own loop around ``deepspeed.initialize``). What ggspeed
did is read from what it leaves behind: its log lines, its per-rank files in the checkpoints, the
weights. The launcher on CPU leaves one /dev/shm segment per rank named after the master port;
each launch removes its own.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "tests" / "hf_trainer_script.py"
PLAIN = ROOT / "tests" / "hf_plain_script.py"

SECTION = {
    "log_interval": 1,
    "gg_init": {"enabled": True, "shape": 1.0},
    "act": {"enabled": True, "lambda_target": 1e-3, "warmup_steps": 2, "compress": True},
    "gct": {"enabled": True, "error_feedback": True},
}
TRAINER_DS = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 1},
    "steps_per_print": 10**6,
    "ggspeed": SECTION,
}
PLAIN_DS = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**6,
    "ggspeed": SECTION,
}
ROUTED = "deepspeed.initialize ran through ggspeed (registered): gg_init, act, gct"
ZERO3_REFUSAL = "zero_optimization.stage: got 3; ggspeed.gct supports ZeRO stages 0, 1 and 2"


def _segments(port: int) -> list[str]:
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")


def launch(script: Path, *args: str, timeout: float = 900) -> tuple[int, str]:
    """``deepspeed --num_gpus 2 script args`` on loopback; (return code, all output)."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("GGSPEED_DISABLE", None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *args]  # fmt: skip
    # Own process group: on a timeout the launcher's ranks go too, not only the launcher.
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for path in _segments(port):
            os.unlink(path)
    return proc.returncode, out


def write(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def reports(prefix: Path) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]


def telemetry(out: str) -> list[dict[str, float]]:
    """The ``[ggspeed] step N: key=value ...`` lines ggspeed logs on rank 0."""
    lines = []
    for line in out.splitlines():
        if line.startswith("[ggspeed] step "):
            pairs = line.split(": ", 1)[1].split()
            lines.append({k: float(v) for k, v in (p.split("=", 1) for p in pairs)})
    return lines


def check_ggspeed_ran(out: str, checkpoint: Path, first: list[dict]) -> None:
    assert out.count(ROUTED) == 1, out[-3000:]  # rank 0 says so, once
    lines = telemetry(out)
    assert lines, out[-3000:]
    gct_bits = [t["gct/bits_per_element"] for t in lines]
    assert all(0.0 < b < 16.0 for b in gct_bits), gct_bits
    assert any("act/bits_per_element" in t and t["act/stored_mb"] > 0 for t in lines), lines
    assert any(t.get("act/lambda", 0.0) > 0 for t in lines), lines  # the rate gradient is on
    # Ranks in sync: the same weights everywhere after compressed all-reduces.
    assert first[0]["digest"] == first[1]["digest"]
    # GG Init (shape 1, Laplace: excess kurtosis 3) replaced the Gaussian init (0).
    assert all(r["start_kurtosis"] > 1.5 for r in first), first
    # ggspeed's per-rank state next to DeepSpeed's files in the checkpoint.
    assert sorted(p.name for p in checkpoint.glob("ggspeed_rank*.pt")) == [
        "ggspeed_rank00000.pt",
        "ggspeed_rank00001.pt",
    ]


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_script_with_section_trains_with_ggspeed_and_resumes_exactly(tmp_path):
    ds = write(tmp_path / "ds.json", TRAINER_DS)
    common = ["--deepspeed", ds, "--max_steps", "4", "--save_steps", "2", "--gradient_checkpointing"]  # fmt: skip
    rc, out = launch(TRAINER, *common, "--output_dir", str(tmp_path / "a"), "--report", str(tmp_path / "a"))  # fmt: skip
    assert rc == 0, out[-6000:]
    first = reports(tmp_path / "a")
    check_ggspeed_ran(out, tmp_path / "a" / "checkpoint-2" / "global_step2", first)

    # Resume from the step-2 checkpoint: steps 3 and 4 repeat bit for bit (weights, optimizer,
    # scheduler, data position, and ggspeed's error-feedback residuals and ACT schedule).
    rc, out = launch(TRAINER, *common, "--output_dir", str(tmp_path / "b"), "--report", str(tmp_path / "b"),
                     "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2"))  # fmt: skip
    assert rc == 0, out[-6000:]
    assert out.count(ROUTED) == 1
    resumed = reports(tmp_path / "b")
    for r in (0, 1):
        assert resumed[r]["losses"] == {k: first[r]["losses"][k] for k in ("3", "4")}
        assert resumed[r]["digest"] == first[r]["digest"]


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_script_without_section_runs_plain_deepspeed(tmp_path):
    plain = {k: v for k, v in TRAINER_DS.items() if k != "ggspeed"}
    ds = write(tmp_path / "ds.json", plain)
    rc, out = launch(TRAINER, "--deepspeed", ds, "--max_steps", "2", "--save_steps", "2",
                     "--gradient_checkpointing", "--output_dir", str(tmp_path / "a"),
                     "--report", str(tmp_path / "a"))  # fmt: skip
    assert rc == 0, out[-6000:]
    assert "[ggspeed]" not in out and "ran through ggspeed" not in out
    first = reports(tmp_path / "a")
    assert first[0]["digest"] == first[1]["digest"]
    assert all(abs(r["start_kurtosis"]) < 1.0 for r in first)  # Hugging Face's Gaussian init
    checkpoint = tmp_path / "a" / "checkpoint-2" / "global_step2"
    assert checkpoint.is_dir() and not list(checkpoint.glob("ggspeed_rank*"))


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_script_refused_setting_stops_both_ranks(tmp_path):
    refused = copy.deepcopy(TRAINER_DS)
    refused["zero_optimization"] = {"stage": 3}
    ds = write(tmp_path / "ds.json", refused)
    rc, out = launch(TRAINER, "--deepspeed", ds, "--max_steps", "2", "--output_dir",
                     str(tmp_path / "a"), "--report", str(tmp_path / "a"))  # fmt: skip
    assert rc != 0
    assert ZERO3_REFUSAL in out, out[-6000:]
    assert "refused the ds_config" in out
    assert "'loss'" not in out and not list(tmp_path.glob("a.rank*.json"))  # no step was taken


@pytest.mark.dist
@pytest.mark.slow
def test_plain_deepspeed_initialize_script_gets_the_same(tmp_path):
    cfg = write(tmp_path / "ds.json", PLAIN_DS)
    rc, out = launch(PLAIN, "--config", cfg, "--save_dir", str(tmp_path / "ckpt"),
                     "--report", str(tmp_path / "r"), "--steps", "4")  # fmt: skip
    assert rc == 0, out[-6000:]
    first = reports(tmp_path / "r")
    # Two engines in the script (train, then resume): ggspeed ran for both.
    assert out.count(ROUTED) == 2, out[-3000:]
    check_ggspeed_ran(out.replace(ROUTED, "", 1), tmp_path / "ckpt" / "global_step2", first)
    for r in first:
        assert r["resumed_losses"] == {k: r["losses"][k] for k in ("3", "4")}
        assert r["resumed_digest"] == r["digest"]
