"""KV frames: the documented checksum recipe, versioning, the reused frame buffer, 64-bit duplicate checks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from bus.codec import encode_cache, encode_layer_chunks
from bus.errors import ChunkError, CodecError
from bus.frames import (
    FRAME_VERSION,
    MAGIC,
    MAX_FRAME_OVERHEAD,
    PREFIX,
    Chunk,
    FrameBuffer,
    frame_head,
    frame_overhead,
    header_budget,
    parse_frame,
    payload_hash,
    read_frame,
    read_frames,
    seal,
)
from bus.reassembler import Reassembler
from tests.bus.frame_spec import blob_hash, pack, sealed, unpack


def _cache(seed: int = 0, shape=(1, 2, 6, 16), n_layers: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for i in range(n_layers)}


def _frames(**kw) -> list[bytes]:
    return list(encode_cache(_cache(), precision="fp16", query_id="q", sender="s", **kw))


def test_checksums_follow_the_documented_recipe() -> None:
    """docs/PROTOCOL.md section 6, recomputed by tests/bus/frame_spec.py (xxhash directly, no bus helpers)."""
    frames = _frames(chunk_bytes=40)
    for frame in frames:
        fields, payload = unpack(frame)
        assert sealed(fields, payload) == frame
        tampered = sealed({**fields, "layers_total": fields["layers_total"] + 1}, payload)
        assert unpack(tampered)[0]["chunk_hash"] != fields["chunk_hash"]  # the hash reads every header byte
    headers = [unpack(f) for f in frames]
    h = headers[0][0]
    chunks = sorted((x["chunk"], p) for x, p in headers if (x["layer"], x["tensor"]) == (0, "k"))
    assert len(chunks) == h["n_chunks"] > 1
    assert h["blob_hash"] == blob_hash([p for _, p in chunks], "q", "s", 0, "k")
    assert h["blob_hash"] != blob_hash([p for _, p in chunks], "q", "s", 1, "k")


def test_layout_follows_the_protocol_doc() -> None:
    """Every frame decodes with a reader written from PROTOCOL.md alone, to the header ``bus.frames`` reads."""
    for frame in _frames(chunk_bytes=40):
        magic, version, reserved, hlen = struct.unpack_from(">4sBBH", frame)
        assert (magic, version, reserved) == (MAGIC, FRAME_VERSION, 0)
        assert (8 + hlen) % 16 == 0
        fields, payload = unpack(frame)
        header, ours = parse_frame(frame)
        assert fields == {**header.model_dump(), "shape": list(header.shape)}
        assert payload == bytes(ours)
        assert pack(fields, payload) == frame  # and a writer from the doc writes the same bytes
        assert 8 + hlen == frame_overhead("q", "s") == 80  # 8 + 64 fixed + 1 + 1 + 1 + 1, padded to 16


def test_header_is_small_next_to_a_one_token_tensor() -> None:
    """One token of a 2-head x 24-dim fp16 K (96 bytes) costs 112 header bytes with 16- and 13-character ids."""
    k = torch.randn(1, 2, 1, 24)
    (chunk, _) = encode_layer_chunks(
        0, k, k, precision="fp16", query_id="a" * 16, sender="t4-llama-weak", layers_total=1, compress=False
    )
    assert len(chunk.head) == frame_overhead("a" * 16, "t4-llama-weak") == 112
    assert header_budget(1 << 20) == (1 << 20) - MAX_FRAME_OVERHEAD and MAX_FRAME_OVERHEAD == 208


def test_old_frame_versions_are_refused_as_version() -> None:
    """Format 1 (u32 header length, CRC-32) reads as version 0, format 2 (JSON header) as 2: both refused by name."""
    header, payload = parse_frame(_frames()[0])
    head = header.model_dump_json().encode()
    old = struct.pack(">4sI", MAGIC, len(head)) + head + bytes(payload)
    with pytest.raises(ChunkError, match="frame version 0") as info:
        read_frame(old)
    assert info.value.reason == "version"
    v2 = PREFIX.pack(MAGIC, 2, 0, len(head)) + head + bytes(payload)
    with pytest.raises(ChunkError, match="JSON-header frame of format 2") as info:
        read_frame(v2)
    assert info.value.reason == "version"
    future = PREFIX.pack(MAGIC, FRAME_VERSION + 1, 0, len(head)) + head + bytes(payload)
    with pytest.raises(ChunkError) as info:
        read_frame(future)
    assert info.value.reason == "version"
    reserved = bytearray(_frames()[0])
    reserved[5] = 1
    with pytest.raises(ChunkError) as info:
        read_frame(bytes(reserved))
    assert info.value.reason == "malformed"


def test_a_message_of_frames_back_to_back_reads_as_those_frames() -> None:
    frames = _frames()
    message = b"".join(frames)
    assert [bytes(c.payload) for c in read_frames(message)] == [bytes(read_frame(f).payload) for f in frames]
    assert [c.header for c in read_frames(frames[0])] == [read_frame(frames[0]).header]
    with pytest.raises(ChunkError, match="expected"):
        read_frame(message)  # one frame's reader sees the rest as excess payload


@pytest.mark.parametrize("cut", [1, 7, 60])
def test_a_bad_frame_in_a_message_keeps_the_frames_before_it(cut: int) -> None:
    frames = _frames()
    message = b"".join(frames[:2]) + frames[2][:-cut]  # the third frame is truncated
    got = []
    with pytest.raises(ChunkError) as err:
        for chunk in read_frames(message):
            got.append(chunk)
    assert err.value.reason == "malformed" and len(got) == 2
    flipped = bytearray(b"".join(frames[:2]))
    flipped[len(frames[0]) + 2] ^= 0xFF  # the second frame's magic
    with pytest.raises(ChunkError, match="magic"):
        list(read_frames(bytes(flipped)))


def test_frame_buffer_builds_the_standalone_frames_and_grows() -> None:
    k, v = _cache()[0]
    small = encode_layer_chunks(0, k, v, precision="fp16", query_id="q", sender="s", layers_total=1, chunk_bytes=64)
    big = encode_layer_chunks(1, k, v, precision="fp32", query_id="q", sender="s", layers_total=1)
    buffer = FrameBuffer()
    first = buffer.frame(small[0])
    kept = bytes(first)
    assert kept == small[0].frame() and len(first) == small[0].size
    grown = buffer.frame(big[0])  # larger than anything before: a new buffer
    assert bytes(grown) == big[0].frame()
    assert bytes(first) == kept  # the old view still shows its frame
    for chunk in small:  # smaller frames reuse the buffer and are exact
        assert bytes(buffer.frame(chunk)) == chunk.frame()


def test_payloads_are_views_of_the_tensor() -> None:
    """Uncompressed fp16 of an fp16 tensor: the sealed payload is the tensor's memory, not a copy."""
    k = torch.randn(1, 2, 6, 16).half()
    (chunk_k, _chunk_v) = encode_layer_chunks(
        0, k, k, precision="fp16", query_id="q", sender="s", layers_total=1, compress=False
    )
    k.view(-1)[0] = 7.0
    assert bytes(chunk_k.payload[:2]) == k.view(-1)[:1].numpy().tobytes()


