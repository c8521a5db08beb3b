"""Fuzz the EG stream decoder: every mutated stream is refused with ValueError or decodes to what
the byte format says; nothing crashes, hangs or raises anything else.

Each input is a stream from a fixed corpus of small valid streams (every coding mode, with and
without a checksum) after one mutation: bit flips with the CRC kept or recomputed, byte and
header-field rewrites, chunk-table edits (with and without the header sums fixed up), payload
rewrites, truncations, extensions, chunk swaps, mode flips. The first inputs are exhaustive:
every single-bit flip (CRC kept and recomputed) and every truncation of the corpus's small
streams; the rest are random, input ``i`` drawn from ``numpy.random.default_rng((seed, i))``, so
any input can be rebuilt from its index.

Each input goes through ``EGStream.from_bytes`` and ``eg_decode`` (numba backend, default
bound) and through ``reference_decode``, a plain-Python reading of the format written from
``ggspeed/codec/stream.py``'s description; the two must agree. Outcomes:

* ``refused``: both raise (ValueError / ``Invalid``);
* ``equal``: both decode, to the values the unmutated stream codes;
* ``as_specified``: both decode, to the same other values (a mutated stream that is still
  valid, e.g. two chunks swapped);
* failures, each input saved under ``OUT/failures/``: ``disagree`` (one refuses, or the values
  differ), ``exception`` (anything but ValueError), ``crc_miss`` (with ``require_crc=True`` a
  changed stream whose CRC was kept was accepted), ``crash`` (the worker died: segfault,
  abort), ``hang`` (no progress for ``--hang-seconds``).

Inputs run in batches, each in a fresh worker subprocess that records the index it is on in a
small shared file; the parent watches it, so a crash or hang names its input, which is saved,
and the batch resumes after it.

    python tools/fuzz_codec.py --inputs 1000000 --out build/fuzz     # the long run
    python tools/fuzz_codec.py --inputs 2000 --batch 1000              # a quick one

Exit status 1 when any failure was seen. ``--inject crash:I`` / ``hang:I`` makes the worker
segfault / sleep at input I: a check that the harness catches both.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The byte format, restated here (not imported) so that the reference is an independent reading.
_HEADER = struct.Struct("<4sBBBBQIIQQIBBH")
_MAGIC, _VERSION = b"GGEC", 1
_F_RUNS, _F_AUTO, _F_CRC = 1, 2, 4
_MAX_CHUNK = 1 << 23
_MAX_K = 31
_MAX_ABS = (1 << 30) - 1
_MAX_U = 2 * _MAX_ABS
_PER_BYTE = 4096  # the decoder's default bound, elements per stream byte
_CRC = slice(40, 44)

FAILURES = ("disagree", "exception", "crc_miss", "crash", "hang")
SMALL = 96  # streams up to this many bytes get every bit flip and every truncation


class Invalid(ValueError):
    """The reference decoder's verdict: not a valid stream (or above the decoding bound)."""


def _code(bits: str, pos: int, end: int, k: int) -> tuple[int, int]:
    """(u, position after the code) of the EG_k code at ``pos``: z zeros, then z + k + 1 bits
    holding u + 2^k. Invalid if the code does not end by ``end`` or u > MAX_U."""
    one = bits.find("1", pos, end)
    if one < 0:
        raise Invalid("code runs past its chunk")
    z = one - pos
    stop = one + z + k + 1
    if stop > end:
        raise Invalid("code runs past its chunk")
    u = int(bits[one:stop], 2) - (1 << k)
    if u > _MAX_U:
        raise Invalid("value out of range")
    return u, stop


