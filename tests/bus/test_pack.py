"""Tensor packs: many whole small tensors of one stream in one message (docs/PROTOCOL.md section 6)."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from bus.codec import encode_layer_chunks
from bus.errors import ChunkError, CodecError, LimitError
from bus.frames import (
    PACK_ENTRY,
    PACK_MAGIC,
    PackEntry,
    SealedChunk,
    is_pack,
    pack_message,
    read_message,
    read_pack,
)
from bus.reassembler import Reassembler
from tests.bus.test_transport import _RecordingClient


def _cache(n_layers: int = 3, tokens: int = 1, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 2, tokens, 16)
    return {i: (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for i in range(n_layers)}


def _entries(cache: dict, precision: str = "fp16", query_id: str = "q-1", sender: str = "tx_2") -> list:
    parts = []
    for layer, (k, v) in cache.items():
        parts += encode_layer_chunks(
            layer,
            k,
            v,
            precision=precision,
            query_id=query_id,
            sender=sender,
            layers_total=len(cache),
            compress=False,
            pack_limit=1 << 20,
        )
    return parts


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_a_pack_round_trips_every_precision(precision: str) -> None:
    cache = _cache()
    entries = _entries(cache, precision)
    assert all(isinstance(e, PackEntry) for e in entries)
    message = pack_message("q-1", "tx_2", 3, entries)
    assert is_pack(message) and len(message) % 16 == 0
    chunks = read_pack(message)
    assert [(c.header.layer, c.header.tensor) for c in chunks] == [(m, t) for m in range(3) for t in "kv"]
    assert all(c.packed and c.header.n_chunks == 1 and c.header.layers_total == 3 for c in chunks)
    reasm = Reassembler(out_dtype=torch.float32)
    done = [ev for c in read_message(message) for ev in reasm.add(c)]
    assert [ev.layer for ev in done] == [0, 1, 2]
    tol = {"fp32": 0, "fp16": 1e-3, "bf16": 1e-2, "int8": 3e-2, "int4": 0.4}[precision]
    for ev in done:
        k, v = cache[ev.layer]
        assert torch.allclose(ev.k, k, atol=tol) and torch.allclose(ev.v, v, atol=tol)


def test_the_pack_layout_and_check_follow_the_protocol_doc() -> None:
    """Parsed with struct from the doc's description alone: prefix, fixed fields, ids, table, check, padding."""
    entries = _entries(_cache(n_layers=2), "int8")
    message = pack_message("q-1", "tx_2", 2, entries)
    magic, version, reserved, hlen = struct.unpack_from(">4sBBH", message)
    assert (magic, version, reserved) == (b"FRKP", 4, 0) and (8 + hlen) % 16 == 0
    head = message[8 : 8 + hlen]
    schema, layers_total, count = struct.unpack_from(">BHH", head)
    assert (schema, layers_total, count) == (1, 2, 4)
    pos = 5
    ids = []
    for _ in range(2):
        n = head[pos]
        ids.append(head[pos + 1 : pos + 1 + n].decode())
        pos += 1 + n
    assert ids == ["q-1", "tx_2"]
    rows = [struct.unpack_from(">BHBBBBBB4III", head, pos + 33 * i) for i in range(count)]
    check_at = pos + 33 * count
    blobs, at = [], 8 + hlen
    for row in rows:
        blobs.append(message[at : at + row[-1]])
        at += -(-row[-1] // 16) * 16
    assert at == len(message)
    digests = struct.pack(f">{count}Q", *(xxhash.xxh3_64_intdigest(b) for b in blobs))
    check = xxhash.xxh3_64_intdigest(head[:check_at], seed=xxhash.xxh3_64_intdigest(digests)) & 0xFFFFFFFF
    assert struct.unpack_from(">I", head, check_at)[0] == check
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, 0, 3), (1, 0, 3), (0, 1, 3), (1, 1, 3)]  # k/v, layer, int8


def test_every_single_byte_change_of_a_pack_is_refused() -> None:
    message = pack_message("q-1", "tx_2", 2, _entries(_cache(n_layers=2), "int4"))
    for i in range(len(message)):
        bad = bytearray(message)
        bad[i] ^= 0x01
        with pytest.raises(ChunkError):
            list(read_message(bytes(bad)))
    for bad in (message[:-1], message[:-16], message + bytes(16), message[:40]):
        with pytest.raises(ChunkError):
            read_pack(bad)


