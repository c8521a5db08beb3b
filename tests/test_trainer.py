"""launch/pretrain_gpt.py: checks before training, LR schedule, and exact resume (2N == N + N)."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.scripts import ROOT
from tests.test_trainer_ranks import load_trainer, run_trainer, run_trainer_sigterm

MODEL = {"seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}


def ds_config(**over):
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**6,
        "ggspeed": {
            "log_interval": 2,
            "gg_init": {"enabled": True, "shape": 1.0},
            "act": {"enabled": True, "lambda_target": 1e-3, "warmup_steps": 2, "compress": True},
            "gct": {"enabled": True, "error_feedback": True},
        },
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.test_data import _tool

    root = tmp_path_factory.mktemp("trainer")
    _tool().prepare(root / "data", vocab_size=512, max_files=20, valid_fraction=0.2)
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def write_ds(root: Path, name: str, **over) -> str:
    path = root / name
    path.write_text(json.dumps(ds_config(**over)))
    return str(path)


def argv(root: Path, ds: str, *extra: str) -> list[str]:
    return [
        "--deepspeed_config", ds,
        "--model-config", str(root / "model.json"),
        "--data-path", str(root / "data"),
        "--train-iters", "6",
        "--eval-interval", "3",
        "--eval-iters", "1",
        "--lr", "3e-3",
        "--lr-warmup-iters", "2",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def preflight_error(root: Path, world: int, ds: str, *extra: str) -> str:
    trainer = load_trainer()
    args = trainer.parse_args(argv(root, ds, *extra))
    with pytest.raises(trainer.SetupError) as e:
        trainer.preflight(args, world)
    return str(e.value)


def test_bad_setups_fail_before_training(setup):
    root = setup
    ds = write_ds(root, "ok.json")
    assert "world size 3 is not divisible by tensor x pipeline" in preflight_error(
        root, 3, ds, "--tp", "2"
    )
    assert "n_head=2 is not divisible by tensor-model-parallel size 4" in preflight_error(
        root, 4, ds, "--tp", "4"
    )
    assert "n_layer=2 is not divisible by pipeline-model-parallel size 4" in preflight_error(
        root, 4, ds, "--pp", "4"
    )
    msg = preflight_error(root, 2, ds, "--data-path", str(root / "nowhere"))
    assert "--data-path" in msg and "nowhere" in msg
    bad = write_ds(root, "batch.json", train_batch_size=10)
    msg = preflight_error(root, 2, bad)  # DeepSpeed's own resolution, run before any group
    assert "train_batch_size=10" in msg and "10 != 2 * 2 * 2" in msg, msg
    assert "gradient_accumulation_steps" in msg and "data-parallel size 2" in msg, msg
    z0 = write_ds(root, "z0.json", zero_optimization={"stage": 0})
    assert "wrong global gradient norm" in preflight_error(root, 4, z0, "--pp", "2")
    typo = write_ds(root, "typo.json", ggspeed={"gct": {"enabld": True}})
    assert "ggspeed.gct.enabld: unknown key" in preflight_error(root, 2, typo)
    # fine layouts pass
    trainer = load_trainer()
    _, cfg, layout, meta = trainer.preflight(trainer.parse_args(argv(root, ds, "--pp", "2")), 4)
    assert (layout.tp, layout.pp, layout.dp) == (1, 2, 2) and cfg.vocab_size == meta["vocab_size"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_head", 0, "n_head must be an integer >= 1, got 0"),
        ("n_layer", 0, "n_layer must be an integer >= 1, got 0"),
        ("seq_len", 0, "seq_len must be an integer >= 1, got 0"),
        ("d_model", -32, "d_model must be an integer >= 1, got -32"),
        ("d_model", 32.5, "d_model must be an integer >= 1, got 32.5"),
        ("dropout", 2.0, "dropout must be in [0, 1), got 2.0"),
        ("seq_len", 10**7, "seq_len 10000000 needs 10000001 tokens per sample, but --data-path"),
    ],
)
def test_bad_model_fields_fail_before_any_process_group(setup, field, value, message):
    """Each is refused by the pre-flight with the field named; once they reached torch/megatron
    (ZeroDivisionError, empty pipelines, a sampler with no sample)."""
    import torch.distributed as dist

    root = setup
    bad = root / f"model_{field}_{value}.json"
    bad.write_text(json.dumps({**MODEL, field: value}))
    msg = preflight_error(root, 2, write_ds(root, "ok.json"), "--model-config", str(bad))
    assert message in msg and (field in msg or "--model-config" in msg), msg
    assert not dist.is_initialized(), "the pre-flight must not need a process group"


def test_gct_with_zero3_fails_before_the_model_is_built(setup):
    root = setup
    z3 = write_ds(root, "z3.json", zero_optimization={"stage": 3})
    msg = preflight_error(root, 2, z3)
    assert "zero_optimization.stage" in msg and "3" in msg, msg


@pytest.mark.dist
def test_preflight_error_on_one_rank_stops_every_rank(setup):
    """Rank 1's model config is bad, rank 0's fine; separate processes, no launcher to tear the
    job down: both exit 2 with rank 1's error, within a bound."""
    from tests.test_trainer_faults import popen_ranks

    root = setup
    bad = root / "model_bad_rank.json"
    bad.write_text(json.dumps({**MODEL, "n_head": 0}))
    ds = write_ds(root, "ok.json")
    argvs = {"0": argv(root, ds), "1": argv(root, ds, "--model-config", str(bad))}
    bound = 120.0
    for r in popen_ranks("rank_trainer", 2, argvs, timeout=bound + 60):
        assert r.returncode == 2, f"rank {r.rank} ({r.returncode}):\n{r.output[-3000:]}"
        assert (
            f"pretrain_gpt.py: error: pre-flight failed: rank 1: --model-config {bad}: n_head "
            "must be an integer >= 1, got 0" in r.output
        ), r.output[-3000:]
        assert r.seconds < bound, f"rank {r.rank} took {r.seconds:.0f} s"


