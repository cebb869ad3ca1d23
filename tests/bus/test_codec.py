"""KV codec round trips: every precision x shapes, error bounds, sizes, chunking, subsets, bad input."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from bus.codec import decode_blob, encode_cache, encode_tensor
from bus.errors import ChunkError, CodecError
from bus.frames import PREFIX, blob_frames, build_frame, parse_frame
from bus.reassembler import Reassembler, decode_frames
from bus.schemas import PRECISIONS, KVChunkHeader, expected_raw_bytes

SHAPES = {
    "batch2": (2, 4, 16, 64),
    "odd_head_dim": (1, 3, 7, 33),  # odd element count for int4 packing
    "one_token": (1, 2, 1, 8),
    "many_layers": (1, 2, 5, 16),
}
# relative L2 error bounds on gaussian data; fp32 is exact
REL_L2_BOUND = {"fp32": 0.0, "fp16": 1e-3, "bf16": 6e-3, "int8": 1e-2, "int4": 0.2}


def _cache(shape: tuple[int, int, int, int], n_layers: int, seed: int, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(torch.randn(shape[3], generator=gen))  # outlier-ish channels, as in real K
    return {
        i: (
            (torch.randn(shape, generator=gen) * channel_scale).to(dtype),
            torch.randn(shape, generator=gen).to(dtype),
        )
        for i in range(n_layers)
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("compress", [True, False, "deflate"], ids=["lz4", "raw", "deflate"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_trip(precision: str, shape_name: str, compress: bool | str) -> None:
    shape = SHAPES[shape_name]
    n_layers = 24 if shape_name == "many_layers" else 2
    cache = _cache(shape, n_layers, seed=zlib.crc32(f"{precision}{shape_name}".encode()))
    frames = list(
        encode_cache(cache, precision=precision, query_id="q", sender="s", compress=compress, chunk_bytes=700)
    )
    random.Random(0).shuffle(frames)
    out = decode_frames(frames)
    assert sorted(out) == sorted(cache)
    for layer, (k, v) in cache.items():
        k2, v2 = out[layer]
        assert k2.shape == k.shape and v2.shape == v.shape and k2.dtype == torch.float32
        for x, y in ((k, k2), (v, v2)):
            if precision == "fp32":
                assert torch.equal(x, y)
            else:
                assert _rel(y, x) <= REL_L2_BOUND[precision]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int_error_within_half_step(precision: str) -> None:
    """Each value is off by at most half a quantization step of its group (per channel K, per token V)."""
    qmax = 127 if precision == "int8" else 7
    k, v = _cache((2, 3, 9, 17), 1, seed=3)[0]
    out = decode_frames(encode_cache({0: (k, v)}, precision=precision, query_id="q", sender="s"))
    k2, v2 = out[0]
    for x, y, dim in ((k, k2, 2), (v, v2, 3)):
        step = x.abs().amax(dim=dim, keepdim=True) / qmax
        assert bool(((y - x).abs() <= step * 0.5 * 1.01 + 1e-6).all())


def test_decoded_dtype_options() -> None:
    cache = _cache((1, 2, 3, 4), 1, seed=1, dtype=torch.bfloat16)
    frames = list(encode_cache(cache, precision="fp16", query_id="q", sender="s"))
    assert decode_frames(frames, out_dtype=torch.float16)[0][0].dtype == torch.float16
    assert decode_frames(frames)[0][1].dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sizes_count_scales(precision: str) -> None:
    shape = (1, 8, 128, 128)
    k, v = _cache(shape, 1, seed=2)[0]
    fp16 = 2 * k.numel()
    enc_k = encode_tensor(k, precision, tensor="k", compress=False)
    enc_v = encode_tensor(v, precision, tensor="v", compress=False)
    assert len(enc_k.blob) == expected_raw_bytes(shape, precision, enc_k.scale_axis)
    ratio = 2 * fp16 / (len(enc_k.blob) + len(enc_v.blob))
    expected = {"fp32": 0.5, "fp16": 1.0, "bf16": 1.0, "int8": 1.95, "int4": 3.8}[precision]
    assert ratio >= expected
    if precision in ("int8", "int4"):
        assert (enc_k.scale_axis, enc_v.scale_axis) == ("channel", "token")


def test_int4_odd_count_packs_to_ceil_half() -> None:
    x = torch.randn(1, 1, 3, 5)  # 15 elements
    enc = encode_tensor(x, "int4", tensor="v", compress=False)
    assert len(enc.blob) == 8 + 2 * 3  # ceil(15 / 2) data bytes + one fp16 scale per token


@pytest.mark.parametrize("max_payload", [4096, 64 * 1024, 1024 * 1024])
def test_frames_fit_max_payload_including_header(max_payload: int) -> None:
    cache = _cache((1, 8, 300, 64), 3, seed=4)
    frames = list(encode_cache(cache, precision="fp32", query_id="q" * 64, sender="s" * 64, max_payload=max_payload))
    assert all(len(f) <= max_payload for f in frames)
    if max_payload < 300 * 64 * 8 * 4:
        assert max(len(f) for f in frames) > max_payload * 0.9  # and chunks are not needlessly small


def test_subset_of_layers_is_a_message() -> None:
    cache = _cache((1, 2, 4, 8), 6, seed=5)
    subset = {5: cache[5], 2: cache[2]}
    frames = list(encode_cache(subset, precision="fp16", query_id="q", sender="s"))
    out = decode_frames(frames)
    assert sorted(out) == [2, 5]
    assert parse_frame(frames[0])[0].layers_total == 2


def test_parse_frame_reports_header() -> None:
    frames = list(encode_cache(_cache((1, 2, 4, 8), 1, seed=6), precision="int8", query_id="q", sender="s"))
    header, payload = parse_frame(frames[0])
    assert (header.layer, header.tensor, header.precision, header.scale_axis) == (0, "k", "int8", "channel")
    assert len(payload) == header.payload_len
    assert build_frame(header, payload) == frames[0]


def test_bad_inputs_are_codec_errors() -> None:
    good = torch.randn(1, 2, 3, 4)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        ({}, "fp16"),
        ({0: (good,)}, "fp16"),
        ({-1: (good, good)}, "fp16"),
        ({0: (good, good)}, "fp8"),
        ({0: (good[0], good)}, "fp16"),
        ({0: (good.to(torch.int32), good)}, "fp16"),
        ({0: (nan, good)}, "int8"),
        ({0: (nan, good)}, "fp16"),
        ({0: (good * 1e6, good)}, "fp16"),
        ({0: ("tensor", good)}, "fp16"),
        ({0: (torch.empty(1, 2, 0, 4), good)}, "fp16"),
    ]
    for layers, precision in cases:
        with pytest.raises(CodecError):
            list(encode_cache(layers, precision=precision, query_id="q", sender="s"))
    with pytest.raises(Exception, match="query id"):
        list(encode_cache({0: (good, good)}, precision="fp16", query_id="q.>", sender="s"))


def test_frames_of_two_streams_refused_by_decode_frames() -> None:
    cache = _cache((1, 2, 4, 8), 1, seed=7)
    frames = list(encode_cache(cache, precision="fp16", query_id="q", sender="a"))
    frames += list(encode_cache(cache, precision="fp16", query_id="q", sender="b"))
    with pytest.raises(CodecError):
        decode_frames(frames)
    with pytest.raises(ChunkError):
        parse_frame(b"FRKV")


def test_payload_is_16_aligned_in_every_frame() -> None:
    for qid in ("q", "q1", "query-with-a-longer-id"):
        for frame in encode_cache(_cache((1, 2, 3, 5), 2, seed=8), precision="int4", query_id=qid, sender="s"):
            header_len = PREFIX.unpack_from(frame)[-1]
            assert (PREFIX.size + header_len) % 16 == 0


def test_one_chunk_tensor_decodes_in_place_and_is_writable() -> None:
    """A one-chunk fp16 tensor decoded to fp16 shares the message's memory; writing to it is fine."""
    cache = _cache((1, 2, 4, 8), 1, seed=9, dtype=torch.float16)
    frames = list(encode_cache(cache, precision="fp16", query_id="q", sender="s", compress=False))
    assert len(frames) == 2
    k, v = decode_frames(frames, out_dtype=torch.float16)[0]
    assert torch.equal(k, cache[0][0])
    k.add_(1)
    v.mul_(0)
    assert torch.equal(k, cache[0][0] + 1) and not v.any()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_one_token_k_is_scaled_per_token_and_stays_smaller_than_fp16(precision: str) -> None:
    """Per-channel scales of a one-token K (a transmitter's tail) would outweigh its data: it is scaled per token."""
    from bus.budget import layer_wire_bytes
    from bus.frames import frame_overhead

    shape = (1, 2, 1, 24)
    k, v = _cache(shape, 1, seed=3)[0]
    frames = {p: list(encode_cache({0: (k, v)}, precision=p, query_id="q", sender="s")) for p in ("fp16", precision)}
    headers = [parse_frame(f)[0] for f in frames[precision]]
    assert [h.scale_axis for h in headers] == ["token", "token"]
    assert sum(map(len, frames[precision])) < sum(map(len, frames["fp16"]))
    assert sum(map(len, frames[precision])) == layer_wire_bytes(
        shape, precision, frame_overhead=frame_overhead("q", "s"), packed=False
    )
    k2, v2 = decode_frames(frames[precision])[0]
    assert _rel(k2, k) <= REL_L2_BOUND[precision] and _rel(v2, v) <= REL_L2_BOUND[precision]
    longer = parse_frame(
        next(iter(encode_cache({0: (k.expand(1, 2, 4, 24), v)}, precision=precision, query_id="q", sender="s")))
    )[0]
    assert longer.scale_axis == "channel"  # four tokens: per-channel scales are no more than the data


