"""ggspeed's per-rank checkpoint files: checksummed, written atomically, committed by all ranks.

A checkpoint counts only once every rank has written every file. The order that guarantees it:

1. DeepSpeed writes its files with ``save_latest=False`` (``latest`` keeps naming the previous
   checkpoint);
2. every rank writes ``ggspeed_rank<r>.pt`` (write to a temporary name, fsync, rename);
3. the ranks agree that all writes succeeded (:func:`ggspeed.consensus.agree`);
4. rank 0 writes ``ggspeed_complete.json`` into the tag folder, then moves ``latest`` (atomic
   rename), the last step.

A rank that dies anywhere before step 4 leaves ``latest`` on the previous complete checkpoint.
Loading a tag folder that holds ggspeed files but no ``ggspeed_complete.json`` is refused.

File format: ``MAGIC``, the SHA-256 of the payload, the payload's length (8 bytes, little-endian),
then the payload: ``torch.save`` of a dict of tensors and plain Python values, read back with
``torch.load(weights_only=True)`` (no code runs while loading). A truncated, random or
bit-flipped file is refused with its path and what is wrong. DeepSpeed's own checkpoint files
(``mp_rank_*``, ``*optim_states.pt``) are pickles: load only checkpoints you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

MAGIC = b"GGSPEED-STATE\x00\x01\n"
STATE_FILE = "ggspeed_rank{rank:05d}.pt"
COMPLETE_FILE = "ggspeed_complete.json"
LATEST_FILE = "latest"
_HEADER = len(MAGIC) + 32 + 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fault."""


def state_path(folder: str, rank: int) -> str:
    return os.path.join(folder, STATE_FILE.format(rank=rank))


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, so that the payload loads with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        return obj.item()
    return obj


def encode(state: Mapping[str, Any]) -> bytes:
    """The file's bytes: header (magic, SHA-256, length) + ``torch.save`` payload."""
    buf = io.BytesIO()
    torch.save(_plain(dict(state)), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).digest()
    return MAGIC + digest + len(payload).to_bytes(8, "little") + payload


def decode(data: bytes, path: str) -> Any:
    """The payload of a state file's bytes; CheckpointError naming ``path`` and the fault."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not a ggspeed state file (no ggspeed header)")
    if len(data) < _HEADER:
        raise CheckpointError(f"{path}: truncated inside the header ({len(data)} bytes)")
    digest = data[len(MAGIC) : len(MAGIC) + 32]
    length = int.from_bytes(data[len(MAGIC) + 32 : _HEADER], "little")
    payload = data[_HEADER:]
    if len(payload) != length:
        raise CheckpointError(
            f"{path}: truncated or padded: the header says {length} payload bytes, "
            f"the file holds {len(payload)}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a payload that matches its checksum but is not tensors + plain data
        raise CheckpointError(f"{path}: payload is not plain tensors and values ({e})") from None


def write_atomic(path: str, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the folder: ``path`` is old or new, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(path: str, state: Mapping[str, Any]) -> None:
    write_atomic(path, encode(state))


def read_state(path: str) -> Any:
    """The payload of the state file at ``path`` (CheckpointError if missing or damaged)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode(data, path)


def mark_complete(folder: str, world_size: int, has_state: bool) -> None:
    """Rank 0, after every rank wrote its files: the tag folder is a whole checkpoint."""
    record = {"world_size": world_size, "state_files": has_state}
    write_atomic(os.path.join(folder, COMPLETE_FILE), json.dumps(record).encode())


def set_latest(save_dir: str, tag: str) -> None:
    """Point ``save_dir/latest`` at ``tag`` (an atomic rename: the last step of a save)."""
    write_atomic(os.path.join(save_dir, LATEST_FILE), tag.encode())


def completeness(folder: str) -> str:
    """``"complete"``, ``"incomplete"`` (ggspeed files without the commit record) or ``"foreign"``
    (no ggspeed file at all: a checkpoint saved by DeepSpeed without ggspeed)."""
    if os.path.isfile(os.path.join(folder, COMPLETE_FILE)):
        return "complete"
    try:
        names = os.listdir(folder)
    except OSError:
        return "foreign"
    prefix = STATE_FILE.split("{", 1)[0]
    return "incomplete" if any(n.startswith(prefix) for n in names) else "foreign"


def check_state(state: Any, path: str, version: int) -> dict[str, Any]:
    """The structure every ggspeed state file has; CheckpointError naming what is wrong."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict")
    if state.get("version") != version:
        raise CheckpointError(
            f"{path}: ggspeed state version {state.get('version')!r} unsupported (expected {version})"
        )
    world = state.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{path}: world_size {world!r} is not a positive integer")
    comps = state.get("components")
    if not isinstance(comps, dict) or not all(isinstance(v, dict) for v in comps.values()):
        raise CheckpointError(f"{path}: 'components' must map names to dicts, got {comps!r:.80}")
    return state
