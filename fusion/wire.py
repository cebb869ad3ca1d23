"""What a transmitted cache looks like after the trip: the bus codec at a chosen precision, in process.

``transmit(layers, precision)`` encodes a ``{layer: (K, V)}`` mapping the way the bus would and decodes it
again, returning the tensors the receiver would get and the bytes that would travel. It uses
``bus.codec`` when that module offers an encode/decode pair; until then (or if its API changes) a local
stand-in quantises exactly as DESIGN.md specifies (fp16/bf16 casts; int8/int4 with per-channel scales
for K and per-token scales for V, asymmetric) and counts the raw quantised bytes plus scales.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping

import torch

from bus.errors import CodecError
from fusion.kvcache import KV

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}


def _quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, int]:
    """Asymmetric min/max quantisation of ``x`` with one (scale, zero) per slice along ``dim`` reduced away."""
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    q = ((x - lo) / scale).round().clamp(0, levels)
    payload = (x.numel() * bits + 7) // 8 + 2 * 2 * lo.numel()  # packed values + fp16 scale and zero per slice
    return q * scale + lo, payload


def _local_roundtrip(layers: Mapping[int, KV], precision: str) -> tuple[dict[int, KV], int]:
    out: dict[int, KV] = {}
    total = 0
    for layer, (k, v) in layers.items():
        if precision in ("fp32", "fp16", "bf16"):
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            k2, v2 = k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype)
            total += (k.numel() + v.numel()) * torch.finfo(dtype).bits // 8
        else:
            bits = _BITS[precision]
            kf, vf = k.float(), v.float()
            k2, nk = _quantize(kf, bits, dim=2)  # K: per channel, scales over the token axis
            v2, nv = _quantize(vf, bits, dim=3)  # V: per token, scales over the channel axis
            k2, v2 = k2.to(k.dtype), v2.to(v.dtype)
            total += nk + nv
        out[layer] = (k2, v2)
    return out, total


def _bus_codec():
    """``(encode, decode)`` from ``bus.codec`` if it exposes a cache-level pair, else None."""
    try:
        codec = importlib.import_module("bus.codec")
    except ImportError:
        return None
    encode, decode = getattr(codec, "encode_cache", None), getattr(codec, "decode_cache", None)
    if callable(encode) and callable(decode):
        return encode, decode
    return None


def transmit(layers: Mapping[int, KV], precision: str = "fp32") -> tuple[dict[int, KV], int]:
    """The layers as the receiver gets them after encoding at ``precision``, and the bytes that travelled."""
    if precision not in PRECISIONS:
        raise CodecError(f"unknown precision {precision!r}; choose one of {PRECISIONS}", precision=precision)
    if not layers:
        return {}, 0
    codec = _bus_codec()
    if codec is not None:
        encode, decode = codec
        blob = encode(dict(layers), precision=precision)
        decoded = decode(blob)
        nbytes = sum(len(b) for b in blob) if isinstance(blob, list | tuple) else len(blob)
        dtype = next(iter(layers.values()))[0].dtype
        return {i: (k.to(dtype), v.to(dtype)) for i, (k, v) in decoded.items()}, nbytes
    return _local_roundtrip(layers, precision)
