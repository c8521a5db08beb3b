"""3D-parallel GPT pretraining (tensor x pipeline x data) with ggspeed's GG Init, ACT and GCT.

Launch it with DeepSpeed's launcher (or torchrun), Megatron-DeepSpeed style:

    deepspeed --num_gpus 4 launch/pretrain_gpt.py --deepspeed_config configs/ds_tiny_cpu.json \\
        --model-config configs/model/tiny.json --pipeline-model-parallel-size 2 \\
        --data-path build/data/stdlib-v4096 --train-iters 200 --save build/ckpt

GG Init, ACT and GCT are switched on only by the ds_config's ``"ggspeed"`` section. Every bad
setting (world size, divisibility, missing data, batch sizes, a known DeepSpeed clipping bug) is
reported before anything is built. See docs/training.md.
"""

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]  # the default --log-dir is under ROOT/build/runs
log = logging.getLogger("pretrain_gpt")


def setup_logging() -> None:
    """The trainer's lines on stdout as plain messages (DeepSpeed's logger keeps its own)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class SetupError(ValueError):
    """A bad command line or ds_config, reported before training starts."""


# The LR flags' defaults: None in argparse, so that the pre-flight knows which were given.
LR_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "min_lr": 1e-4,
    "lr_warmup_iters": 0,
    "lr_decay_iters": None,  # --train-iters
    "lr_decay_style": "cosine",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and parallelism")
    g.add_argument(
        "--model-config", required=True, help="JSON file of GPTConfig fields (configs/model/*.json)"
    )
    g.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, dest="tp")
    g.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, dest="pp")
    g.add_argument(
        "--checkpoint-num-layers",
        type=int,
        default=None,
        help="blocks per activation checkpoint (0: off); default 1 when the ds_config has an "
        "activation_checkpointing section or ggspeed.act is enabled, else 0",
    )
    g.add_argument(
        "--use-cpu-initialization",
        action="store_true",
        help="initialize full master weights on the CPU then split them (bitwise the same weights "
        "for every layout; always on without a GPU)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path", required=True, help="dataset folder from tools/preprocess_data.py"
    )
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per validation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak LR of the trainer's AdamW (default {LR_DEFAULTS['lr']}; refused when the "
        'ds_config has an "optimizer" section, which sets its own)',
    )
    g.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help=f"LR at the end of the decay (default {LR_DEFAULTS['min_lr']})",
    )
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="linear warm-up (default 0)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument(
        "--lr-decay-style",
        choices=["cosine", "linear", "constant"],
        default=None,
        help="DeepSpeed's WarmupCosineLR, WarmupDecayLR or WarmupLR (default cosine); the "
        'schedule flags are refused when the ds_config has a "scheduler" section',
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints")
    g.add_argument(
        "--load", default=None, help="resume from the latest checkpoint in this directory"
    )
    g.add_argument(
        "--log-dir",
        default=None,
        help="metrics.jsonl, summary.json, loss.png (default: build/runs/<time>)",
    )
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0))
    )
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    args.lr_flags_given = [
        "--" + k.replace("_", "-") for k in LR_DEFAULTS if getattr(args, k) is not None
    ]
    for k, v in LR_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (a ds_config.json, e.g. configs/ds_tiny_cpu.json)")
    return args


# ----------------------------------------------------------------------------- checks


def load_model_config(path: str, data_vocab: int):
    from ggspeed.models.nanogpt import GPTConfig

    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise SetupError(f"--model-config {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise SetupError(f"--model-config {path}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise SetupError(f"--model-config {path}: must be a JSON object of GPTConfig fields")
    d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" keys
    d.setdefault("vocab_size", data_vocab)
    check_model_fields(d, path)
    try:
        cfg = GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise SetupError(f"--model-config {path}: {e}") from e
    if cfg.vocab_size < data_vocab:
        raise SetupError(
            f"--model-config {path}: vocab_size {cfg.vocab_size} is smaller than the dataset's {data_vocab}"
        )
    return cfg


MODEL_INTS = {"vocab_size": 1, "seq_len": 1, "n_layer": 1, "n_head": 1, "d_model": 1, "d_ff": 0}


def check_model_fields(d: dict[str, Any], path: str) -> None:
    """Sizes and rates a GPT can be built from; SetupError naming the field and allowed values."""
    for key, least in MODEL_INTS.items():
        v = d.get(key, least)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise SetupError(
                f"--model-config {path}: {key} must be an integer >= {least}, got {v!r}"
            )
    dropout = d.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise SetupError(f"--model-config {path}: dropout must be in [0, 1), got {dropout!r}")
    std = d.get("init_std", 0.02)
    if not isinstance(std, int | float) or not 0.0 < std < math.inf:
        raise SetupError(f"--model-config {path}: init_std must be > 0, got {std!r}")


def check_splits(meta: dict[str, Any], seq_len: int, data_path: str) -> None:
    """Each split holds at least one sequence (seq_len + 1 tokens) for training and validation."""
    for split, counts in (meta.get("splits") or {}).items():
        tokens = counts.get("tokens") if isinstance(counts, dict) else None
        if isinstance(tokens, int) and tokens < seq_len + 1:
            raise SetupError(
                f"--model-config seq_len {seq_len} needs {seq_len + 1} tokens per sample, but "
                f"--data-path {data_path}'s {split} split holds {tokens}"
            )


def batch_triple(ds: dict[str, Any], dp: int) -> tuple[int, int, int]:
    """(train_batch_size, micro, grad_accum) resolved by DeepSpeed's own code for ``dp`` ranks.

    ``DeepSpeedConfig(...)`` takes the data-parallel size from a process group (world size 1
    without one), so its resolution step runs here on the three keys alone, with ``dp`` given:
    what ``deepspeed.initialize`` would accept or refuse, said before any process group exists.
    """
    from deepspeed.runtime import config as ds_config

    resolved = ds_config.DeepSpeedConfig.__new__(ds_config.DeepSpeedConfig)
    resolved.world_size = dp
    resolved.train_batch_size = ds_config.get_train_batch_size(ds)
    resolved.train_micro_batch_size_per_gpu = ds_config.get_train_micro_batch_size_per_gpu(ds)
    resolved.gradient_accumulation_steps = ds_config.get_gradient_accumulation_steps(ds)
    given = ", ".join(
        f"{k}={ds.get(k)}"
        for k in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        )
    )
    try:
        resolved._configure_train_batch_size()
    except (AssertionError, TypeError, ZeroDivisionError) as e:
        raise SetupError(
            f"ds_config batch sizes ({given}) for data-parallel size {dp}: {e} (DeepSpeed "
            "needs train_batch_size = train_micro_batch_size_per_gpu x "
            "gradient_accumulation_steps x data-parallel size)"
        ) from None
    return (
        resolved.train_batch_size,
        resolved.train_micro_batch_size_per_gpu,
        resolved.gradient_accumulation_steps,
    )


def preflight(
    args: argparse.Namespace, world_size: int
) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
    """Every check that needs no process group: returns (ds_config, GPTConfig, Layout, data meta)."""
    from ggspeed.config import ConfigError, load_ds_config
    from ggspeed.data.indexed import DataError, check_dataset_dir
    from ggspeed.models.gpt3d import check_layout
    from ggspeed.runtime import validate_ds_config

    try:
        ds = load_ds_config(args.deepspeed_config)
        validate_ds_config(ds)  # the "ggspeed" section, and e.g. GCT refusing ZeRO-3
        meta = check_dataset_dir(args.data_path)
    except (ConfigError, DataError) as e:
        raise SetupError(str(e)) from e
    cfg = load_model_config(args.model_config, int(meta["vocab_size"]))
    check_splits(meta, cfg.seq_len, args.data_path)
    try:
        layout = check_layout(cfg, world_size, args.tp, args.pp)
    except ValueError as e:
        raise SetupError(str(e)) from e
    batch_triple(ds, layout.dp)
    check_lr_flags(args, ds)
    zero = int((ds.get("zero_optimization") or {}).get("stage", 0))
    half = any((ds.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16"))
    if layout.pp > 1 and zero >= 2:
        raise SetupError(
            f"zero_optimization.stage {zero} is not supported with pipeline parallelism; use 0 or 1"
        )
    if layout.pp > 1 and zero == 0 and not half and ds.get("gradient_clipping", 1.0) > 0:
        raise SetupError(
            "pipeline parallelism with fp32 ZeRO stage 0 and gradient clipping: DeepSpeed 0.19.8 "
            "computes a wrong global gradient norm there (gradient_clipping defaults to 1.0); use "
            '"zero_optimization": {"stage": 1}, bf16, or "gradient_clipping": 0'
        )
    for name in ("train_iters", "eval_interval", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_interval is not None and args.save is None:
        raise SetupError("--save-interval needs --save DIR")
    if args.load is not None and not Path(args.load, "latest").is_file():
        raise SetupError(f"--load {args.load}: no 'latest' checkpoint file there")
    return ds, cfg, layout, meta


def agree_on_preflight(error: str | None) -> None:
    """Join the process group and exchange pre-flight verdicts; SetupError on every rank if any
    rank's failed. Without it, a rank whose inputs differ (another node's files) exits alone and
    its peers wait in the rendezvous for as long as nothing tears the job down."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from ggspeed import consensus

    if not torch.cuda.is_available():
        os.environ.pop("LOCAL_SIZE", None)  # no never-freed /dev/shm buffer on CPU (gloo)
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    consensus.agree(error, "pre-flight failed", SetupError)