def test_duplicate_index_with_other_payload_is_a_conflict_even_with_equal_chunk_hash() -> None:
    """Exact duplicates are judged on the chunk checksum *and* the 64-bit payload digest."""
    frames = _frames()
    reasm = Reassembler()
    chunk = read_frame(frames[0])
    reasm.add(chunk)
    other = bytearray(chunk.payload)
    other[0] ^= 1
    forged = Chunk(chunk.header, memoryview(bytes(other)), payload_hash(other))  # as if chunk_hash collided
    with pytest.raises(ChunkError) as info:
        reasm.add(forged)
    assert info.value.reason == "conflict"
    assert reasm.feed(frames[0]) == []  # the true duplicate is still fine


def test_resealed_header_passes_the_chunk_check() -> None:
    header, payload = parse_frame(_frames()[0])
    resealed = seal(header.model_copy(update={"layers_total": 5}), payload_hash(payload))
    assert read_frame(frame_head(resealed) + bytes(payload)).header.layers_total == 5


def test_protocol_doc_example_checksums() -> None:
    """The worked example in docs/PROTOCOL.md section 6 (chunk_hash, blob_hash, the frame's bytes) is the code's."""
    k = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    frames = list(encode_cache({0: (k, k)}, precision="int8", query_id="q", sender="t", max_payload=1 << 20))
    header, _ = parse_frame(frames[0])
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    assert f"`chunk_hash` is {header.chunk_hash}" in doc and f"`blob_hash` is {header.blob_hash}" in doc
    doc_hex = "".join(doc.split("The whole 120-byte frame")[1].split("```")[1].split())
    assert doc_hex == frames[0].hex() and len(frames[0]) == 120


def test_stream_cut_round_trip_and_damage() -> None:
    from bus.frames import cut_frame, is_cut, read_cut

    frame = cut_frame("q-1", "tx_2", [5, 0, 3])
    assert is_cut(frame) and not is_cut(b"FRKV" + frame[4:])
    cut = read_cut(frame)
    assert (cut.query_id, cut.sender, cut.layers) == ("q-1", "tx_2", (5, 0, 3))
    for i in range(len(frame)):  # every single-byte change is caught
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(ChunkError):
            read_cut(bytes(bad))
    with pytest.raises(ChunkError):
        read_cut(frame[:-1])
    with pytest.raises(ChunkError):
        read_cut(frame + b"\x00")
    with pytest.raises(CodecError):
        cut_frame("q", "t", [1024])
