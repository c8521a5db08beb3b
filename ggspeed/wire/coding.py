"""The coded form of a parameter update: per-block steps, Exp-Golomb-coded levels, one message.

An update ``u`` (float32, flat) is cut into blocks of ``block_size`` consecutive elements; each
block gets the step ``quant_step x RMS(block)`` (a multiple of the update's own scale, so the
levels' distribution, hence the bits, does not depend on the learning rate or the layer), and the
levels ``q = round(u / step)`` are Exp-Golomb coded. The message is

    float32[nblocks] steps | EGStream bytes (ggspeed/codec/stream.py, no checksum)

Decoding gives back ``q`` and the steps bit for bit, so every rank that applies
``dequantized(q, steps)`` computes the same float32 values as the sender.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import codec
from ..gct.common import level_counts, level_entropy
from .settings import ParamGatherSettings

__all__ = ["CodedUpdate", "apply_update", "block_steps", "decode_update", "encode_update"]


@dataclass
class CodedUpdate:
    """One rank's coded update: its levels, steps and the message that carries both."""

    q: torch.Tensor  # int32, flat
    steps: torch.Tensor  # float32, one per block
    message: torch.Tensor  # uint8, flat
    code_bits: int  # bits of the Exp-Golomb codes alone (no header, tables or steps)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_steps(u: torch.Tensor, block: int, quant_step: float) -> torch.Tensor:
    """``quant_step x RMS`` of each block of ``u`` (float32); 1.0 for an all-zero block (its
    levels are zero whatever the step). The sums of squares are float64."""
    n = u.numel()
    nb = _blocks(n, block)
    pad = nb * block - n
    sq = u.double().square()
    if pad:
        sq = torch.cat([sq, sq.new_zeros(pad)])
    counts = torch.full((nb,), float(block), dtype=torch.float64, device=u.device)
    if pad:
        counts[-1] = block - pad
    rms = (sq.view(nb, block).sum(1) / counts).sqrt()
    steps = (rms * quant_step).float()
    ok = torch.isfinite(steps) & (steps > 0)
    return torch.where(ok, steps, torch.ones_like(steps))


def _blockwise_(x: torch.Tensor, steps: torch.Tensor, block: int, op: str) -> torch.Tensor:
    """``x`` (flat float32) multiplied or divided in place, block by block, by its step: the same
    elementwise float32 operations as against a per-element copy of the steps, without one."""
    n = x.numel()
    full = n // block
    fn = torch.Tensor.mul_ if op == "mul" else torch.Tensor.div_
    if full:
        fn(x[: full * block].view(full, block), steps[:full, None])
    if full * block < n:
        fn(x[full * block :], steps[full])
    return x


def encode_update(u: torch.Tensor, settings: ParamGatherSettings) -> CodedUpdate:
    """Quantize and code a flat float32 update; ValueError if it holds inf or NaN."""
    steps = block_steps(u, settings.block_size, settings.quant_step)
    q = codec.quantize(_blockwise_(u.clone(), steps, settings.block_size, "div"), 1.0)
    stream = codec.eg_encode(q, k=settings.eg_order, runs=settings.zero_runs)
    body = stream.to_tensor(checksum=False)
    head = steps.contiguous().view(torch.uint8).to(body.device)
    return CodedUpdate(q=q, steps=steps, message=torch.cat([head, body]), code_bits=stream.nbits)


def decode_update(message: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels (int32, n) and steps (float32) ``message`` carries; ValueError if corrupt."""
    nb = _blocks(n, block)
    if message.numel() < 4 * nb:
        raise ValueError(f"coded update truncated: {message.numel()} bytes, {4 * nb} for steps")
    steps = message[: 4 * nb].clone().view(torch.float32)
    stream = codec.EGStream.from_tensor(message[4 * nb :].contiguous())
    if stream.numel != n:
        raise ValueError(f"coded update holds {stream.numel} levels, expected {n}")
    return codec.eg_decode(stream, validate=False), steps


def apply_update(held: torch.Tensor, q: torch.Tensor, steps: torch.Tensor, block: int) -> None:
    """``held <- held + q x step`` (in float32, then rounded to held's dtype), in place.

    Elementwise IEEE operations only: every rank that applies the same (q, steps) to the same
    ``held`` gets the same bits.
    """
    delta = q.to(held.device, torch.float32, copy=True)
    delta = _blockwise_(delta, steps.to(held.device), block, "mul")
    if held.dtype == torch.float32:
        held.add_(delta.view_as(held))
    else:
        held.copy_((held.float() + delta.view_as(held)).to(held.dtype))


def full_width_bits(dtype: torch.dtype) -> int:
    """Bits per element of the uncoded all-gather of ``dtype`` weights."""
    return int(torch.empty(0, dtype=dtype).element_size() * 8)


def entropy_bits(q: torch.Tensor) -> float:
    """Empirical entropy of the levels in bits per element (0 for none): the coded rate's floor.

    ``codec.empirical_entropy``'s value, from GCT's level histogram (on the CPU one numba pass:
    a torch bincount of every message cost a large part of coding it)."""
    e = level_entropy(level_counts([q]))
    return e if math.isfinite(e) else 0.0
