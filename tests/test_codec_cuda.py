"""The compiled Triton codec on a CUDA device: the same bytes as the numba kernels, at scale too.

Skipped without a GPU (CI has none); run where one is lent (``tools/gpu_checks.sh``). The
small-input checks are the interpreter suite's (``tests/test_codec_triton.py``) on CUDA tensors;
the large inputs add what the interpreter cannot afford: millions of codes ORed by many blocks
at once, and a zero-run input planned in several slices.
"""

from __future__ import annotations

import pytest
import torch

from ggspeed import codec
from ggspeed.codec import triton_kernels
from tests.test_codec import gg_sample
from tests.test_codec_triton import triton_checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_small_inputs_match_numba_on_cuda() -> None:
    assert triton_checks("cuda") > 0


@pytest.mark.parametrize(
    ("shape", "step", "k", "runs"),
    [(0.5, 0.05, "auto", False), (1.0, 0.3, "auto", False), (1.0, 4.0, "auto", True)],
)
def test_large_inputs_match_numba_on_cuda(
    shape: float, step: float, k: str, runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = (1 << 24) + 123_457  # a short last chunk
    q = codec.quantize(gg_sample(shape, 1.0, n, seed=7), step)
    if runs:  # several planning slices
        monkeypatch.setattr(triton_kernels, "SLICE_ELEMS", 1 << 16)
        assert len(triton_kernels._slices(q.cuda().to(torch.int32), codec.DEFAULT_CHUNK)) > 1
    ref = codec.eg_encode(q, k, runs)
    s = codec.eg_encode(q.cuda(), k, runs)  # a CUDA tensor dispatches to Triton
    assert s.data.is_cuda and s.nbits == ref.nbits
    assert torch.equal(s.chunk_bits.cpu(), ref.chunk_bits)
    assert torch.equal(s.orders.cpu(), ref.orders)
    assert torch.equal(s.data.cpu(), ref.data)
    assert codec.eg_code_length(q.cuda(), k, runs) == ref.nbits
    out = codec.eg_decode(s)
    assert out.is_cuda and torch.equal(out.cpu(), q.to(torch.int32))
    # a stream coded on the GPU decodes on the CPU and the other way round
    assert torch.equal(codec.eg_decode(codec.EGStream.from_bytes(s.to_bytes())), out.cpu())
    back = codec.EGStream.from_tensor(ref.to_tensor().cuda())
    assert torch.equal(codec.eg_decode(back).cpu(), out.cpu())
