"""Chunk-level access to the codec: code chunks into a caller's buffer, decode chunks and add.

``eg_encode`` / ``eg_decode`` take and give whole tensors. A caller that fuses coding with its
own passes (the GCT all-reduce quantizes a block and codes its chunks while the levels are still
in cache, and adds decoded levels straight into running sums) needs the steps in between:

* inside numba code: :func:`encode_chunk` (one chunk's codes at a byte offset of a buffer, the
  orders chosen as ``eg_encode`` would) and :func:`decode_chunk` (one chunk's levels into a
  scratch buffer);
* around them, in Python: :func:`write_stream_head` (the header and tables in front of a payload
  a kernel wrote, optionally sealed with the stream's CRC-32), :func:`read_stream` (parse and
  validate a received stream, optionally requiring the CRC), :func:`decode_add` (``q +=`` the
  levels of a stream, without materializing them on the CPU), and the sizes a buffer needs
  (:func:`code_bound`, :func:`stream_capacity`, :data:`PAD`).

The bytes are those of ``EGStream.to_tensor`` (format: ``stream.py``); tests compare them.
"""

from __future__ import annotations

import struct
import zlib

import numba
import numpy as np
import torch

from . import cpu as _cpu
from .api import DEFAULT_CHUNK, _orders, eg_decode
from .stream import F_CRC, EGStream, head_size, stream_size, write_head

__all__ = [
    "DEFAULT_CHUNK",
    "PAD",
    "chunk_starts",
    "code_bound",
    "decode_add",
    "decode_chunk",
    "encode_chunk",
    "error_message",
    "has_checksum",
    "kernel_orders",
    "read_stream",
    "stream_capacity",
    "stream_k",
    "stream_size",
    "write_stream_head",
]

PAD = _cpu.PAD
"""Readable zero bytes a decoder needs after a payload (it reads whole words ahead)."""

# Worst case of one element's codes (runs mode: run + sign + ones count + value, each <= 63 bits)
MAX_CODE_BYTES = 24
_FLAGS_AT, _CRC_AT = 5, 40  # byte offsets of the header's flags and CRC-32 fields (stream.py)


def kernel_orders(k: int | str | tuple[int, int, int], runs: bool) -> tuple[int, int, int]:
    """The three orders the kernels take for the caller's ``k`` (-1: the best for each chunk);
    ValueError for an invalid ``k``."""
    return _orders(k, runs)


def stream_k(k: int | str | tuple[int, int, int], runs: bool) -> int | str | tuple[int, int, int]:
    """What a stream's header records as ``k`` for the caller's ``k`` (as ``eg_encode`` does)."""
    ks = _orders(k, runs)
    return "auto" if k == "auto" else ks if runs else ks[0]


def code_bound(n: int, streams: int = 1) -> int:
    """Bytes the CPU kernels may write when they code n levels as ``streams`` streams back to
    back: the worst case (numba does not check bounds), with room for each chunk's partial
    last word."""
    nwords = n // DEFAULT_CHUNK + streams + 1
    return MAX_CODE_BYTES * n + 8 * nwords + 64


