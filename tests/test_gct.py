"""GCT single-process checks: config, DeepSpeed config refusals, RDOQ, state, the constraint."""

from __future__ import annotations

import pickle

import pytest
import torch

from ggspeed import codec
from ggspeed.config import ConfigError, GCTConfig, from_ds_config
from ggspeed.gct import (
    GCTState,
    apply_constraint,
    check_ds_config,
    eg_bits,
    exact_constraint_term,
    quantize_rdoq,
    quantize_round,
    secant_term,
)


@pytest.mark.parametrize(
    "k,runs,mu", [(0, True, 0.1), (0, False, 0.3), (2, True, 0.5), (1, False, 0)]
)
def test_fused_quantize_matches_reference(k: int, runs: bool, mu: float) -> None:
    """The all-reduce's fused CPU pass gives quantize_rdoq's levels, the exact residual (in the
    old residual's memory) and the statistics' sums."""
    from ggspeed.gct import allreduce

    torch.manual_seed(k)
    n, block = 20011, 8192
    v = torch.randn(n) * torch.rand(n) * 40
    v[::97] *= 100  # levels past the threshold table (1024): the exact fix-up pass
    steps = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float32)
    state = GCTState(_gct(eg_order=k, zero_runs=runs, rdoq_mu=mu))
    residual = torch.zeros(n)
    # segment 0 skipped: quantization only, as the unfused path would do it
    q, err, esq, _ = allreduce._quantize_encode_cpu(state, v, steps, block, residual, [0, n], 0)
    step = steps.repeat_interleave(block)[:n]
    ref = quantize_rdoq(v, step, mu, k, runs)
    assert torch.equal(q, ref)
    ref_err = v - ref.float() * step
    assert err is residual and torch.equal(err, ref_err)
    assert esq == pytest.approx(float(ref_err.double().square().sum()), rel=1e-6)
    _, _, vsq = allreduce._prepare(state, v.clone(), None, block)  # the statistics pass takes it
    assert vsq == pytest.approx(float(v.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("order", [0, 2, "auto"])
@pytest.mark.parametrize("runs", [True, False])
@pytest.mark.parametrize("segments", [1, 3])
def test_quantize_encode_gives_the_codec_bytes(order, runs: bool, segments: int) -> None:
    """The one-pass quantize-and-encode writes, per segment, the very stream ``encode_chunk``
    makes of the levels (what the receivers' decoder and the CUDA path expect), and
    ``decode_add_cpu`` adds a received stream into a level tensor."""
    from ggspeed.gct import allreduce, common

    torch.manual_seed(7)
    n, block = 3 * codec.DEFAULT_CHUNK + 1234, 4096
    v = torch.randn(n) * (torch.rand(n) < 0.3) * torch.rand(n) * 30
    steps = torch.rand(-(-n // block)) + 0.5
    state = GCTState(_gct(eg_order=order, zero_runs=runs, rdoq_mu=0.1))
    bounds = allreduce._chunk_bounds(n, segments)
    skip = 1 if segments > 1 else -1
    residual = torch.zeros(n)
    q, err, _, coded = allreduce._quantize_encode_cpu(
        state, v.clone(), steps, block, residual, bounds, skip
    )
    q_ref, err_ref, _, _ = common.quantize_torch(state, v.clone(), steps, block)
    assert torch.equal(q, q_ref) and torch.equal(err, err_ref)
    assert err is residual  # overwritten in place
    for r in range(segments):
        seg = q[bounds[r] : bounds[r + 1]]
        if r == skip:
            assert coded[r] is None
            continue
        assert torch.equal(coded[r], allreduce.encode_chunk(seg, state))
        buf = common.with_slack(coded[r].numel() + 5, torch.device("cpu"))
        buf[5 : 5 + coded[r].numel()] = coded[r]
        acc = torch.randint(-1000, 1000, seg.shape, dtype=torch.int32)
        want = acc + seg
        acc0 = acc.clone()
        common.decode_add_cpu(buf, 5, coded[r].numel(), acc)
        assert torch.equal(acc, want)
        # finish: the sums go dequantized to out, exactly as _dequantize computes them
        seg_steps = steps.repeat_interleave(block)[bounds[r] : bounds[r + 1]]  # block 1
        out = torch.empty(seg.numel())
        common.decode_add_cpu(buf, 5, coded[r].numel(), acc0, (seg_steps, 1, 2, True, out))
        assert torch.equal(out, allreduce._dequantize(want, seg_steps, 1, 2, True, None))
        with pytest.raises(ValueError, match="truncated"):
            common.decode_add_cpu(buf, 5, coded[r].numel() - 1, acc.clone())
        with pytest.raises(ValueError, match="expected"):
            common.decode_add_cpu(buf, 5, coded[r].numel(), acc[1:].clone())


def test_bad_exchange_named() -> None:
    from ggspeed.gct import compressed_all_reduce

    with pytest.raises(ValueError, match="exchange must be one of"):
        compressed_all_reduce(torch.zeros(3), GCTState(_gct()), exchange="ring")


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_block_steps_kernel_matches_torch_ops(mode: str) -> None:
    """The CPU steps (numba) are the torch ops' float32 steps, for every world size: all-zero
    blocks, huge max |v| (the codec's range guard), inf."""
    from ggspeed.gct import common

    torch.manual_seed(5)
    rms = torch.rand(500) * torch.logspace(-8, 3, 500)
    amax = rms * torch.rand(500) * 1e3
    rms[:20], amax[:10] = 0.0, 0.0
    amax[20:30] = torch.logspace(20, 38, 10)
    rms[30], amax[31] = float("inf"), float("inf")
    state = GCTState(_gct(step_mode=mode, quant_step=0.7 if mode == "relative" else 3e-4))
    for world in (1, 2, 3, 8):
        got = common.block_steps(state, rms, amax, world)
        want = common.block_steps_torch(state, rms, amax, world)
        assert got.dtype == torch.float32 and torch.equal(got, want), world


@pytest.mark.parametrize(
    "kw",
    [
        {"rdoq_mu": 0.1},
        {"rdoq_mu": 0.3, "eg_order": "auto", "block_size": 0},
        {"zero_runs": False, "eg_order": 2, "quant_step": 0.3},
        {"step_mode": "absolute", "quant_step": 2e-2, "rdoq_mu": 0.05, "error_feedback": False},
    ],
)
def test_previous_steps_pass_matches_torch_path(kw: dict) -> None:
    """The CPU pass of steps set without a collective (add, statistics, steps from a basis or
    the own RMS, quantize, code: one pass) gives the torch path's steps, RMS, levels, residual
    and stream bytes; the receivers' weighted sum equals the
    torch ops' rank-ordered sum bit for bit; a non-finite gradient leaves the residual alone."""
    from ggspeed.gct import common, previous_steps

    torch.manual_seed(3)
    n = 3 * codec.DEFAULT_CHUNK + 999
    cfg = _gct(**kw)
    block = min(cfg.block_size or n, n)
    ranks = []
    for r in range(3):
        state = GCTState(cfg)
        x = torch.randn(n) * (torch.rand(n) < 0.5) * (r + 1)
        x[:5000] *= 50  # a loud block: its own, coarser step
        x[5000:9000] = 0  # an all-zero block
        residual = torch.randn(n) * 0.1 if cfg.error_feedback else None
        live = residual.clone() if residual is not None else None
        basis = torch.rand(-(-n // block)) if r == 1 else None  # rank 1: steps from a basis
        q, err, steps, rms, coded, esq, vsq = previous_steps._encode_cpu(
            state, x, residual, "b", block, basis
        )
        tq, terr, tsteps, trms, tcoded, tesq, tvsq = previous_steps._encode_torch(
            state, x, residual, block, basis
        )
        assert torch.equal(steps, tsteps) and torch.equal(rms, trms)
        assert torch.equal(q, tq) and torch.equal(coded, tcoded)
        # statistics: float64 sums here, float32 BLAS dot products there
        assert vsq == pytest.approx(tvsq, rel=1e-4) and esq == pytest.approx(tesq, rel=1e-4)
        if residual is not None:
            assert torch.equal(err, terr) and torch.equal(residual, live)  # not written over
        ranks.append((q.clone(), steps, rms, coded))
    # The gathered buffer as gather_coded lays it out: header (flag, steps, RMS), stream, padding.
    nb = ranks[0][1].numel()
    parts = [torch.cat([torch.tensor([0.0]), s, rm]).view(torch.uint8) for _, s, rm, _ in ranks]
    lens = [p.numel() + c.numel() for p, (*_, c) in zip(parts, ranks, strict=True)]
    width = max(lens) + 3
    buf = common.with_slack(3 * width, torch.device("cpu"))
    for r, (p, (*_, c)) in enumerate(zip(parts, ranks, strict=True)):
        buf[r * width : r * width + lens[r]] = torch.cat([p, c])
    heads = previous_steps._headers(buf, lens, width, nb)
    assert all(
        not f and torch.equal(s, rk[1]) and torch.equal(rm, rk[2])
        for (f, s, rm), rk in zip(heads, ranks, strict=True)
    )
    steps = torch.stack([s for _, s, _, _ in ranks])
    for me in range(3):
        for average in (True, False):
            want = previous_steps._decode_torch(
                buf, lens, width, me, ranks[me][0], steps, block, average
            )
            out = torch.empty(n)
            previous_steps._decode_cpu(
                GCTState(cfg), buf, lens, width, me, ranks[me][0], steps, block, average, out
            )
            assert torch.equal(out, want)
    bad = buf.clone()
    bad[2 * width + 4 * (2 * nb + 1) + 80] ^= 0xFF  # rank 2's payload (after 76 bytes of tables)
    with pytest.raises(ValueError, match="cannot decode rank 2's stream"):
        previous_steps._decode_cpu(
            GCTState(cfg), bad, lens, width, 0, ranks[0][0], steps, block, True, out
        )
    # A non-finite gradient stops the pass: no stream, and the live residual is untouched.
    state = GCTState(cfg)
    x = torch.randn(n)
    x[n - 3] = float("nan")
    residual = torch.randn(n) if cfg.error_feedback else None
    live = residual.clone() if residual is not None else None
    *_, coded, _, _ = previous_steps._encode_cpu(state, x, residual, "b", block)
    assert coded is None
    if residual is not None:
        assert torch.equal(residual, live)


def _gct(**kw) -> GCTConfig:
    return from_ds_config({"ggspeed": {"gct": {"enabled": True, **kw}}}).gct


def test_config_defaults_and_bad_values() -> None:
    cfg = _gct()
    assert cfg.step_mode == "relative" and cfg.error_feedback and cfg.zero_runs
    assert _gct(eg_order="auto").eg_order == "auto"
    bad = [
        ({"quant_step": 0}, "ggspeed.gct.quant_step"),
        ({"step_mode": "rel"}, "ggspeed.gct.step_mode"),
        ({"exchange": "ring"}, "ggspeed.gct.exchange"),
        ({"step_agreement": "mine"}, "ggspeed.gct.step_agreement"),
        ({"step_agreement": "previous"}, "step_agreement 'previous' needs exchange 'allgather'"),
        ({"rdoq_mu": -1}, "ggspeed.gct.rdoq_mu"),
        ({"eg_order": 16}, "eg_order"),
        ({"eg_order": "fast"}, "ggspeed.gct.eg_order"),
        ({"constraint_warmup_steps": 10}, "constraint_lambda"),
        ({"quant_stp": 1.0}, "did you mean 'quant_step'"),
    ]
    for kw, needle in bad:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            _gct(**kw)


def test_check_ds_config_refuses_what_it_cannot_serve() -> None:
    cfg = _gct()
    check_ds_config({"zero_optimization": {"stage": 2}}, cfg)
    check_ds_config({"zero_optimization": {"stage": 3}}, GCTConfig())  # disabled: no opinion
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: got 3"):
        check_ds_config({"zero_optimization": {"stage": 3}}, cfg)
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_optimizer"):
        check_ds_config(
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, cfg
        )
    with pytest.raises(ConfigError, match="sequence_parallel_size"):
        check_ds_config({"sequence_parallel_size": 2}, cfg)


def test_eg_bits_matches_codec() -> None:
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(5000, generator=g) * 3).round().to(torch.int32)
    for k in (0, 2):
        assert int(eg_bits(q, k).sum()) == codec.eg_code_length(q, k=k, runs=False)


def test_rdoq_trades_error_for_bits() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,)) * 0.01
    step = 0.01
    q0 = quantize_rdoq(x, step, 0.0)
    assert torch.equal(q0, quantize_round(x, step))
    prev_bits, prev_err = None, None
    for mu in (0.0, 0.05, 0.2):
        q = quantize_rdoq(x, step, mu, runs=True)
        err = (x - q * step).abs()
        assert float(err.max()) < step * (1 + 1e-5)  # floor or ceil only: error below a step
        bits = codec.eg_code_length(q, k=0, runs=True)
        mse = float(err.square().mean())
        if prev_bits is not None:
            assert bits < prev_bits and mse > prev_err
        prev_bits, prev_err = bits, mse
    del g


def test_state_round_trip_and_pickle() -> None:
    s = GCTState(_gct(constraint_lambda=0.1, constraint_warmup_steps=10))
    s.set_residual("e0", torch.arange(4.0))
    s.set_step_basis("e0", torch.tensor([0.5, 2.0]))
    s.constraint_prev["g0.p0"] = (torch.ones(2), torch.zeros(2))
    s.on_step(5)
    assert s.constraint_lambda == pytest.approx(0.05)
    s.record(calls=1, bytes_sent=100, wire_elements=400.0)
    t = GCTState(s.cfg)
    t.load_state_dict(pickle.loads(pickle.dumps(s.state_dict())))
    assert torch.equal(t.residuals["e0"], torch.arange(4.0)) and t.global_step == 5
    assert torch.equal(t.step_basis("e0", 2), torch.tensor([0.5, 2.0]))
    assert t.step_basis("e0", 3) is None  # another block count: not applied
    # double buffering: the replaced residual becomes the next call's buffer, never the live one
    t.set_residual("e0", torch.zeros(4))
    spare = t.next_residual("e0", 4)
    assert spare.data_ptr() != t.residuals["e0"].data_ptr()
    assert torch.equal(spare, torch.arange(4.0))  # the old residual's memory, reused
    older = {k: v for k, v in s.state_dict().items() if k != "step_bases"}  # an older checkpoint
    t.load_state_dict(older)
    assert t.step_basis("e0", 2) is None
    assert t.stats.bits_per_element == pytest.approx(2.0)
    assert s.scalars()["bits_per_element"] == pytest.approx(2.0)
    assert s.scalars()["bytes_sent"] == 0.0  # a window since the last call
    assert pickle.loads(pickle.dumps(s)).residuals.keys() == {"e0"}
    assert s.residual("e0", torch.zeros(3)) is None  # size changed: dropped, not misapplied
    with pytest.raises(ValueError, match="version"):
        t.load_state_dict({"version": 7})


def test_secant_guard_and_clip() -> None:
    p, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0, 1.0])
    pp, pg = torch.tensor([0.0, 2.0, 2.9999]), torch.tensor([0.0, 0.0, 0.0])
    t = secant_term(p, g, pp, pg, eps=1e-12, clip=100.0)
    assert t[0] == 1.0  # h = 1/1, sign +
    assert t[1] == 0.0  # parameter did not move: guarded
    assert t[2] == 100.0  # h = 1e4, clipped


def test_secant_matches_exact_hvp_direction() -> None:
    """On a small regression model the secant term points where the exact H sign(g) does.

    The diagonal secant sees only the diagonal of H (plus the coupling along the last step), so
    agreement is close where H is near-diagonal, as here; it is weaker on coupled problems.
    """
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(4096, 1)
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    state = GCTState(_gct(constraint_lambda=1.0))
    named = [(f"p{i}", p) for i, p in enumerate(model.parameters())]
    cos = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads, hv = exact_constraint_term(loss, list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        raw = [p.grad.clone() for p in model.parameters()]
        apply_constraint(state, named)
        approx = torch.cat([(p.grad - r).flatten() for p, r in zip(model.parameters(), raw)])
        if approx.abs().sum() > 0:
            exact = torch.cat([h.flatten() for h in hv])
            cos.append(float(torch.nn.functional.cosine_similarity(approx, exact, dim=0)))
        for p, r in zip(model.parameters(), raw):
            p.grad = r  # step on the task gradient so the secant sees the plain trajectory
        opt.step()
    assert len(cos) == 7 and min(cos) > 0.5 and sorted(cos)[3] > 0.9, cos
    assert state.scalars()["constraint_rel"] > 0
