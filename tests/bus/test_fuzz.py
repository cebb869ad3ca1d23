"""Seeded fuzz of malformed chunks: truncations, bit flips and header mutations always end in a typed
error (never a crash), never yield a wrong tensor, and never disturb a bystander query."""

from __future__ import annotations

import random

import pytest
import torch

from bus.codec import encode_cache
from bus.errors import CodecError
from bus.frames import MAGIC, parse_frame, payload_hash, seal
from bus.reassembler import Reassembler
from tests.bus.frame_spec import pack, unpack

MUTATIONS = {
    "layer": lambda v, r: v + r.choice([1, -1, 7]),
    "tensor": lambda v, r: "v" if v == "k" else "k",
    "chunk": lambda v, r: v + r.choice([1, -1, 1000]),
    "n_chunks": lambda v, r: v + r.choice([1, -1]),
    "chunk_size": lambda v, r: v + r.choice([1, -1, 64]),
    "shape": lambda v, r: (lambda j: [d + (i == j) for i, d in enumerate(v)])(r.randrange(4)),
    "precision": lambda v, r: r.choice([p for p in ("fp32", "fp16", "bf16", "int8", "int4", "fp8") if p != v]),
    "shuffle": lambda v, r: not v,
    "compression": lambda v, r: "none" if v == "lz4" else "lz4",
    "scale_axis": lambda v, r: r.choice([a for a in ("none", "channel", "token") if a != v]),
    "raw_bytes": lambda v, r: v + r.choice([1, -1, 10**9]),
    "blob_bytes": lambda v, r: v + r.choice([1, -1]),
    "layers_total": lambda v, r: v + 1,
    "chunk_hash": lambda v, r: v ^ (1 << r.randrange(32)),
    "blob_hash": lambda v, r: v ^ (1 << r.randrange(32)),
    "schema_version": lambda v, r: r.choice([0, 2, "1", None]),
    "query_id": lambda v, r: r.choice(["other", "q.*", ""]),
    "sender": lambda v, r: r.choice(["mallory", "s>"]),
    "dtype": lambda v, r: "float64",
    "scale_dtype": lambda v, r: "float32",
}


def _cache(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(1, 2, 5, 24, generator=gen), torch.randn(1, 2, 5, 24, generator=gen)) for i in range(3)}


def _split(frame: bytes) -> tuple[dict, bytes]:
    return unpack(frame)


def _join(header: dict, payload: bytes) -> bytes:
    return pack(header, payload)


def _reference(frames: list[bytes]) -> dict:
    reasm = Reassembler()
    for frame in frames:
        reasm.feed(frame)
    return reasm.completed("q", "s")


def _mutate(kind: str, frame: bytes, r: random.Random) -> bytes:
    if kind == "truncate":
        return frame[: r.randrange(len(frame))]
    if kind == "bitflip":
        out = bytearray(frame)
        for _ in range(r.randint(1, 3)):
            pos = r.randrange(len(out))
            out[pos] ^= 1 << r.randrange(8)
        return bytes(out)
    if kind == "header":
        header, payload = _split(frame)
        field = r.choice(list(MUTATIONS))
        header[field] = MUTATIONS[field](header.get(field), r)
        return _join(header, payload)
    if kind == "junk":
        return r.randbytes(r.randrange(0, 200)) if r.random() < 0.5 else MAGIC + r.randbytes(r.randrange(0, 64))
    if kind == "forged_payload":  # payload changed and chunk_hash recomputed: only blob_hash can tell
        header, payload = parse_frame(frame)
        data = bytearray(payload)
        data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        resealed = seal(header, payload_hash(data))
        return _join(resealed.model_dump(), bytes(data))
    if kind == "forged_header":  # identity changed and chunk_hash recomputed: blob_hash is bound to identity
        header, payload = parse_frame(frame)
        update = r.choice([{"layer": (header.layer + 1) % 3}, {"tensor": "v" if header.tensor == "k" else "k"}])
        forged = seal(header.model_copy(update=update), payload_hash(payload))
        return _join(forged.model_dump(), bytes(payload))
    raise AssertionError(kind)


@pytest.mark.parametrize("precision", ["fp16", "int4"])
@pytest.mark.parametrize("compress", [True, False, "deflate"], ids=["lz4", "raw", "deflate"])
def test_fuzz_malformed_chunks(precision: str, compress: bool | str) -> None:
    r = random.Random(f"{precision}-{compress}")
    good = list(
        encode_cache(_cache(1), precision=precision, query_id="q", sender="s", compress=compress, chunk_bytes=48)
    )
    bystander = list(encode_cache(_cache(2), precision=precision, query_id="b", sender="s", compress=compress))
    expected = _reference(good)
    expected_bystander = decode_bystander(bystander)
    kinds = ["truncate", "bitflip", "header", "junk", "forged_payload", "forged_header"]
    for case in range(120):
        kind = kinds[case % len(kinds)]
        target = r.randrange(len(good))
        bad = _mutate(kind, good[target], r)
        if bad == good[target] or (kind == "header" and _split(bad) == _split(good[target])):
            continue  # the mutation changed nothing
        stream = [*good[:target], *good[target + 1 :], bad, *bystander]
        r.shuffle(stream)
        reasm = Reassembler()
        errors = []
        for frame in stream:
            try:
                reasm.feed(frame)
            except CodecError as exc:  # ChunkError and LimitError are CodecErrors
                errors.append(exc)
            # anything else propagates and fails the test: a crash
        assert all("\n" not in str(e) for e in errors)
        for layer, (k, v) in reasm.completed("q", "s").items():  # whatever completed is exactly right
            assert torch.equal(k, expected[layer][0]) and torch.equal(v, expected[layer][1])
        if kind != "forged_header":  # a well-formed forgery may just leave its layers incomplete
            assert errors, f"case {case} ({kind}) on chunk {target} passed silently"
            assert len(reasm.completed("q", "s")) == 2  # only the layer holding the bad chunk is missing
        got = reasm.completed("b", "s")
        assert all(torch.equal(got[i][0], expected_bystander[i][0]) for i in expected_bystander)
        assert len(got) == len(expected_bystander)


def decode_bystander(frames: list[bytes]) -> dict:
    reasm = Reassembler()
    for frame in frames:
        reasm.feed(frame)
    return reasm.completed("b", "s")
