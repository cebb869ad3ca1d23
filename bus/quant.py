"""KV tensor formats: fp32 / fp16 / bf16 casts and symmetric int8 / int4 quantization (KIVI-style axes).

A format turns a float tensor ``(B, kv_heads, T, head_dim)`` into *sections* of bytes, each with the
element size the byte-shuffle should use, and back. Integer formats keep one fp16 scale per group:
per channel for K (a group = one head_dim channel over all tokens, so outlier channels get their own
range) and per token for V (a group = one token's head_dim values). A K whose per-channel scales would
cost more than its data (under 2 tokens at int8, under 4 at int4: a transmitter's one-token tail) is
scaled per token too (``bus.schemas.int_scale_axis``). Quantization is symmetric
(``q = round(x / scale)``, ``scale = absmax / qmax``): an fp16 zero point would cost 2 more bytes per
group, which at 128 tokens pushes int8 below 1.95x and int4 below 3.8x the size of fp16.

Blob layout before shuffle/compression: ``[scales fp16][data]`` (int) or ``[data]`` (float); its size is
``bus.schemas.expected_raw_bytes``.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from bus.errors import ChunkError, CodecError
from bus.schemas import PRECISIONS, expected_raw_bytes, int_scale_axis

_EXPONENT_MASKS = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
SCALE_DTYPE = "float16"
Section = tuple[np.ndarray, int]  # (flat uint8 array, element size in bytes for the shuffle)


def _reduce_dim(axis: str) -> int:
    if axis == "channel":
        return 2  # reduce over tokens -> one scale per (B, head, channel)
    if axis == "token":
        return 3  # reduce over head_dim -> one scale per (B, head, token)
    raise CodecError(f"integer formats need scale_axis 'channel' or 'token', got {axis!r}", reason="malformed")


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr``'s memory, also when that memory is a received message (read-only ``bytes``).

    Such a tensor may be written: the message buffer has no other owner once the chunk was taken.
    """
    if not arr.flags.writeable:
        _spend_readonly_warning()
    return torch.from_numpy(arr)


@functools.cache
def _spend_readonly_warning() -> None:
    """torch warns about the first tensor over a read-only buffer only, once per process: spend that warning here,
    silenced, so later tensors need no ``catch_warnings`` (~10 us a tensor, a tenth of a real-size receive)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(b"\0", dtype=np.uint8))


def _as_u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


def _nonfinite(data: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the float bits in ``data`` (flat uint8) hold NaN or inf: |x| at or above the all-ones exponent.

    Two read-only reductions, no temporary: read unsigned, a negative NaN/inf is at or above sign | exponent (and
    only those are); read signed, the negatives fall below zero and a positive NaN/inf is at or above the exponent.
    """
    unsigned, signed = (np.uint32, np.int32) if dtype == torch.float32 else (np.uint16, np.int16)
    words = data.view(unsigned)
    if not words.size:
        return False
    exponent = _EXPONENT_MASKS[dtype]
    sign = 0x80000000 if dtype == torch.float32 else 0x8000
    return int(words.max()) >= sign | exponent or int(words.view(signed).max()) >= exponent


def _cast_checked(x: torch.Tensor, out_dtype: torch.dtype, what: str) -> torch.Tensor:
    """``x`` in ``out_dtype``; a ChunkError when that dtype's range is narrower and a value overflowed it (to inf)."""
    if x.dtype == out_dtype:
        return x
    out = x.to(out_dtype)
    narrower = torch.finfo(out_dtype).max < torch.finfo(x.dtype).max
    if narrower and not bool(torch.isfinite(out).all()):
        raise ChunkError(f"{what} values exceed the range of {out_dtype}", reason="range")
    return out