def test_a_pack_that_names_a_tensor_twice_or_nothing_is_refused() -> None:
    entries = _entries(_cache(n_layers=1))
    with pytest.raises(ChunkError, match="twice"):
        read_pack(pack_message("q", "t", 1, [entries[0], entries[0]]))
    with pytest.raises(CodecError):
        pack_message("q", "t", 1, [])


def test_a_pack_entry_that_breaks_the_header_rules_is_refused() -> None:
    """An entry is validated as a one-chunk chunk header: here raw_bytes does not fit its shape and precision."""
    (k_entry, _) = _entries(_cache(n_layers=1))
    forged = PackEntry(k_entry.layer, k_entry.tensor, k_entry.blob, (*k_entry.fields[:-2], 999, k_entry.fields[-1]))
    with pytest.raises(ChunkError, match="raw_bytes"):
        read_pack(pack_message("q", "t", 1, [forged]))


def test_entries_validated_once_per_kind_are_each_the_header_their_row_validates_to(monkeypatch) -> None:
    """A stream's pack entries alike but for layer and K/V validate once (kept across its packs): every chunk still
    carries the header its own row validates to, and a later pack of the same stream whose entry differs in any
    other field, names a layer out of range or an undefined tensor is refused as before."""
    import bus.frames as frames
    from bus.schemas import MAX_LAYER_INDEX, KVChunkHeader

    entries = _entries(_cache(n_layers=4, tokens=8), query_id="q-alike", sender="t")
    for _ in range(2):  # the second read takes the kept headers
        for chunk, entry in zip(read_pack(pack_message("q-alike", "t", 4, entries)), entries, strict=True):
            want = frames._entry_header(
                (frames.TENSORS.index(entry.tensor), entry.layer, *entry.fields), "q-alike", "t", 4
            )
            assert chunk.header == want and isinstance(chunk.header, KVChunkHeader)
            assert (chunk.header.layer, chunk.header.tensor) == (entry.layer, entry.tensor)
    k = entries[0]
    forged = PackEntry(k.layer, k.tensor, k.blob, (*k.fields[:-2], 999, k.fields[-1]))
    with pytest.raises(ChunkError, match="raw_bytes"):
        read_pack(pack_message("q-alike", "t", 4, [entries[1], forged]))
    with pytest.raises(ChunkError, match="layer"):
        read_pack(pack_message("q-alike", "t", 4, [entries[0], PackEntry(MAX_LAYER_INDEX + 1, "k", k.blob, k.fields)]))
    monkeypatch.setattr(frames, "TENSORS", ("k", "v", "x"))  # a sender writing tensor code 2
    message = pack_message("q-alike", "t", 4, [entries[0], PackEntry(2, "x", k.blob, k.fields)])
    monkeypatch.undo()
    with pytest.raises(ChunkError, match="undefined tensor"):
        read_pack(message)


def _add_all(reasm: Reassembler, message: bytes, whole: bool, done: list | None = None) -> list:
    """A pack's tensors into ``reasm``: as one pack (``add_pack``) or chunk by chunk (``add``); the layers done."""
    from bus.frames import read_pack_entries

    done = [] if done is None else done
    if whole:
        return reasm.add_pack(read_pack_entries(message), done)
    for c in read_pack(message):
        done += reasm.add(c)
    return done


