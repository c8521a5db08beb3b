"""GCT single-process checks: config, DeepSpeed config refusals, RDOQ, state, the constraint."""

from __future__ import annotations

import gc
import pickle
import weakref

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
    buffer it is given, the live residual untouched) and the statistics' sums."""
    from ggspeed.gct import common

    torch.manual_seed(k)
    n, block = 20011, 8192
    v = torch.randn(n) * torch.rand(n) * 40
    v[::97] *= 100  # levels past the threshold table (1024): the exact fix-up pass
    steps = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float32)
    state = GCTState(_gct(eg_order=k, zero_runs=runs, rdoq_mu=mu))
    residual = torch.zeros(n)
    buf = torch.full((n,), 7.0)
    # segment 0 skipped: quantization only, as the unfused path would do it
    q, err, esq, _, _ = common.quantize_encode(state, v, residual, steps, block, buf, [0, n], 0)
    step = steps.repeat_interleave(block)[:n]
    ref = quantize_rdoq(v, step, mu, k, runs)
    assert torch.equal(q, ref)
    ref_err = v - ref.float() * step
    assert err is buf and torch.equal(err, ref_err), "the new residual, in the given buffer"
    assert torch.equal(residual, torch.zeros(n)), "the live residual is not written"
    assert esq == pytest.approx(float(ref_err.double().square().sum()), rel=1e-6)
    _, _, vsq = common.add_and_block_stats(state, v.clone(), None, block)  # the statistics pass
    assert vsq == pytest.approx(float(v.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("block", [4096, 5000, 20011])
@pytest.mark.parametrize("with_residual", [True, False])
def test_statistics_kernel_matches_torch(block: int, with_residual: bool) -> None:
    """Step 1 on the CPU (numba, v never stored) gives the torch reference's per-block RMS and
    max |v| bit for bit, and the same non-finite flag."""
    from ggspeed.gct import common

    torch.manual_seed(block)
    n = 20011
    x = torch.randn(n) * torch.logspace(-6, 2, n)
    residual = torch.randn(n) * 1e-3 if with_residual else None
    state = GCTState(_gct())
    _, msg, _ = common.add_and_block_stats(state, x, residual, block)
    _, rms, amax, nonfinite = common.add_and_block_stats_torch(x, residual, block)
    nb = rms.numel()
    assert torch.equal(msg[:nb], rms), "block RMS"
    assert torch.equal(msg[nb : 2 * nb], amax), "block max |v|"
    assert msg[-1] == 0 and not nonfinite
    x[n // 2] = float("nan")
    _, msg, _ = common.add_and_block_stats(state, x, residual, block)
    assert msg[-1] == 1 and common.add_and_block_stats_torch(x, residual, block)[3]


@pytest.mark.parametrize("average", [True, False])
def test_dequantize_kernel_matches_torch(average: bool) -> None:
    from ggspeed.gct import common

    torch.manual_seed(2)
    sums = torch.randint(-5000, 5000, (20011,), dtype=torch.int32)
    steps = torch.rand(5) * 1e-3
    for world in (2, 3, 8):
        got = common.dequantize(sums, steps, 4096, world, average, None)
        want = common.dequantize_torch(sums, steps, 4096, world, average)
        assert torch.equal(got, want), world


@pytest.mark.parametrize("order", [0, 2, "auto"])
@pytest.mark.parametrize("runs", [True, False])
@pytest.mark.parametrize("segments", [1, 3])
def test_quantize_encode_gives_the_codec_bytes(order, runs: bool, segments: int) -> None:
    """The one-pass quantize-and-encode writes, per segment, the very stream ``encode_levels``
    makes of the levels (the codec's bytes with a CRC-32, what the CUDA path sends), and
    ``decode_add`` adds a received stream into a level tensor."""
    from ggspeed.gct import common
    from ggspeed.gct.exchange import chunk_bounds

    torch.manual_seed(7)
    n, block = 3 * codec.DEFAULT_CHUNK + 1234, 4096
    v = torch.randn(n) * (torch.rand(n) < 0.3) * torch.rand(n) * 30
    steps = torch.rand(-(-n // block)) + 0.5
    state = GCTState(_gct(eg_order=order, zero_runs=runs, rdoq_mu=0.1))
    bounds = chunk_bounds(n, segments)
    skip = 1 if segments > 1 else -1
    buf = torch.empty(n)
    q, err, _, _, coded = common.quantize_encode(
        state, v.clone(), torch.zeros(n), steps, block, buf, bounds, skip
    )
    q_ref, err_ref, _, _ = common.quantize_torch(state, v.clone(), steps, block)
    assert torch.equal(q, q_ref) and torch.equal(err, err_ref)
    for r in range(segments):
        seg = q[bounds[r] : bounds[r + 1]]
        if r == skip:
            assert coded[r] is None
            continue
        assert torch.equal(coded[r], common.encode_levels(seg, state))
        stream = codec.EGStream.from_tensor(coded[r])  # the CRC checks out
        assert torch.equal(codec.eg_decode(stream), seg)
        buf = common.with_slack(coded[r].numel() + 5, torch.device("cpu"))
        buf[5 : 5 + coded[r].numel()] = coded[r]
        acc = torch.randint(-1000, 1000, seg.shape, dtype=torch.int32)
        want = acc + seg
        acc0 = acc.clone()
        common.decode_add(buf, 5, coded[r].numel(), acc)
        assert torch.equal(acc, want)
        # finish: the sums go dequantized to out, exactly as dequantize computes them
        seg_steps = steps.repeat_interleave(block)[bounds[r] : bounds[r + 1]]  # block 1
        out = torch.empty(seg.numel())
        common.decode_add(buf, 5, coded[r].numel(), acc0, (seg_steps, 1, 2, True, out))
        assert torch.equal(out, common.dequantize_torch(want, seg_steps, 1, 2, True))
        with pytest.raises(ValueError, match="truncated"):
            common.decode_add(buf, 5, coded[r].numel() - 1, acc.clone())
        with pytest.raises(ValueError, match="expected"):
            common.decode_add(buf, 5, coded[r].numel(), acc[1:].clone())
        flipped = buf.clone()
        flipped[5 + coded[r].numel() - 3] ^= 4  # one payload bit
        with pytest.raises(ValueError, match="checksum mismatch"):
            common.decode_add(flipped, 5, coded[r].numel(), acc.clone())
        no_crc = buf.clone()
        no_crc[5 + 5] &= ~4  # the header's "checksum present" flag cleared
        with pytest.raises(ValueError, match="no checksum"):
            common.decode_add(no_crc, 5, coded[r].numel(), acc.clone())


@pytest.mark.parametrize("runs", [True, False])
def test_codec_chunk_api(runs: bool) -> None:
    """codec.chunks: a stream assembled from a header written in front of kernel-coded chunks is
    ``eg_encode``'s (with its CRC when asked), and ``decode_add`` adds its levels."""
    import numpy as np

    from ggspeed.codec import chunks
    from ggspeed.gct import kernels

    torch.manual_seed(11)
    n = 2 * codec.DEFAULT_CHUNK + 77
    q = (torch.randn(n) * 3 * (torch.rand(n) < 0.4)).round().to(torch.int32)
    for k in (1, "auto"):
        ref = codec.eg_encode(q, k=k, runs=runs)
        ks = np.asarray(chunks.kernel_orders(k, runs), np.int64)
        head = chunks.head_size(ref.nchunks)
        buf = np.zeros(head + chunks.code_bound(n), np.uint8)
        bits = np.zeros(ref.nchunks, np.int64)
        orders = np.zeros((ref.nchunks, 3), np.uint8)
        p = np.uint64(0)
        for c in range(ref.nchunks):
            lo, hi = c * codec.DEFAULT_CHUNK, min(n, (c + 1) * codec.DEFAULT_CHUNK)
            p, code = kernels._code_chunk(
                q.numpy(), lo, hi, runs, ks, buf[head:], p, bits, orders, c
            )
            assert code == 0
        for checksum in (False, True):
            size = chunks.write_stream_head(
                buf, n, chunks.stream_k(k, runs), runs, bits, orders, int(p), checksum=checksum
            )
            got = torch.from_numpy(buf[:size].copy())
            assert torch.equal(got, ref.to_tensor(checksum=checksum)), (k, checksum)
            assert chunks.has_checksum(got) == checksum
        stream = chunks.read_stream(got, n, require_checksum=True)
        acc = torch.ones(n, dtype=torch.int32)
        chunks.decode_add(stream, acc)
        assert torch.equal(acc, q + 1)
    with pytest.raises(ValueError, match="no checksum"):
        chunks.read_stream(ref.to_tensor(checksum=False), n, require_checksum=True)


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
        # removed option: an old config naming it gets the unknown-key error
        ({"step_agreement": "previous"}, "ggspeed.gct.step_agreement: unknown key"),
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
    s.constraint_prev["g0.p0"] = (torch.ones(2), torch.zeros(2))
    s.on_step(5)
    assert s.constraint_lambda == pytest.approx(0.05)
    s.record(calls=1, bytes_sent=100, wire_elements=400.0)
    t = GCTState(s.cfg)
    t.load_state_dict(pickle.loads(pickle.dumps(s.state_dict())))
    assert torch.equal(t.residuals["e0"], torch.arange(4.0)) and t.global_step == 5
    # double buffering (CPU path): a recycled residual becomes the next call's buffer, never
    # the live one
    t.set_residual("e0", torch.zeros(4), recycle=True)
    spare = t.residual_buffer("e0", 4)
    assert spare.data_ptr() != t.residuals["e0"].data_ptr()
    assert torch.equal(spare, torch.arange(4.0))  # the old residual's memory, reused
    assert t.stats.bits_per_element == pytest.approx(2.0)
    assert s.scalars()["bits_per_element"] == pytest.approx(2.0)
    assert s.scalars()["bytes_sent"] == 0.0  # a window since the last call
    assert pickle.loads(pickle.dumps(s)).residuals.keys() == {"e0"}
    s.set_residual("e0", torch.arange(4.0))  # used since: a size change is a new bucket
    assert s.residual("e0", torch.zeros(3)) is None  # size changed: dropped, not misapplied
    with pytest.raises(ValueError, match="version"):
        t.load_state_dict({"version": 7})


def test_set_residual_releases_the_replaced_one() -> None:
    """The torch path allocates each new residual: the one it replaces must be freed, not kept
    as a spare (two bucket-sized buffers per bucket on a GPU)."""
    s = GCTState(_gct())
    old = torch.randn(1000)
    ref = weakref.ref(old)
    s.set_residual("b", old)
    s.set_residual("b", torch.randn(1000))
    del old
    gc.collect()
    assert ref() is None, "the replaced residual is still referenced by the state"


def test_state_dict_loads_with_weights_only(tmp_path) -> None:
    """A saved GCT state holds only tensors and plain Python values: torch.load with
    weights_only=True reads it back (counters fed numpy integers included)."""
    import numpy as np

    s = GCTState(_gct(constraint_lambda=0.1))
    s.set_residual("e0", torch.randn(10))
    s.constraint_prev["p"] = (torch.ones(3), torch.zeros(3))
    s.record(calls=1, bytes_sent=np.int64(1234), quant_sq_err=np.float32(0.5), elements=10)
    path = tmp_path / "gct.pt"
    torch.save({"components": {"gct": s.state_dict()}}, path)
    loaded = torch.load(path, weights_only=True)["components"]["gct"]
    t = GCTState(s.cfg)
    t.load_state_dict(loaded)
    assert torch.equal(t.residuals["e0"], s.residuals["e0"])
    assert t.stats.bytes_sent == 1234 and type(loaded["stats"]["bytes_sent"]) is int


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: ["not", "a", "dict"], r"the whole state\) must be a dict, got list"),
        (lambda d: {**d, "residuals": "abc"}, "residuals must be a dict, got str"),
        (lambda d: {**d, "residuals": {"e0": [1.0, 2.0]}}, r"residuals\['e0'\] must be a tensor"),
        (
            lambda d: {**d, "residuals": {"e0": torch.zeros(4, dtype=torch.float64)}},
            r"residuals\['e0'\] must be a 1-D float32 tensor, got 1-D torch.float64",
        ),
        (
            lambda d: {**d, "residuals": {"e0": torch.tensor([1.0, float("nan")])}},
            r"residuals\['e0'\] holds inf or NaN",
        ),
        (lambda d: {**d, "constraint_prev": {"p": 3}}, r"constraint_prev\['p'\] must be a"),
        (lambda d: {**d, "stats": {"calls": "x"}}, r"stats\['calls'\] must be a number"),
        (lambda d: {**d, "stats": {"bogus": 1}}, "stats has unknown fields"),
        (lambda d: {k: v for k, v in d.items() if k != "residuals"}, "residuals is missing"),
        (lambda d: {**d, "global_step": 1.5}, "global_step must be an int"),
    ],
)
def test_load_state_dict_refuses_bad_contents(change, needle: str) -> None:
    """A malformed state is refused naming the key and what is wrong, and nothing changes."""
    s = GCTState(_gct())
    s.set_residual("e0", torch.arange(4.0))
    t = GCTState(s.cfg)
    t.set_residual("mine", torch.ones(2))
    with pytest.raises(ValueError, match=needle):
        t.load_state_dict(change(s.state_dict()))
    assert list(t.residuals) == ["mine"]


def test_restored_residual_of_another_size_is_refused() -> None:
    """A residual loaded from a checkpoint that does not fit its bucket is an error naming the
    key and both sizes, not silently dropped."""
    s = GCTState(_gct())
    s.set_residual("e0", torch.arange(4.0))
    t = GCTState(s.cfg)
    t.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="residual 'e0' has 4 elements, but this bucket has 3"):
        t.residual("e0", torch.zeros(3))
    assert torch.equal(t.residual("e0", torch.zeros(4)), torch.arange(4.0))


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


def test_gct_uses_only_the_codecs_public_api() -> None:
    """ggspeed.gct reaches the codec through ``ggspeed.codec`` and ``codec.chunks`` only, never
    its private modules (cpu, api, stream, triton_kernels) or underscore names."""
    import re
    from pathlib import Path

    import ggspeed.gct

    private = re.compile(
        r"from \.\.codec(\.\w+)? import .*\b(cpu|api|stream|triton_kernels|_\w+)\b"
        r"|from \.\.codec\.(cpu|api|stream|triton_kernels) import"
        r"|\b(codec|chunks)\._\w+"
    )
    for path in sorted(Path(ggspeed.gct.__file__).parent.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not private.search(line), f"{path.name}:{i}: {line.strip()}"