def test_script_reports_setup_errors(setup):
    root = setup
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "pretrain_gpt.py"),
            *argv(root, write_ds(root, "ok.json"), "--data-path", "/nonexistent"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--data-path /nonexistent: no such directory" in r.stderr, (
        r.stderr[-2000:]
    )


def scheduled_lrs(style: str, warmup: int, total: int, steps: int) -> list[float]:
    """The LR each of ``steps`` optimizer steps runs at under the trainer's flag mapping."""
    import torch

    trainer = load_trainer()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = trainer.lr_scheduler(opt, style, 1e-4, warmup, total)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()  # after the optimizer step, as DeepSpeed's engine does
    return lrs


def test_lr_schedule_is_deepspeeds_warmup_cosine():
    """--lr-decay-style cosine is DeepSpeed's WarmupCosineLR. Its counting differs from the
    trainer's former own schedule (step 1 at 0.1 x peak, peak at step 10): the scheduler starts
    one iteration before the first step and its linear warm-up starts at 0, so steps 1 and 2 run
    at LR 0 and the warm-up reaches 0.9 x peak at step 11; the decay then starts just below the
    peak and ends at --min-lr (cos_min_ratio = min-lr / lr) from step total + 1 on."""
    lrs = scheduled_lrs("cosine", warmup=10, total=100, steps=110)
    assert lrs[0] == 0.0 and lrs[1] == 0.0, "steps 1-2 at LR 0: DeepSpeed's warm-up start"
    assert lrs[2:11] == pytest.approx([1e-4 * k for k in range(1, 10)]), "linear warm-up"
    assert 0.999e-3 < lrs[11] < 1e-3, "the cosine decay starts just below the peak"
    assert all(a >= b for a, b in itertools.pairwise(lrs[11:])), "monotone decay"
    assert lrs[101:] == pytest.approx([1e-4] * 9), "--min-lr from step total + 1 on"