def test_deflate_shrinks_int4_where_lz4_cannot_and_decodes_the_same() -> None:
    """Quantized KV is skewed (most codes near zero): Huffman codes shrink it, LZ4's byte matches do not."""
    k, v = _cache((1, 4, 64, 64), 1, seed=11)[0]
    sizes = {c: len(encode_tensor(v, "int4", tensor="v", compress=c).blob) for c in ("none", "lz4", "deflate")}
    assert sizes["deflate"] < 0.95 * sizes["none"] <= sizes["lz4"]
    plain = decode_frames(encode_cache({0: (k, v)}, precision="int4", query_id="q", sender="s", compress="none"))
    packed = decode_frames(encode_cache({0: (k, v)}, precision="int4", query_id="q", sender="s", compress="deflate"))
    assert all(torch.equal(a, b) for a, b in zip(plain[0], packed[0], strict=True))  # lossless on top of int4
    with pytest.raises(CodecError, match="unknown compression"):
        encode_tensor(v, "int4", compress="zstd")


@pytest.mark.parametrize(
    "damage",
    [
        lambda z: z[:-3],  # cut short
        lambda z: z + b"\x00",  # bytes after the stream
        lambda z: zlib.compress(bytes(70_000), 1),  # inflates past raw_bytes (a bomb, in small)
        lambda z: z[:2] + bytes(len(z) - 2),  # not deflate data
    ],
    ids=["truncated", "trailing", "too-long", "garbage"],
)
def test_bad_deflate_data_is_a_decode_error(damage) -> None:
    x = torch.randn(1, 2, 32, 64)
    enc = encode_tensor(x, "int8", tensor="v", compress="deflate")
    assert enc.compression == "deflate"
    blob = damage(bytes(enc.blob))
    header = KVChunkHeader(
        query_id="q", sender="s", layer=0, tensor="v", chunk=0, n_chunks=1, chunk_size=len(blob), dtype="float32",
        shape=enc.shape, precision="int8", shuffle=True, compression="deflate", scale_axis=enc.scale_axis,
        scale_dtype="float16", raw_bytes=enc.raw_bytes, blob_bytes=len(blob), layers_total=1, chunk_hash=0,
        blob_hash=0,
    )  # fmt: skip
    with pytest.raises(ChunkError, match="deflate|decompressed"):
        decode_blob(blob, header)


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
def test_a_received_blob_with_nan_or_inf_is_refused(precision: str) -> None:
    """A sender that skips the encoder's check (or lies) cannot put NaN/inf into a receiver's cache."""
    cache = _cache((1, 2, 4, 8), 1, seed=11, dtype=torch.float32)
    header, payload = parse_frame(next(iter(encode_cache(cache, precision=precision, query_id="q", sender="s"))))
    blob = bytearray(payload)  # one chunk: the whole blob; its first value (or int8's first fp16 scale) -> inf
    width = 4 if precision == "fp32" else 2
    blob[:width] = np.array([np.inf], dtype=np.float32 if width == 4 else np.float16).tobytes()
    computed = {"chunk", "n_chunks", "chunk_size", "blob_bytes", "chunk_hash", "blob_hash"}
    fields = {k: v for k, v in header.model_dump().items() if k not in computed}
    (bad,) = blob_frames(bytes(blob), fields, max_payload=1 << 20)  # sealed like an honest frame
    with pytest.raises(ChunkError, match="NaN/inf") as err:
        Reassembler(out_dtype=torch.float32).feed(bad)
    assert err.value.reason == "range"


