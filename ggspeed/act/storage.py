"""How a checkpointed tensor is held between forward and recomputation.

Plain: the tensor itself (optionally moved to CPU, optionally only this rank's 1/mp_size slice,
as DeepSpeed's ``cpu_checkpointing`` / ``partition_activations`` do). Coded (``compress``):
q = round(a / step) with step = rel_step * RMS(a), Exp-Golomb-coded with ggspeed.codec; the
memory held is the stream's bytes. Decoding gives back a with |a - a_hat| <= step / 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Partition:
    """This rank's slice of a tensor partitioned over the model-parallel group."""

    rank: int
    size: int
    group: Any


class Stored:
    """One held tensor. ``nbytes`` is what it occupies; ``load()`` rebuilds it on ``device``."""

    nbytes: int = 0
    numel: int = 0
    bits: int | None = None

    def load(self) -> torch.Tensor:
        raise NotImplementedError


class PlainStored(Stored):
    def __init__(self, a: torch.Tensor, *, cpu: bool, part: Partition | None) -> None:
        self.shape, self.device, self.requires_grad = a.shape, a.device, a.requires_grad
        data = a.detach()
        if part is not None:
            data = _slice(data, part).clone()
        if cpu and data.device.type != "cpu":
            data = data.to("cpu")
        self.data, self.part = data, part
        self.numel = data.numel()
        self.nbytes = data.numel() * data.element_size()

    def load(self) -> torch.Tensor:
        data = self.data.to(self.device)
        if self.part is not None:
            data = _gather(data, self.part, self.shape)
        return data


class CodedStored(Stored):
    def __init__(
        self,
        a: torch.Tensor,
        step: float,
        *,
        k: int | str,
        cpu: bool,
        part: Partition | None,
    ) -> None:
        codec = _codec()
        self.shape, self.device, self.dtype = a.shape, a.device, a.dtype
        self.requires_grad = a.requires_grad
        data = a.detach()
        if part is not None:
            data = _slice(data, part)
        q = codec.quantize(data.reshape(-1), step)
        stream = codec.eg_encode(q, k=k)
        if cpu and stream.data.device.type != "cpu":
            stream = dataclasses.replace(
                stream,
                data=stream.data.cpu(),
                chunk_bits=stream.chunk_bits.cpu(),
                orders=stream.orders.cpu(),
            )
        self.stream, self.step, self.part = stream, step, part
        self.numel = q.numel()
        self.nbytes = int(stream.nbytes)
        self.bits = int(stream.nbits)

    def load(self) -> torch.Tensor:
        codec = _codec()
        # made by eg_encode in this process and never serialized: the table checks are moot
        q = codec.eg_decode(self.stream, validate=False).to(self.device)
        data = codec.dequantize(q, self.step, dtype=self.dtype)
        if self.part is not None:
            return _gather(data, self.part, self.shape)
        return data.view(self.shape)


@functools.cache
def _codec():
    """ggspeed.codec, imported on first use (it loads numba) and looked up once."""
    from ggspeed import codec

    return codec


def _slice(a: torch.Tensor, part: Partition) -> torch.Tensor:
    n = a.numel() // part.size
    return a.reshape(-1).narrow(0, part.rank * n, n)


def _gather(piece: torch.Tensor, part: Partition, shape: torch.Size) -> torch.Tensor:
    full = torch.empty(piece.numel() * part.size, dtype=piece.dtype, device=piece.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(full, piece.contiguous(), group=part.group)
    return full.view(shape)


def rms(a: torch.Tensor) -> float:
    """Root mean square in float32 (nan/inf when ``a`` holds non-finite values).

    One fused norm pass (no squared copy): this runs on every checkpoint at a relative step.
    """
    x = a.detach()
    if x.numel() == 0:
        return math.nan
    if x.dtype != torch.float32:
        x = x.float()
    return float(torch.linalg.vector_norm(x)) / math.sqrt(x.numel())


def step_for(a: torch.Tensor, rel_step: float) -> float | None:
    """The quantization step rel_step * RMS(a); None when a is all zero or non-finite."""
    r = rms(a)
    if not math.isfinite(r) or r == 0.0:
        return None
    return rel_step * r


def eg_bits(a: torch.Tensor, step: float, k: int | str = 0) -> int:
    """Exact EG code length, in bits, of ``a`` quantized with ``step`` (telemetry, compress off)."""
    codec = _codec()
    return int(codec.eg_code_length(codec.quantize(a.detach().reshape(-1), step), k=k))


@functools.lru_cache(maxsize=4096)
def _rel_step_for_bits(shape: float, bits: float) -> float:
    from ggspeed import gg

    scale = gg.scale_for_std(shape, 1.0)
    lo, hi = math.log(1e-4), math.log(16.0)  # entropy falls as the step grows
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if gg.quantized_entropy(shape, scale, math.exp(mid)) > bits:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def rel_step_for_bits(shape: float, bits: float) -> float:
    """Step (in units of the std) at which a GG(shape) source quantizes to ``bits`` of entropy."""
    return _rel_step_for_bits(round(shape, 2), round(bits, 3))
