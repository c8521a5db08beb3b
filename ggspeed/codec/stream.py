"""EGStream: an Exp-Golomb coded integer tensor, and its self-describing byte format.

Bit format (identical for the numba and the Triton kernels):

* Values are cut into chunks of ``chunk_size`` elements (the last one shorter). Each chunk is
  coded on its own, MSB first, and starts on a byte boundary, so chunks encode and decode in
  parallel; the padding bits after a chunk are zero.
* Plain mode: every element is ``EG_k(u)``, ``u = zigzag(q)`` (2q - 1 for q > 0, else -2q), i.e.
  ``u + 2^k`` in binary preceded by ``bitlen(u + 2^k) - k - 1`` zeros. ``k`` is per chunk.
* Zero-run mode, per nonzero: ``EG_kr(zeros before it)``, a sign bit (1 = negative), then
  (only at the chunk's first nonzero and at the first nonzero after each ``|q| >= 2``)
  ``EG_kb(number of |q| == 1 nonzeros before the next |q| >= 2, or before the chunk's end)``,
  and for a ``|q| >= 2`` nonzero ``EG_kv(|q| - 2)``. Magnitude 1, by far the most frequent
  nonzero in sparse data, thus costs far below a bit. Zeros at the end of a chunk are one last
  run with nothing after it: the decoder knows the chunk's element count, so a run that reaches
  it ends the chunk. ``kr``, ``kb``, ``kv`` are per chunk.

Byte layout of ``to_bytes()`` / ``to_tensor()`` (little-endian integers), version 1:

    0   4s  magic b"GGEC"            24  u64 nbits (code bits, padding excluded)
    4   u8  version (1)              32  u64 payload bytes
    5   u8  flags: 1 runs, 2 auto,   40  u32 CRC-32 of the whole buffer with this field zeroed
            4 checksum present
    6   u8  k (kr in runs mode)      44  u8 kb, u8 kv (runs mode), u16 reserved (0)
    7   u8  reserved (0)             48  u32[nchunks] code bits of each chunk
    8   u64 numel                        u8[nchunks, 3] per-chunk orders (k, 0, 0 / kr, kb, kv)
    16  u32 chunk_size                   payload (chunks back to back, byte aligned)
    20  u32 nchunks
    (k, kb, kv: the orders asked for; 0 with "auto")

Decoding is bounded: the format lets a chunk of up to ``MAX_CHUNK`` zeros cost a few bytes, so a
stream of n bytes could otherwise ask for an output of ~2^20 * n elements. ``eg_decode`` refuses
a stream that codes more than ``MAX_ELEMENTS_PER_BYTE`` elements per byte of ``to_bytes()``
unless the caller states the size it expects (``expected=``) or its own cap (``max_elements=``),
which then bound the output instead.
The checksum flag is one header bit: ``require_crc=True`` (``from_bytes`` / ``from_tensor`` /
``eg_decode``) refuses a stream whose CRC-32 was not present and verified.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .cpu import MAX_K

MAGIC = b"GGEC"
VERSION = 1
HEADER = struct.Struct("<4sBBBBQIIQQIBBH")
HEADER_SIZE = HEADER.size  # 48
F_RUNS, F_AUTO, F_CRC = 1, 2, 4
MAX_CHUNK = 1 << 23  # keeps every chunk's bit count below 2^31 (stored as u32, read as i32)
MAX_ELEMENTS_PER_BYTE = 4096
"""Default decoding bound: elements per byte of the whole stream (16 KiB of int32 output per
byte). An all-zero chunk costs 7 table bytes and 3 payload bytes up to 2^15 elements, so every
stream with ``chunk_size <= 32768`` (the default is 16384) is within it whatever its values."""

assert HEADER_SIZE == 48
assert sys.byteorder == "little", "ggspeed.codec's byte format assumes a little-endian host"


@dataclass
class EGStream:
    """An Exp-Golomb coded integer tensor (see the module docstring for the format).

    ``data`` is the payload on the input's device; ``chunk_bits`` (int64) and ``orders``
    (uint8, (nchunks, 3)) live on the same device. ``k`` is what the caller asked for (an int,
    a (kr, kb, kv) triple in run mode, or "auto"); the orders actually used are in ``orders``.
    """

    data: torch.Tensor
    numel: int
    k: int | str | tuple[int, int, int]
    runs: bool
    nbits: int
    chunk_size: int
    chunk_bits: torch.Tensor
    orders: torch.Tensor
    crc_checked: bool = field(default=False, compare=False)
    """True when ``from_tensor`` / ``from_bytes`` verified the stream's CRC-32."""

    @property
    def nchunks(self) -> int:
        return int(self.chunk_bits.shape[0])

    @property
    def chunk_offsets(self) -> torch.Tensor:
        """Bit offset of each chunk's first code in ``data`` (chunks are byte aligned)."""
        nb = (self.chunk_bits + 7) // 8
        return (torch.cumsum(nb, 0) - nb) * 8

    @property
    def nbytes(self) -> int:
        """Size of ``to_bytes()``: what the stream costs on the wire."""
        return HEADER_SIZE + 7 * self.nchunks + int(self.data.numel())

    @property
    def bits_per_element(self) -> float:
        return self.nbits / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _header(self, crc: int, with_crc: bool) -> bytes:
        fields = _header_fields(
            self.numel, self.k, self.runs, self.chunk_size, self.nchunks, self.nbits,
            int(self.data.numel()), crc, with_crc,
        )  # fmt: skip
        return HEADER.pack(*fields)

    def to_tensor(self, checksum: bool | None = None) -> torch.Tensor:
        """The whole stream (header, tables, payload) as one uint8 tensor on the stream's device.

        Same bytes as ``to_bytes()``. ``checksum`` (default: only for CPU streams) adds a CRC-32;
        on CUDA it costs a device-to-host copy, so streams that never leave the GPU skip it.
        """
        dev = self.data.device
        if checksum is None:
            checksum = dev.type == "cpu"
        tables = [
            _bytes_of(self.chunk_bits.to(torch.int32)),
            self.orders.to(torch.uint8).reshape(-1),
            self.data,
        ]
        head = torch.frombuffer(bytearray(self._header(0, checksum)), dtype=torch.uint8)
        out = torch.cat([head.to(dev), *[t.to(dev) for t in tables]])
        if checksum:
            crc = zlib.crc32(out.cpu().numpy())
            out[40:44] = torch.tensor(list(struct.pack("<I", crc)), dtype=torch.uint8)
        return out

    def to_bytes(self) -> bytes:
        return self.to_tensor(checksum=True).cpu().numpy().tobytes()

    @classmethod
    def from_tensor(cls, buf: torch.Tensor, *, require_crc: bool = False) -> EGStream:
        """Parse ``to_tensor()`` output (any device); ValueError if it is not a valid stream, or
        with ``require_crc`` if it carries no checksum."""
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError("EGStream.from_tensor: expected a 1-D uint8 tensor")
        n = int(buf.numel())
        if n < HEADER_SIZE:
            raise ValueError(f"EG stream truncated: {n} bytes, the header alone is {HEADER_SIZE}")
        # CPU buffers are read through numpy: a received stream is parsed on every call of the
        # compressed all-reduce, where the fixed cost of a torch op on a tiny tensor adds up.
        host = buf.numpy() if buf.device.type == "cpu" else None
        head = host[:HEADER_SIZE] if host is not None else buf[:HEADER_SIZE].cpu().numpy()
        (magic, version, flags, k0, _, numel, chunk, nchunks, nbits, nload, crc, kb, kv, _) = (
            HEADER.unpack_from(head)
        )
        if magic != MAGIC:
            raise ValueError(f"not an EG stream: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"EG stream version {version} not supported (this reader: {VERSION})")
        if require_crc and not flags & F_CRC:
            raise ValueError(
                "EG stream carries no checksum (flag 4 clear), and require_crc=True asks for one"
            )
        expected = HEADER_SIZE + 7 * nchunks + nload
        if n < expected:
            raise ValueError(f"EG stream truncated: {n} bytes, header says {expected}")
        if n > expected:
            raise ValueError(f"EG stream has {n - expected} trailing bytes after its payload")
        if flags & F_CRC:
            host = buf.cpu().numpy()  # CRC over the bytes with the CRC field read as zeros
            if zlib.crc32(host[44:], zlib.crc32(bytes(4), zlib.crc32(host[:40]))) != crc:
                raise ValueError("EG stream checksum mismatch: the bytes are corrupted")
        if flags & ~(F_RUNS | F_AUTO | F_CRC):
            raise ValueError(f"EG stream has unknown flags {flags:#x}")
        runs = bool(flags & F_RUNS)
        k: int | str | tuple[int, int, int] = k0
        if flags & F_AUTO:
            k = "auto"
        elif runs:
            k = (k0, kb, kv)
        o = HEADER_SIZE
        if host is not None:
            bits = torch.from_numpy(host[o : o + 4 * nchunks].view("<i4").astype(np.int64))
        else:
            bits = buf[o : o + 4 * nchunks].clone().view(torch.int32).to(torch.int64)  # aligned
        o += 4 * nchunks
        orders = buf[o : o + 3 * nchunks].reshape(nchunks, 3)
        o += 3 * nchunks
        s = cls(
            data=buf[o:],
            numel=numel,
            k=k,
            runs=runs,
            nbits=nbits,
            chunk_size=chunk,
            chunk_bits=bits,
            orders=orders,
            crc_checked=bool(flags & F_CRC),
        )
        s.validate()
        return s

    @classmethod
    def from_bytes(
        cls, b: bytes | bytearray | memoryview, *, require_crc: bool = False
    ) -> EGStream:
        """Parse ``to_bytes()`` output; ValueError as ``from_tensor``."""
        if len(b) == 0:
            raise ValueError("EG stream truncated: 0 bytes")
        buf = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        return cls.from_tensor(buf, require_crc=require_crc)

    def check_shape(self) -> None:
        """The O(1) checks that size the decoder's output: chunk size and chunk count."""
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ValueError(f"EG stream chunk_size {self.chunk_size} not in [1, {MAX_CHUNK}]")
        want = -(-self.numel // self.chunk_size)
        if self.nchunks != want:
            raise ValueError(
                f"EG stream mismatch: {self.nchunks} chunks, but numel {self.numel} with "
                f"chunk_size {self.chunk_size} needs {want}"
            )

    def check_bound(self, expected: int | None = None, max_elements: int | None = None) -> None:
        """ValueError unless decoding this stream is within bounds: ``numel == expected`` if
        given, ``numel <= max_elements`` if given, and with neither at most
        ``MAX_ELEMENTS_PER_BYTE`` elements per byte of the stream (see the module docstring)."""
        expected = _count_arg("expected", expected)
        max_elements = _count_arg("max_elements", max_elements)
        if expected is not None and self.numel != expected:
            raise ValueError(f"EG stream codes {self.numel} elements, expected {expected}")
        if max_elements is not None and self.numel > max_elements:
            raise ValueError(
                f"EG stream codes {self.numel} elements, above the decoding bound "
                f"max_elements={max_elements}"
            )
        limit = MAX_ELEMENTS_PER_BYTE * self.nbytes
        if expected is None and max_elements is None and self.numel > limit:
            raise ValueError(
                f"EG stream codes {self.numel} elements in {self.nbytes} bytes, above the "
                f"decoding bound of {limit} (MAX_ELEMENTS_PER_BYTE = {MAX_ELEMENTS_PER_BYTE} "
                f"per byte); pass expected= or max_elements= to decode it"
            )

    def validate(self) -> None:
        """Check that header, tables and payload agree; ValueError naming what does not."""
        self.check_shape()
        if self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise ValueError("EG stream data must be a 1-D uint8 tensor")
        if tuple(self.orders.shape) != (self.nchunks, 3):
            raise ValueError(f"EG stream orders have shape {tuple(self.orders.shape)}")
        if self.nchunks == 0:
            if self.nbits or self.data.numel():
                raise ValueError("EG stream mismatch: empty tensor with a nonempty payload")
            return
        # numpy, not torch: these tables are small and checked on every received stream
        bits = self.chunk_bits.cpu().numpy().astype(np.int64, copy=False)
        orders = self.orders.cpu().numpy()
        sizes = np.full(self.nchunks, self.chunk_size, dtype=np.int64)
        sizes[-1] = self.numel - self.chunk_size * (self.nchunks - 1)
        lo = 1 if self.runs else sizes  # a zero run codes many elements
        hi = sizes * (190 if self.runs else 63)  # runs: <= 3 codes of <= 63 bits + sign
        if (bits < lo).any() or (bits > hi).any():
            raise ValueError("EG stream mismatch: a chunk's bit count is impossible for its size")
        if int(bits.sum()) != self.nbits:
            raise ValueError(
                f"EG stream mismatch: chunk bits sum to {int(bits.sum())}, header says {self.nbits}"
            )
        nload = int(((bits + 7) // 8).sum())
        if nload != self.data.numel():
            raise ValueError(
                f"EG stream mismatch: payload is {self.data.numel()} bytes, chunks need {nload}"
            )
        if (orders > MAX_K).any():
            raise ValueError(f"EG stream has an Exp-Golomb order above {MAX_K}")
        if not self.runs and (orders[:, 1:] != 0).any():
            raise ValueError("EG stream has run-mode orders in plain mode")


def _count_arg(name: str, v: int | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be None or an int >= 0, got {v!r}")
    return int(v)


def _header_fields(
    numel: int,
    k: int | str | tuple[int, int, int],
    runs: bool,
    chunk_size: int,
    nchunks: int,
    nbits: int,
    nload: int,
    crc: int,
    with_crc: bool,
) -> tuple:
    auto = k == "auto"
    flags = (F_RUNS if runs else 0) | (F_AUTO if auto else 0) | (F_CRC if with_crc else 0)
    if auto:
        ks = (0, 0, 0)
    elif isinstance(k, tuple):
        ks = tuple(int(v) for v in k)
    else:
        ks = (int(k), 0, 0)
    return (MAGIC, VERSION, flags, ks[0], 0, numel, chunk_size, nchunks, nbits, nload, crc,
            ks[1], ks[2], 0)  # fmt: skip


def head_size(nchunks: int) -> int:
    """Bytes before the payload: the header and the per-chunk tables."""
    return HEADER_SIZE + 7 * nchunks


def write_head(
    buf: np.ndarray,
    numel: int,
    k: int | str | tuple[int, int, int],
    runs: bool,
    chunk_size: int,
    chunk_bits: np.ndarray,
    orders: np.ndarray,
    nload: int,
) -> int:
    """Write a stream's header and tables (no checksum) at the start of ``buf`` (uint8); the
    caller's payload of ``nload`` bytes goes right after them. The same bytes as
    ``to_tensor(checksum=False)``, without building the stream first: a kernel can code straight
    into a send buffer. Returns the stream's size."""
    nch = chunk_bits.size
    fields = _header_fields(numel, k, runs, chunk_size, nch, int(chunk_bits.sum()), nload, 0, False)
    HEADER.pack_into(buf, 0, *fields)
    o = HEADER_SIZE
    buf[o : o + 4 * nch] = chunk_bits.astype("<i4").view(np.uint8)
    o += 4 * nch
    buf[o : o + 3 * nch] = orders.reshape(-1)
    return o + 3 * nch + nload


def stream_size(buf: np.ndarray) -> int:
    """The size a stream's header says it has (header, tables, payload), read from the first
    bytes of ``buf``; ValueError if they are not a stream header. The rest is checked by
    ``EGStream.from_tensor``."""
    if buf.size < HEADER_SIZE:
        raise ValueError(
            f"EG stream truncated: {buf.size} bytes, the header alone is {HEADER_SIZE}"
        )
    magic, _, _, _, _, _, _, nchunks, _, nload, *_ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError(f"not an EG stream: magic {magic!r}, expected {MAGIC!r}")
    return head_size(nchunks) + nload


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The little-endian bytes of an int tensor (empty tensors have no viewable strides)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8)