@pytest.mark.parametrize("whole", [True, False], ids=["add_pack", "add"])
def test_packed_tensors_are_charged_deduplicated_and_limited_as_chunked_ones(whole: bool) -> None:
    """A pack read twice adds nothing the second time; a packed tensor that differs from one already held is a
    conflict; a pack that crosses the query's byte limit completes the tensors before the limit (their layers
    reported), refuses the one that crosses it, and charges the query exactly the decoded tensors it keeps."""
    from bus.reassembler import ReassemblyLimits

    cache = _cache(n_layers=3, tokens=8)  # 512-byte fp16 blobs decoded to 1,024-byte fp32 tensors
    message = pack_message("q", "t", 3, _entries(cache, query_id="q", sender="t"))
    reasm = Reassembler()
    assert [ev.layer for ev in _add_all(reasm, message, whole)] == [0, 1, 2]
    held = reasm.query_bytes("q")
    assert held == 6 * 1024 and _add_all(reasm, message, whole) == []
    other = _entries(_cache(n_layers=1, tokens=8, seed=1), query_id="q", sender="t")
    with pytest.raises(ChunkError, match="conflict"):
        _add_all(reasm, pack_message("q", "t", 3, other[:1]), whole)
    assert reasm.query_bytes("q") == held and set(reasm.completed("q", "t")) == {0, 1, 2}
    need = 512 + 512 + 1024  # a packed tensor reserves blob, raw copy and output while it decodes
    limited = Reassembler(ReassemblyLimits(max_bytes_per_query=2 * 1024 + need))  # room for two kept and one more
    done: list = []
    with pytest.raises(LimitError, match="bytes"):
        _add_all(limited, message, whole, done)
    assert [ev.layer for ev in done] == [0]
    assert limited.query_bytes("q") == 3 * 1024 and set(limited.completed("q", "t")) == {0}
    with pytest.raises(ChunkError, match="late"):
        limited.close("q") or _add_all(limited, message, whole)


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8", "int4"])
def test_a_pack_added_whole_is_the_pack_added_chunk_by_chunk(precision: str) -> None:
    """Alike float tensors (a block), quantized ones (K and V of different kinds) and a second stream's pack:
    ``add_pack`` completes the same layers with the same tensors, precisions and charged bytes as ``add``."""
    packs = [
        pack_message("q", "t", 4, _entries(_cache(n_layers=4, tokens=8), precision, query_id="q", sender="t")),
        pack_message("q", "u", 2, _entries(_cache(n_layers=2, tokens=3, seed=2), precision, query_id="q", sender="u")),
    ]
    by_pack, by_chunk = Reassembler(out_dtype=torch.float16), Reassembler(out_dtype=torch.float16)
    got = [[(ev.sender, ev.layer) for message in packs for ev in _add_all(r, message, w)] for r, w in
           ((by_pack, True), (by_chunk, False))]  # fmt: skip
    assert got[0] == got[1] and len(got[0]) == 6
    assert by_pack.query_bytes("q") == by_chunk.query_bytes("q") > 0
    for sender in ("t", "u"):
        a, b = by_pack.completed("q", sender), by_chunk.completed("q", sender)
        assert a.keys() == b.keys() and all(torch.equal(a[m][i], b[m][i]) for m in a for i in (0, 1))
        assert by_pack.layer_precisions("q", sender) == by_chunk.layer_precisions("q", sender)


def test_a_nan_in_a_pack_added_whole_fails_its_own_tensor_after_the_ones_before() -> None:
    """Three alike K tensors, the last with a NaN, added as one pack: the block fails, each decodes alone with the
    header of its kind (validated for layer 0), the first two are added and charged, the bad one is refused and
    nothing of it is held; sent again without the NaN it completes."""
    from bus.frames import read_pack_entries

    ks = [e for e in _entries(_cache(n_layers=3, tokens=8), query_id="q-nan", sender="t-nan") if e.tensor == "k"]
    pack = read_pack_entries(pack_message("q-nan", "t-nan", 3, [ks[0], ks[1], _nan_entry(ks[2], 2)]))
    assert pack.block is not None and [e.kind.layer for e in pack.entries] == [0, 0, 0]
    reasm = Reassembler()
    done: list = []
    with pytest.raises(ChunkError, match="NaN/inf"):
        reasm.add_pack(pack, done)
    assert pack.block.failed and done == [] and reasm.query_bytes("q-nan") == 2 * 1024  # two fp32 K tensors kept
    assert reasm.add_pack(read_pack_entries(pack_message("q-nan", "t-nan", 3, ks))) == []  # K only: no layer yet
    assert reasm.query_bytes("q-nan") == 3 * 1024


def test_a_packs_parts_are_its_message_with_the_blobs_as_views() -> None:
    from bus.frames import pack_parts

    for tokens in (1, 8):  # 64- and 512-byte fp16 blobs: aligned, nothing pads them
        entries = _entries(_cache(n_layers=2, tokens=tokens))
        parts = pack_parts("q-1", "tx_2", 2, entries)
        assert b"".join(parts) == pack_message("q-1", "tx_2", 2, entries)
        assert [p.obj for p in parts[1:]] == [memoryview(e.blob).obj for e in entries]  # not copied
    ragged = _entries({0: (torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3))})  # 6-byte blobs: padded
    parts = pack_parts("q-1", "tx_2", 1, ragged)
    assert [len(p) for p in parts[1:]] == [6, 10, 6, 10] and b"".join(parts) == pack_message("q-1", "tx_2", 1, ragged)


