"""Quantization and Exp-Golomb coding: numba kernels for CPU tensors, Triton for CUDA tensors.

    q = quantize(x, step)                      # int32, torch.round semantics
    s = eg_encode(q, k="auto", runs=True)      # EGStream; s.to_bytes(), s.to_tensor(), s.nbytes
    q2 = eg_decode(s)                          # int32, flat, == q.flatten()
    eg_code_length(q, k="auto", runs=True)     # == s.nbits, without encoding

Both backends write the same bytes (format: ``ggspeed/codec/stream.py``). ``codec.chunks`` gives
chunk-level access (code chunks into a caller's buffer, decode chunks and add) for fused passes.
"""

from __future__ import annotations

from . import chunks
from .api import (
    DEFAULT_CHUNK,
    eg_code_length,
    eg_decode,
    eg_encode,
)
from .cpu import MAX_ABS
from .quant import dequantize, empirical_entropy, quantize
from .stream import EGStream

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_ABS",
    "EGStream",
    "chunks",
    "dequantize",
    "eg_code_length",
    "eg_decode",
    "eg_encode",
    "empirical_entropy",
    "quantize",
]
