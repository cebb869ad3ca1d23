"""What a transmitted cache looks like after the trip: the bus codec at a chosen precision, in process.

``transmit(layers, precision)`` encodes a ``{layer: (K, V)}`` mapping with the bus codec (quantise, shuffle,
LZ4, checksummed frames), decodes the frames again, and returns the tensors the receiver would get and the
bytes that would travel. Without ``bus.codec`` a local stand-in quantises as DESIGN.md specifies (fp16/bf16
casts; int8/int4 asymmetric with per-channel scales for K, per-token for V) and counts raw bytes plus scales.
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
    """``(encode_cache, decode_frames)`` of the bus codec, or None when it is not importable."""
    try:
        codec, reassembler = importlib.import_module("bus.codec"), importlib.import_module("bus.reassembler")
    except ImportError:
        return None
    encode, decode = getattr(codec, "encode_cache", None), getattr(reassembler, "decode_frames", None)
    return (encode, decode) if callable(encode) and callable(decode) else None


def transmit(
    layers: Mapping[int, KV], precision: str = "fp32", *, query_id: str = "local", sender: str = "local"
) -> tuple[dict[int, KV], int]:
    """The layers as the receiver gets them after the bus codec at ``precision``, and the bytes that travelled.

    Bytes are whole frames (header + compressed payload), exactly what would be published.
    """
    if precision not in PRECISIONS:
        raise CodecError(f"unknown precision {precision!r}; choose one of {PRECISIONS}", precision=precision)
    if not layers:
        return {}, 0
    codec = _bus_codec()
    if codec is None:
        return _local_roundtrip(layers, precision)
    encode, decode = codec
    dtype = next(iter(layers.values()))[0].dtype
    frames = list(encode(dict(layers), precision=precision, query_id=query_id, sender=sender))
    decoded = decode(frames, out_dtype=dtype)
    missing = sorted(set(layers) - set(decoded))
    if missing:
        raise CodecError(f"the codec lost layers {missing} on a local round trip")
    return {i: decoded[i] for i in sorted(layers)}, sum(len(f) for f in frames)
