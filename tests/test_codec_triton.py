"""ggspeed.codec's Triton backend against the numba one: byte-identical streams, decoding, errors.

Without a GPU the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) on CPU
tensors. The variable must be set before triton is imported and must not leak into other tests,
so those checks run in a fresh subprocess. ``tests/test_codec_cuda.py`` runs the same checks
(``triton_checks``) compiled, on CUDA tensors, where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TENSORS = ("data", "chunk_bits", "orders")


def triton_checks(device: str) -> int:
    """The Triton backend on ``device`` tensors against numba on CPU; returns the encodes compared."""
    import numpy as np
    import torch

    from ggspeed.codec import MAX_ABS, EGStream, eg_code_length, eg_decode, eg_encode, quantize
    from tests.test_codec import MODES, gg_sample

    def same(a: EGStream, b: EGStream) -> None:
        assert b.data.device.type == torch.device(device).type
        b = EGStream(**{**b.__dict__, **{f: getattr(b, f).cpu() for f in _TENSORS}})
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
            if chunk == 7 and q.numel() > 1000:
                chunk = 77  # still tiny and odd; fewer programs for the interpreter to run
            a = eg_encode(q, k, runs, chunk_size=chunk)
            b = eg_encode(q.to(device), k, runs, chunk_size=chunk, backend="triton")
            same(a, b)
            n = eg_code_length(q.to(device), k, runs, chunk_size=chunk, backend="triton")
            assert n == a.nbits
            encoded += 1
    # Zero-run inputs with many nonzeros are planned in chunk-aligned slices: force several.
    from ggspeed.codec import triton_kernels

    slice_elems, triton_kernels.SLICE_ELEMS = triton_kernels.SLICE_ELEMS, 100
    for k, runs in [m for m in MODES if m[1]]:
        for q in inputs[-2:]:
            a = eg_encode(q, k, runs, chunk_size=300)
            qd = q.to(device)
            assert len(triton_kernels._slices(qd.to(torch.int32), 300)) > 1
            same(a, eg_encode(qd, k, runs, chunk_size=300, backend="triton"))
            assert eg_code_length(qd, k, runs, chunk_size=300, backend="triton") == a.nbits
    triton_kernels.SLICE_ELEMS = slice_elems
    # Decoding runs one interpreted instruction at a time: small inputs, every mode.
    small = [
        torch.tensor([0, 5, -3, 0, 0, 0, 1, -1, 1, MAX_ABS, -MAX_ABS, 0, 0, 2, 0, 0]),
        quantize(gg_sample(1.0, 1.0, 60, seed=1), 2.0),
    ]
    for q, modes in ((small[0], MODES), (small[1], MODES[::3])):
        for k, runs in modes:
            s = eg_encode(q.to(device), k, runs, chunk_size=24, backend="triton")
            out = eg_decode(s, backend="triton")
            assert out.device.type == torch.device(device).type
            assert torch.equal(out.cpu(), q.flatten().to(torch.int32)), (k, runs, out, q)
    empty = eg_encode(torch.zeros(0, dtype=torch.int32, device=device), backend="triton")
    assert eg_decode(empty, backend="triton").numel() == 0
    # Corruption is caught by the Triton decoders too (both modes).
    for runs in (True, False):
        s = eg_encode(small[0].to(device), "auto", runs=runs, chunk_size=8, backend="triton")
        for mutate in ("ones", "bits", "pad"):
            data, bits = s.data.clone(), s.chunk_bits.clone()
            if mutate == "ones":
                data[:] = 255
            elif mutate == "bits":
                bits[0] += 1
                bits[1] -= 1
            else:  # a one in the padding after the last code
                if int(s.nbits) % 8 == 0:
                    continue
                data[-1] |= 1
            bad = EGStream(**{**s.__dict__, "data": data, "chunk_bits": bits})
            try:
                eg_decode(bad, backend="triton")
            except ValueError as e:
                assert "cannot decode" in str(e)
            else:
                raise AssertionError(f"corrupt stream ({mutate}, runs={runs}) decoded")
    try:
        eg_encode(torch.tensor([0, MAX_ABS + 1], device=device), backend="triton")
    except ValueError as e:
        assert "supported range" in str(e)
    else:
        raise AssertionError("out-of-range value encoded")
    assert "ggspeed.codec.triton_kernels" in sys.modules
    return encoded


def _interpreter_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(f"OK {triton_checks('cpu')} encodes")


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
    sig |= {"ord_ptr": "*u8", "err_ptr": "*i32", "n": "i64", "chunk": "i64"}
    dec = ASTSource(fn=tk._decode_runs_kernel, signature=sig, constexprs={})
    assert triton.compile(dec, target=target).asm["cubin"]
    sig = {"words_ptr": "*i32"} | {k: v for k, v in sig.items() if k != "data_ptr"}
    sig |= {"nchunks": "i64", "LANES": "constexpr"}
    dec = ASTSource(fn=tk._decode_plain_kernel, signature=sig, constexprs={"LANES": 32})
    assert triton.compile(dec, target=target).asm["cubin"]
    q = {"q_ptr": "*i32"}
    sig = q | {"bits_ptr": "*i64", "ord_ptr": "*u8", "n": "i64", "chunk": "i64", "k_fixed": "i32"}
    sig |= {"BLOCK": "constexpr"}
    stats = ASTSource(fn=tk._plain_stats_kernel, signature=sig, constexprs={"BLOCK": 1024})
    assert triton.compile(stats, target=target).asm["cubin"]
    sig = q | {"start_ptr": "*i64", "ord_ptr": "*u8", "out_ptr": "*i32", "n": "i64"}
    sig |= {"chunk": "i64", "BLOCK": "constexpr"}
    write = ASTSource(fn=tk._plain_write_kernel, signature=sig, constexprs={"BLOCK": 1024})
    assert triton.compile(write, target=target).asm["cubin"]