# ----------------------------------------------------------------------------- pieces


def scheduler_section(
    style: str, peak_lr: float, min_lr: float, warmup: int, total: int
) -> dict[str, Any]:
    """The ds_config ``"scheduler"`` section that the Megatron-style LR flags stand for.

    cosine -> WarmupCosineLR, linear -> WarmupDecayLR, constant -> WarmupLR, each with a linear
    warm-up (docs/training.md lists how they count steps). DeepSpeed's classes warm up over at
    least 2 steps: without a warm-up, cosine and constant start those steps at the peak.
    """
    steps = max(1, warmup)
    if style == "cosine":
        params = {
            "total_num_steps": total,
            "warmup_min_ratio": 0.0 if warmup else 1.0,
            "warmup_num_steps": steps,
            "cos_min_ratio": min_lr / peak_lr,
        }
        name = "WarmupCosineLR"
    elif style == "linear":
        params = {
            "total_num_steps": total,
            "warmup_min_lr": min_lr,
            "warmup_max_lr": peak_lr,
            "warmup_num_steps": steps,
        }
        name = "WarmupDecayLR"
    elif style == "constant":
        params = {
            "warmup_min_lr": 0.0 if warmup else peak_lr,
            "warmup_max_lr": peak_lr,
            "warmup_num_steps": steps,
        }
        name = "WarmupLR"
    else:
        raise ValueError(f"LR decay style {style!r}: use cosine, linear or constant")
    return {"type": name, "params": {**params, "warmup_type": "linear"}}


