"""A cache tail carried inside its offer: the stream codec's values, and typed errors for anything wrong."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from bus.errors import ChunkError, CodecError, SchemaError
from bus.inline import decode_inline, encode_inline, inline_bytes
from bus.schemas import MAX_INLINE_BYTES, Offer, decode_message
from fusion.wire import transmit

HEADS, DIM, LAYERS = 2, 8, 3


def _layers(tokens: int = 1, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(1, HEADS, tokens, DIM, generator=g), torch.randn(1, HEADS, tokens, DIM, generator=g))
        for m in range(LAYERS)
    }


def _offer(inline, n_tokens: int = 5) -> Offer:
    return Offer(
        query_id="q1",
        transmitter_id="t1",
        query_digest=0,
        model_fingerprint="aa",
        n_tokens=n_tokens,
        n_layers=LAYERS,
        kv_heads=HEADS,
        head_dim=DIM,
        confidence=0.5,
        inline=inline,
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_an_inline_tail_decodes_to_what_the_stream_codec_delivers(precision: str) -> None:
    layers = _layers(tokens=2)
    offer = _offer(encode_inline(layers, precision))
    got = decode_inline(offer)
    streamed, _ = transmit(layers, precision)  # the bus codec's encode -> frames -> decode, in process
    assert sorted(got) == list(range(LAYERS))
    for m in range(LAYERS):
        assert torch.equal(got[m][0], streamed[m][0]) and torch.equal(got[m][1], streamed[m][1])
    assert len(base64.b64decode(offer.inline.data)) == inline_bytes(LAYERS, HEADS, 2, DIM, precision)
    assert list(decode_inline(offer, [2, 0])) == [2, 0]  # only the planned layers, in the plan's order


def test_an_offer_with_an_inline_cache_round_trips_as_json() -> None:
    offer = _offer(encode_inline(_layers()))
    again = decode_message(offer.to_bytes(), Offer)
    assert again == offer and torch.equal(decode_inline(again)[1][0], decode_inline(offer)[1][0])


def test_a_corrupt_inline_cache_is_a_chunk_error_at_the_receiver() -> None:
    inline = encode_inline(_layers())
    raw = bytearray(base64.b64decode(inline.data))
    raw[3] ^= 0x01
    flipped = _offer(inline.model_copy(update={"data": base64.b64encode(bytes(raw)).decode()}))
    with pytest.raises(ChunkError, match="digest"):
        decode_inline(flipped)
    not_b64 = _offer(inline.model_copy(update={"data": "*" * len(inline.data)}))
    with pytest.raises(ChunkError, match="base64"):
        decode_inline(not_b64)
    with pytest.raises(ChunkError, match="layers"):
        decode_inline(_offer(inline), [LAYERS])
    with pytest.raises(ChunkError, match="no inline"):
        decode_inline(_offer(None))


def test_an_inline_cache_with_nan_is_refused_even_with_a_right_digest() -> None:
    """A sender that skips the encoder's check (its digest matches what it sent) cannot put NaN into a receiver."""
    import numpy as np
    import xxhash

    inline = encode_inline(_layers(), "fp16")
    raw = bytearray(base64.b64decode(inline.data))
    raw[0:2] = np.array([np.nan], dtype=np.float16).tobytes()
    data = base64.b64encode(bytes(raw)).decode()
    bad = _offer(inline.model_copy(update={"data": data, "digest": xxhash.xxh3_64_intdigest(bytes(raw))}))
    with pytest.raises(ChunkError, match="NaN/inf") as err:
        decode_inline(bad)
    assert err.value.reason == "range"


def test_an_inline_cache_that_does_not_fit_the_offers_shape_is_rejected_whole() -> None:
    inline = encode_inline(_layers(tokens=2))
    short = _offer(inline).model_dump(mode="json")
    short["inline"]["data"] = short["inline"]["data"][:-4]
    with pytest.raises(SchemaError, match="inline cache text"):
        decode_message(_json(short), Offer)
    longer = _offer(inline, n_tokens=5).model_dump(mode="json")
    longer["n_tokens"] = 1  # a 2-token tail of a 1-token prompt
    with pytest.raises(SchemaError, match="tokens"):
        decode_message(_json(longer), Offer)


def _json(fields: dict) -> bytes:
    return json.dumps(fields).encode()


def test_what_cannot_travel_inline_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="fp32, fp16 or bf16"):
        encode_inline(_layers(), "int8")
    with pytest.raises(CodecError, match="every layer"):
        encode_inline({1: _layers()[1]})
    nan = _layers()
    nan[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        encode_inline(nan)
    big = MAX_INLINE_BYTES // (LAYERS * 2 * HEADS * DIM * 2) + 1  # tokens that make it one step too large
    with pytest.raises(CodecError, match="too large"):
        encode_inline(_layers(tokens=big))