class FloatFormat:
    """A plain cast to a float dtype (fp32, fp16 or bf16)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def scale_axis(self, tensor: str, shape: tuple[int, ...]) -> str:
        """Float formats carry no scales."""
        return "none"

    def encode(self, x: torch.Tensor, axis: str) -> list[Section]:
        """Cast ``x`` and return its bytes as one section; NaN, inf or fp16 overflow is a CodecError."""
        data = _as_u8(x.to(self.dtype))
        if _nonfinite(data, self.dtype):
            raise CodecError(f"tensor holds NaN/inf or values beyond the range of {self.name}", reason="range")
        return [(data, self.itemsize)]

    def layout(self, shape: tuple[int, int, int, int], axis: str) -> list[tuple[int, int]]:
        """(bytes, element size) of each section for a tensor of ``shape``."""
        return [(math.prod(shape) * self.itemsize, self.itemsize)]

    def decode(
        self, sections: list[np.ndarray], shape: tuple[int, int, int, int], axis: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild the tensor in ``out_dtype`` from the (unshuffled) data section; NaN/inf on the wire, or values
        beyond ``out_dtype``'s range, are a ChunkError (a sender's bad cache never reaches a model)."""
        if _nonfinite(sections[0], self.dtype):
            raise ChunkError(f"{self.name} data holds NaN/inf", reason="range")
        data = _tensor(sections[0]).view(self.dtype).reshape(shape)  # (B, heads, T, head_dim)
        return _cast_checked(data, out_dtype, self.name)


class IntFormat:
    """Symmetric integer quantization with fp16 scales per channel (K) or per token (V)."""

    def __init__(self, name: str, bits: int) -> None:
        self.name = name
        self.bits = bits
        self.qmax = (1 << (bits - 1)) - 1  # 127 or 7: symmetric, -qmax..qmax

    def scale_axis(self, tensor: str, shape: tuple[int, ...]) -> str:
        """KIVI: K gets per-channel scales, V per-token scales; a K of one to three tokens per token too."""
        return int_scale_axis(tensor, shape, self.name)

    def encode(self, x: torch.Tensor, axis: str) -> list[Section]:
        """Quantize ``x``; sections are the fp16 scales and the (packed) integers."""
        dim = _reduce_dim(axis)
        xf = x.float()
        absmax = xf.abs().amax(dim=dim, keepdim=True)  # (B, heads, 1, D) or (B, heads, T, 1)
        scale = (absmax / self.qmax).to(torch.float16)
        if not bool(torch.isfinite(scale).all()):  # NaN/inf anywhere reaches its group's absmax
            raise CodecError(f"tensor holds NaN/inf or values too large for fp16 scales ({self.name})", reason="range")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
        q = torch.round(xf / safe).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return [(_as_u8(scale), 2), (self._pack(q), 1)]

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        flat = q.reshape(-1)
        if self.bits == 8:
            return _as_u8(flat)
        u = (flat.to(torch.int16) + 8).to(torch.uint8)  # 1..15
        if u.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])  # odd count: pad one nibble
        packed = u[0::2] | (u[1::2] << 4)  # low nibble = even element
        return packed.numpy()

    def layout(self, shape: tuple[int, int, int, int], axis: str) -> list[tuple[int, int]]:
        """(bytes, element size) of the scale and data sections."""
        total = expected_raw_bytes(shape, self.name, axis)
        n = math.prod(shape)
        data = n if self.bits == 8 else (n + 1) // 2
        return [(total - data, 2), (data, 1)]

    def decode(
        self, sections: list[np.ndarray], shape: tuple[int, int, int, int], axis: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Dequantize the scale and data sections into ``out_dtype``."""
        b, h, t, d = shape
        scale_shape = (b, h, 1, d) if _reduce_dim(axis) == 2 else (b, h, t, 1)
        if _nonfinite(sections[0], torch.float16):
            raise ChunkError(f"{self.name} scales hold NaN/inf", reason="range")
        scale = _tensor(sections[0]).view(torch.float16).reshape(scale_shape).float()
        n = b * h * t * d
        raw = _tensor(sections[1])
        if self.bits == 8:
            q = raw.view(torch.int8)
        else:
            q = torch.stack([raw & 0x0F, raw >> 4], dim=1).reshape(-1)[:n].to(torch.int8) - 8
        x = q.reshape(shape).float() * scale  # (B, heads, T, head_dim)
        return _cast_checked(x, out_dtype, self.name)  # scales near fp16's top overflow it


_FORMATS: dict[str, FloatFormat | IntFormat] = {
    "fp32": FloatFormat("fp32", torch.float32),
    "fp16": FloatFormat("fp16", torch.float16),
    "bf16": FloatFormat("bf16", torch.bfloat16),
    "int8": IntFormat("int8", 8),
    "int4": IntFormat("int4", 4),
}
assert tuple(_FORMATS) == PRECISIONS


def get_format(precision: str) -> FloatFormat | IntFormat:
    """The format for a precision name; unknown names fail loudly with :class:`CodecError`."""
    try:
        return _FORMATS[precision]
    except KeyError:
        raise CodecError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}", reason="malformed"
        ) from None