def lr_scheduler(optimizer: Any, style: str, min_lr: float, warmup: int, total: int) -> Any:
    """DeepSpeed's scheduler class for these flags over any torch optimizer, whose LR is the peak.

    Built as DeepSpeed builds a ds_config ``"scheduler"`` section; call ``step()`` after each
    optimizer step, as DeepSpeed's engine does. tools/ use it for their schedules too.
    """
    from deepspeed.runtime import lr_schedules

    section = scheduler_section(style, optimizer.param_groups[0]["lr"], min_lr, warmup, total)
    return getattr(lr_schedules, section["type"])(optimizer, **section["params"])


def check_lr_flags(args: argparse.Namespace, ds: dict[str, Any]) -> None:
    """The schedule comes from the ds_config's ``"scheduler"`` or from the flags, never both;
    --lr is the trainer's AdamW's, so not with an ``"optimizer"`` section."""
    given = args.lr_flags_given
    if "scheduler" in ds and [f for f in given if f != "--lr"]:
        kind = (ds["scheduler"] or {}).get("type") if isinstance(ds["scheduler"], dict) else None
        raise SetupError(
            f'ds_config has a "scheduler" section ({kind}) and the command line gives '
            f"{', '.join(f for f in given if f != '--lr')}: the LR schedule comes from one of "
            'them; drop the flags or the "scheduler" section'
        )
    if "optimizer" in ds and "--lr" in given:
        raise SetupError(
            "--lr sets the trainer's AdamW, but the ds_config's \"optimizer\" section builds "
            "its own with its own lr: drop one of them"
        )
    if "scheduler" in ds:
        return
    if not args.lr > 0:
        raise SetupError(f"--lr must be > 0, got {args.lr}")
    peak, where = args.lr, "--lr"
    if "optimizer" in ds:  # DeepSpeed's optimizer: its lr is the peak the schedule scales
        opt = ds["optimizer"] if isinstance(ds["optimizer"], dict) else {}
        peak, where = (opt.get("params") or {}).get("lr"), "optimizer.params.lr"
    if isinstance(peak, int | float) and not 0 <= args.min_lr <= peak:
        raise SetupError(f"--min-lr must be in [0, {where} {peak}], got {args.min_lr}")
    if args.lr_warmup_iters < 0:
        raise SetupError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if args.lr_decay_iters is not None and args.lr_decay_iters < 1:
        raise SetupError(f"--lr-decay-iters must be >= 1, got {args.lr_decay_iters}")