def test_lr_schedule_linear_and_constant_styles():
    """linear: WarmupDecayLR warms up from --min-lr (its one floor) and decays back to it;
    constant without a warm-up: WarmupLR at the peak from the first step."""
    lin = scheduled_lrs("linear", warmup=4, total=20, steps=30)
    assert lin[0] == pytest.approx(1e-4) and max(lin) == pytest.approx(1e-3)
    assert lin[21:] == pytest.approx([1e-4] * 9), "WarmupDecayLR ends at --min-lr"
    assert scheduled_lrs("constant", warmup=0, total=20, steps=5) == [1e-3] * 5
    cos0 = scheduled_lrs("cosine", warmup=0, total=20, steps=4)
    assert cos0[0] == 0.0 and cos0[1:3] == [1e-3, 1e-3], "no warm-up: peak from step 2 on"


def test_lr_flags_and_a_scheduler_section_are_refused_together(setup):
    root = setup
    sched = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
    ds = write_ds(root, "sched.json", scheduler=sched)
    msg = preflight_error(root, 2, ds)  # argv() gives --lr-warmup-iters
    assert '"scheduler" section (WarmupLR)' in msg and "--lr-warmup-iters" in msg, msg
    opt = write_ds(root, "opt.json", optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    msg = preflight_error(root, 2, opt)  # argv() gives --lr
    assert "--lr" in msg and '"optimizer" section' in msg, msg
    msg = preflight_error(root, 2, write_ds(root, "ok.json"), "--min-lr", "1")
    assert "--min-lr must be in [0, --lr 0.003], got 1.0" in msg, msg


def test_codec_threads_share_the_cpus():
    """numba's codec kernels get this rank's share of the CPUs, not one thread per CPU each."""
    import os

    from ggspeed.cpu_threads import codec_threads

    assert codec_threads({"OMP_NUM_THREADS": "1", "LOCAL_SIZE": "4"}) == 1
    assert codec_threads({"OMP_NUM_THREADS": "3"}) == 3
    cpus = len(os.sched_getaffinity(0))
    assert codec_threads({"LOCAL_WORLD_SIZE": "2"}) == max(1, cpus // 2)
    assert codec_threads({"LOCAL_SIZE": str(4 * cpus)}) == 1


@pytest.mark.dist
def test_resume_reproduces_the_straight_run(setup):
    """6 steps straight (checkpoint at 3) vs the checkpoint at 3 resumed for 3 steps: same losses.

    Dropout is on and every ggspeed feature too, so this covers the data order, the LR schedule,
    the optimizer, RNG streams and ggspeed's per-rank state (GCT error feedback, ACT schedule).
    """
    root = setup
    ds = write_ds(root, "ok.json")
    straight = run_ranks(
        run_trainer, 2,
        argv(root, ds, "--save", str(root / "ckA"), "--save-interval", "3", "--log-dir", str(root / "logA")),
        init_pg=False, timeout=600,
    )[0]  # fmt: skip
    assert (root / "ckA" / "iter_0000003").is_dir() and (root / "ckA" / "iter_0000006").is_dir()
    assert (
        straight["gct_bits_per_element"] is not None
        and straight["act_bits_per_element"] is not None
    )
    (root / "ckA" / "latest").write_text("iter_0000003")  # resume from the middle checkpoint
    resumed = run_ranks(
        run_trainer, 2,
        argv(root, ds, "--load", str(root / "ckA"), "--save", str(root / "ckB"), "--log-dir", str(root / "logB")),
        init_pg=False, timeout=600,
    )[0]  # fmt: skip
    assert len(straight["losses"]) == 6 and len(resumed["losses"]) == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)
    assert resumed["final_valid_loss"] == pytest.approx(straight["final_valid_loss"], abs=1e-6)

    def lrs(log):
        return [
            m["lr"]
            for m in map(json.loads, (root / log / "metrics.jsonl").read_text().splitlines())
            if "lr" in m
        ]

    assert lrs("logB") == pytest.approx(lrs("logA")[3:], rel=1e-9)
    assert (root / "logA" / "summary.json").is_file()


WIRE_ON = {
    "param_gather": {"enabled": True},
    "pipe_activations": {"enabled": True},
    "pipe_grads": {"enabled": True},
    "tied_grads": {"enabled": True},
}


@pytest.mark.dist
def test_resume_with_every_wire_switch_on_reproduces_the_straight_run(setup):
    """PP2 x DP2 with every coded-wire switch on (the ZeRO parameter gather, both pipeline
    directions, the tied embedding's gradient through GCT's all-reduce), GG Init, ACT and GCT too:
    the checkpoint at 3 resumed for 3 steps gives the straight run's losses, LRs and validation
    loss. The pipe's slot capacities are not saved and both ends of each send restart them from
    nothing; the residuals of GCT, the tied gradients and the parameter gather are restored."""
    root = setup
    assert MODEL["n_layer"] % 2 == 0, "one or more layers per pipeline stage"
    base = ds_config()["ggspeed"]
    ds = write_ds(root, "wire.json", ggspeed={**base, "wire": WIRE_ON})

    def train(log: str, *extra: str) -> list[dict]:
        return run_ranks(
            run_trainer, 4,
            argv(root, ds, "--pp", "2", "--log-dir", str(root / log), *extra),
            init_pg=False, timeout=600,
        )  # fmt: skip

    straight = train("logWA", "--save", str(root / "ckWA"), "--save-interval", "3")
    assert (root / "ckWA" / "iter_0000003").is_dir() and (root / "ckWA" / "iter_0000006").is_dir()
    scal = straight[0]["ggspeed_scalars"]
    for key in (
        "param_gather/bits_per_element",
        "pipe/activations/bits_per_element",
        "pipe/grads/bits_per_element",
        "tied_grads/bits_per_element",
        "gct/bits_per_element",
        "act/bits_per_element",
    ):
        assert scal.get(key, 0.0) > 0.0, f"{key} missing or zero: the feature did not run; {scal}"
    (root / "ckWA" / "latest").write_text("iter_0000003")  # resume from the middle checkpoint
    resumed = train("logWB", "--load", str(root / "ckWA"), "--save", str(root / "ckWB"))
    for r, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert len(a["losses"]) == 6 and len(b["losses"]) == 3, (r, a["losses"], b["losses"])
        assert b["losses"] == pytest.approx(a["losses"][3:], abs=1e-6), f"rank {r}"
        assert b["final_valid_loss"] == pytest.approx(a["final_valid_loss"], abs=1e-6), f"rank {r}"
    assert resumed[0]["ggspeed_scalars"].get("tied_grads/bits_per_element", 0.0) > 0.0

    def lrs(log):
        return [
            m["lr"]
            for m in map(json.loads, (root / log / "metrics.jsonl").read_text().splitlines())
            if "lr" in m
        ]

    assert len(lrs("logWA")) == 6 and lrs("logWB") == pytest.approx(lrs("logWA")[3:], rel=1e-9)


@pytest.mark.dist
def test_a_ds_config_scheduler_section_is_the_schedule(setup):
    """With a "scheduler" section the trainer passes no scheduler: DeepSpeed builds the section's
    class, and the steps run at its LRs (WarmupLR, linear, 0 -> 0.01 over 4 iterations)."""
    root = setup
    sched = {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4,
                   "warmup_type": "linear"},
    }  # fmt: skip
    ds = write_ds(root, "sched_run.json", scheduler=sched, ggspeed={}, train_batch_size=4)
    args = argv(root, ds, "--log-dir", str(root / "logS"))
    del args[args.index("--lr-warmup-iters") : args.index("--lr-warmup-iters") + 2]
    args[args.index("--train-iters") + 1] = "3"
    run_ranks(run_trainer, 1, args, init_pg=False, timeout=300)
    lrs = [
        m["lr"]
        for m in map(json.loads, (root / "logS" / "metrics.jsonl").read_text().splitlines())
        if "lr" in m
    ]
    assert lrs == pytest.approx([0.0, 0.0, 0.0025]), f"the section's WarmupLR, got {lrs}"


