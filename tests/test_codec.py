"""ggspeed.codec: quantization, Exp-Golomb round trips in every mode, exact code lengths, the byte
format, and rejection of corrupt, truncated, mismatched or out-of-range input (numba backend)."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggspeed.codec import (
    MAX_ABS,
    EGStream,
    dequantize,
    eg_code_length,
    eg_decode,
    eg_encode,
    empirical_entropy,
    quantize,
)
from ggspeed.codec import cpu as cpu_kernels
from ggspeed.codec import stream as codec_stream

MODES = [
    (0, False),
    (1, False),
    (5, False),
    (31, False),
    ("auto", False),
    (0, True),
    (2, True),
    ((30, 0, 31), True),
    ("auto", True),
]


def gg_sample(shape: float, scale: float, n: int, seed: int) -> torch.Tensor:
    """Generalized Gaussian: |x| = scale * Gamma(1/shape, 1)^(1/shape), random sign."""
    g = torch.Generator().manual_seed(seed)
    gam = torch._standard_gamma(torch.full((n,), 1.0 / shape, dtype=torch.float64), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (scale * gam ** (1.0 / shape) * sign).float()


def roundtrip(q: torch.Tensor, k, runs: bool, chunk_size: int = 16384) -> EGStream:
    s = eg_encode(q, k, runs, chunk_size=chunk_size)
    assert s.nbits == eg_code_length(q, k, runs, chunk_size=chunk_size)
    out = eg_decode(s)
    assert out.dtype == torch.int32
    assert torch.equal(out, q.flatten().to(torch.int32))
    back = EGStream.from_bytes(s.to_bytes())
    assert len(s.to_bytes()) == s.nbytes
    assert torch.equal(eg_decode(back), out)
    assert torch.equal(eg_decode(EGStream.from_tensor(s.to_tensor())), out)
    return s


ints = st.one_of(
    st.integers(-MAX_ABS, MAX_ABS),
    st.sampled_from([0, 0, 0, 1, -1, MAX_ABS, -MAX_ABS, 2**29, -(2**29)]),
    st.integers(-3, 3),
)


@st.composite
def int_arrays(draw):
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["values", "zeros", "nonzero"]))
        if kind == "zeros":
            parts.append(np.zeros(draw(st.integers(1, 300)), np.int64))
        elif kind == "nonzero":
            v = np.array(draw(st.lists(st.integers(1, MAX_ABS), max_size=40)), np.int64)
            parts.append(v * np.where(np.arange(v.size) % 2, 1, -1))
        else:
            parts.append(np.array(draw(st.lists(ints, max_size=60)), np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=int_arrays(), mode=st.sampled_from(MODES), chunk=st.sampled_from([1, 7, 64, 16384]))
def test_roundtrip_hypothesis(arr, mode, chunk):
    k, runs = mode
    q = torch.from_numpy(arr)
    roundtrip(q, k, runs, chunk)
    roundtrip(q.to(torch.int32), k, runs, chunk)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_dtypes_and_shapes(dtype):
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -MAX_ABS), min(info.max, MAX_ABS)
    q = torch.cat([torch.tensor([lo, hi, lo, 0, hi]), torch.arange(-57, 58).clamp(lo, hi)])
    q = q.to(dtype).reshape(2, 3, 4, 5)
    for k, runs in MODES:
        roundtrip(q, k, runs, chunk_size=17)


@pytest.mark.parametrize("shape", [0.3, 0.5, 1.0, 2.0])
def test_gg_roundtrip_and_efficiency(shape):
    x = gg_sample(shape, 1.0, 50_000, seed=int(shape * 10))
    for step in (0.05, 0.5, 4.0):
        q = quantize(x, step)
        assert torch.equal(q, torch.round(x / step).to(torch.int32))
        h = empirical_entropy(q)
        lengths = {}
        for k, runs in MODES:
            lengths[(k, runs)] = roundtrip(q, k, runs, chunk_size=4096).nbits
        # auto is the per-chunk best order, so never worse than any fixed order.
        assert lengths[("auto", False)] <= min(v for (k, r), v in lengths.items() if not r)
        assert lengths[("auto", True)] <= min(v for (k, r), v in lengths.items() if r)
        assert lengths[("auto", False)] >= h * q.numel()  # no code beats the entropy


def test_auto_is_exact_minimum():
    x = gg_sample(0.7, 1.0, 20_000, seed=3)
    for step in (0.01, 0.3):
        q = quantize(x, step)
        best = min(eg_code_length(q, k, chunk_size=20_000) for k in range(32))
        assert eg_code_length(q, "auto", chunk_size=20_000) == best
        best_runs = min(
            eg_code_length(q, (kr, kb, kv), runs=True, chunk_size=20_000)
            for kr in range(7)
            for kb in range(5)
            for kv in range(12)
        )
        assert eg_code_length(q, "auto", runs=True, chunk_size=20_000) == best_runs


def test_known_bits():
    # u = 0, 1, 2, 3 -> 1 010 011 00100 (EG order 0), padded with zeros: 0b10100110 0b01000000
    s = eg_encode(torch.tensor([0, 1, -1, 2]))
    assert s.nbits == 12 and bytes(s.data.tolist()) == bytes([0b10100110, 0b01000000])
    # order 2: u + 4 with bitlen - 3 leading zeros: u=0 -> 100, u=5 (q=3) -> 01001
    s = eg_encode(torch.tensor([0, 3]), k=2)
    assert bytes(s.data.tolist()) == bytes([0b10001001])
    # zero runs, orders 0: run 2 -> 011, sign 1, ones-count 1 -> 010; trailing run 1 -> 010
    s = eg_encode(torch.tensor([0, 0, -1, 0]), k=0, runs=True)
    assert s.nbits == 10 and bytes(s.data.tolist()) == bytes([0b01110100, 0b10000000])
    # run 0, sign 0, ones-count 0 -> 1, |q| - 2 = 1 -> 010; run 0, sign 1, count 1 -> 010
    s = eg_encode(torch.tensor([3, -1]), k=0, runs=True)
    assert s.nbits == 11 and bytes(s.data.tolist()) == bytes([0b10101011, 0b01000000])
    # chunks start on byte boundaries: two chunks of one 1-bit code each
    s = eg_encode(torch.tensor([0, 0]), chunk_size=1)
    assert bytes(s.data.tolist()) == bytes([0x80, 0x80]) and s.chunk_offsets.tolist() == [0, 8]


def test_low_rate_runs_beat_plain():
    x = gg_sample(1.0, 1.0, 200_000, seed=5)
    q = quantize(x, 6.0)  # ~95% zeros
    h = empirical_entropy(q)
    plain = eg_code_length(q, 0) / q.numel()
    runs = eg_code_length(q, "auto", runs=True) / q.numel()
    assert h < 0.5 and runs < plain
    assert h / runs > 0.9


def test_empty_and_single():
    for k, runs in MODES:
        s = roundtrip(torch.zeros(0, dtype=torch.int32), k, runs)
        assert s.nbits == 0 and s.nchunks == 0
        roundtrip(torch.tensor([MAX_ABS]), k, runs)
        roundtrip(torch.tensor([-MAX_ABS]), k, runs)
        roundtrip(torch.tensor([0]), k, runs)
    assert empirical_entropy(torch.zeros(0, dtype=torch.int32)) == 0.0


def test_parallel_matches_serial():
    q = quantize(gg_sample(0.8, 1.0, 100_000, seed=9), 0.2).numpy()
    for runs, k0, k1 in ((False, -1, 0), (True, -1, -1), (False, 3, 0), (True, 2, 1)):
        a = cpu_kernels.encode(q, 1000, runs, (k0, k1, k1), parallel=False)
        b = cpu_kernels.encode(q, 1000, runs, (k0, k1, k1), parallel=True)
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
        out = cpu_kernels.decode(a[0], q.size, 1000, runs, a[1], a[2], parallel=True)
        assert np.array_equal(out, q)


def test_too_wide_values_raise():
    for bad in (MAX_ABS + 1, -MAX_ABS - 1, 2**31 - 1, -(2**31), 2**40):
        q = torch.tensor([0, bad], dtype=torch.int64)
        for k, runs in (("auto", False), (0, True), (3, False)):
            with pytest.raises(ValueError, match="supported range"):
                eg_encode(q, k, runs)
            with pytest.raises(ValueError, match="supported range"):
                eg_code_length(q, k, runs)
            if -(2**31) <= bad < 2**31:
                with pytest.raises(ValueError, match="supported range"):
                    eg_encode(q.to(torch.int32), k, runs)


def test_bad_arguments():
    q = torch.zeros(4, dtype=torch.int32)
    for k in (-1, 32, 1.5, "best", True, None):
        with pytest.raises(ValueError, match="k must be"):
            eg_encode(q, k)
    with pytest.raises(ValueError, match="k must be"):
        eg_encode(q, (1, 2, 32), runs=True)
    with pytest.raises(ValueError, match="k must be"):
        eg_encode(q, (1, 2, 3))  # triples only in run mode
    with pytest.raises(ValueError, match="integer tensor"):
        eg_encode(torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        eg_encode(q, chunk_size=0)


def test_quantize():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.49, 3.0])
    assert quantize(x, 1.0).tolist() == [0, 2, 2, 0, -1, 3]  # half to even, as torch.round
    assert quantize(x.to(torch.bfloat16), torch.tensor(0.5)).dtype == torch.int32
    y = dequantize(quantize(x, 0.25), 0.25, torch.float64)
    assert y.dtype == torch.float64 and torch.allclose(y, x.double(), atol=0.125)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="non-finite"):
            quantize(torch.tensor([0.0, bad]), 1.0)
    with pytest.raises(ValueError, match="supported"):
        quantize(torch.tensor([2.0**31]), 1.0)
    for step in (0.0, -1.0, float("nan"), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="step"):
            quantize(x, step)
    assert quantize(torch.zeros(0), 1.0).numel() == 0


def test_empirical_entropy():
    assert empirical_entropy(torch.tensor([3, 3, 3])) == 0.0
    assert math.isclose(empirical_entropy(torch.tensor([0, 1, 2, 3] * 5)), 2.0)
    assert math.isclose(empirical_entropy(torch.tensor([-(2**40), 2**40])), 1.0)


def _good_stream() -> EGStream:
    q = quantize(gg_sample(0.8, 1.0, 3000, seed=1), 0.3)
    return eg_encode(q, "auto", runs=True, chunk_size=500)


def _with_crc(b: bytearray) -> bytes:
    b[40:44] = b"\0\0\0\0"
    b[40:44] = struct.pack("<I", zlib.crc32(bytes(b)))
    return bytes(b)


def test_corrupt_bytes_raise():
    b = _good_stream().to_bytes()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(b), 40, replace=False):
        bad = bytearray(b)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            EGStream.from_bytes(bytes(bad))
    for cut in (0, 10, 47, 48, 60, len(b) - 1):
        with pytest.raises(ValueError, match="truncated"):
            EGStream.from_bytes(b[:cut])
    with pytest.raises(ValueError, match="trailing"):
        EGStream.from_bytes(b + b"\0")
    bad = bytearray(b)
    bad[:4] = b"XXXX"
    with pytest.raises(ValueError, match="magic"):
        EGStream.from_bytes(_with_crc(bad))
    bad = bytearray(b)
    bad[4] = 9
    with pytest.raises(ValueError, match="version"):
        EGStream.from_bytes(_with_crc(bad))
    for numel in (2999, 3001, 2500):  # wrong numel with a valid checksum
        bad = bytearray(b)
        bad[8:16] = struct.pack("<Q", numel)
        with pytest.raises(ValueError, match=r"mismatch|chunk"):
            eg_decode(EGStream.from_bytes(_with_crc(bad)))


def test_corrupt_header_with_valid_checksum():
    """Header and table corruption that the CRC cannot see (recomputed) raises ValueError or
    decodes: never another exception, a crash or a hang."""
    s = _good_stream()
    b = s.to_bytes()
    rng = np.random.default_rng(2)
    raised = 0
    for _ in range(200):
        bad = bytearray(b)
        for i in rng.integers(4, 48 + 7 * s.nchunks, int(rng.integers(1, 3))):
            if 40 <= i < 44:
                continue
            bad[int(i)] ^= 1 << int(rng.integers(8))
        try:
            out = eg_decode(EGStream.from_bytes(_with_crc(bad)))
            assert out.dtype == torch.int32
        except ValueError:
            raised += 1
    assert raised > 150


def test_corrupt_payload_never_crashes():
    """Without a checksum, random corruption raises ValueError or decodes to the right size."""
    s = _good_stream()
    good = eg_decode(s)
    rng = np.random.default_rng(1)
    raised = 0
    for trial in range(300):
        data = s.data.clone()
        for i in rng.integers(0, data.numel(), int(rng.integers(1, 4))):
            data[int(i)] = int(rng.integers(256)) if trial % 2 else 0
        bad = EGStream(**{**s.__dict__, "data": data})
        try:
            out = eg_decode(bad)
            assert out.shape == good.shape
        except ValueError:
            raised += 1
    assert raised > 150  # most corruption is caught by lengths, prefixes, runs and padding
    t = s.to_tensor(checksum=False)
    t[48 + 7 * s.nchunks :] = 255  # payload all ones: codes run past every chunk end
    with pytest.raises(ValueError):
        eg_decode(EGStream.from_tensor(t))


def test_mismatched_stream_fields():
    s = _good_stream()
    with pytest.raises(ValueError, match="chunks"):
        eg_decode(EGStream(**{**s.__dict__, "numel": 2000}))
    with pytest.raises(ValueError, match="payload"):
        eg_decode(EGStream(**{**s.__dict__, "data": s.data[:-1]}))
    with pytest.raises(ValueError, match="bits"):
        eg_decode(EGStream(**{**s.__dict__, "nbits": s.nbits + 1}))
    bits = s.chunk_bits.clone()
    bits[0] += 1
    bits[1] -= 1
    with pytest.raises(ValueError):
        eg_decode(EGStream(**{**s.__dict__, "chunk_bits": bits}))
    orders = s.orders.clone()
    orders[0, 0] = 40
    with pytest.raises(ValueError, match="order"):
        eg_decode(EGStream(**{**s.__dict__, "orders": orders}))
    plain = eg_encode(torch.arange(100), 3, chunk_size=50)
    for k in (0, 2, 4, 9):
        orders = plain.orders.clone()
        orders[:, 0] = k
        with pytest.raises(ValueError):
            eg_decode(EGStream(**{**plain.__dict__, "orders": orders}))


def test_decode_without_validation():
    """validate=False (in-memory streams) decodes the same; the kernels still catch bad sizes."""
    q = torch.randint(-40, 41, (5000,), dtype=torch.int32)
    for k, runs in ((0, False), ("auto", False), ("auto", True)):
        s = eg_encode(q, k, runs, chunk_size=1024)
        assert torch.equal(eg_decode(s, validate=False), q)
    s = eg_encode(q, 0, chunk_size=1024)
    with pytest.raises(ValueError, match="payload"):
        eg_decode(EGStream(**{**s.__dict__, "data": s.data[:-1]}), validate=False)


def _zero_run_stream(chunk_log2: int, nchunks: int, crc: bool = True) -> bytes:
    """A valid run-mode stream of ``nchunks`` all-zero chunks of 2^chunk_log2 elements, each coded
    as one zero run with order kr = chunk_log2 (26 bits: a 0, then 1 and chunk_log2 + 1 zeros):
    11 bytes per chunk for 2^chunk_log2 elements, written by hand (the encoder would need the
    whole tensor in memory)."""
    from ggspeed.codec.stream import write_head

    chunk = 1 << chunk_log2
    bits = np.full(nchunks, chunk_log2 + 3, np.int64)
    orders = np.zeros((nchunks, 3), np.uint8)
    orders[:, 0] = chunk_log2
    code = int("01" + "0" * (chunk_log2 + 1), 2) << (8 * 4 - (chunk_log2 + 3))
    payload = np.tile(np.frombuffer(code.to_bytes(4, "big"), np.uint8)[: -(-bits[0] // 8)], nchunks)
    buf = np.zeros(48 + 7 * nchunks + payload.size, np.uint8)
    size = write_head(
        buf, chunk * nchunks, (chunk_log2, 0, 0), True, chunk, bits, orders, payload.size
    )
    buf[size - payload.size :] = payload
    if crc:
        buf[5] |= 4  # the checksum flag
    b = bytearray(buf.tobytes())
    return _with_crc(b) if crc else bytes(b)


def test_decode_bound_refuses_tiny_streams_of_huge_tensors():
    """No stream makes the decoder allocate more than its byte length allows: 136 bytes coding
    2^26 elements (256 MiB) and 11 KB coding 2^33 (32 GiB, MemoryError before the bound) are
    refused with ValueError before any allocation, unless the caller expects that size."""
    b = _zero_run_stream(23, 8)
    assert len(b) == 136
    s = EGStream.from_bytes(b)
    assert s.numel == 1 << 26
    with pytest.raises(ValueError, match="bound"):
        eg_decode(s)
    with pytest.raises(ValueError, match="bound"):
        eg_decode(s, validate=False)
    with pytest.raises(ValueError, match="expected 1000"):
        eg_decode(s, expected=1000)
    with pytest.raises(ValueError, match="max_elements"):
        eg_decode(s, max_elements=(1 << 26) - 1)
    big = EGStream.from_bytes(_zero_run_stream(23, 1024))
    assert big.nbytes < 11_500 and big.numel == 1 << 33
    for kwargs in ({}, {"validate": False}, {"backend": "triton"}, {"max_elements": 1 << 20}):
        with pytest.raises(ValueError, match="bound"):
            eg_decode(big, **kwargs)


def test_decode_bound_accepts_expected_size():
    """An all-zero chunk of 2^20 elements codes in 23 bits: a legitimate stream above the default
    ratio, which decodes when the caller states its size."""
    q = torch.zeros(1 << 20, dtype=torch.int32)
    s = eg_encode(q, "auto", runs=True, chunk_size=1 << 20)
    assert s.numel > codec_stream.MAX_ELEMENTS_PER_BYTE * s.nbytes
    with pytest.raises(ValueError, match="bound"):
        eg_decode(s)
    assert torch.equal(eg_decode(s, expected=q.numel()), q)
    assert torch.equal(eg_decode(s, max_elements=q.numel()), q)
    back = EGStream.from_bytes(s.to_bytes())
    assert torch.equal(eg_decode(back, expected=q.numel(), require_crc=True), q)
    # streams at the default chunk size are never refused by the ratio, even all zeros
    for n in (1, 16384, 5 * 16384 + 3):
        z = torch.zeros(n, dtype=torch.int32)
        assert torch.equal(eg_decode(eg_encode(z, "auto", runs=True)), z)
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="expected"):
            eg_decode(s, expected=bad)
        with pytest.raises(ValueError, match="max_elements"):
            eg_decode(s, max_elements=bad)


def test_inconsistent_stream_refused_without_validation():
    """validate=False still checks the O(1) facts that size the output: chunk count and size."""
    s = eg_encode(torch.arange(100), 3, chunk_size=50)
    with pytest.raises(ValueError, match="chunks"):
        eg_decode(EGStream(**{**s.__dict__, "numel": 150}), validate=False)
    with pytest.raises(ValueError, match="chunk_size"):
        eg_decode(EGStream(**{**s.__dict__, "chunk_size": 0}), validate=False)


def test_require_crc():
    """Clearing the checksum flag (one bit) turns the CRC off: require_crc refuses such streams,
    and with it every single-bit flip of a checksummed stream is refused."""
    s = _good_stream()
    b = s.to_bytes()
    good = eg_decode(s)
    assert torch.equal(eg_decode(EGStream.from_bytes(b, require_crc=True), require_crc=True), good)
    off = bytearray(b)
    off[5] &= ~4
    off[-5] ^= 0x10  # and a flipped payload bit, which nothing checks now
    EGStream.from_bytes(bytes(off))  # accepted without the requirement
    with pytest.raises(ValueError, match="checksum"):
        EGStream.from_bytes(bytes(off), require_crc=True)
    with pytest.raises(ValueError, match="checksum"):
        EGStream.from_tensor(torch.frombuffer(off, dtype=torch.uint8), require_crc=True)
    with pytest.raises(ValueError, match="checksum"):
        eg_decode(EGStream.from_bytes(bytes(off)), require_crc=True)
    with pytest.raises(ValueError, match="checksum"):
        eg_decode(s, require_crc=True)  # made in memory: no checksum was verified
    small = eg_encode(torch.tensor([0, 3, -1, 0, 0, 7, 1, 0]), "auto", runs=True).to_bytes()
    for i in range(8 * len(small)):
        bad = bytearray(small)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ValueError):
            EGStream.from_bytes(bytes(bad), require_crc=True)
