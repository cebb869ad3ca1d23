"""Reassembler: order, duplicates, conflicts, limits, deadlines, and isolation between queries."""

from __future__ import annotations

import random

import pytest
import torch

from bus.codec import encode_cache
from bus.errors import ChunkError, LimitError
from bus.frames import build_frame, parse_frame, payload_hash, read_frame, seal
from bus.reassembler import LayerDone, Reassembler, ReassemblyLimits


def _cache(n_layers: int = 3, shape=(1, 2, 6, 16), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for i in range(n_layers)}


def _frames(cache: dict, query_id: str = "q", sender: str = "s", precision: str = "fp16", **kw) -> list[bytes]:
    return list(encode_cache(cache, precision=precision, query_id=query_id, sender=sender, chunk_bytes=64, **kw))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_any_order_with_duplicates_reports_layers_as_they_finish() -> None:
    cache = _cache()
    frames = _frames(cache)
    assert len(frames) > 20
    seen: list[LayerDone] = []
    reasm = Reassembler(on_layer=seen.append)
    stream = frames + frames[::3]
    random.Random(1).shuffle(stream)
    returned = []
    for frame in stream:
        returned += reasm.feed(frame)
    assert [d.layer for d in returned] == [d.layer for d in seen]
    assert sorted(d.layer for d in seen) == [0, 1, 2]
    assert reasm.is_complete("q", "s")
    for layer, (k, v) in reasm.completed("q", "s").items():
        assert torch.allclose(k, cache[layer][0], atol=2e-3) and torch.allclose(v, cache[layer][1], atol=2e-3)


def test_partial_stream_reports_complete_layers_only() -> None:
    cache = _cache()
    frames = _frames(cache)
    reasm = Reassembler()
    for frame in frames[: len(frames) // 2]:
        reasm.feed(frame)
    done = set(reasm.completed("q", "s"))
    assert done and done != {0, 1, 2}
    assert not reasm.is_complete("q", "s")


def test_conflicting_duplicate_rejected_state_kept() -> None:
    frames = _frames(_cache())
    reasm = Reassembler()
    reasm.feed(frames[0])
    other = read_frame(_frames(_cache(seed=9))[0])  # same identity, other data
    with pytest.raises(ChunkError) as info:
        reasm.add(other)
    assert info.value.reason == "conflict"
    assert reasm.feed(frames[0]) == []  # the original chunk is still there and still a duplicate
    for frame in frames[1:]:
        reasm.feed(frame)
    assert reasm.is_complete("q", "s")


def test_errors_do_not_disturb_other_queries() -> None:
    good, bad = _frames(_cache(), query_id="good"), _frames(_cache(seed=3), query_id="bad")
    reasm = Reassembler()
    errors = 0
    for i, frame in enumerate(good):
        reasm.feed(frame)
        corrupt = bytearray(bad[i % len(bad)])
        corrupt[-1] ^= 0x40
        try:
            reasm.feed(bytes(corrupt))
        except ChunkError:
            errors += 1
    assert errors == len(good)
    assert reasm.is_complete("good", "s")
    assert reasm.completed("bad", "s") == {}


def test_limits() -> None:
    cache = _cache(n_layers=1, shape=(1, 2, 64, 64))
    reasm = Reassembler(ReassemblyLimits(max_bytes_per_query=40_000))
    frames = _frames(cache)
    with pytest.raises(LimitError) as info:
        for frame in frames:
            reasm.feed(frame)
    assert info.value.reason == "bytes"

    reasm = Reassembler(ReassemblyLimits(max_queries=2))
    reasm.feed(_frames(_cache(), query_id="a")[0])
    reasm.feed(_frames(_cache(), query_id="b")[0])
    with pytest.raises(LimitError):
        reasm.feed(_frames(_cache(), query_id="c")[0])
    reasm.close("a")
    reasm.feed(_frames(_cache(), query_id="c")[0])

    reasm = Reassembler(ReassemblyLimits(max_chunks_per_tensor=4))
    with pytest.raises(LimitError):
        reasm.feed(frames[0])

    reasm = Reassembler(ReassemblyLimits(max_senders_per_query=1))
    reasm.feed(_frames(_cache(), sender="a")[0])
    with pytest.raises(LimitError):
        reasm.feed(_frames(_cache(), sender="b")[0])


def test_deadline_frees_state_and_refuses_late_chunks() -> None:
    clock = FakeClock()
    reasm = Reassembler(ReassemblyLimits(ttl=10.0), clock=clock)
    frames = _frames(_cache(), query_id="old")
    reasm.feed(frames[0])
    reasm.set_deadline("other", clock.now + 100)
    clock.now += 5
    assert reasm.expire() == []
    clock.now += 6
    assert reasm.expire() == ["old"]
    assert reasm.queries_in_flight == 1 and reasm.query_bytes("old") == 0
    with pytest.raises(ChunkError) as info:
        reasm.feed(frames[1])
    assert info.value.reason == "late"


def test_bytes_accounting_shrinks_after_decode() -> None:
    cache = _cache(n_layers=1, shape=(1, 2, 32, 32))
    reasm = Reassembler()
    for frame in _frames(cache, precision="int8"):
        reasm.feed(frame)
    assert reasm.query_bytes("q") == 2 * 2 * 32 * 32 * 4  # just the two decoded fp32 tensors


def test_kv_shape_disagreement_is_shape_error() -> None:
    k = torch.randn(1, 2, 4, 8)
    v_wrong = torch.randn(1, 2, 5, 8)
    reasm = Reassembler()
    with pytest.raises(ChunkError) as info:
        for frame in _frames({0: (k, v_wrong)}):
            reasm.feed(frame)
    assert info.value.reason == "shape"
    assert reasm.completed("q", "s") == {}


def test_reassembled_header_fields_must_agree() -> None:
    """A chunk re-framed with a changed tensor-level field (and a fresh checksum) is a conflict."""
    frames = _frames(_cache())
    reasm = Reassembler()
    reasm.feed(frames[0])
    header, payload = parse_frame(frames[1])
    forged = seal(header.model_copy(update={"blob_hash": header.blob_hash ^ 1}), payload_hash(payload))
    with pytest.raises(ChunkError) as info:
        reasm.feed(build_frame(forged, payload))
    assert info.value.reason == "conflict"
