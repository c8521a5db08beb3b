"""eg_encode / eg_decode / eg_code_length: argument checks and backend dispatch.

CPU tensors go to the numba kernels (``cpu.py``), CUDA tensors to the Triton kernels
(``triton_kernels.py``); ``backend=`` forces one (tests run Triton on CPU tensors under
``TRITON_INTERPRET=1``). Both share ``EGStream``'s chunk layout and write identical bytes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from . import cpu
from .cpu import MAX_ABS, MAX_K
from .stream import MAX_CHUNK, EGStream

DEFAULT_CHUNK = 16384
"""Elements per chunk: ~0.003 bit/element of table overhead, thousands of chunks per GPU bucket."""

Backend = Literal["numba", "triton"]
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _orders(k: int | str | tuple[int, ...], runs: bool) -> tuple[int, int, int]:
    """Map the caller's k to the kernels' three orders; -1 means 'the best for each chunk'."""
    if k == "auto":
        return (-1, -1, -1) if runs else (-1, 0, 0)
    if runs and isinstance(k, tuple) and len(k) == 3:
        ks = k
    elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        ks = (k, k, k) if runs else (k, 0, 0)
    else:
        allowed = "an int, 'auto' or a 3-tuple of ints" if runs else "an int or 'auto'"
        raise ValueError(f"k must be {allowed}, got {k!r}")
    for v in ks:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_K:
            raise ValueError(f"k must be an int in [0, {MAX_K}] (or 'auto'), got {k!r}")
    return int(ks[0]), int(ks[1]), int(ks[2])


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be an int, got {chunk_size!r}")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    return int(chunk_size)


def _flat_int32(q: torch.Tensor) -> torch.Tensor:
    """q flattened as contiguous int32; ValueError for non-integer or out-of-range values."""
    if not isinstance(q, torch.Tensor) or q.dtype not in _INT_DTYPES:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"eg_encode expects an integer tensor (int8..int64, uint8), got {got}")
    flat = q.reshape(-1)
    if flat.dtype == torch.int64 and flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -MAX_ABS or hi > MAX_ABS:
            raise ValueError(
                f"cannot encode: values in [{lo}, {hi}], the supported range is |q| <= {MAX_ABS}"
            )
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    return flat.contiguous()


def _backend(t: torch.Tensor, backend: Backend | None) -> Backend:
    if backend is None:
        return "triton" if t.is_cuda else "numba"
    if backend not in ("numba", "triton"):
        raise ValueError(f"backend must be 'numba' or 'triton', got {backend!r}")
    if backend == "numba" and t.device.type != "cpu":
        raise ValueError(f"the numba backend needs a CPU tensor, got device {t.device}")
    return backend


def eg_encode(
    q: torch.Tensor,
    k: int | str | tuple[int, int, int] = 0,
    runs: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    backend: Backend | None = None,
) -> EGStream:
    """Exp-Golomb code an integer tensor (any shape) into an EGStream on the same device.

    ``k``: an order in [0, 31], or "auto" (per chunk, the order giving the fewest bits). With
    ``runs=True`` zeros are coded as run lengths (see ``stream.py``); ``k`` is then one order for
    all three symbol kinds, a (zero run, ones run, big value) triple, or "auto" (each chosen per
    chunk).
    """
    ks = _orders(k, runs)
    chunk = _check_chunk(chunk_size)
    flat = _flat_int32(q)
    be = _backend(flat, backend)
    if be == "numba":
        data, bits, orders = cpu.encode(flat.numpy(), chunk, bool(runs), ks)
        data_t = torch.from_numpy(data)
        bits_t, orders_t = torch.from_numpy(bits), torch.from_numpy(orders)
        nbits = int(bits.sum())
    else:
        from . import triton_kernels

        data_t, bits_t, orders_t = triton_kernels.encode(flat, chunk, bool(runs), ks)
        nbits = int(bits_t.sum())
    kk: int | str | tuple[int, int, int] = "auto" if k == "auto" else ks if runs else ks[0]
    return EGStream(
        data=data_t,
        numel=int(flat.numel()),
        k=kk,
        runs=bool(runs),
        nbits=nbits,
        chunk_size=chunk,
        chunk_bits=bits_t,
        orders=orders_t,
    )


def eg_decode(
    stream: EGStream,
    *,
    backend: Backend | None = None,
    validate: bool = True,
    expected: int | None = None,
    max_elements: int | None = None,
    require_crc: bool = False,
) -> torch.Tensor:
    """The flat int32 tensor ``stream`` codes, on the stream's device; ValueError if corrupt.

    Bounded: nothing is allocated for a stream that codes other than ``expected`` elements (when
    given), more than ``max_elements`` (when given), or, with neither, more than
    ``stream.MAX_ELEMENTS_PER_BYTE`` elements per byte of the stream: a few bytes cannot ask for
    gigabytes. ``require_crc=True`` refuses a stream whose CRC-32 was not verified when it was
    parsed (``from_bytes`` / ``from_tensor``; a stream made in memory has none).

    ``validate=False`` skips ``EGStream.validate()`` (the header/table consistency checks, a few
    small host-side reductions per call) for a stream this process made with ``eg_encode`` and
    never exposed to outside bytes, e.g. an activation checkpoint held in memory. The output
    size is still checked (chunk size and count, the bound), the kernels still report malformed
    codes, and the numba path checks the payload size against the chunk table; streams from
    ``from_bytes`` / ``from_tensor`` are validated there already.
    """
    if not isinstance(stream, EGStream):
        raise ValueError(f"eg_decode expects an EGStream, got {type(stream).__name__}")
    if require_crc and not stream.crc_checked:
        raise ValueError(
            "EG stream has no verified checksum (none in its bytes, or not parsed from bytes), "
            "and require_crc=True asks for one"
        )
    stream.check_shape()
    stream.check_bound(expected, max_elements)
    if validate:
        stream.validate()
    be = _backend(stream.data, backend)
    if be == "numba":
        out = cpu.decode(
            stream.data.contiguous().numpy(),
            stream.numel,
            stream.chunk_size,
            stream.runs,
            stream.chunk_bits.cpu().to(torch.int64).numpy(),
            stream.orders.cpu().to(torch.uint8).contiguous().numpy(),
        )
        return torch.from_numpy(out)
    from . import triton_kernels

    return triton_kernels.decode(stream)


def eg_code_length(
    q: torch.Tensor,
    k: int | str | tuple[int, int, int] = 0,
    runs: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    backend: Backend | None = None,
) -> int:
    """Exactly ``eg_encode(q, k, runs, chunk_size=...).nbits``, computed without encoding."""
    ks = _orders(k, runs)
    chunk = _check_chunk(chunk_size)
    flat = _flat_int32(q)
    if _backend(flat, backend) == "numba":
        bits, _ = cpu.chunk_stats(flat.numpy(), chunk, bool(runs), ks)
        return int(bits.sum())
    from . import triton_kernels

    bits_t, _ = triton_kernels.chunk_stats(flat, chunk, bool(runs), ks)
    return int(bits_t.sum())
