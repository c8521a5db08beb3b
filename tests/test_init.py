"""GG Init of whole torch modules, the init-method factories and the gg_init config section."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ggspeed import gg
from ggspeed.config import ConfigError, GGInitConfig, from_ds_config
from ggspeed.init import (
    apply_gg_init,
    gg_init_method,
    gg_kaiming_init_method,
    gg_lecun_init_method,
    gg_scaled_init_method,
    is_gg_initialized,
    mark_gg_initialized,
)
from ggspeed.models.nanogpt import GPT, GPTConfig


class Conv1D(nn.Module):
    """The Hugging Face GPT-2 layer convention: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.empty(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class HFStyleBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)


class HFStyleModel(nn.Module):
    """GPT-2's parameter names and layouts, tied head, ``config.n_layer``."""

    def __init__(self, d: int = 64, vocab: int = 300, n_layer: int = 2) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"n_layer": n_layer})()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(HFStyleBlock(d) for _ in range(n_layer))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def test_nanogpt_megatron_rule() -> None:
    cfg = GPTConfig(vocab_size=512, n_layer=3, d_model=128, n_head=4)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    torch.manual_seed(0)
    report = apply_gg_init(model, {"enabled": True, "shape": 0.8, "std": 0.03})
    assert is_gg_initialized(model)
    b = model.blocks[0]
    assert _std(b.qkv.weight) == pytest.approx(0.03, rel=0.05)
    assert _std(b.fc.weight) == pytest.approx(0.03, rel=0.05)
    assert _std(b.proj.weight) == pytest.approx(0.03 / math.sqrt(6), rel=0.05)
    assert _std(b.fc_out.weight) == pytest.approx(0.03 / math.sqrt(6), rel=0.05)
    assert _std(model.wte.weight) == pytest.approx(0.03, rel=0.05)
    assert (
        torch.all(b.qkv.bias == 0) and torch.all(b.ln_1.weight == 1) and torch.all(b.ln_1.bias == 0)
    )
    assert model.lm_head.weight is model.wte.weight  # the tie survives, initialized once
    assert gg.fit_shape(model.wte.weight)[0] == pytest.approx(0.8, rel=0.1)
    assert report["blocks.0.proj.weight"].startswith("gg(shape=0.8")
    assert not any(float(p.detach().abs().max()) == 7.0 for p in model.parameters())


def test_hf_conv1d_fans_lecun_kaiming_and_embeddings() -> None:
    d, vocab = 64, 300
    model = HFStyleModel(d, vocab)
    # Conv1D's weight is (in, out): with fan 'out' the fan of c_attn is 3d, not d.
    apply_gg_init(
        model, {"enabled": True, "rule": "lecun", "fan": "out", "output_layer_scaling": False}
    )
    assert _std(model.h[0].c_attn.weight) == pytest.approx(math.sqrt(1 / (3 * d)), rel=0.05)
    apply_gg_init(model, {"enabled": True, "rule": "kaiming", "embeddings": "gaussian"})
    w = model.h[0].c_attn.weight
    assert _std(w) == pytest.approx(math.sqrt(2 / d), rel=0.05)
    assert _std(model.h[1].c_proj.weight) == pytest.approx(math.sqrt(2 / d) / 2, rel=0.05)
    emb = model.wte.weight
    assert _std(emb) == pytest.approx(math.sqrt(2 / d), rel=0.05)
    assert gg.fit_shape(emb)[0] == pytest.approx(2.0, rel=0.1)  # gaussian embeddings
    before = emb.detach().clone()
    apply_gg_init(model, {"enabled": True, "embeddings": "untouched"})
    assert torch.equal(model.wte.weight, before)


def test_paper_preset_is_the_authors_rule() -> None:
    model = HFStyleModel(32, 200)
    lin = nn.Linear(16, 48)
    model.extra = lin
    apply_gg_init(model, {"enabled": True, "rule": "paper", "shape": 1.2})
    # n = shape[0] of every 2-D parameter, xi = 2, embeddings included.
    assert _std(model.wte.weight) == pytest.approx(math.sqrt(2 / 200), rel=0.05)
    assert _std(model.h[0].c_attn.weight) == pytest.approx(math.sqrt(2 / 32), rel=0.1)
    assert _std(lin.weight) == pytest.approx(math.sqrt(2 / 48), rel=0.1)
    assert torch.all(lin.bias == 0) and torch.all(model.h[0].ln_1.weight == 1)