def test_only_tensors_within_the_pack_limit_come_out_whole() -> None:
    k = torch.randn(1, 2, 40, 16)  # 2,560 bytes at fp16
    small = torch.randn(1, 2, 1, 16)
    parts = encode_layer_chunks(
        0, k, small, precision="fp16", query_id="q", sender="t", layers_total=1, compress=False, pack_limit=1000
    )
    assert isinstance(parts[0], SealedChunk) and isinstance(parts[1], PackEntry)
    chunked = encode_layer_chunks(
        0, small, small, precision="fp16", query_id="q", sender="t", layers_total=1, pack_limit=1000, chunk_bytes=32
    )
    assert all(isinstance(p, SealedChunk) for p in chunked)  # chunk_bytes caps what travels whole too
    assert PACK_ENTRY.size == 33 and PACK_MAGIC == b"FRKP"


def test_a_chunk_and_a_packed_copy_of_one_tensor_conflict() -> None:
    """A pack cannot complete (or overwrite) a tensor that chunk frames started: the headers differ."""
    cache = _cache(n_layers=1, tokens=4)
    (k, v) = cache[0]
    framed = encode_layer_chunks(0, k, v, precision="fp16", query_id="q", sender="t", layers_total=1, chunk_bytes=64)
    reasm = Reassembler()
    from bus.frames import read_frame

    reasm.add(read_frame(framed[0].frame()))
    packed = read_pack(pack_message("q", "t", 1, _entries(cache, query_id="q", sender="t")))
    with pytest.raises(ChunkError, match="conflicts"):
        reasm.add(packed[0])


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
async def test_a_shaped_link_sends_a_pack_per_small_layer_within_the_planners_estimate(precision: str) -> None:
    """A real one-token tail (3 kv heads x 64) on a slow shaped link: one pack per layer, each within
    ``layer_wire_bytes`` (what the gate and the steer plan with) and smaller than two chunk frames."""
    from bus.budget import layer_wire_bytes
    from bus.frames import frame_overhead
    from bus.shaper import LinkShaper
    from bus.transport import send_cache

    async def no_wait(_: float) -> None:
        return None

    cache = {m: (torch.randn(1, 3, 1, 64).half(), torch.randn(1, 3, 1, 64).half()) for m in range(4)}
    nc = _RecordingClient()
    qid, sender = "0123456789abcdef", "gemma-a"
    report = await send_cache(
        nc, "s", cache, precision=precision, query_id=qid, sender=sender, shaper=LinkShaper(1000, sleep=no_wait)
    )  # type: ignore[arg-type]
    assert len(nc.frames) == 4 and all(is_pack(m) for m in nc.frames)
    assert report.wire_bytes == sum(map(len, nc.frames))
    overhead = frame_overhead(qid, sender)
    packed = layer_wire_bytes((1, 3, 1, 64), precision, frame_overhead=overhead)
    framed = layer_wire_bytes((1, 3, 1, 64), precision, frame_overhead=overhead, packed=False)
    assert all(len(m) <= packed < framed for m in nc.frames)


def _nan_entry(like: PackEntry, layer: int) -> PackEntry:
    """A pack entry whose blob holds a NaN (a sender that skipped the encoder's check)."""
    blob = bytearray(bytes(like.blob))
    blob[0:2] = b"\x00\x7e"  # fp16 NaN, little-endian
    return PackEntry(layer, like.tensor, bytes(blob), like.fields)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_a_pack_of_alike_float_tensors_decodes_as_one_block_to_the_same_values(out_dtype: torch.dtype) -> None:
    from bus.codec import decode_blob

    cache = _cache(n_layers=4, tokens=8)  # 512-byte fp16 blobs: a multiple of 16, nothing pads between them
    message = pack_message("q-1", "tx_2", 4, _entries(cache))
    chunks = read_pack(message)
    block = chunks[0].block
    assert block is not None and all(c.block is block for c in chunks) and [c.index for c in chunks] == list(range(8))
    reasm = Reassembler(out_dtype=out_dtype)
    done = [ev for c in chunks for ev in reasm.add(c)]
    assert block.decoded is not None and not block.failed
    assert len(block.decoded) == 8 and all(t.shape == (1, 2, 8, 16) for t in block.decoded)
    assert len({t.untyped_storage().data_ptr() for t in block.decoded}) == 1  # views of one buffer
    assert [ev.layer for ev in done] == [0, 1, 2, 3]
    for c, ev in zip(chunks[::2], done, strict=True):
        assert torch.equal(ev.k, decode_blob(c.payload, c.header, out_dtype)) and ev.k.dtype == out_dtype
    for ev in done:
        k, v = cache[ev.layer]
        assert torch.allclose(ev.k.float(), k, atol=1e-3) and torch.allclose(ev.v.float(), v, atol=1e-3)