def make_optimizer(model: Any, args: argparse.Namespace):
    """AdamW with no decay on biases/norms; apex's FusedAdam where it imports and a GPU is present."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = {"lr": args.lr, "betas": (args.adam_beta1, args.adam_beta2)}
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception:  # apex absent or without its CUDA extensions
            pass
    return torch.optim.AdamW(groups, **kw)


class StopFlag:
    """SIGTERM -> save a checkpoint at the next step boundary and exit (agreed on by all ranks)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was signalled: a MAX all-reduce of a CPU flag on ggspeed's gloo side
        group (the default group may be NCCL, which takes no CPU tensors)."""
        import torch
        import torch.distributed as dist

        from ggspeed import consensus

        t = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=consensus.side_group())
        return bool(t.item())


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams (dropout), which DeepSpeed's checkpoint does not hold."""
    import torch
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    state = {"cpu": torch.get_rng_state(), "tracker": ds_ckpt.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    torch.set_rng_state(state["cpu"])
    ds_ckpt.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, args: argparse.Namespace, step: int) -> Path:
    """A checkpoint that counts only once every rank wrote all of it (ggspeed.checkpoint)."""
    tag = f"iter_{step:07d}"
    engine.save_checkpoint(args.save, tag=tag, client_state={"iteration": step})
    return Path(args.save) / tag


