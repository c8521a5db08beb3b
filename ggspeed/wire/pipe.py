"""A pipeline's stage-to-stage sends, coded: activations forward, their gradients back.

DeepSpeed 0.19.8's ``PipelineEngine`` moves activations to the next stage in
``_exec_send_activations`` / ``_exec_recv_activations`` and their gradients to the previous one
in ``_exec_send_grads`` / ``_exec_recv_grads``, each tensor one ``deepspeed.runtime.pipe.p2p``
send matched by one receive into a buffer of the same shape and dtype (the shapes travel once,
in DeepSpeed's meta exchange). Coded instead, per direction:

* a floating-point tensor ``x`` goes out as the message of :mod:`ggspeed.wire.coding`: per block
  of ``block_size`` elements the step ``quant_step x RMS(block)`` (as ACT's coded storage steps
  relative to the tensor's RMS, so ACT's rate constraint makes the levels cheaper), the levels
  ``round(x / step)`` Exp-Golomb coded; the receiver writes ``levels x step`` into DeepSpeed's
  buffer, in its dtype. Non-float tensors (DeepSpeed's meta buffers, partitioned-tensor metadata,
  labels) and the attention mask DeepSpeed sends cast to half go as DeepSpeed sends them;
* a tensor holding inf or NaN (an fp16 overflow that DeepSpeed's loss scaler must see) goes raw,
  its own bytes, flagged in the slot header: the receiver gets exactly what DeepSpeed sent.

Transfer. A coded message's length varies; NCCL's receive must name the sent size, and a send
costs the link's latency. So each message goes out in **one slot** whose size both ends know
without asking: a 16-byte header (message length, CRC-32 of the message, kind) and ``capacity``
bytes, the capacity being the previous message of the same kind (direction, ordinal within the
instruction) x (1 + ``capacity_slack``), which the receiver learns from that message's header as
the sender does. A message longer than the slot sends its remainder in a second message of the
size the header gave (the first message of each kind always does). No message is added per
micro-batch beyond that, and the meta exchange and the schedule stay DeepSpeed's.

Integrity. The receiver checks the header's length against the largest message the buffer's size
allows and the CRC-32 over the whole message (steps and stream) before decoding; a mismatch raises
:class:`PipeWireError` naming the direction, the sending stage and the fault: a corrupt stream
never reaches training.

Installed on the engine *instance*: ``PipelineEngine._exec_schedule`` binds its instructions from
``_INSTRUCTION_MAP``, so an instance copy of the map wraps the four instructions, each arming
the component while DeepSpeed's own method runs; ``p2p.send`` / ``p2p.recv`` (looked up on the
module by the engine at every call) become dispatchers that code only an armed engine's float
tensors and hand everything else (the loss broadcast, other engines) to DeepSpeed's functions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from ..config.wire import PIPE_KEYS, PipeCodingConfig
from .coding import apply_update, decode_update, encode_update, entropy_bits, full_width_bits

__all__ = [
    "DIRECTIONS",
    "CodedPipe",
    "PipeStats",
    "PipeWireError",
    "decode_message",
    "encode_message",
    "install_coded_pipe",
]

logger = logging.getLogger("ggspeed")

DIRECTIONS = ("activations", "grads")
STATE_VERSION = 1
_HEAD = 16  # u64 message length | u32 CRC-32 of the message | u8 kind | 3 bytes zero
_ALIGN = 64
KIND_CODED, KIND_RAW = 0, 1


class PipeWireError(ValueError):
    """A received pipeline message failed its checks (length, CRC-32, stream): refused."""


@dataclasses.dataclass
class PipeStats:
    """What this rank sent in one direction."""

    messages: int = 0
    elements: int = 0  # elements of the tensors sent coded or raw
    bytes_sent: int = 0  # bytes handed to p2p: slots (header + capacity) and remainders
    full_width_bytes: int = 0  # what DeepSpeed's send of the same tensors hands over
    message_bytes: int = 0  # the messages alone (steps, stream headers, codes)
    code_bits: int = 0  # the Exp-Golomb codes alone
    entropy_bits: float = 0.0  # elements x empirical entropy of the levels
    second_rounds: int = 0  # messages that outgrew their slot
    raw_messages: int = 0  # tensors with inf/NaN sent as their own bytes
    signal_sq: float = 0.0  # sum of x^2 of the coded tensors decoded back (sampled sends)
    error_sq: float = 0.0  # sum of (x - decoded)^2 over the same sends

    def scalars(self) -> dict[str, float]:
        n = self.elements
        if not n:
            return {}  # a rank that sent nothing this way reports nothing (not a zero rate)
        return {
            "messages": float(self.messages),
            "bytes_sent": float(self.bytes_sent),
            "bits_per_element": 8.0 * self.bytes_sent / n,
            "message_bits_per_element": 8.0 * self.message_bytes / n,
            "code_bits_per_element": self.code_bits / n,
            "entropy_bits_per_element": self.entropy_bits / n,
            "full_width_bits_per_element": 8.0 * self.full_width_bytes / n,
            "ratio_to_full_width": self.bytes_sent / self.full_width_bytes,
            "second_rounds": float(self.second_rounds),
            "raw_messages": float(self.raw_messages),
            "rel_error": math.sqrt(self.error_sq / self.signal_sq) if self.signal_sq else 0.0,
        }

    def add(self, other: PipeStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class Encoded:
    """One tensor's message and what it cost."""

    kind: int
    message: torch.Tensor  # uint8, flat
    code_bits: int = 0
    entropy_bits: float = 0.0
    error_sq: float = 0.0
    signal_sq: float = 0.0


