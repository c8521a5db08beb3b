"""Fit generalized-Gaussian (GG) shape and scale to weights, activations and gradients.

Checkpoint mode: per tensor and pooled over all selected tensors, from a torch state_dict file
(.pt/.bin), a safetensors file, a DeepSpeed checkpoint folder (``latest`` + tag folder with
``*model_states.pt``) or a Hugging Face model folder (``*.safetensors`` or ``*.bin``)::

    python tools/fit_gg.py CHECKPOINT [--json fit.json] [--plot fit.png] [--include REGEX]

GPT mode: a few training steps of the built-in small GPT (ggspeed.models.nanogpt) on the
embedded corpus, optionally starting from a state_dict; forward hooks capture the block outputs
(activations) and the parameter gradients of the last step(s)::

    python tools/fit_gg.py --gpt [--from trained.pt] [--steps 20] [--json ...] [--plot ...]

The pooled moment-matched shape over a trained model's weights is what ``gg_init.shape`` should
be set to when aligning GG Init with trained-model statistics.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ggspeed import gg  # noqa: E402

POOL_SAMPLE = 1 << 22  # values kept from the pool for the MLE fit, KS and the histogram


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # DeepSpeed checkpoints pickle config objects: only load files you trust.
        return torch.load(path, map_location="cpu", weights_only=False)


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")


def _state_dict_of(obj: Any) -> dict[str, Any]:
    """The model weights inside a loaded file: a plain state_dict or a wrapper around one."""
    if isinstance(obj, dict):
        for key in ("module", "model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        return obj
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    raise ValueError(f"no state_dict in an object of type {type(obj).__name__}")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return dict(_flatten(_state_dict_of(_torch_load(path))))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or folder, by name (file-prefixed when several files)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return _load_file(path)
    files: list[Path]
    latest = path / "latest"
    if latest.is_file():  # DeepSpeed: latest -> tag folder with *model_states.pt
        tag_dir = path / latest.read_text().strip()
        files = sorted(tag_dir.glob("*model_states.pt"))
    elif list(path.glob("*model_states.pt")):
        files = sorted(path.glob("*model_states.pt"))
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        files = files or sorted(path.glob("*.pt"))
    if not files:
        raise ValueError(
            f"{path}: no checkpoint files (expected a DeepSpeed 'latest' file, *model_states.pt, "
            "*.safetensors, *.bin or *.pt)"
        )
    out: dict[str, torch.Tensor] = {}
    prefix_files = len(files) > 1 and any("model_states" in f.name for f in files)
    for f in files:
        for name, t in _load_file(f).items():
            out[f"{f.stem}/{name}" if prefix_files else name] = t
    return out


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


class Pool:
    """Pooled statistics: exact sums for the moment fit, a uniform subsample for MLE/KS/plots."""

    def __init__(self, total: int, seed: int = 0) -> None:
        self.n = 0
        self.s1 = 0.0
        self.s2 = 0.0
        self.total = max(total, 1)
        self.parts: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double()
        self.n += x.numel()
        self.s1 += float(x.abs().sum())
        self.s2 += float((x * x).sum())
        keep = math.ceil(x.numel() * min(1.0, POOL_SAMPLE / self.total))
        if keep < x.numel():
            x = x[torch.randint(0, x.numel(), (keep,), generator=self.gen)]
        self.parts.append(x.float())

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("nothing selected to pool")
        shape = gg._shape_from_rho(self.n * self.s2 / (self.s1 * self.s1))
        sample = torch.cat(self.parts)
        fit = gg.goodness_of_fit(sample)
        return {
            "numel": self.n,
            "std": math.sqrt(self.s2 / self.n),
            "shape": shape,
            "scale": gg.scale_for_std(shape, math.sqrt(self.s2 / self.n)),
            "goodness_of_fit": fit,
            "sample": sample,
        }


def fit_tensor(x: torch.Tensor, gof: bool) -> dict[str, Any]:
    x = x.detach().float()
    shape, scale = gg.fit_shape(x)
    row: dict[str, Any] = {
        "shape_dims": list(x.shape),
        "numel": x.numel(),
        "std": float(x.double().std()) if x.numel() > 1 else 0.0,
        "shape": shape,
        "scale": scale,
        "shape_mle": gg.fit_shape(x, method="mle")[0],
    }
    if gof:
        r = gg.goodness_of_fit(x)
        row.update(
            nll_gg=r["gg"]["nll"],
            nll_gauss=r["gaussian"]["nll"],
            ks_gg=r["gg"]["ks"],
            ks_gauss=r["gaussian"]["ks"],
        )
    return row


def fit_group(
    tensors: dict[str, torch.Tensor], gof: bool, min_numel: int, samples: dict[str, Any]
) -> dict[str, Any]:
    chosen: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for n, t in tensors.items():
        if not (t.is_floating_point() and t.numel() >= min_numel and float(t.abs().sum()) > 0):
            continue
        key = (t.data_ptr(), tuple(t.shape))  # tied weights (e.g. lm_head = wte) count once
        if key not in seen:
            seen.add(key)
            chosen[n] = t
    if not chosen:
        raise ValueError(f"no floating-point tensor with at least {min_numel} non-zero elements")
    total = sum(t.numel() for t in chosen.values())
    pool, pool_std = Pool(total), Pool(total)
    rows = {}
    for name, t in chosen.items():
        rows[name] = fit_tensor(t, gof)
        pool.add(t)
        pool_std.add(t / max(rows[name]["std"], 1e-30))
    pooled = pool.result()
    pooled_std = pool_std.result()
    samples["pooled"] = pooled.pop("sample")
    samples["pooled, each tensor / its std"] = pooled_std.pop("sample")
    for name in list(chosen)[:2]:
        samples[name] = chosen[name].detach().reshape(-1).float()
    return {"tensors": rows, "pooled": pooled, "pooled_standardized": pooled_std}


def print_group(title: str, res: dict[str, Any]) -> None:
    print(f"\n== {title} ==")
    gof = any("ks_gg" in r for r in res["tensors"].values())
    head = f"{'tensor':48s} {'numel':>10s} {'std':>10s} {'shape':>7s} {'mle':>7s} {'scale':>10s}"
    print(head + (f" {'ks gg':>7s} {'ks gauss':>8s}" if gof else ""))
    for name, r in res["tensors"].items():
        line = (
            f"{name[-48:]:48s} {r['numel']:>10d} {r['std']:>10.4g} {r['shape']:>7.3f} "
            f"{r['shape_mle']:>7.3f} {r['scale']:>10.4g}"
        )
        if gof:
            line += f" {r['ks_gg']:>7.4f} {r['ks_gauss']:>8.4f}"
        print(line)
    for label, key in (("POOLED", "pooled"), ("POOLED (each / its std)", "pooled_standardized")):
        p = res[key]
        f = p["goodness_of_fit"]
        print(
            f"{label:48s} {p['numel']:>10d} {p['std']:>10.4g} {p['shape']:>7.3f} "
            f"{f['gg']['shape']:>7.3f} {p['scale']:>10.4g}"
        )
    for key in ("pooled", "pooled_standardized"):
        p = res[key]
        f = p["goodness_of_fit"]
        print(
            f"{key}: GG shape {p['shape']:.3f} (moment), {f['gg']['shape']:.3f} (MLE); "
            f"NLL/element GG {f['gg']['nll']:.4f} vs Gaussian {f['gaussian']['nll']:.4f} nats; "
            f"KS GG {f['gg']['ks']:.4f} vs Gaussian {f['gaussian']['ks']:.4f}"
        )


# ---------------------------------------------------------------------------------------------
# GPT mode: activations and gradients
# ---------------------------------------------------------------------------------------------


def gpt_capture(a: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.models.nanogpt import GPT, GPTConfig

    state = None
    cfg_kwargs = {
        "vocab_size": a.vocab,
        "seq_len": a.seq,
        "n_layer": a.layers,
        "n_head": a.heads,
        "d_model": a.d_model,
    }
    if a.from_:
        state = _state_dict_of(_torch_load(Path(a.from_)))
        cfg_kwargs["vocab_size"] = state["wte.weight"].shape[0]
        cfg_kwargs["d_model"] = state["wte.weight"].shape[1]
        cfg_kwargs["n_layer"] = 1 + max(
            int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))
        )
        if "wpe.weight" in state:
            cfg_kwargs["seq_len"] = state["wpe.weight"].shape[0]
    torch.manual_seed(a.seed)
    model = GPT(GPTConfig(**cfg_kwargs))
    if state is not None:
        model.load_state_dict(state)
    corpus = load_corpus_tokens(vocab_size=cfg_kwargs["vocab_size"])
    batches = random_batches(corpus.train, a.batch, cfg_kwargs["seq_len"], seed=a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    acts: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    capture = {"on": False}

    def hook(name: str):
        def fn(_m: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
            if capture["on"]:
                acts.setdefault(name, []).append(out.detach().clone())

        return fn

    handles = [b.register_forward_hook(hook(f"block{i}.out")) for i, b in enumerate(model.blocks)]
    for step in range(a.steps):
        capture["on"] = step >= a.steps - a.capture_steps
        x, y = next(batches)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if capture["on"]:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grads.setdefault(n, []).append(p.grad.detach().clone())
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    for h in handles:
        h.remove()
    return {
        "weights": {n: p.detach() for n, p in model.named_parameters()},
        "activations": {n: torch.cat([t.flatten() for t in v]) for n, v in acts.items()},
        "gradients": {n: torch.cat([t.flatten() for t in v]) for n, v in grads.items()},
    }


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(samples: dict[str, dict[str, torch.Tensor]], results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    panels = [(g, n) for g in samples for n in samples[g]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (group, name) in zip(axes.flat, panels):
        x = samples[group][name].double().numpy()
        r = gg.goodness_of_fit(x)
        lim = float(np.quantile(np.abs(x), 0.9995))
        bins = np.linspace(-lim, lim, 201)
        ax.hist(x, bins=bins, density=True, color="0.75", label="data")
        grid = np.linspace(-lim, lim, 801)
        ax.plot(
            grid,
            np.exp(gg.gg_logpdf(grid, r["gg"]["shape"], r["gg"]["scale"])),
            "C0",
            label=f"GG shape {r['gg']['shape']:.2f}",
        )
        ax.plot(
            grid,
            stats.norm.pdf(grid, r["gaussian"]["mean"], r["gaussian"]["std"]),
            "C3--",
            label="Gaussian",
        )
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-3 / lim, 1e-6))
        ax.set_title(f"{group}: {name}"[-60:], fontsize=9)
        ax.text(
            0.02,
            0.97,
            f"NLL GG {r['gg']['nll']:.3f} / Gauss {r['gaussian']['nll']:.3f}\n"
            f"KS GG {r['gg']['ks']:.4f} / Gauss {r['gaussian']['ks']:.4f}",
            transform=ax.transAxes,
            va="top",
            fontsize=7,
        )
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", nargs="?", type=Path, help="state_dict/safetensors/DeepSpeed/HF")
    p.add_argument("--gpt", action="store_true", help="train the small GPT and capture stats")
    p.add_argument("--include", default=None, help="regex on tensor names (checkpoint mode)")
    p.add_argument("--min-numel", type=int, default=1024, help="skip smaller tensors")
    p.add_argument("--all-dims", action="store_true", help="include 1-D tensors (norms, biases)")
    p.add_argument("--gof", action="store_true", help="per-tensor NLL and KS (slower)")
    p.add_argument("--json", type=Path, default=Path("gg_fit.json"))
    p.add_argument("--plot", type=Path, default=None)
    g = p.add_argument_group("GPT mode")
    g.add_argument("--from", dest="from_", default=None, help="nanogpt state_dict to start from")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--capture-steps", type=int, default=1)
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--seq", type=int, default=64)
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (not a.gpt):
        p.error("give a checkpoint path or --gpt (not both)")
    if a.gpt and not 1 <= a.capture_steps <= a.steps:
        p.error("--capture-steps must be in [1, --steps]")
    if a.gpt:
        groups = gpt_capture(a)
    else:
        tensors = load_tensors(a.checkpoint)
        pat = re.compile(a.include) if a.include else None
        groups = {
            "weights": {
                n: t
                for n, t in tensors.items()
                if (a.all_dims or t.dim() >= 2) and (pat is None or pat.search(n))
            }
        }
    if not a.all_dims and "weights" in groups:
        groups["weights"] = {n: t for n, t in groups["weights"].items() if t.dim() >= 2}
    results: dict[str, Any] = {}
    samples: dict[str, dict[str, torch.Tensor]] = {}
    for group, tensors in groups.items():
        samples[group] = {}
        results[group] = fit_group(tensors, a.gof, a.min_numel, samples[group])
        print_group(group, results[group])
    if "weights" in results:
        print(
            f"\nSet gg_init.shape to {results['weights']['pooled_standardized']['shape']:.3f} to "
            "align GG Init with these weights' statistics (moment fit pooled over the tensors, "
            "each divided by its std: GG Init sets each tensor's std itself)."
        )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"source": str(a.checkpoint or "gpt"), **results}, indent=1))
    print(f"wrote {a.json}")
    if a.plot:
        plot(samples, results, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