def plot(metrics: list[dict[str, Any]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    valid = [(m["step"], m["valid_loss"]) for m in metrics if "valid_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- build


@dataclass
class Run:
    """What build() sets up and the train loop and finish() share."""

    args: argparse.Namespace
    cfg: Any  # GPTConfig
    layout: Any  # ggspeed.models.gpt3d.Layout
    gcfg: Any  # ggspeed.config.GGSpeedConfig
    rank: int
    engine: Any  # DeepSpeed's PipelineEngine with .ggspeed
    start: int  # the step a resumed run continues from (0 for a fresh one)
    plan: Any  # ggspeed.data.indexed.BatchPlan
    dp_rank: int
    batches: Any  # TrainBatches: this rank's micro-batches from `start` on
    valid_sampler: Any

    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch * self.cfg.seq_len


def check_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """Pre-flight on this rank, then (with peers) every rank's verdict: (ds_config, GPTConfig,
    Layout); SetupError on every rank if any rank's failed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    error = None
    try:
        ds, cfg, layout, _ = preflight(args, world)
    except SetupError as e:
        if world == 1:
            raise
        error = str(e)
    if world > 1:  # tell the peers, whose pre-flight may have passed; raises on every rank
        agree_on_preflight(error)
    return ds, cfg, layout


def start_distributed(args: argparse.Namespace, cfg: Any) -> int:
    """Megatron's TP/PP/DP groups and seeds; as a script, the heartbeat that names lost ranks.
    Returns this rank."""
    import torch.distributed as dist

    from ggspeed.models.gpt3d import init_parallel

    init_parallel(cfg, args.tp, args.pp, seed=args.seed)
    if __name__ == "__main__":
        global WATCH
        WATCH = PeerWatch()
    return dist.get_rank()


def build_model(args: argparse.Namespace, ds: dict[str, Any], cfg: Any, layout: Any, gcfg: Any):
    """This rank's pipeline stage, with activation checkpointing (ACT's when it is on) and GG Init."""
    import deepspeed
    from megatron.core import parallel_state as ps

    from ggspeed.models.gpt3d import build_pipeline_model

    ckpt_layers = args.checkpoint_num_layers
    if ckpt_layers is None:
        ckpt_layers = 1 if ("activation_checkpointing" in ds or gcfg.act.enabled) else 0
    if "activation_checkpointing" in ds:
        deepspeed.checkpointing.configure(ps, deepspeed_config=args.deepspeed_config)
    ckpt_func = None
    if gcfg.act.enabled:
        from ggspeed.act import checkpoint as act_checkpoint

        ckpt_func = act_checkpoint
    return build_pipeline_model(
        cfg,
        layout,
        seed=args.seed,
        activation_checkpoint_interval=ckpt_layers,
        activation_checkpoint_func=ckpt_func,
        gg_init=gcfg.gg_init,
        cpu_init=True if args.use_cpu_initialization else None,
    )


def build_engine(args: argparse.Namespace, ds: dict[str, Any], model: Any) -> Any:
    """ggspeed.initialize with the trainer's AdamW and LR schedule unless the ds_config has its own."""
    import ggspeed

    kwargs: dict[str, Any] = {}
    if "optimizer" not in ds:
        kwargs["optimizer"] = make_optimizer(model, args)
    else:
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
    if "scheduler" not in ds:  # else DeepSpeed builds the ds_config's own
        kwargs["lr_scheduler"] = lambda opt: lr_scheduler(
            opt,
            args.lr_decay_style,
            args.min_lr,
            args.lr_warmup_iters,
            args.lr_decay_iters or args.train_iters,
        )
    engine, _, _, _ = ggspeed.initialize(args=args, model=model, **kwargs)
    # saved in ggspeed's per-rank file, committed with the rest of the checkpoint
    engine.ggspeed.add_state("rng", rng_state, set_rng_state)
    return engine


def resume(engine: Any, args: argparse.Namespace) -> int:
    """Load --load's latest checkpoint; the step to continue from (0 without --load)."""
    if not args.load:
        return 0
    tag = (Path(args.load) / "latest").read_text().strip()
    path, client = engine.load_checkpoint(args.load, tag=tag)
    if path is None:
        raise SetupError(f"--load {args.load}: DeepSpeed found no checkpoint {tag!r} to load")
    return int(client["iteration"])


def build(args: argparse.Namespace, ds: dict[str, Any], cfg: Any, layout: Any) -> Run:
    """Process groups, model, engine, resumed state and this rank's data streams."""
    from ggspeed.config import from_ds_config
    from ggspeed.data.indexed import BatchPlan, SequenceSampler, TokenStream, TrainBatches

    gcfg = from_ds_config(ds)
    rank = start_distributed(args, cfg)
    model = build_model(args, ds, cfg, layout, gcfg)
    engine = build_engine(args, ds, model)
    start = resume(engine, args)
    plan = BatchPlan(
        engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), layout.dp
    )
    dp_rank = engine.grid.get_data_parallel_id()
    data = Path(args.data_path)
    train_sampler = SequenceSampler(TokenStream(data / "train"), cfg.seq_len, seed=args.seed)
    valid_sampler = SequenceSampler(
        TokenStream(data / "valid"), cfg.seq_len, seed=args.seed, shuffle=False
    )
    batches = TrainBatches(train_sampler, plan, dp_rank, start_step=start)
    return Run(args, cfg, layout, gcfg, rank, engine, start, plan, dp_rank, batches, valid_sampler)


# ----------------------------------------------------------------------------- logs


@dataclass
class MetricsLog:
    """Every logged entry: kept on each rank (the summary's losses), written to metrics.jsonl and
    shown in the progress bar or as a line on rank 0, and sent to DeepSpeed's monitor."""

    log_dir: Path
    rank: int
    monitor: Any
    entries: list[dict[str, Any]] = field(default_factory=list)
    file: IO[str] | None = None
    bar: Any = None

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        # ggspeed's own scalars ("gct/...", "act/...") reach the monitor from ggspeed.initialize
        # as ggspeed/<feature>/<key>; the trainer adds loss, lr, tokens/s and validation loss.
        events = [
            (f"Train/{k}" if k != "valid_loss" else "Valid/loss", float(v), entry["step"])
            for k, v in entry.items()
            if k != "step" and "/" not in k and isinstance(v, int | float)
        ]
        if self.monitor.enabled and events:
            self.monitor.write_events(events)

    def show(self, entry: dict[str, Any]) -> None:
        """A logged step in the progress bar, or as a JSON line without one (rank 0)."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{entry['loss']:.3f}",
                tok_s=f"{entry['tokens_per_s']:.0f}",
                lr=f"{entry['lr']:.2e}",
                gct_bits=f"{entry.get('gct/bits_per_element', float('nan')):.2f}",
                act_bits=f"{entry.get('act/bits_per_element', float('nan')):.2f}",
                refresh=False,
            )
        elif self.rank == 0:
            log.info(json.dumps(entry))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def open_metrics(run: Run) -> MetricsLog:
    """The log folder, metrics.jsonl (appended to on resume), the run's header line and the
    progress bar, all on rank 0."""
    args = run.args
    log_dir = Path(args.log_dir or ROOT / "build" / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    metrics = MetricsLog(log_dir, run.rank, run.engine.monitor)
    if run.rank != 0:
        return metrics
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics.file = open(log_dir / "metrics.jsonl", "a" if args.load else "w")  # noqa: SIM115
    layout, gcfg = run.layout, run.gcfg
    wire = [k for k in type(gcfg.wire).model_fields if getattr(gcfg.wire, k).enabled]
    log.info(
        "[ggspeed] layout tp=%d pp=%d dp=%d; global batch %d x %d tokens; steps %d..%d; "
        "ggspeed: gg_init=%s act=%s gct=%s wire=%s",
        *(layout.tp, layout.pp, layout.dp, run.plan.global_batch, run.cfg.seq_len),
        *(run.start, args.train_iters, gcfg.gg_init.enabled, gcfg.act.enabled, gcfg.gct.enabled),
        ",".join(wire) or "off",
    )
    if not args.no_progress:
        from tqdm import tqdm

        metrics.bar = tqdm(
            total=args.train_iters,
            initial=run.start,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.5,
        )
    return metrics


# ----------------------------------------------------------------------------- train loop


@dataclass
class LoopState:
    """Where the loop is, and what the summary reports of it."""

    step: int
    train_time: float = 0.0  # seconds in train_batch, the first step (one-time set-up) left out
    cpu_time: float = 0.0  # this process's CPU seconds (all threads) over the same steps
    trained_steps: int = 0  # the steps train_time covers
    last_loss: float = math.nan
    valid_loss: float = math.nan
    last_ckpt: Path | None = None


class StepProfiler:
    """cProfile of each rank's steps after the first, when GGSPEED_PROFILE_DIR names a folder."""

    def __init__(self) -> None:
        self.dir = os.environ.get("GGSPEED_PROFILE_DIR")
        self.prof: Any = None

    def start(self) -> None:
        if self.dir and self.prof is None:
            import cProfile

            self.prof = cProfile.Profile()
            self.prof.enable()

    def dump(self, rank: int) -> None:
        if self.prof is not None:
            self.prof.disable()
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            self.prof.dump_stats(str(Path(self.dir) / f"rank{rank}.prof"))


def train_step(run: Run, state: LoopState) -> dict[str, Any]:
    """One global batch; its metrics entry (loss, lr, tokens/s and ggspeed's scalars)."""
    engine = run.engine
    lr = float(engine.get_lr()[0])  # the LR this step runs at (the scheduler steps after it)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = float(engine.train_batch(run.batches))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    state.step += 1
    if state.step > run.start + 1:  # the first step pays one-time set-up
        state.train_time += dt
        state.cpu_time += cpu
        state.trained_steps += 1
    state.last_loss = loss
    entry = {
        "step": state.step,
        "loss": loss,
        "lr": lr,
        "tokens_per_s": run.tokens_per_step / dt,
    }
    entry.update({k: float(v) for k, v in engine.ggspeed.scalars().items()})
    return entry


def evaluate(run: Run, metrics: MetricsLog, step: int) -> float:
    """Mean validation loss over --eval-iters global batches, recorded at ``step``."""
    from ggspeed.data.indexed import eval_batches

    args = run.args
    losses = []
    it = eval_batches(run.valid_sampler, run.plan, run.dp_rank, args.eval_iters)
    for _ in range(args.eval_iters):
        losses.append(float(run.engine.eval_batch(it)))
    loss = sum(losses) / len(losses)
    metrics.record({"step": step, "valid_loss": loss})
    return loss


def train(run: Run, metrics: MetricsLog) -> LoopState:
    """Steps up to --train-iters or an agreed SIGTERM, logging, validating and saving on their
    intervals; a checkpoint of the last step when --save is given."""
    args, engine = run.args, run.engine
    state = LoopState(step=run.start)
    stop = StopFlag()
    profiler = StepProfiler()
    while state.step < args.train_iters:
        if state.step > run.start:
            profiler.start()
        entry = train_step(run, state)
        step = state.step
        if step % args.log_interval == 0 or step == args.train_iters:
            metrics.record(entry)
            metrics.show(entry)
        metrics.advance()
        if step % args.eval_interval == 0 or step == args.train_iters:
            state.valid_loss = evaluate(run, metrics, step)
        if args.save and args.save_interval and step % args.save_interval == 0:
            state.last_ckpt = save(engine, args, step)
        if stop.agreed():
            if args.save:
                state.last_ckpt = save(engine, args, step)
            if run.rank == 0:
                log.info(
                    "[ggspeed] SIGTERM: stopped at step %d, checkpoint %s", step, state.last_ckpt
                )
            break
    if args.save and (
        state.last_ckpt is None or not str(state.last_ckpt).endswith(f"{state.step:07d}")
    ):
        state.last_ckpt = save(engine, args, state.step)
    metrics.close_bar()
    profiler.dump(run.rank)
    return state


# ----------------------------------------------------------------------------- finish


def final_scalars(engine: Any) -> dict[str, float]:
    """The last log interval's ggspeed scalars; a run shorter than ggspeed.log_interval collects
    them now (a collective: every rank takes the same branch, their step counts are equal)."""
    scal = engine.ggspeed.scalars()
    if not scal and engine.ggspeed.components:
        scal = engine.ggspeed.collect()
    return {k: float(v) for k, v in scal.items()}


def print_summary(s: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return "n/a (feature off)" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        "=" * 64,
        f"ggspeed pretraining finished: {s['steps']} steps, layout {s['layout']}",
        f"  final train loss       {fmt(s['final_train_loss'])}",
        f"  final validation loss  {fmt(s['final_valid_loss'])}",
        f"  throughput             {fmt(s['tokens_per_s'])} tokens/s",
        f"  CPU per step           {fmt(s['cpu_s_per_step']['sum_over_ranks'])} s, all ranks",
        f"  GCT bits per element   {fmt(s['gct_bits_per_element'])}",
        f"  ACT bits per element   {fmt(s['act_bits_per_element'])}",
        f"  bytes across nodes     {fmt(s['wire_budget'].get('cross_bytes_per_step'))} per step",
        f"  logs                   {s['log_dir']}/metrics.jsonl (summary.json)",
        f"  plot                   {s.get('plot')}",
        f"  checkpoint             {s['checkpoint']}",
        "=" * 64,
    ]
    log.info("\n".join(lines))


def cpu_per_step(state: LoopState) -> dict[str, float]:
    """CPU seconds per training step (first step left out): this rank's, and the sum and the
    maximum over all ranks. Where ranks share cores, wall time follows the sum; it tells compute
    from waiting on the link."""
    import torch
    import torch.distributed as dist

    from ggspeed import consensus

    mine = state.cpu_time / state.trained_steps if state.trained_steps else float("nan")
    total, most = (
        torch.tensor([mine], dtype=torch.float64),
        torch.tensor([mine], dtype=torch.float64),
    )
    dist.all_reduce(total, group=consensus.side_group())
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=consensus.side_group())
    return {"rank": mine, "sum_over_ranks": float(total), "max_over_ranks": float(most)}


