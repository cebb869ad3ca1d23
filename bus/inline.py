"""A small cache carried inside its offer (:class:`~bus.schemas.InlineKV`): encode on the transmitter, decode on the
receiver.

A transmitter whose receiver fuses only its last token(s) has a cache tail of a few hundred bytes per layer. On a
fast link, sending it with the offer costs less than the round trip it saves: the gate's plan then only says which
of those layers the receiver uses (``PlanEntry.inline``), and nothing streams after the plan. Both ends cast as
the stream codec does (``bus.quant``'s float formats), so a cache that came inline decodes to the same values as
the same layers streamed at that precision.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import torch
import xxhash

from bus.errors import ChunkError, CodecError
from bus.quant import FloatFormat, get_format
from bus.schemas import MAX_INLINE_BYTES, InlineKV, Offer, inline_raw_bytes

KV = tuple[torch.Tensor, torch.Tensor]


def _dtype(precision: str) -> torch.dtype:
    """The stream codec's float format for ``precision`` (an inline cache has no integer formats)."""
    fmt = get_format(precision)
    if not isinstance(fmt, FloatFormat):
        raise CodecError(f"an inline cache is fp32, fp16 or bf16, not {precision!r}")
    return fmt.dtype


def inline_bytes(n_layers: int, kv_heads: int, tokens: int, head_dim: int, precision: str) -> int:
    """Bytes of an inline cache of this shape at ``precision`` (before base64)."""
    _dtype(precision)
    return inline_raw_bytes(n_layers, kv_heads, tokens, head_dim, precision)


def encode_inline(layers: Mapping[int, KV], precision: str = "fp16") -> InlineKV:
    """Every layer ``0 .. n-1`` of ``layers`` (each K and V ``(1, kv_heads, tokens, head_dim)``, one shape) inline."""
    dtype = _dtype(precision)
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise CodecError(f"an inline cache holds every layer from 0; got layers {sorted(layers)}")
    shape = tuple(layers[0][0].shape)
    if len(shape) != 4 or shape[0] != 1:
        raise CodecError(f"inline K/V must be (1, kv_heads, tokens, head_dim), got {shape}")
    parts = []
    for m in range(len(layers)):
        for x in layers[m]:
            if tuple(x.shape) != shape:
                raise CodecError(f"layer {m} has shape {tuple(x.shape)}; an inline cache needs one shape, {shape}")
            parts.append(x.detach().to("cpu", dtype).reshape(-1))
    flat = torch.cat(parts)
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"the cache holds NaN/inf or values beyond the range of {precision}", reason="range")
    raw = flat.view(torch.uint8).numpy().tobytes()
    if len(raw) > MAX_INLINE_BYTES:
        raise CodecError(f"a cache of {len(raw)} bytes is too large to carry inline (at most {MAX_INLINE_BYTES})")
    return InlineKV(
        precision=precision,  # type: ignore[arg-type]
        tokens=shape[2],
        digest=xxhash.xxh3_64_intdigest(raw),
        data=base64.b64encode(raw).decode("ascii"),
    )


def decode_inline(
    offer: Offer, layers: list[int] | None = None, out_dtype: torch.dtype = torch.float32
) -> dict[int, KV]:
    """The inline cache of ``offer`` as ``{layer: (K, V)}`` (``layers``: only those), each ``(1, kv_heads, tokens,
    head_dim)`` in ``out_dtype``. :class:`ChunkError` when the offer has none, or its text or digest is wrong."""
    inline = offer.inline
    if inline is None:
        raise ChunkError(f"offer of {offer.transmitter_id} for {offer.query_id} carries no inline cache")
    try:
        raw = base64.b64decode(inline.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ChunkError(f"inline cache of {offer.transmitter_id} is not base64: {exc}", reason="decode") from exc
    need = inline.raw_bytes(offer.n_layers, offer.kv_heads, offer.head_dim)
    if len(raw) != need:
        raise ChunkError(f"inline cache of {offer.transmitter_id} holds {len(raw)} bytes; its shape needs {need}")
    if xxhash.xxh3_64_intdigest(raw) != inline.digest:
        raise ChunkError(f"inline cache of {offer.transmitter_id} fails its digest", reason="checksum")
    shape = (offer.n_layers, 2, 1, offer.kv_heads, inline.tokens, offer.head_dim)
    data = torch.frombuffer(bytearray(raw), dtype=_dtype(inline.precision)).view(shape).to(out_dtype)
    if not bool(torch.isfinite(data).all()):  # NaN/inf sent, or beyond out_dtype's range: never reaches a model
        raise ChunkError(f"inline cache of {offer.transmitter_id} holds NaN/inf", reason="range")
    wanted = range(offer.n_layers) if layers is None else layers
    bad = [m for m in wanted if not 0 <= m < offer.n_layers]
    if bad:
        raise ChunkError(
            f"layers {bad} are not in the inline cache of {offer.transmitter_id} ({offer.n_layers} layers)"
        )
    return {m: (data[m, 0], data[m, 1]) for m in wanted}