def test_seed_policy() -> None:
    cfg = {"enabled": True, "seed": 11, "shape": 1.0}
    a, b = GPT(GPTConfig(vocab_size=256, n_layer=2)), GPT(GPTConfig(vocab_size=256, n_layer=2))
    torch.manual_seed(1)
    apply_gg_init(a, cfg)
    torch.manual_seed(2)  # the default generator does not matter with a seed
    apply_gg_init(b, cfg)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.blocks[0].fc.weight[:, :64], a.blocks[1].fc.weight[:, :64])
    # Without a seed, draws follow the caller-seeded default generator (Megatron's policy).
    c = GPT(GPTConfig(vocab_size=256, n_layer=2))
    torch.manual_seed(5)
    apply_gg_init(c, {"enabled": True})
    d = GPT(GPTConfig(vocab_size=256, n_layer=2))
    torch.manual_seed(5)
    apply_gg_init(d, {"enabled": True})
    assert torch.equal(c.blocks[1].qkv.weight, d.blocks[1].qkv.weight)
    g = torch.Generator().manual_seed(5)
    apply_gg_init(d, GGInitConfig(enabled=True), generator=g)
    assert torch.equal(c.blocks[1].qkv.weight, d.blocks[1].qkv.weight)


def test_num_layers_needed_for_output_scaling() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"ggspeed\.gg_init\.num_layers"):
        apply_gg_init(model, {"enabled": True})
    apply_gg_init(model, {"enabled": True, "output_layer_scaling": False})
    apply_gg_init(
        model, {"enabled": True, "num_layers": 4, "output_layers": ["0.weight"], "std": 0.5}
    )
    assert _std(model[0].weight) == pytest.approx(0.5 / math.sqrt(8), rel=0.3)


def test_mark_and_factories() -> None:
    m = nn.Linear(2, 2)
    assert not is_gg_initialized(m)
    mark_gg_initialized(m)
    wrapper = nn.Module()
    wrapper.module = m
    assert is_gg_initialized(m) and is_gg_initialized(wrapper)
    assert gg_scaled_init_method(1.0, 0.02, 8).std == pytest.approx(0.02 / 4)
    assert gg_lecun_init_method(1.0, fan=256).std == pytest.approx(1 / 16)
    assert gg_kaiming_init_method(1.0, fan=128).std == pytest.approx(1 / 8)
    w = nn.Parameter(torch.empty(200, 300))
    gg_init_method(1.5, 0.02)(w)  # in place on a leaf that requires grad
    assert w.grad_fn is None and _std(w) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="std"):
        gg_init_method(1.0, 0.0)


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"shape": 0.05}, r"ggspeed\.gg_init\.shape: got 0\.05; .*greater than 0\.05"),
        ({"shape": 6}, r"ggspeed\.gg_init\.shape: got 6; .*less than or equal to 5"),
        ({"rule": "xavier"}, r"ggspeed\.gg_init\.rule: got 'xavier'; expected 'megatron', 'lecun'"),
        ({"embeddings": "zero"}, r"ggspeed\.gg_init\.embeddings: got 'zero'"),
        ({"rule": "kaiming", "std": 0.1}, r"ggspeed\.gg_init\.std applies to rule 'megatron'"),
        ({"xi": 2.0}, r"ggspeed\.gg_init\.xi applies to rules"),
        ({"std": -1}, r"ggspeed\.gg_init\.std: got -1"),
        ({"shap": 1}, r"ggspeed\.gg_init\.shap: unknown key; did you mean 'shape'"),
    ],
)
def test_config_errors_name_the_key(section: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        from_ds_config({"ggspeed": {"gg_init": {"enabled": True, **section}}})


def test_config_defaults_and_descriptions() -> None:
    cfg = from_ds_config({"ggspeed": {"gg_init": {"enabled": True}}}).gg_init
    assert cfg.shape == 1.0 and cfg.rule == "megatron" and cfg.effective_std == 0.02
    assert cfg.embeddings == "gg" and cfg.output_layer_scaling and cfg.seed is None
    assert GGInitConfig(rule="kaiming").effective_xi == 2.0
    assert all(f.description for f in GGInitConfig.model_fields.values())