def finish(run: Run, metrics: MetricsLog, state: LoopState) -> dict[str, Any]:
    """The summary (summary.json, loss.png and the printed table on rank 0); leaves Megatron's
    groups."""
    from megatron.core import parallel_state as ps

    scal = final_scalars(run.engine)
    layout = run.layout
    summary = {
        "steps": state.step,
        "final_train_loss": state.last_loss,
        "final_valid_loss": state.valid_loss,
        "tokens_per_s": run.tokens_per_step * state.trained_steps / state.train_time
        if state.train_time > 0
        else float("nan"),
        "gct_bits_per_element": scal.get("gct/bits_per_element"),
        "act_bits_per_element": scal.get("act/bits_per_element"),
        "cpu_s_per_step": cpu_per_step(state),  # a collective: every rank
        "ggspeed_scalars": scal,
        "wire_budget": run.engine.ggspeed.budget.summary(skip=1),  # a collective: every rank
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
        "log_dir": str(metrics.log_dir),
        "checkpoint": str(state.last_ckpt) if state.last_ckpt else None,
        "losses": [m["loss"] for m in metrics.entries if "loss" in m],
    }
    if run.rank == 0:
        metrics.close()
        summary["plot"] = str(plot(metrics.entries, metrics.log_dir / "loss.png"))
        (metrics.log_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary)
    ps.destroy_model_parallel()
    return summary


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns the summary dict (also written to <log-dir>/summary.json on rank 0)."""
    args = parse_args(argv)
    setup_logging()
    from ggspeed.cpu_threads import limit_codec_threads  # imports neither numba nor torch

    limit_codec_threads()  # before numba's first import (ggspeed.initialize applies it too)
    ds, cfg, layout = check_inputs(args)
    run = build(args, ds, cfg, layout)
    metrics = open_metrics(run)
    state = train(run, metrics)
    return finish(run, metrics, state)


def shutdown() -> None:
    """Leave together: a rank exiting while its peers still hold the gloo group's pairs can make
    them abort on their way out (rank 0 writes the summary after the others are done)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PeerWatch:
    """Names the ranks that died when a collective fails (a killed rank cannot say so itself).

    Every rank bumps a counter in the rendezvous store each second from a daemon thread (it keeps
    running while the main thread waits in a collective); after a failure each surviving rank
    reports the ranks whose counters stopped without a report of their own. Rank 0 hosts the
    store, so it leaves last."""

    def __init__(self, period_s: float = 1.0) -> None:
        import threading

        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        self.store, self.rank, self.world = (
            _get_default_store(),
            dist.get_rank(),
            dist.get_world_size(),
        )
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ggspeed-peer-watch")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"ggspeed/beat/{self.rank}", 1)
            except Exception:  # the store (rank 0) is gone: the main thread will find out
                return
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        """Before the process group goes: a store call running during interpreter teardown
        aborts the process."""
        self._stop.set()
        self._thread.join()

    def _beats(self) -> list[int]:
        keys = [f"ggspeed/beat/{r}" for r in range(self.world)]
        return [int(self.store.get(k)) if self.store.check([k]) else 0 for k in keys]

    def _close_connections(self) -> None:
        """Drop this rank's process groups, so that a peer blocked in a collective with it fails
        now, while rank 0's store is up to compare heartbeats, and not when rank 0 exits, when
        the store is gone and the peer cannot tell who died. Bounded: a hung teardown is left."""
        import threading

        import torch.distributed as dist

        def close() -> None:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # already broken: the peers learn when the process exits
                pass

        t = threading.Thread(target=close, daemon=True, name="ggspeed-close-groups")
        t.start()
        t.join(5.0)

    def report(self, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self._close_connections()
        try:
            before = self._beats()
            time.sleep(4 * self.period_s)
            after = self._beats()
            self.store.set(f"ggspeed/done/{self.rank}", "1")
            done = [self.store.check([f"ggspeed/done/{r}"]) for r in range(self.world)]
            lost = [r for r in range(self.world) if after[r] == before[r] and not done[r]]
            if self.rank == 0:  # keep the store up until every live rank has read it
                deadline = time.monotonic() + 30
                alive = [f"ggspeed/done/{r}" for r in range(self.world) if r not in lost]
                while not self.store.check(alive) and time.monotonic() < deadline:
                    time.sleep(0.2)
        except Exception as e:  # the store lives in rank 0's process
            print(
                f"[ggspeed] rank {self.rank}: rendezvous store unreachable ({e})", file=sys.stderr
            )
            lost = [0]
        self.stop()
        print(f"[ggspeed] rank {self.rank}: a collective failed ({first}); ranks lost: "
              f"{', '.join(map(str, lost)) or 'none'}", file=sys.stderr, flush=True)  # fmt: skip


WATCH: PeerWatch | None = None

if __name__ == "__main__":
    try:
        main()
    except SetupError as e:
        print(f"pretrain_gpt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if WATCH is not None:
            WATCH.report(e)
        raise
    if WATCH is not None:
        WATCH.stop()
    shutdown()