def encode_message(x: torch.Tensor, settings: PipeCodingConfig, *, errors: bool = True) -> Encoded:
    """The message for float tensor ``x``: coded (steps | EG stream), or raw if it holds inf/NaN.
    ``errors``: also decode it back for ``error_sq`` / ``signal_sq`` (costs about as much as the
    coding, so ``CodedPipe`` does it on a message's first send per telemetry window)."""
    flat = x.detach().reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raw = flat.contiguous().view(torch.uint8).clone()
        return Encoded(KIND_RAW, raw)
    u = flat.float()
    coded = encode_update(u, settings)  # type: ignore[arg-type]  # the same four settings
    if not errors:
        ent = u.numel() * entropy_bits(coded.q)
        return Encoded(KIND_CODED, coded.message, code_bits=coded.code_bits, entropy_bits=ent)
    back = torch.zeros_like(u)
    apply_update(back, coded.q, coded.steps, settings.block_size)
    return Encoded(
        KIND_CODED,
        coded.message,
        code_bits=coded.code_bits,
        entropy_bits=u.numel() * entropy_bits(coded.q),
        error_sq=float((u - back.to(x.dtype).float()).double().square().sum()),
        signal_sq=float(u.double().square().sum()),
    )


def max_message_bytes(n: int, element_size: int, block: int) -> int:
    """An upper bound of a legitimate message's length for a tensor of ``n`` elements: longer
    headers are refused before anything is allocated."""
    raw = n * element_size
    coded = 4 * -(-n // block) + 48 + 7 * (n // 1024 + 1) + 8 * n + 8
    return max(raw, coded)


def decode_message(
    message: torch.Tensor, kind: int, out: torch.Tensor, block: int, what: str
) -> None:
    """Write the tensor ``message`` carries into ``out`` (its shape and dtype); PipeWireError,
    naming ``what``, if it does not fit ``out`` or is not a valid stream."""
    n = out.numel()
    flat = out.view(-1)
    if kind == KIND_RAW:
        if message.numel() != n * out.element_size():
            raise PipeWireError(
                f"{what}: raw message of {message.numel()} bytes for {n} x {out.dtype} elements"
            )
        flat.copy_(message.view(out.dtype))
        return
    if kind != KIND_CODED:
        raise PipeWireError(f"{what}: unknown message kind {kind}")
    try:
        q, steps = decode_update(message, n, block)
    except ValueError as e:
        raise PipeWireError(f"{what}: invalid coded message: {e}") from None
    flat.zero_()
    apply_update(flat, q, steps, block)


class CodedPipe:
    """Per-rank state of the coded pipeline sends; the runtime's component ``pipe``.

    The slot capacities are agreed by both ends of each send from the messages themselves and
    start from nothing at both ends alike, so they are not saved; ``state_dict`` holds the
    counters and the settings.
    """

    name = "pipe"

    def __init__(self, settings: Mapping[str, PipeCodingConfig]) -> None:
        self.settings = {d: settings[d] for d in DIRECTIONS if d in settings}
        self.stats = {d: PipeStats() for d in DIRECTIONS}
        self._since = {d: PipeStats() for d in DIRECTIONS}
        self.capacity: dict[tuple[str, str, int], int] = {}  # (direction, end, ordinal)
        self._errors_done: set[tuple[str, str, int]] = set()  # sends with error sums this window
        self.global_step = 0
        self.engine: Any = None

    # -- the runtime's component protocol --------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "settings": {d: s.model_dump() for d, s in self.settings.items()},
            "global_step": self.global_step,
            "stats": {d: dataclasses.asdict(s) for d, s in self.stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pipe: saved state version {state.get('version')!r} unsupported")
        self.global_step = int(state.get("global_step", 0))
        saved = state.get("stats", {})
        self.stats = {d: PipeStats(**saved.get(d, {})) for d in DIRECTIONS}
        self._since = {d: PipeStats() for d in DIRECTIONS}

    def on_step(self, global_step: int) -> None:
        self.global_step = int(global_step)

    def scalars(self) -> dict[str, float]:
        """Per direction, since the previous call: ``activations/bits_per_element``, ..."""
        out = {f"{d}/{k}": v for d in self.settings for k, v in self._since[d].scalars().items()}
        self._since = {d: PipeStats() for d in DIRECTIONS}
        self._errors_done = set()
        return out

    # -- one message -------------------------------------------------------------------------
    def _next_capacity(self, key: tuple[str, str, int], length: int, direction: str) -> None:
        need = int(length * (1.0 + self.settings[direction].capacity_slack))
        self.capacity[key] = -(-need // _ALIGN) * _ALIGN

    def send(self, send: Any, tensor: torch.Tensor, dest_stage: int, armed: _Armed) -> None:
        d = armed.direction
        cfg = self.settings[d]
        key = (d, "send", armed.ordinal)
        enc = encode_message(tensor, cfg, errors=key not in self._errors_done)
        if enc.signal_sq:  # rel_error: a message's first send per window (``encode_message``)
            self._errors_done.add(key)
        msg = enc.message.to(tensor.device)
        armed.ordinal += 1
        cap = self.capacity.get(key, 0)
        slot = torch.zeros(_HEAD + cap, dtype=torch.uint8, device=tensor.device)
        slot[:_HEAD] = _header(msg, enc.kind)
        first = min(cap, msg.numel())
        slot[_HEAD : _HEAD + first] = msg[:first]
        send(slot, dest_stage)
        sent = slot.numel()
        g = PipeStats(messages=1, elements=tensor.numel())
        if msg.numel() > cap:
            send(msg[cap:].contiguous(), dest_stage)
            sent += msg.numel() - cap
            g.second_rounds = 1
        self._next_capacity(key, msg.numel(), d)
        g.bytes_sent = sent
        g.full_width_bytes = tensor.numel() * full_width_bits(tensor.dtype) // 8
        g.message_bytes = msg.numel()
        g.code_bits, g.entropy_bits = enc.code_bits, enc.entropy_bits
        g.error_sq, g.signal_sq = enc.error_sq, enc.signal_sq
        g.raw_messages = int(enc.kind == KIND_RAW)
        self.stats[d].add(g)
        self._since[d].add(g)

    def recv(self, recv: Any, buffer: torch.Tensor, src_stage: int, armed: _Armed) -> None:
        d = armed.direction
        cfg = self.settings[d]
        key = (d, "recv", armed.ordinal)
        armed.ordinal += 1
        what = f"{PIPE_KEYS[d]}: message from pipeline stage {src_stage}"
        cap = self.capacity.get(key, 0)
        slot = torch.empty(_HEAD + cap, dtype=torch.uint8, device=buffer.device)
        recv(slot, src_stage)
        head = slot[:_HEAD].cpu()
        length = int(head[:8].view(torch.int64))
        crc = int(head[8:12].view(torch.int32)) & 0xFFFFFFFF
        kind = int(head[12])
        bound = max_message_bytes(buffer.numel(), buffer.element_size(), cfg.block_size)
        if not 0 <= length <= bound or int(head[13:].sum()) != 0:
            raise PipeWireError(
                f"{what}: corrupt header (length {length}, at most {bound} for {buffer.numel()} "
                "elements); refused"
            )
        msg = slot[_HEAD : _HEAD + min(cap, length)]
        if length > cap:
            rest = torch.empty(length - cap, dtype=torch.uint8, device=buffer.device)
            recv(rest, src_stage)
            msg = torch.cat([msg, rest])
        if zlib.crc32(msg.cpu().numpy()) != crc:
            raise PipeWireError(f"{what}: CRC-32 mismatch, the message is corrupt; refused")
        self._next_capacity(key, length, d)
        decode_message(msg, kind, buffer, cfg.block_size, what)


def _header(msg: torch.Tensor, kind: int) -> torch.Tensor:
    head = torch.zeros(_HEAD, dtype=torch.uint8)
    head[:8] = torch.tensor([msg.numel()], dtype=torch.int64).view(torch.uint8)
    crc = zlib.crc32(msg.cpu().numpy())
    head[8:12] = torch.tensor([crc - (1 << 32) if crc >= 1 << 31 else crc], dtype=torch.int32).view(
        torch.uint8
    )
    head[12] = kind
    return head.to(msg.device)


# -- the dispatch --------------------------------------------------------------------------


@dataclasses.dataclass
class _Armed:
    """The instruction now running on an engine with coded sends in its direction."""

    pipe: CodedPipe
    direction: str
    engine: Any
    mask_send: int = -1  # ordinal among this instruction's sends of the half-cast mask
    sends: int = 0
    ordinal: int = 0


_ARMED: _Armed | None = None


def _is_mask_recv(armed: _Armed, tensor: torch.Tensor) -> bool:
    eng = armed.engine
    if armed.direction != "activations" or not (eng.has_attention_mask or eng.has_bool_tensors):
        return False
    buf = eng.pipe_recv_buf
    return isinstance(buf, tuple) and len(buf) > 0 and tensor is buf[-1]


def _dispatch_send(original: Any) -> Any:
    @functools.wraps(original)
    def send(tensor: torch.Tensor, dest_stage: int, async_op: bool = False) -> Any:
        armed = _ARMED
        if armed is None or async_op or not tensor.is_floating_point():
            if armed is not None:
                armed.sends += 1
            return original(tensor, dest_stage, async_op)
        index = armed.sends
        armed.sends += 1
        if index == armed.mask_send:
            return original(tensor, dest_stage, async_op)
        armed.pipe.send(original, tensor, dest_stage, armed)
        return None

    send._ggspeed_original = original  # type: ignore[attr-defined]
    return send


def _dispatch_recv(original: Any) -> Any:
    @functools.wraps(original)
    def recv(tensor: torch.Tensor, src_stage: int, async_op: bool = False) -> Any:
        armed = _ARMED
        if (
            armed is None
            or async_op
            or not tensor.is_floating_point()
            or _is_mask_recv(armed, tensor)
        ):
            return original(tensor, src_stage, async_op)
        armed.pipe.recv(original, tensor, src_stage, armed)
        return None

    recv._ggspeed_original = original  # type: ignore[attr-defined]
    return recv


def _patch_p2p() -> None:
    from deepspeed.runtime.pipe import p2p

    if getattr(p2p.send, "_ggspeed_original", None) is None:
        p2p.send = _dispatch_send(p2p.send)
    if getattr(p2p.recv, "_ggspeed_original", None) is None:
        p2p.recv = _dispatch_recv(p2p.recv)


def _mask_send_index(engine: Any, buffer_id: int) -> int:
    """Which of ``_exec_send_activations``' sends carries the attention mask DeepSpeed casts to
    half (the tuple's last tensor, after the meta buffer when one is sent); -1 if none."""
    if not (engine.has_attention_mask or engine.has_bool_tensors):
        return -1
    outputs = engine.pipe_buffers["outputs"][buffer_id]
    if not isinstance(outputs, tuple):
        return -1
    meta = 1 if (engine.dynamic_shape or engine.first_output_send) else 0
    return meta + len(outputs) - 1


def _armed_instruction(fn: Any, pipe: CodedPipe, direction: str, send: bool) -> Any:
    @functools.wraps(fn)
    def instruction(engine: Any, buffer_id: int) -> Any:
        global _ARMED
        mask = _mask_send_index(engine, buffer_id) if send and direction == "activations" else -1
        _ARMED = _Armed(pipe, direction, engine, mask_send=mask)
        try:
            return fn(engine, buffer_id)
        finally:
            _ARMED = None

    return instruction


def pipeline_stages(engine: Any) -> int:
    """The engine's number of pipeline stages (1 for an engine that is not a PipelineEngine)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if not isinstance(engine, PipelineEngine):
        return 1
    return int(engine.num_stages)


def install_coded_pipe(
    engine: Any, activations: PipeCodingConfig | None, grads: PipeCodingConfig | None
) -> CodedPipe | None:
    """Code ``engine``'s pipeline sends in the directions given (settings, or None for
    DeepSpeed's sends); returns the per-rank component, or None (with a warning naming the key)
    where there is nothing to code: no PipelineEngine, or one pipeline stage."""
    from deepspeed.runtime.pipe import schedule

    chosen = {d: s for d, s in (("activations", activations), ("grads", grads)) if s is not None}
    if not chosen:
        return None
    keys = " and ".join(f"{PIPE_KEYS[d]}.enabled" for d in chosen)
    stages = pipeline_stages(engine)
    if stages < 2:
        what = "a pipeline of one stage" if hasattr(engine, "num_stages") else "not a pipeline"
        logger.warning(
            "%s: the engine is %s, so there are no stage-to-stage sends to code; nothing "
            "installed (set it to false to silence this)",
            keys,
            what,
        )
        return None
    if getattr(engine, "_ggspeed_pipe", None) is not None:
        raise RuntimeError("ggspeed.wire pipeline coding is already installed on this engine")
    pipe = CodedPipe(chosen)
    pipe.engine = engine
    _patch_p2p()
    table = dict(engine._INSTRUCTION_MAP)
    for direction, send_cls, recv_cls in (
        ("activations", schedule.SendActivation, schedule.RecvActivation),
        ("grads", schedule.SendGrad, schedule.RecvGrad),
    ):
        if direction in chosen:
            table[send_cls] = _armed_instruction(table[send_cls], pipe, direction, True)
            table[recv_cls] = _armed_instruction(table[recv_cls], pipe, direction, False)
    engine._INSTRUCTION_MAP = table
    engine._ggspeed_pipe = pipe
    return pipe