def _plain_chunk(bits: str, end: int, size: int, k: int) -> list[int]:
    out, pos = [], 0
    for _ in range(size):
        u, pos = _code(bits, pos, end, k)
        out.append((u + 1) // 2 if u & 1 else -(u // 2))
    if pos != end:
        raise Invalid("chunk does not end at its recorded length")
    return out


def _runs_chunk(bits: str, end: int, size: int, kr: int, kb: int, kv: int) -> list[int]:
    out = [0] * size
    i, pos, ones = 0, 0, -1  # ones: |q| == 1 values left before the next |q| >= 2; -1: read one
    while i < size:
        run, pos = _code(bits, pos, end, kr)
        if run > size - i:
            raise Invalid("zero run past the chunk")
        i += run
        if i == size:
            break
        if pos >= end:
            raise Invalid("sign bit past the chunk")
        neg = bits[pos] == "1"
        pos += 1
        if ones < 0:
            ones, pos = _code(bits, pos, end, kb)
            if ones > size - i:
                raise Invalid("ones count past the chunk")
        if ones > 0:
            m = 1
            ones -= 1
        else:
            v, pos = _code(bits, pos, end, kv)
            if v > _MAX_ABS - 2:
                raise Invalid("value out of range")
            m = v + 2
            ones = -1
        out[i] = -m if neg else m
        i += 1
    if ones > 0:
        raise Invalid("ones count past the chunk")
    if pos != end:
        raise Invalid("chunk does not end at its recorded length")
    return out


def reference_decode(b: bytes, require_crc: bool = False) -> list[int]:
    """The values stream ``b`` codes, read by the letter of the format; Invalid if it is not a
    valid stream, codes more than the default bound's elements, or (``require_crc``) has no
    CRC-32."""
    if len(b) < _HEADER.size:
        raise Invalid("truncated header")
    magic, version, flags, _, _, numel, chunk, nchunks, nbits, nload, crc, _, _, _ = (
        _HEADER.unpack_from(b)
    )  # the header's orders are what was asked for; the table's are used
    if magic != _MAGIC or version != _VERSION:
        raise Invalid("magic or version")
    if require_crc and not flags & _F_CRC:
        raise Invalid("no checksum")
    if len(b) != _HEADER.size + 7 * nchunks + nload:
        raise Invalid("length does not match the header")
    if flags & _F_CRC and zlib.crc32(b[:40] + bytes(4) + b[44:]) != crc:
        raise Invalid("checksum")
    if flags & ~(_F_RUNS | _F_AUTO | _F_CRC):
        raise Invalid("unknown flags")
    if not 1 <= chunk <= _MAX_CHUNK or nchunks != -(-numel // chunk):
        raise Invalid("chunk size or count")
    if numel > _PER_BYTE * len(b):
        raise Invalid("above the decoding bound")
    runs = bool(flags & _F_RUNS)
    o = _HEADER.size
    cbits = struct.unpack_from(f"<{nchunks}I", b, o)
    orders = b[o + 4 * nchunks : o + 7 * nchunks]
    payload = b[o + 7 * nchunks :]
    if sum(cbits) != nbits or sum((x + 7) // 8 for x in cbits) != nload:
        raise Invalid("chunk table does not match the header")
    if max(orders, default=0) > _MAX_K:
        raise Invalid("order above 31")
    out: list[int] = []
    start = 0
    for c in range(nchunks):
        nb = (cbits[c] + 7) // 8
        seg = payload[start : start + nb]
        start += nb
        bits = bin(int.from_bytes(b"\1" + seg, "big"))[3:]  # leading 1 keeps the zeros
        if "1" in bits[cbits[c] :]:
            raise Invalid("nonzero padding")
        size = min(chunk, numel - c * chunk)
        ok = orders[3 * c : 3 * c + 3]
        if runs:
            out += _runs_chunk(bits, cbits[c], size, ok[0], ok[1], ok[2])
        else:
            if ok[1] or ok[2]:
                raise Invalid("run-mode orders in plain mode")
            out += _plain_chunk(bits, cbits[c], size, ok[0])
    return out


def _with_crc(b: bytearray) -> bytearray:
    """``b`` with its CRC field recomputed (if its flags ask for one)."""
    if len(b) >= 44 and b[5] & _F_CRC:
        b[_CRC] = bytes(4)
        b[_CRC] = struct.pack("<I", zlib.crc32(b))
    return b


# ---------------------------------------------------------------- corpus


@dataclass
class Base:
    data: bytes
    values: np.ndarray  # int64
    numel: int
    chunk: int
    nchunks: int


def corpus() -> list[Base]:
    """Small valid streams: every mode and order kind, several chunk sizes, with and without a
    checksum; fixed (independent of the fuzzing seed)."""
    import torch

    from ggspeed.codec import eg_encode

    rng = np.random.default_rng(1234)
    arrays = [
        np.zeros(0, np.int64),
        np.array([0]),
        np.array([_MAX_ABS, -_MAX_ABS, 0, 1, -1]),
        np.array([0, 3, -1, 0, 0, 7, 1, 0]),
        np.zeros(40, np.int64),
        rng.integers(-3, 4, 30),
        np.round(rng.standard_normal(64) * 0.6).astype(np.int64),  # sparse
        np.round(rng.laplace(0, 20, 50)).astype(np.int64),
        rng.integers(-_MAX_ABS, _MAX_ABS + 1, 12),
        np.where(rng.random(200) < 0.08, rng.integers(-5, 6, 200), 0),
    ]
    modes = [(0, False), (3, False), ("auto", False), (0, True), ((5, 0, 12), True), ("auto", True)]
    chunks = [1, 3, 16, 16384]
    out = []
    for j, a in enumerate(arrays):
        for m, (k, runs) in enumerate(modes):
            chunk = chunks[(j + m) % len(chunks)]
            s = eg_encode(torch.from_numpy(a), k, runs, chunk_size=chunk)
            for crc in (True, False):
                data = s.to_tensor(checksum=crc).numpy().tobytes()
                out.append(Base(data, a.astype(np.int64), a.size, chunk, s.nchunks))
    return out


# ---------------------------------------------------------------- mutations


def _header(b: bytes | bytearray) -> tuple:
    return _HEADER.unpack_from(b)


_FIELDS = {  # name: (offset, struct code)
    "version": (4, "B"),
    "flags": (5, "B"),
    "k": (6, "B"),
    "reserved": (7, "B"),
    "numel": (8, "Q"),
    "chunk_size": (16, "I"),
    "nchunks": (20, "I"),
    "nbits": (24, "Q"),
    "nload": (32, "Q"),
    "kb": (44, "B"),
    "kv": (45, "B"),
    "reserved2": (46, "H"),
}


def _interesting(rng: np.random.Generator, old: int, width: int) -> int:
    top = (1 << (8 * width)) - 1
    cands = [
        0,
        1,
        2,
        7,
        8,
        31,
        32,
        63,
        64,
        255,
        old - 1,
        old + 1,
        old + 8,
        old - 8,
        2 * old,
        old // 2,
        1 << 23,
        (1 << 23) + 1,
        1 << 31,
        top,
        int(rng.integers(0, 1 << 62)),
    ]
    return int(cands[int(rng.integers(len(cands)))]) & top


def _flip(rng, b: bytearray, avoid_crc: bool) -> None:
    for _ in range(int(rng.integers(1, 4))):
        while True:
            p = int(rng.integers(8 * len(b)))
            if not (avoid_crc and 320 <= p < 352):
                break
        b[p // 8] ^= 1 << (p % 8)


def m_flip_kept(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    _flip(rng, b, False)
    return b, True


def m_flip_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    _flip(rng, b, True)
    return _with_crc(b), False


def m_bytes_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    for _ in range(int(rng.integers(1, 5))):
        p = int(rng.integers(len(b)))
        if 40 <= p < 44:
            continue
        b[p] = int(rng.choice([0, 255, int(rng.integers(256)), (b[p] + 1) & 255]))
    return _with_crc(b), False


def m_header_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    name = list(_FIELDS)[int(rng.integers(len(_FIELDS)))]
    off, code = _FIELDS[name]
    width = struct.calcsize(code)
    (old,) = struct.unpack_from("<" + code, b, off)
    struct.pack_into("<" + code, b, off, _interesting(rng, old, width))
    return _with_crc(b), False


def m_table_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    """A chunk's bit count or order rewritten; half the time the header's nbits / nload (and the
    payload's length) follow, so that the stream reaches the kernels."""
    b = bytearray(base.data)
    n = base.nchunks
    c = int(rng.integers(n))
    bits_off = 48 + 4 * c
    if rng.random() < 0.5:
        o = 48 + 4 * n + 3 * c + int(rng.integers(3))
        b[o] = _interesting(rng, b[o], 1)
        return _with_crc(b), False
    (old,) = struct.unpack_from("<I", b, bits_off)
    new = (
        _interesting(rng, old, 4) if rng.random() < 0.5 else max(0, old + int(rng.integers(-9, 10)))
    )
    struct.pack_into("<I", b, bits_off, new)
    if rng.random() < 0.5 and new < 1 << 20:
        # keep the sums right: nbits, nload, and the chunk's payload bytes
        nbits, nload = _header(b)[8:10]
        grow = (new + 7) // 8 - (old + 7) // 8
        start = 48 + 7 * n + sum((x + 7) // 8 for x in struct.unpack_from(f"<{c}I", base.data, 48))
        end = start + (old + 7) // 8
        fill = bytes(rng.integers(0, 256, max(grow, 0), dtype=np.uint8))
        seg = b[start:end] + fill if grow >= 0 else b[start : end + grow]
        b = b[:start] + seg + b[end:]
        struct.pack_into("<QQ", b, 24, nbits - old + new, nload + grow)
    return _with_crc(b), False


def m_payload_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    lo = 48 + 7 * base.nchunks
    for _ in range(int(rng.integers(1, 9))):
        p = int(rng.integers(lo, len(b)))
        if rng.random() < 0.5:
            b[p] ^= 1 << int(rng.integers(8))
        else:
            b[p] = int(rng.choice([0, 255, int(rng.integers(256))]))
    return _with_crc(b), False


def m_truncate_kept(rng, base: Base) -> tuple[bytearray, bool]:
    return bytearray(base.data[: int(rng.integers(len(base.data)))]), True


def m_truncate_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    """Payload bytes cut off, the header's payload size following."""
    b = bytearray(base.data)
    lo = 48 + 7 * base.nchunks
    b = b[: max(lo, len(b) - int(rng.integers(1, 4)))]
    struct.pack_into("<Q", b, 32, len(b) - lo)
    return _with_crc(b), False


def m_extend(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data) + bytes(rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8))
    if rng.random() < 0.5:
        return b, True
    struct.pack_into("<Q", b, 32, len(b) - 48 - 7 * base.nchunks)  # say the payload grew
    return _with_crc(b), False


def m_swap_chunks(rng, base: Base) -> tuple[bytearray, bool]:
    """Two whole chunks swapped (tables and payload): still valid, decoding to swapped values."""
    full = base.numel // base.chunk  # chunks of exactly chunk_size elements
    c1, c2 = sorted(int(x) for x in rng.choice(full, 2, replace=False))
    n = base.nchunks
    d = base.data
    bits = list(struct.unpack_from(f"<{n}I", d, 48))
    orders = [d[48 + 4 * n + 3 * c : 48 + 4 * n + 3 * c + 3] for c in range(n)]
    lo = 48 + 7 * n
    segs, p = [], lo
    for x in bits:
        segs.append(d[p : p + (x + 7) // 8])
        p += (x + 7) // 8
    for t in (bits, orders, segs):
        t[c1], t[c2] = t[c2], t[c1]
    b = bytearray(d[:48]) + struct.pack(f"<{n}I", *bits) + b"".join(orders) + b"".join(segs)
    return _with_crc(b), False


def m_mode_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    b = bytearray(base.data)
    b[5] ^= _F_RUNS if rng.random() < 0.7 else _F_AUTO
    return _with_crc(b), False


def _has_chunks(base: Base) -> bool:
    return base.nchunks > 0


def _has_payload(base: Base) -> bool:
    return len(base.data) > 48 + 7 * base.nchunks


def _two_full_chunks(base: Base) -> bool:
    return base.numel // base.chunk >= 2


def _any(base: Base) -> bool:
    return True


def m_grow_fixed(rng, base: Base) -> tuple[bytearray, bool]:
    """A larger chunk size, and numel to match the chunk count: a stream claiming many more
    elements than its bytes code (the decoding bound's case)."""
    b = bytearray(base.data)
    chunk = 1 << int(rng.integers(8, 24))
    numel = base.nchunks * chunk - int(rng.integers(chunk))
    struct.pack_into("<Q", b, 8, numel)
    struct.pack_into("<I", b, 16, chunk)
    return _with_crc(b), False


MUTATORS = {  # name: (mutation, the bases it applies to)
    "flip_kept": (m_flip_kept, _any),
    "flip_fixed": (m_flip_fixed, _any),
    "bytes_fixed": (m_bytes_fixed, _any),
    "header_fixed": (m_header_fixed, _any),
    "table_fixed": (m_table_fixed, _has_chunks),
    "payload_fixed": (m_payload_fixed, _has_payload),
    "truncate_kept": (m_truncate_kept, _any),
    "truncate_fixed": (m_truncate_fixed, _has_payload),
    "extend": (m_extend, _any),
    "swap_chunks": (m_swap_chunks, _two_full_chunks),
    "mode_fixed": (m_mode_fixed, _any),
    "grow_fixed": (m_grow_fixed, _has_chunks),
}


def exhaustive(bases: list[Base]) -> list[tuple[int, str, int]]:
    """(base, kind, position) of every single-bit flip (CRC kept and recomputed) and every
    truncation of each small stream."""
    out = []
    for j, base in enumerate(bases):
        if len(base.data) > SMALL:
            continue
        for p in range(8 * len(base.data)):
            out.append((j, "every_flip_kept", p))
            if not 320 <= p < 352:
                out.append((j, "every_flip_fixed", p))
        for cut in range(len(base.data)):
            out.append((j, "every_truncation", cut))
    return out


def make_input(bases, exh, seed: int, i: int) -> tuple[bytes, int, str, bool]:
    """(stream bytes, base index, mutation name, CRC kept) of input ``i``."""
    if i < len(exh):
        j, kind, p = exh[i]
        b = bytearray(bases[j].data)
        if kind == "every_truncation":
            return bytes(b[:p]), j, kind, True
        b[p // 8] ^= 1 << (p % 8)
        if kind == "every_flip_fixed":
            _with_crc(b)
        return bytes(b), j, kind, kind == "every_flip_kept"
    rng = np.random.default_rng((seed, i))
    name = list(MUTATORS)[int(rng.integers(len(MUTATORS)))]
    mutate, applies = MUTATORS[name]
    eligible = [j for j, base in enumerate(bases) if applies(base)]
    j = eligible[int(rng.integers(len(eligible)))]
    b, kept = mutate(rng, bases[j])
    return bytes(b), j, name, kept


# ---------------------------------------------------------------- worker


def check(data: bytes, base: Base, crc_kept: bool) -> tuple[str, str]:
    """(outcome, detail) of one input."""
    from ggspeed.codec import EGStream, eg_decode

    try:
        got = eg_decode(EGStream.from_bytes(data), backend="numba").numpy()
    except ValueError as e:
        got = e
    except Exception as e:  # any other exception is the finding
        return "exception", f"{type(e).__name__}: {e}"
    try:
        ref = reference_decode(data)
    except Invalid as e:
        ref = e
    if isinstance(got, ValueError) or isinstance(ref, Invalid):
        if not (isinstance(got, ValueError) and isinstance(ref, Invalid)):
            return "disagree", f"decoder: {got!r}; reference: {ref!r}"[:2000]
        outcome = "refused"
    elif not np.array_equal(got.astype(np.int64), np.asarray(ref, np.int64)):
        return "disagree", "decoded values differ from the reference"
    else:
        outcome = "equal" if np.array_equal(got, base.values) else "as_specified"
    if crc_kept and base.data[5] & _F_CRC and data != base.data:
        try:
            EGStream.from_bytes(data, require_crc=True)
            return "crc_miss", "a changed stream passed require_crc"
        except ValueError:
            pass
    return outcome, ""


def worker(args: argparse.Namespace) -> None:
    """Run inputs [start, start + count); print the counts as one JSON line."""
    bases = corpus()
    exh = exhaustive(bases)
    fd = os.open(args.progress, os.O_RDWR)
    prog = mmap.mmap(fd, 8)
    inject = None
    if args.inject:
        kind, at = args.inject.split(":")
        inject = (kind, int(at))
    counts: Counter = Counter()
    by_kind: Counter = Counter()
    fail_dir = Path(args.out) / "failures"
    for i in range(args.start, args.start + args.count):
        prog[:8] = struct.pack("<q", i)
        if inject and inject[1] == i:
            if inject[0] == "crash":
                ctypes.string_at(0)  # a real segfault
            time.sleep(10**6)
        data, j, name, kept = make_input(bases, exh, args.seed, i)
        outcome, detail = check(data, bases[j], kept)
        counts[outcome] += 1
        by_kind[f"{name}/{outcome}"] += 1
        if outcome in FAILURES:
            save(fail_dir, outcome, args.seed, i, data, name, j, detail)
    prog[:8] = struct.pack("<q", args.start + args.count)
    print(json.dumps({"counts": counts, "by_kind": by_kind}))


def save(folder: Path, outcome: str, seed: int, i: int, data: bytes, name, j, detail) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{outcome}-seed{seed}-input{i}"
    stem.with_suffix(".bin").write_bytes(data)
    meta = {"outcome": outcome, "seed": seed, "input": i, "mutation": name, "base": j}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "detail": detail}, indent=1) + "\n")


# ---------------------------------------------------------------- parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_batch(args, start: int, count: int, progress: Path) -> tuple[dict, int | None, str]:
    """Run one batch in a worker; (counts, index of a crash / hang or None, its kind)."""
    progress.write_bytes(struct.pack("<q", -1))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--seed",
        str(args.seed),
        "--start",
        str(start),
        "--count",
        str(count),
        "--progress",
        str(progress),
        "--out",
        str(args.out),
    ]
    if args.inject:
        cmd += ["--inject", args.inject]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last, since = -1, time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        (now,) = struct.unpack("<q", progress.read_bytes()[:8])
        if now != last:
            last, since = now, time.monotonic()
        limit = args.startup_seconds if now < 0 else args.hang_seconds
        if time.monotonic() - since > limit:
            proc.kill()  # this worker only
            proc.communicate()
            return {}, now, "hang"
    out, err = proc.communicate()
    if proc.returncode != 0:
        (now,) = struct.unpack("<q", progress.read_bytes()[:8])
        sys.stderr.write(err[-2000:])
        return {}, now, "crash"
    return json.loads(out.strip().splitlines()[-1]), None, ""


def parent(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.bin"
    bases = exh = None  # built only to save a crashing input
    counts: Counter = Counter()
    by_kind: Counter = Counter()
    t0 = time.time()
    args.commit = _git_commit()  # the code that runs, before anything else is committed
    i, stop = args.start, args.start + args.inputs
    while i < stop:
        n = min(args.batch, stop - i)
        res, bad, kind = run_batch(args, i, n, progress)
        if bad is None:
            counts.update(res["counts"])
            by_kind.update(res["by_kind"])
            i += n
            part = _summary(args, t0, i, counts, by_kind)  # so far: kept if the run is stopped
            (out / "partial.json").write_text(json.dumps(part, indent=1) + "\n")
            rate = part["inputs"] / max(part["wall_s"], 1e-9)
            print(f"{part['inputs']} inputs, {rate:.0f}/s, {part['counts']}", file=sys.stderr)
            continue
        if bad < i:  # died before its first input: not an input's fault
            raise RuntimeError(f"fuzz worker failed to start ({kind}) for inputs from {i}")
        if bad > i:  # the inputs before the bad one, again, for their counts
            res, again, _ = run_batch(args, i, bad - i, progress)
            if again is not None:
                raise RuntimeError(f"fuzz worker not deterministic: inputs {i}..{bad}")
            counts.update(res["counts"])
            by_kind.update(res["by_kind"])
        if bases is None:
            bases = corpus()
            exh = exhaustive(bases)
        data, j, name, _ = make_input(bases, exh, args.seed, bad)
        save(out / "failures", kind, args.seed, bad, data, name, j, f"worker {kind}")
        counts[kind] += 1
        by_kind[f"{name}/{kind}"] += 1
        i = bad + 1
    summary = _summary(args, t0, i, counts, by_kind)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "by_kind"}, indent=1))
    return 1 if summary["failures"] else 0


def _summary(args, t0: float, done_to: int, counts: Counter, by_kind: Counter) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}",
        "commit": args.commit,
        "command": " ".join(["python", "tools/fuzz_codec.py", *sys.argv[1:]]),
        "inputs": done_to - args.start,
        "exhaustive_inputs": sum(v for k, v in by_kind.items() if k.startswith("every_")),
        "wall_s": round(time.time() - t0, 1),
        "counts": dict(sorted(counts.items())),
        "failures": sum(counts[k] for k in FAILURES),
        "by_kind": dict(sorted(by_kind.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="how many inputs to run")
    p.add_argument("--start", type=int, default=0, help="index of the first input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25_000, help="inputs per worker subprocess")
    p.add_argument("--out", default="build/fuzz", help="folder for failures and summary.json")
    p.add_argument(
        "--hang-seconds", type=float, default=60.0, help="no progress for this long: hang"
    )
    p.add_argument(
        "--startup-seconds", type=float, default=300.0, help="allowed for a worker start"
    )
    p.add_argument("--inject", help="harness self-check: crash:I or hang:I at input I")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inputs < 0 or args.start < 0 or args.batch < 1:
        p.error("--inputs and --start must be >= 0 and --batch >= 1")
    if args.inject and (
        args.inject.split(":")[0] not in ("crash", "hang") or ":" not in args.inject
    ):
        p.error(f"--inject must be crash:INDEX or hang:INDEX, got {args.inject!r}")
    if args.worker:
        worker(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