@pytest.mark.dist
def test_sigterm_saves_a_checkpoint_and_stops(setup):
    """SIGTERM reaching one rank stops every rank at the same step, after a checkpoint."""
    root = setup
    ds = write_ds(root, "plain.json", ggspeed={})
    args = argv(root, ds, "--save", str(root / "ckT"), "--log-dir", str(root / "logT"))
    args[args.index("--train-iters") + 1] = "1000"
    out = run_ranks(run_trainer_sigterm, 2, args, str(root / "logT"), 2, init_pg=False, timeout=600)
    steps = {r["steps"] for r in out}
    assert len(steps) == 1 and 2 <= steps.pop() < 1000
    tag = f"iter_{out[0]['steps']:07d}"
    assert out[0]["checkpoint"].endswith(tag) and (root / "ckT" / tag).is_dir()
    assert (root / "ckT" / "latest").read_text().strip() == tag


def _launch(root: Path, tag: str, iters: int) -> tuple[subprocess.Popen, Path]:
    """The trainer under DeepSpeed's `deepspeed` runner, 2 CPU ranks, in its own process group."""
    import os

    from tests.dist import free_port

    ds = write_ds(root, "plain.json", ggspeed={})
    args = argv(root, ds, "--save", str(root / f"ck{tag}"), "--log-dir", str(root / f"log{tag}"))
    args[args.index("--train-iters") + 1] = str(iters)
    runner = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(runner), "--num_gpus", "2", "--master_port", str(free_port()),
         str(ROOT / "launch" / "pretrain_gpt.py"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    return proc, root / f"log{tag}"


def _wait_for_lines(proc: subprocess.Popen, log: Path, lines: int, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    metrics = log / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            os_kill_group(proc)
            raise AssertionError(f"no {lines} log lines:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


def os_kill_group(proc: subprocess.Popen) -> None:
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.dist
def test_sigterm_to_the_jobs_process_group_checkpoints_and_stops(setup):
    """`kill -TERM -- -<pgid>` of a `deepspeed` job: every rank stops at the same step after a
    committed checkpoint, and the runner exits."""
    import os
    import signal

    root = setup
    proc, log = _launch(root, "G", 1000)
    try:
        _wait_for_lines(proc, log, 2)
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=240)[0]
    finally:
        os_kill_group(proc)
    summary = json.loads((log / "summary.json").read_text())
    tag = f"iter_{summary['steps']:07d}"
    assert 2 <= summary["steps"] < 1000 and "SIGTERM: stopped at step" in out, out[-3000:]
    assert (root / "ckG" / "latest").read_text().strip() == tag
    assert (root / "ckG" / tag / "ggspeed_complete.json").is_file()


@pytest.mark.dist
def test_sigterm_to_the_deepspeed_runner_alone_is_not_forwarded(setup):
    """What docs/training.md warns about: on one node DeepSpeed 0.19.8's runner does not forward
    SIGTERM; the ranks train to the end (so signal the process group or the ranks)."""
    import os
    import signal

    root = setup
    proc, log = _launch(root, "R", 12)
    try:
        _wait_for_lines(proc, log, 2)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        import time

        deadline = time.monotonic() + 300
        while not (log / "summary.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        summary = json.loads((log / "summary.json").read_text())
        assert summary["steps"] == 12, summary
        while time.monotonic() < deadline:  # the orphaned launcher and ranks finish on their own
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    finally:
        os_kill_group(proc)