def test_packs_of_unlike_or_quantized_tensors_decode_tensor_by_tensor() -> None:
    mixed = {0: _cache(1, tokens=8)[0], 1: _cache(1, tokens=16, seed=1)[0]}  # two shapes
    assert all(c.block is None for c in read_pack(pack_message("q", "t", 2, _entries(mixed, query_id="q", sender="t"))))
    quantized = pack_message("q", "t", 3, _entries(_cache(tokens=8), "int8", query_id="q", sender="t"))
    assert all(c.block is None for c in read_pack(quantized))
    odd = pack_message("q", "t", 3, _entries(_cache(tokens=1), query_id="q", sender="t"))  # 64 B: aligned, a block
    assert read_pack(odd)[0].block is not None
    ragged = {0: (torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3))}  # 6-byte blobs: padded apart, no block
    assert all(
        c.block is None for c in read_pack(pack_message("q", "t", 1, _entries(ragged, query_id="q", sender="t")))
    )


def test_a_nan_in_a_block_fails_only_its_own_tensor() -> None:
    """One bad tensor in a pack decoded as a block: the layers before it complete, the bad one is refused alone,
    as it would be in a pack of its own."""
    cache = _cache(n_layers=3, tokens=8)
    entries = _entries(cache, query_id="q", sender="t")
    entries[3] = _nan_entry(entries[3], 1)  # layer 1's V
    chunks = read_pack(pack_message("q", "t", 3, entries))
    assert chunks[0].block is not None
    reasm = Reassembler(out_dtype=torch.float32)
    done = []
    with pytest.raises(ChunkError, match="NaN/inf"):
        for c in chunks:
            done += reasm.add(c)
    assert chunks[0].block.failed and [ev.layer for ev in done] == [0]
    assert set(reasm.completed("q", "t")) == {0}


def test_a_block_of_pack_entries_is_the_entries_layer_by_layer() -> None:
    from bus.codec import encode_pack_entries

    cache = {m: (k.half(), v.float()) for m, (k, v) in _cache(n_layers=3, tokens=4).items()}
    same_dtype = {m: (k, v.half()) for m, (k, v) in cache.items()}
    items = [(m, k, v) for m, (k, v) in same_dtype.items()]
    for precision in ("fp16", "fp32", "bf16"):
        block = encode_pack_entries(items, precision, 1 << 20)
        assert block is not None and list(block) == [0, 1, 2]
        per_layer = {
            m: encode_layer_chunks(
                m,
                k,
                v,
                precision=precision,
                query_id="q",
                sender="t",
                layers_total=3,
                compress=False,
                pack_limit=1 << 20,
            )
            for m, k, v in items
        }
        for m in block:
            got = [(e.layer, e.tensor, e.fields, bytes(e.blob)) for e in block[m]]
            assert got == [(e.layer, e.tensor, e.fields, bytes(e.blob)) for e in per_layer[m]]
    nan = {m: (k.clone(), v) for m, (k, v) in same_dtype.items()}
    nan[2][0][0, 0, 0, 0] = float("nan")
    refused = [
        [(m, k, v) for m, (k, v) in cache.items()],  # K fp16, V fp32: not one block
        [(m, k, v) for m, (k, v) in nan.items()],  # a NaN: layer by layer reports it where it is
        [(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))],  # not 4-D
        [(0, torch.zeros(1, 2, 4, 16, dtype=torch.int32), torch.zeros(1, 2, 4, 16, dtype=torch.int32))],
        [(0, torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 5, 16))],  # shapes differ: not one block
        [(0, torch.zeros(1, 2, 4, 16), "not a tensor")],
    ]
    for bad in refused:
        assert encode_pack_entries(bad, "fp16", 1 << 20) is None
    assert encode_pack_entries(items, "fp16", 100) is None  # a blob over the pack limit
    assert encode_pack_entries(items, "int8", 1 << 20) is None  # quantized: tensor by tensor
