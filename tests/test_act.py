"""ACT in one process: exact rate gradients, schedule, RNG replay, config errors, compression."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ggspeed.act as act
from ggspeed.act.rate import rate_value
from ggspeed.config import ConfigError, from_ds_config
from ggspeed.config.act import ACTConfig


class Block(nn.Module):
    """Residual MLP block with dropout: recomputation must replay the same mask."""

    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def make_model(d: int = 16, n: int = 4, p: float = 0.1) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(Block(d, p) for _ in range(n)).double()


def data(d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(
        8, d, generator=g, dtype=torch.float64
    )


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def explicit(model, x, y, lams, shape, eps) -> list[torch.Tensor]:
    """The reference: L + sum_b lambda_b * mean((|a_b| + eps)^shape), plain autograd."""
    torch.manual_seed(5)
    h, pen = x, 0.0
    for b, blk in enumerate(model):
        pen = pen + lams[b] * ((h.abs() + eps) ** shape).mean()
        h = blk(h)
    (task_loss(h, y) + pen).backward()
    return grads(model)


def explicit_inputs(model, x) -> list[torch.Tensor]:
    """The block inputs of a plain forward (no dropout in the model used)."""
    out, h = [], x
    with torch.no_grad():
        for blk in model:
            out.append(h)
            h = blk(h)
    return out


def state_for(cfg: ACTConfig, shape: float, nblocks: int) -> act.ACTState:
    st = act.ACTState(cfg)
    st.shapes = dict.fromkeys(range(nblocks), shape)
    st._fit_due = set()
    return st


@pytest.fixture
def active():
    """Activate a state for the test and deactivate it afterwards."""
    previous = act.active_state()

    def _use(st):
        act.activate(st)
        return st

    yield _use
    act.activate(previous)


@pytest.mark.parametrize("shape", [0.7, 1.6])
def test_rate_gradient_equals_explicit_penalty(active, shape):
    model = make_model()
    x0, y = data()
    lam, eps = 0.3, 1e-3
    cfg = ACTConfig(enabled=True, lambda_target=lam, warmup_steps=0)
    active(state_for(cfg, shape, 4))
    ref = explicit(model, x0, y, [lam] * 4, shape, eps)

    # ggspeed's reentrant checkpoint; the input requires grad (a boundary activation)
    torch.manual_seed(5)
    h = x0.clone().requires_grad_(True)
    for blk in model:
        h = act.checkpoint(blk, h)
    task_loss(h, y).backward()
    ours = grads(model)

    # non-reentrant checkpointing (torch's and DeepSpeed's), the identity placed in the block
    import deepspeed

    def runner(blk):
        return lambda a: blk(act.apply_rate(a, lam, shape, eps))

    for ckpt in (
        lambda f, a: torch.utils.checkpoint.checkpoint(f, a, use_reentrant=False),
        deepspeed.checkpointing.non_reentrant_checkpoint,
    ):
        torch.manual_seed(5)
        h = x0.clone().requires_grad_(True)
        for blk in model:
            h = ckpt(runner(blk), h)
        task_loss(h, y).backward()
        for r, g in zip(ref, grads(model)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    for r, g in zip(ref, ours):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # and the rate really changed the gradient (the test can fail)
    base = explicit(model, x0, y, [0.0] * 4, shape, eps)
    assert max((a - b).abs().max().item() for a, b in zip(base, ref)) > 1e-4


def test_blockwise_lambdas_and_l1(active):
    """Blockwise schedule mid-warm-up: each block gets its own lambda; rate=l1 is mean |a|."""
    model = make_model(p=0.0)
    x0, y = data()
    cfg = ACTConfig(
        enabled=True,
        lambda_target=0.5,
        warmup_steps=40,
        blockwise=True,
        num_blocks=4,
        rate="l1",
        log_interval=5,
    )
    st = active(act.ACTState(cfg))
    st.step = 15  # block 0 full, block 1 at 50%, blocks 2, 3 off; a rate-logging step
    lams = [st.lambda_for(b) for b in range(4)]
    assert lams == pytest.approx([0.5, 0.25, 0.0, 0.0])
    ref = explicit(model, x0, y, lams, 1.0, 0.0)
    h = x0.clone().requires_grad_(True)
    for blk in model:
        h = act.checkpoint(blk, h)
    task_loss(h, y).backward()
    for r, g in zip(ref, grads(model)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    s = st.scalars()
    assert s["lambda"] == pytest.approx(0.5)
    rates = [float(h.abs().mean()) for h in explicit_inputs(model, x0)]
    assert s["rate"] == pytest.approx(sum(rates) / 4)
    assert s["penalty"] == pytest.approx(sum(lam * r for lam, r in zip(lams, rates)))
    st.step = 16  # not a rate-logging step: no rate telemetry, nothing reported as 0
    act.checkpoint(model[0], x0.clone().requires_grad_(True))
    assert "rate" not in st.scalars()


def test_schedule_values():
    lin = act.LambdaSchedule(target=2.0, start=10, warmup=100)
    assert [lin(s) for s in (0, 10, 60, 110, 500)] == pytest.approx([0, 0, 1.0, 2.0, 2.0])
    cos = act.LambdaSchedule(target=2.0, warmup=100, kind="cosine")
    assert [cos(s) for s in (0, 25, 50, 100)] == pytest.approx([0, 1 - math.sqrt(0.5), 1.0, 2.0])
    blk = act.LambdaSchedule(target=1.0, warmup=100, blockwise=True, num_blocks=4)
    assert [blk(50, b) for b in range(4)] == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert [blk(60, b) for b in range(4)] == pytest.approx([1.0, 1.0, 0.4, 0.0])
    assert blk(100, 3) == 1.0 and blk(99, 7) == blk(99, 3)
    assert act.LambdaSchedule(target=3.0)(0) == 3.0
    st = act.ACTState(ACTConfig(enabled=True, lambda_target=1.0, warmup_steps=10))
    st.on_step(5)
    assert st.lambda_for(0) == pytest.approx(0.5)


def test_dropout_replayed_in_recomputation(active):
    """Dropout masks of the recomputation equal the forward's (else grads differ from plain)."""
    active(None)
    model = make_model(p=0.5)
    x0, y = data()
    torch.manual_seed(7)
    h = x0.clone().requires_grad_(True)
    for blk in model:
        h = blk(h)
    task_loss(h, y).backward()
    ref = grads(model)
    torch.manual_seed(7)
    h = x0.clone().requires_grad_(True)
    for blk in model:
        h = act.checkpoint(blk, h)
    out = h.detach().clone()
    task_loss(h, y).backward()
    after = torch.rand(1)  # the RNG continues where the forward left it
    for r, g in zip(ref, grads(model)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    torch.manual_seed(7)
    h = x0.clone()
    with torch.no_grad():
        for blk in model:
            h = blk(h)
    assert torch.equal(out, h)
    assert torch.equal(after, torch.rand(1)), "backward must restore the caller's RNG state"


def test_checkpoint_contract_kwargs_tuples_and_eval(active):
    active(None)
    lin = nn.Linear(4, 4)

    def f(a, mask=None, scale=2.0):
        return lin(a) * mask, "tag", scale

    a = torch.randn(3, 4, requires_grad=True)
    m = torch.ones(3, 4)
    out, tag, scale = act.checkpoint(f, a, mask=m)
    assert tag == "tag" and scale == 2.0 and out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(a.grad, lin.weight.sum(0).expand(3, 4))
    with torch.no_grad():
        o, _, _ = act.checkpoint(f, a, mask=m)
    assert not o.requires_grad


def test_config_errors():
    def bad(section, match):
        with pytest.raises(ConfigError, match=match):
            from_ds_config({"ggspeed": {"act": section}})

    bad({"lambda_target": -1}, r"ggspeed\.act\.lambda_target")
    bad({"schedule": "step"}, r"ggspeed\.act\.schedule")
    bad({"rate": "l2"}, r"ggspeed\.act\.rate")
    bad({"lamda_target": 1}, r"did you mean 'lambda_target'")
    bad({"blockwise": True}, r"ggspeed\.act\.num_blocks")
    bad({"rel_step": 0.1, "bits_target": 3}, r"rel_step and ggspeed\.act\.bits_target")
    bad({"bits_target": 3, "abs_step": 0.1}, r"bits_target and ggspeed\.act\.abs_step")
    bad({"abs_step": 0}, r"ggspeed\.act\.abs_step")
    bad({"eg_order": 99}, r"ggspeed\.act\.eg_order")
    bad({"warmup_steps": -2}, r"ggspeed\.act\.warmup_steps")
    cfg = from_ds_config({"ggspeed": {"act": {"enabled": True, "compress": True}}}).act
    act.check_ds_config({"bf16": {"enabled": True}}, cfg)
    for ds, key in (
        ({"fp16": {"enabled": True}}, r"fp16\.enabled"),
        ({"pipeline": {"use_reentrant": False}}, r"pipeline\.use_reentrant"),
        (
            {"activation_checkpointing": {"contiguous_memory_optimization": True}},
            r"contiguous_memory_optimization",
        ),
    ):
        with pytest.raises(ConfigError, match=key):
            act.check_ds_config(ds, cfg)
    act.check_ds_config({"fp16": {"enabled": True}}, ACTConfig())  # ACT off: nothing refused


def test_rate_value():
    a = torch.tensor([0.0, -1.0, 2.0])
    assert rate_value(a, 1.0, 0.0) == pytest.approx(1.0)
    assert rate_value(a, 2.0, 0.0) == pytest.approx(5 / 3)


def test_coded_storage_round_trip_within_half_step():
    from ggspeed import codec, gg
    from ggspeed.act.storage import CodedStored, step_for

    torch.manual_seed(3)
    a = gg.sample(0.6, 1.0, (64, 300)) * 3.0  # heavy-tailed, like trained activations
    a[0, :5] = torch.tensor([0.0, 1e-9, -40.0, 25.0, 7.5])
    for rel in (0.01, 0.3, 2.0):
        step = step_for(a, rel)
        st = CodedStored(a, step, k="auto", cpu=True, part=None)
        back = st.load()
        assert back.shape == a.shape and back.dtype == a.dtype
        assert (back - a).abs().max().item() <= step / 2 * (1 + 1e-6)
        q = codec.quantize(a.reshape(-1), step)
        assert st.bits == codec.eg_code_length(q, k="auto")
        assert st.nbytes == st.stream.nbytes == len(st.stream.to_bytes())
    b = a.to(torch.bfloat16)
    st = CodedStored(b, step_for(b, 0.1), k=0, cpu=False, part=None)
    assert st.load().dtype == torch.bfloat16


def test_compressed_checkpoint_recomputes_on_decoded_input(active):
    """compress: the forward sees a, the recomputation sees dequantize(quantize(a)); the held
    bytes are the streams' bytes, released after backward."""
    from ggspeed import codec

    cfg = ACTConfig(enabled=True, lambda_target=0.0, compress=True, rel_step=0.2, rate="l1")
    st = active(act.ACTState(cfg))
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    seen: list[torch.Tensor] = []

    def f(x):
        seen.append(x.detach().clone())
        return lin(x)

    a = torch.randn(64, 32, requires_grad=True)
    out = act.checkpoint(f, a)
    held = st.live_bytes
    assert held > 0
    g = torch.randn_like(out)
    out.backward(g)
    assert st.live_bytes == 0
    step = 0.2 * a.detach().pow(2).mean().sqrt().item()
    decoded = codec.dequantize(codec.quantize(a.detach(), step), step).view_as(a)
    assert torch.equal(seen[0], a.detach()) and torch.equal(seen[1], decoded)
    assert not torch.equal(seen[1], a.detach())
    torch.testing.assert_close(lin.weight.grad, g.t() @ decoded)
    s = st.scalars()
    assert s["stored_mb"] * 1e6 == held
    assert s["bf16_mb"] == pytest.approx(2 * a.numel() / 1e6)
    assert 0 < s["bits_per_element"] < 8 and s["ratio_vs_bf16"] > 2
    assert s["peak_live_mb"] * 1e6 == held


def test_shape_refresh_and_bits_target(active):
    """rate=gg fits each block's shape on first sight and again after a refresh interval;
    bits_target turns the fitted shape into the step giving that quantized entropy."""
    from ggspeed import gg

    cfg = ACTConfig(
        enabled=True, lambda_target=1e-2, compress=True, bits_target=3.0, shape_refresh_interval=2
    )
    st = active(act.ACTState(cfg))
    lin = nn.Linear(64, 64)
    torch.manual_seed(0)
    a = gg.sample(0.8, 1.0, (256, 64)).requires_grad_(True)
    act.checkpoint(lin, a).sum().backward()
    assert st.shapes[0] == pytest.approx(0.8, abs=0.1)
    rel = st.rel_step_for(0)
    assert gg.quantized_entropy(0.8, gg.scale_for_std(0.8, 1.0), rel) == pytest.approx(
        3.0, abs=0.05
    )
    assert st.scalars()["bits_per_element"] < 4.0
    b = gg.sample(2.0, 1.0, (256, 64)).requires_grad_(True)
    st.on_step(1)
    act.checkpoint(lin, b).sum().backward()
    assert st.shapes[0] == pytest.approx(0.8, abs=0.1)  # not yet due
    st.on_step(2)
    act.checkpoint(lin, b).sum().backward()
    assert st.shapes[0] == pytest.approx(2.0, abs=0.2)
    assert st.state_dict()["shapes"] == st.shapes


def test_abs_step_storage_and_out_of_range_fallback(active):
    """abs_step: one fixed step for every tensor; values the codec cannot carry at that step
    are held as they are instead of failing the training step."""
    from ggspeed import codec

    cfg = ACTConfig(enabled=True, lambda_target=0.0, compress=True, abs_step=0.05, rate="l1")
    st = active(act.ACTState(cfg))
    lin = nn.Linear(16, 16)
    seen: list[torch.Tensor] = []

    def f(x):
        seen.append(x.detach().clone())
        return lin(x)

    a = torch.randn(32, 16, requires_grad=True)
    act.checkpoint(f, a).sum().backward()
    assert torch.equal(seen[1], codec.dequantize(codec.quantize(a.detach(), 0.05), 0.05))
    assert st.scalars()["ratio_vs_bf16"] > 1.5
    huge = (torch.randn(32, 16) * 1e9).requires_grad_(True)
    seen.clear()
    act.checkpoint(f, huge).sum().backward()
    assert torch.equal(seen[1], huge.detach())
    assert "bits_per_element" not in st.scalars()


def test_state_dict_round_trip():
    cfg = ACTConfig(enabled=True, lambda_target=1.0, warmup_steps=10, bits_target=2.0)
    st = act.ACTState(cfg)
    st.shapes, st.rel_steps = {0: 0.9, 3: 1.4}, {0: 0.7}
    st.on_step(4)
    fresh = act.ACTState(cfg)
    fresh.load_state_dict(st.state_dict())
    assert (fresh.step, fresh.shapes, fresh.rel_steps) == (4, st.shapes, st.rel_steps)
    assert fresh.lambda_for(0) == pytest.approx(0.4) and not fresh.wants_fit(3)
    assert fresh.rel_step_for(0) == 0.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "eps"), [(1.0, 0.0), (0.7, 1e-3), (1.6, 0.0)])
def test_rate_backward_matches_pow_formula(dtype, shape, eps):
    """The fused backward (addcmul, exp/log power) equals grad + coef * dR/da written with pow,
    in the gradient's dtype, including exact zeros (sign 0) in the activation."""
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(64, 33, generator=g) * torch.logspace(-3, 2, 33)).to(dtype)
    a[0, :5] = 0.0
    up = torch.randn(64, 33, generator=g).to(dtype)
    coef = 0.37
    x = a.float()
    if shape == 1.0:
        extra = torch.sign(x) / x.numel()
    else:
        extra = shape * (x.abs() + eps).pow(shape - 1.0) * torch.sign(x) / x.numel()
    want = up + (coef * extra).to(dtype)
    leaf = a.clone().requires_grad_(True)
    act.apply_rate(leaf, coef, shape, eps).backward(up)
    assert leaf.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(leaf.grad, want, **tol)
    assert not torch.isnan(leaf.grad).any()
