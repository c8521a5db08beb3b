"""Failure behaviour on real separate processes: a rank killed while saving, corrupt state files,
a bad config section on one rank only. Every rank's outcome and how long it took are asserted.

The ranks are plain ``python`` processes (``Popen``) with the environment a launcher gives them,
started without a launcher that tears the job down when one of them exits: what a rank does on
its own is what is tested. ``python -m tests.test_trainer_faults <function> <json args>`` runs
one rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dist import free_port, run_ranks
from tests.dist import rank_env as dist_rank_env
from tests.scripts import ROOT

DS = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
    "steps_per_print": 1000,
}


@dataclass
class RankExit:
    rank: int
    returncode: int
    output: str
    seconds: float


def popen_ranks(
    function: str, world: int, args: Any, timeout: float = 240.0, env: dict | None = None
) -> list[RankExit]:
    """Start ``world`` ranks of ``function(args)`` as separate processes; wait for each to exit.

    A rank still running after ``timeout`` seconds is killed and reported with returncode None
    semantics (-9) and its elapsed time, so a hang fails the caller's assertions, not pytest.
    """
    port = free_port()
    procs, started = [], time.monotonic()
    for rank in range(world):
        rank_env = {
            k: v for k, v in os.environ.items() if k not in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE")
        }
        rank_env.update(dist_rank_env(rank, world, port), PYTHONPATH=str(ROOT), **(env or {}))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_trainer_faults", function, json.dumps(args)],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    exits = []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[test] rank {rank} killed after {timeout} s"
        exits.append(RankExit(rank, proc.returncode, out, time.monotonic() - started))
    return exits


def _report(**fields: Any) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def _results(out: str) -> list[dict[str, Any]]:
    return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]


def _engine(probe: dict[str, Any], kill_on: int | None = None):
    """A tiny DeepSpeed engine via ggspeed.initialize with a registered per-rank state ``probe``.

    ``kill_on``: this rank SIGKILLs itself when its state is taken with ``probe["n"] == kill_on``,
    i.e. after DeepSpeed wrote its checkpoint files and before ggspeed wrote this rank's file.
    """
    import torch

    import ggspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine, *_ = ggspeed.initialize(model=model, model_parameters=model.parameters(), config=DS)

    def get() -> dict[str, Any]:
        if probe["n"] == kill_on:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"rank": engine.global_rank, "n": torch.tensor(probe["n"])}

    def put(state: dict[str, Any]) -> None:
        probe["loaded"] = int(state["n"])

    engine.ggspeed.add_state("probe", get, put)
    return engine


def _step(engine) -> None:
    import torch

    loss = engine(torch.ones(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def rank_save_then_die(folder: str) -> None:
    """Save tag a (complete), then tag b, with rank 1 killed inside tag b's save."""
    rank = int(os.environ["RANK"])
    probe = {"n": 1}
    engine = _engine(probe, kill_on=2 if rank == 1 else None)
    _step(engine)
    engine.save_checkpoint(folder, tag="a")
    _report(saved="a")
    probe["n"] = 2
    _step(engine)
    t0 = time.monotonic()
    try:
        engine.save_checkpoint(folder, tag="b")
    except Exception as e:
        _report(error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
        raise
    _report(saved="b")


def rank_load(folder: str) -> None:
    """Load ``latest``, then try the incomplete tag b explicitly."""
    from ggspeed.checkpoint import CheckpointError

    probe: dict[str, Any] = {"n": 0}
    engine = _engine(probe)
    path, _ = engine.load_checkpoint(folder)
    _report(loaded=path, n=probe.get("loaded"))
    try:
        engine.load_checkpoint(folder, tag="b")
        _report(b="loaded")
    except CheckpointError as e:
        _report(b=str(e))


@pytest.mark.dist
def test_rank_killed_between_deepspeed_and_ggspeed_files(tmp_path):
    """`latest` stays on the last complete checkpoint; the incomplete one is refused by all."""
    folder = str(tmp_path / "ck")
    saver = popen_ranks("rank_save_then_die", 2, folder)
    r0, r1 = saver
    assert r1.returncode == -signal.SIGKILL, f"rank 1 was to be killed:\n{r1.output[-3000:]}"
    assert _results(r1.output) == [{"saved": "a"}], r1.output[-3000:]
    res0 = _results(r0.output)
    assert r0.returncode != 0 and res0[0] == {"saved": "a"}, r0.output[-3000:]
    assert "checkpoint" in res0[1]["error"] and "/b not saved" in res0[1]["error"], res0
    assert "'latest' still names the previous one" in res0[1]["error"], res0
    assert res0[1]["seconds"] < 60, f"rank 0 took {res0[1]['seconds']:.0f} s to notice"
    assert (tmp_path / "ck" / "latest").read_text() == "a", "latest moved to the incomplete b"
    assert (tmp_path / "ck" / "b" / "ggspeed_rank00000.pt").is_file()
    assert not (tmp_path / "ck" / "b" / "ggspeed_complete.json").exists()

    loader = popen_ranks("rank_load", 2, folder)
    for r in loader:
        assert r.returncode == 0, r.output[-3000:]
        first, second = _results(r.output)
        assert "/ck/a/" in first["loaded"] and first["n"] == 1, (r.rank, first)
        assert "incomplete checkpoint" in second["b"] and "load an earlier tag" in second["b"], (
            r.rank,
            second,
        )


# ----------------------------------------------------------------------------- corrupt files


def _wrapped(obj: Any) -> bytes:
    """A correctly checksummed ggspeed file around any ``torch.save`` payload."""
    import hashlib
    import io

    import torch

    from ggspeed.checkpoint import MAGIC

    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + payload


def _corruptions(good: bytes) -> dict[str, tuple[bytes | None, str]]:
    """name -> (bytes for rank 1's file or None to delete it, the fault the message must name)."""
    import datetime

    flipped = bytearray(good)
    flipped[-40] ^= 0x04
    return {
        "truncated": (good[: len(good) // 2], "truncated or padded"),
        "random": (os.urandom(len(good)), "not a ggspeed state file"),
        "plain_torch_save": (good[len(good) - int.from_bytes(good[48:56], "little") :], "header"),
        "bitflip": (bytes(flipped), "checksum mismatch"),
        "list": (_wrapped([1, 2, 3]), "holds a list, expected a dict"),
        "string": (_wrapped("hello"), "holds a str, expected a dict"),
        "version99": (_wrapped({"version": 99}), "version 99 unsupported"),
        "world_not_int": (_wrapped({"version": 1, "world_size": "2"}), "world_size '2'"),
        "components_list": (
            _wrapped({"version": 1, "world_size": 2, "components": {"probe": [1]}}),
            "'components' must map names to dicts",
        ),
        "probe_missing_key": (
            _wrapped({"version": 1, "world_size": 2, "components": {"probe": {"rank": 1}}}),
            "bad probe state",
        ),
        "code_object": (_wrapped({"version": 1, "when": datetime.date(2026, 1, 1)}), "plain"),
        "missing": (None, "cannot read"),
    }


def corrupt_file_verdicts(folder: str) -> dict[str, str]:
    """Save one checkpoint; per case, copy it with rank 1's ggspeed file damaged, load on all."""
    import shutil

    import torch.distributed as dist

    from ggspeed.checkpoint import CheckpointError

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    probe: dict[str, Any] = {"n": 3}
    engine = _engine(probe)
    _step(engine)
    engine.save_checkpoint(folder, tag="good")
    good = Path(folder, "good", "ggspeed_rank00001.pt").read_bytes()
    verdicts = {}
    for case, (data, _) in _corruptions(good).items():
        if rank == 1:
            shutil.copytree(Path(folder, "good"), Path(folder, case))
            target = Path(folder, case, "ggspeed_rank00001.pt")
            if data is None:
                target.unlink()
            else:
                target.write_bytes(data)
        dist.barrier()
        try:
            engine.load_checkpoint(folder, tag=case)
            verdicts[case] = "loaded"
        except CheckpointError as e:
            verdicts[case] = str(e)
    probe.pop("loaded", None)
    engine.load_checkpoint(folder, tag="good")  # still usable after the refusals
    verdicts["good"] = f"n={probe.get('loaded')}"
    return verdicts


@pytest.mark.dist
def test_corrupt_state_files_are_refused_on_every_rank(tmp_path):
    folder = tmp_path / "ck"
    out = run_ranks(corrupt_file_verdicts, 2, str(folder), init_pg=False, timeout=300)
    cases = _corruptions(b"\0" * 64)
    for rank, verdicts in enumerate(out):
        assert verdicts["good"] == "n=3", (rank, verdicts["good"])
        for case, (_, fault) in cases.items():
            msg = verdicts[case]
            path = str(folder / case / "ggspeed_rank00001.pt")
            assert msg.startswith(f"checkpoint {folder / case} not loaded: rank 1: "), (rank, msg)
            assert path in msg and fault in msg, f"rank {rank}, {case}: {msg}"
            assert "rank 0:" not in msg, f"rank 0's own file is fine: {msg}"


# ----------------------------------------------------------------------------- config


def rank_initialize(sections: dict[str, Any]) -> None:
    """ggspeed.initialize with this rank's ``"ggspeed"`` section (keyed by rank)."""
    import torch

    import ggspeed

    rank = os.environ["RANK"]
    model = torch.nn.Linear(4, 4)
    config = {**DS, "ggspeed": sections.get(rank, {})}
    t0 = time.monotonic()
    try:
        ggspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    except Exception as e:
        _report(error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
        sys.exit(3)
    _report(error=None)


@pytest.mark.dist
def test_bad_section_on_one_rank_stops_every_rank(tmp_path):
    """No launcher tears the job down here: each rank must leave with the error on its own."""
    bound = 120.0
    exits = popen_ranks("rank_initialize", 2, {"1": {"log_interval": 0}}, timeout=bound + 60)
    for r in exits:
        res = _results(r.output)
        assert r.returncode == 3 and res, f"rank {r.rank} ({r.returncode}):\n{r.output[-3000:]}"
        msg = res[0]["error"]
        assert msg.startswith("ConfigError: invalid ggspeed configuration: rank 1: "), msg
        assert "ggspeed.log_interval: got 0" in msg, msg
        assert r.seconds < bound, f"rank {r.rank} took {r.seconds:.0f} s"


# ----------------------------------------------------------------------------- NaN


def nan_gradient_outcome(stage: int, gct: bool) -> dict[str, Any]:
    """One fp32 step where rank 1's input holds a NaN: what the step did to the weights."""
    import torch

    import ggspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    before = [p.detach().clone() for p in model.parameters()]
    section = {"gct": {"enabled": True}} if gct else {}
    config = {**DS, "zero_optimization": {"stage": stage}, "ggspeed": section}
    engine, *_ = ggspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.ones(2, 4)
    if engine.global_rank == 1:
        x[0, 0] = float("nan")
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    params = list(engine.module.parameters())
    return {
        "all_nan": all(bool(p.isnan().all()) for p in params),
        "unchanged": all(torch.equal(p, b) for p, b in zip(params, before, strict=True)),
        "skipped": engine.skipped_steps,
    }


@pytest.mark.dist
@pytest.mark.parametrize(
    ("stage", "gct"),
    [(0, False), (1, False), (0, True), (1, True)],
    ids=["zero0-fp32_all_reduce", "zero1-fp32_all_reduce", "zero0-gct", "zero1-gct"],
)
def test_nan_gradient_skipped_under_zero1_poisons_zero0(stage, gct):
    """What docs/failures.md states: a NaN gradient on one rank, fp32. ZeRO-1: every rank skips
    the step (weights unchanged). ZeRO-0: DeepSpeed has no overflow check for fp32, every weight
    on every rank becomes NaN, with GCT as with the plain all-reduce."""
    expected = (
        {"all_nan": False, "unchanged": True, "skipped": 1}
        if stage == 1
        else {"all_nan": True, "unchanged": False, "skipped": 0}
    )
    for rank, out in enumerate(run_ranks(nan_gradient_outcome, 2, stage, gct, init_pg=False)):
        assert out == expected, (rank, out)


def rank_trainer(argvs: dict[str, list[str]]) -> None:
    """launch/pretrain_gpt.py as a script, with this rank's command line."""
    import runpy

    sys.argv = ["pretrain_gpt.py", *argvs[os.environ["RANK"]]]
    runpy.run_path(str(ROOT / "launch" / "pretrain_gpt.py"), run_name="__main__")


if __name__ == "__main__":
    globals()[sys.argv[1]](json.loads(sys.argv[2]))