def test_decoding_into_a_narrower_dtype_refuses_overflow() -> None:
    big = {0: (torch.full((1, 1, 2, 4), 1e6), torch.ones(1, 1, 2, 4))}
    frames = list(encode_cache(big, precision="fp32", query_id="q", sender="s"))
    with pytest.raises(ChunkError, match="range of torch.float16"):
        Reassembler(out_dtype=torch.float16).feed(frames[0])
    assert Reassembler(out_dtype=torch.float32).feed(frames[0]) == []  # K alone completes no layer
    as_bf16 = list(encode_cache(big, precision="bf16", query_id="q", sender="s"))  # bf16 holds 1e6; fp16 does not
    with pytest.raises(ChunkError, match="range of torch.float16"):
        Reassembler(out_dtype=torch.float16).feed(as_bf16[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_nan_inf_check_agrees_with_torch_on_every_bit_pattern(dtype: torch.dtype) -> None:
    """Every 16-bit pattern (fp16, bf16), and for fp32 the patterns around each class boundary and both signs."""
    from bus.quant import _nonfinite

    if dtype == torch.float32:
        edges = [0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF]
        words = np.array(edges + [w | 0x80000000 for w in edges], dtype=np.uint32)
    else:
        words = np.arange(1 << 16, dtype=np.uint16)
    values = torch.from_numpy(words.view(np.int32 if dtype == torch.float32 else np.int16)).view(dtype)
    bad = ~torch.isfinite(values.float())
    assert bad.any() and not bad.all()
    for word, nonfinite in zip(words, bad.tolist(), strict=True):
        one = np.array([word], dtype=words.dtype).view(np.uint8)
        assert _nonfinite(one, dtype) == nonfinite, hex(int(word))
    finite = words[~bad.numpy()].view(np.uint8)
    assert not _nonfinite(finite, dtype) and not _nonfinite(finite[:0], dtype)