def stream_capacity(n: int) -> int:
    """Bytes a whole stream of n levels may take: header, tables and the kernels' worst case."""
    return head_size(-(-n // DEFAULT_CHUNK)) + code_bound(n, 1)


@numba.njit(cache=True, inline="always")
def encode_chunk(q, lo, hi, runs, ko, out, p):
    """Code the levels q[lo:hi] (int32) as one chunk at byte p of ``out`` (uint8, large enough:
    ``code_bound``), with the orders ``ko`` (from ``kernel_orders``; -1: the best for this
    chunk). Returns (the byte after the chunk, its code bits, k0, k1, k2, error code); a
    nonzero error code (a level out of the codec's range) writes nothing."""
    if ko[0] < 0 or ko[1] < 0 or ko[2] < 0:
        if runs:
            k0, k1, k2, _, code = _cpu._chunk_stats_runs(q, lo, hi, ko[0], ko[1], ko[2])
        else:
            k0, _, code = _cpu._chunk_stats_plain(q, lo, hi, ko[0])
            k1 = 0
            k2 = 0
        if code != 0:
            return p, np.int64(0), k0, k1, k2, code
    else:
        k0, k1, k2 = ko[0], ko[1], ko[2]
    p, nbits = _cpu._encode_chunk(q, lo, hi, runs, k0, k1, k2, out, p)
    return p, nbits, k0, k1, k2, 0


@numba.njit(cache=True, inline="always")
def decode_chunk(data, start_byte, nbits, n, runs, k0, k1, k2, out):
    """Decode the chunk of n levels coded from byte ``start_byte`` of ``data`` (``nbits`` code
    bits; at least ``PAD`` readable bytes after the payload) into out[:n], which must be zero
    in runs mode. Returns an error code (0: fine; ``error_message`` says what else)."""
    return _cpu._decode_chunk(data, start_byte, nbits, 0, n, runs, k0, k1, k2, out)


def chunk_starts(bits: np.ndarray) -> np.ndarray:
    """Byte offset of each chunk in the payload, from the chunks' code bits."""
    return _cpu.chunk_starts(bits)


def error_message(code: int, chunk: int = -1) -> str:
    """What a kernel's error code means (``chunk``: where, -1 if unknown)."""
    return _cpu.error_message(code, chunk)


def write_stream_head(
    buf: np.ndarray,
    numel: int,
    k: int | str | tuple[int, int, int],
    runs: bool,
    chunk_bits: np.ndarray,
    orders: np.ndarray,
    nload: int,
    *,
    checksum: bool,
) -> int:
    """Write a stream's header and tables at the start of ``buf`` (uint8), in front of the
    ``nload``-byte payload a kernel coded at ``buf[head_size(nchunks):]``; with ``checksum``
    also the CRC-32 over the whole stream. The same bytes as ``EGStream.to_tensor(checksum)``.
    Returns the stream's size."""
    size = write_head(buf, numel, k, runs, DEFAULT_CHUNK, chunk_bits, orders, nload)
    if checksum:
        buf[_FLAGS_AT] |= F_CRC
        crc = zlib.crc32(buf[:size])  # over the bytes with the CRC field zero (write_head's)
        struct.pack_into("<I", buf, _CRC_AT, crc)
    return size


def has_checksum(buf: torch.Tensor | np.ndarray) -> bool:
    """Whether the stream header at the start of ``buf`` says a CRC-32 is present."""
    if buf.shape[0] <= _FLAGS_AT:
        return False
    return bool(int(buf[_FLAGS_AT]) & F_CRC)


def read_stream(buf: torch.Tensor, numel: int, *, require_checksum: bool = False) -> EGStream:
    """Parse and validate the stream that fills ``buf`` (checking its CRC-32 when present);
    ValueError if it is malformed, if it does not hold ``numel`` levels, or, with
    ``require_checksum``, if it carries no CRC (a flipped flag bit must not switch it off)."""
    head = buf if buf.device.type == "cpu" else buf[:8].cpu()  # the flags, not the stream
    if require_checksum and not has_checksum(head):
        raise ValueError("EG stream carries no checksum, and this reader requires one")
    stream = EGStream.from_tensor(buf)
    if stream.numel != numel:
        raise ValueError(f"EG stream holds {stream.numel} levels, expected {numel}")
    return stream


@numba.njit(cache=True, nogil=True)
def _decode_add(data, chunk, runs, bits, orders, starts, q):
    """q += the levels of every chunk, decoded through a chunk-sized scratch buffer."""
    n = q.size
    buf = np.zeros(chunk, np.int32)
    for c in range(bits.size):
        lo = c * chunk
        m = min(n, lo + chunk) - lo
        code = decode_chunk(
            data, starts[c], bits[c], m, runs, orders[c, 0], orders[c, 1], orders[c, 2], buf
        )
        if code != 0:
            return code, c
        for i in range(m):
            q[lo + i] += buf[i]
        buf[:m] = 0
    return 0, -1


def decode_add(stream: EGStream, q: torch.Tensor, padded: torch.Tensor | None = None) -> None:
    """``q += `` the levels ``stream`` codes (q: a flat int32 tensor of ``stream.numel``
    elements on the stream's device); ValueError if the codes are malformed.

    On the CPU the levels are decoded chunk by chunk into a cache-sized buffer and added, never
    materialized; ``padded``: the stream's payload followed by at least ``PAD`` readable bytes
    (e.g. the receive buffer it sits in), which saves a copy."""
    if q.numel() != stream.numel or q.dtype != torch.int32:
        raise ValueError(
            f"decode_add: q must be int32 with {stream.numel} elements, got {q.dtype} "
            f"with {q.numel()}"
        )
    if q.device.type != "cpu":
        q += eg_decode(stream, validate=False)
        return
    if padded is None:
        padded = torch.zeros(stream.data.numel() + PAD, dtype=torch.uint8)
        padded[: stream.data.numel()] = stream.data
    bits = stream.chunk_bits.numpy()
    code, c = _decode_add(
        padded.numpy(),
        stream.chunk_size,
        stream.runs,
        bits,
        stream.orders.contiguous().numpy(),
        chunk_starts(bits),
        q.numpy(),
    )
    if code != 0:
        raise ValueError(f"cannot decode: {error_message(code, c)}")
