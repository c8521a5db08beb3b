"""ggspeed.codec's Triton backend against the numba one: byte-identical streams, decoding, errors.

No GPU here, so the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) on CPU
tensors. The variable must be set before triton is imported and must not leak into other tests,
so the checks run in a fresh subprocess (``_interpreter_checks`` below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _interpreter_checks() -> None:
    import numpy as np
    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from ggspeed.codec import MAX_ABS, EGStream, eg_code_length, eg_decode, eg_encode, quantize
    from tests.test_codec import MODES, gg_sample

    def same(a: EGStream, b: EGStream) -> None:
        assert a.nbits == b.nbits and a.numel == b.numel
        assert torch.equal(a.chunk_bits, b.chunk_bits), (a.chunk_bits, b.chunk_bits)
        assert torch.equal(a.orders, b.orders), (a.orders, b.orders)
        assert torch.equal(a.data, b.data)
        assert a.to_bytes() == b.to_bytes()

    rng = np.random.default_rng(0)
    edge = [
        np.zeros(0, np.int64),
        np.array([MAX_ABS]),
        np.array([-MAX_ABS, MAX_ABS, 0, 0, 1, -1, 2**29]),
        np.zeros(1000, np.int64),
        rng.integers(1, 5, 900) * rng.choice([-1, 1], 900),
        np.concatenate([np.zeros(300, np.int64), [3, -1, 1, 1, -7], np.zeros(50, np.int64), [1]]),
    ]
    inputs = [torch.from_numpy(a) for a in edge]
    for shape, step in ((0.5, 0.02), (1.0, 0.3), (2.0, 1.5), (1.0, 5.0)):
        inputs.append(quantize(gg_sample(shape, 1.0, 3000, seed=int(10 * shape)), step))
    encoded = 0
    for i, q in enumerate(inputs):
        for j, (k, runs) in enumerate(MODES):
            chunk = (7, 1000, 16384)[(i + j) % 3]
            a = eg_encode(q, k, runs, chunk_size=chunk)
            b = eg_encode(q, k, runs, chunk_size=chunk, backend="triton")
            same(a, b)
            n = eg_code_length(q, k, runs, chunk_size=chunk, backend="triton")
            assert n == a.nbits
            encoded += 1
    # Long inputs are planned in chunk-aligned slices: force several slices.
    from ggspeed.codec import triton_kernels

    triton_kernels.SLICE_ELEMS = 1000
    for k, runs in MODES[::2]:
        for q in inputs[-2:]:
            a = eg_encode(q, k, runs, chunk_size=300)
            same(a, eg_encode(q, k, runs, chunk_size=300, backend="triton"))
            assert eg_code_length(q, k, runs, chunk_size=300, backend="triton") == a.nbits
    triton_kernels.SLICE_ELEMS = 1 << 24
    # Decoding runs one interpreted instruction at a time: small inputs, every mode.
    small = [
        torch.tensor([0, 5, -3, 0, 0, 0, 1, -1, 1, MAX_ABS, -MAX_ABS, 0, 0, 2, 0, 0]),
        quantize(gg_sample(1.0, 1.0, 60, seed=1), 2.0),
    ]
    for q, modes in ((small[0], MODES), (small[1], MODES[::3])):
        for k, runs in modes:
            s = eg_encode(q, k, runs, chunk_size=24)
            out = eg_decode(s, backend="triton")
            assert torch.equal(out, q.flatten().to(torch.int32)), (k, runs, out, q)
    assert eg_decode(eg_encode(torch.zeros(0, dtype=torch.int32)), backend="triton").numel() == 0
    # Corruption is caught by the Triton decoder too.
    s = eg_encode(small[0], "auto", runs=True, chunk_size=8)
    for mutate in ("ones", "bits"):
        data, bits = s.data.clone(), s.chunk_bits.clone()
        if mutate == "ones":
            data[:] = 255
        else:
            bits[0] += 1
            bits[1] -= 1
        bad = EGStream(**{**s.__dict__, "data": data, "chunk_bits": bits})
        try:
            eg_decode(bad, backend="triton")
        except ValueError as e:
            assert "cannot decode" in str(e)
        else:
            raise AssertionError(f"corrupt stream ({mutate}) decoded without error")
    try:
        eg_encode(torch.tensor([0, MAX_ABS + 1]), backend="triton")
    except ValueError as e:
        assert "supported range" in str(e)
    else:
        raise AssertionError("out-of-range value encoded")
    assert "ggspeed.codec.triton_kernels" in sys.modules
    print(f"OK {encoded} encodes")


def test_triton_matches_numba_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = "import tests.test_codec_triton as t; t._interpreter_checks()"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout[-3000:] + r.stderr[-5000:]


def test_triton_kernels_compile_for_gpu():
    """The interpreter is laxer than the compiler: build the real kernels (PTX and cubin, sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ggspeed.codec import triton_kernels as tk

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # no floats here
    target = GPUTarget("cuda", 90, 32)
    put = ASTSource(
        fn=tk._put_codes_kernel,
        signature={"val_ptr": "*i64", "len_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*i32"}
        | {"n": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": 1024},
    )
    assert triton.compile(put, target=target).asm["cubin"]
    sig = {"data_ptr": "*u8", "out_ptr": "*i32", "start_ptr": "*i64", "bits_ptr": "*i64"}
    sig |= {"ord_ptr": "*u8", "err_ptr": "*i32", "n": "i64", "chunk": "i64", "RUNS": "constexpr"}
    for runs in (False, True):
        dec = ASTSource(fn=tk._decode_kernel, signature=sig, constexprs={"RUNS": runs})
        assert triton.compile(dec, target=target).asm["cubin"]
