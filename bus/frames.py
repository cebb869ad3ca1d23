"""The KV chunk frame: ``MAGIC | u32 header length | header JSON | payload``, one per NATS message.

The frame is the whole NATS payload (no NATS headers), so what the server checks against
``max_payload`` is exactly the frame's length. Checksums (CRC-32, zlib) are chained so every payload
byte is read once on each side:

- ``payload_crc = crc32(payload)``; ``chunk_crc = crc32(header seed, start=payload_crc)``: the CRC of
  the payload followed by every other header field, so a flipped payload bit *or* a mutated header
  field fails the chunk check;
- ``blob_crc = crc32(payload_crc_0 .. payload_crc_n-1 as 4-byte words, start=crc32(identity))``: the
  whole tensor blob, chunk by chunk in order, bound to (query, sender, layer, tensor), so a chunk
  misplaced, swapped between tensors or re-signed after a payload change fails at reassembly.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from bus.errors import ChunkError, CodecError
from bus.schemas import CRC_MAX, MAX_CHUNKS, SCHEMA_VERSION, KVChunkHeader

MAGIC = b"FRKV"
PREFIX = struct.Struct(">4sI")  # magic, header length in bytes
MAX_HEADER_BYTES = 4096  # a header longer than this is malformed
MIN_CHUNK_BYTES = 1024  # a max_payload leaving less than this per chunk is refused
PAYLOAD_ALIGN = 16  # bytes; payload offset within the frame

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Chunk:
    """A parsed, checked frame: its header, a view of its payload, and the payload's plain CRC-32."""

    header: KVChunkHeader
    payload: memoryview
    payload_crc: int


def identity_seed(query_id: str, sender: str, layer: int, tensor: str) -> bytes:
    """Bytes that start ``blob_crc``, so a blob cannot pass as another layer's, tensor's or sender's."""
    return f"{SCHEMA_VERSION}|{query_id}|{sender}|{layer}|{tensor}".encode()


def blob_crc(payload_crcs: list[int], seed: bytes) -> int:
    """CRC-32 over a tensor's chunk CRCs in order, started from ``seed``."""
    return zlib.crc32(struct.pack(f">{len(payload_crcs)}I", *payload_crcs), zlib.crc32(seed))


def seal(header: KVChunkHeader, payload_crc: int) -> KVChunkHeader:
    """Return ``header`` with ``chunk_crc`` set for a payload whose plain CRC-32 is ``payload_crc``."""
    unsigned = header.model_copy(update={"chunk_crc": 0})
    return header.model_copy(update={"chunk_crc": zlib.crc32(unsigned.crc_seed(), payload_crc)})


def header_budget(max_payload: int) -> int:
    """Payload bytes per chunk that always fit ``max_payload`` with the worst-case header and prefix."""
    probe = KVChunkHeader.model_construct(
        query_id="x" * 64,
        sender="x" * 64,
        layer=10**6,
        tensor="k",
        chunk=MAX_CHUNKS,
        n_chunks=MAX_CHUNKS,
        chunk_size=10**12,
        dtype="bfloat16",
        shape=(10**8,) * 4,
        precision="fp16",
        shuffle=False,
        compression="none",
        scale_axis="channel",
        scale_dtype="float16",
        raw_bytes=10**15,
        blob_bytes=10**15,
        layers_total=10**4,
        chunk_crc=CRC_MAX,
        blob_crc=CRC_MAX,
    )
    overhead = PREFIX.size + len(probe.model_dump_json()) + PAYLOAD_ALIGN + 16
    budget = max_payload - overhead
    if budget < MIN_CHUNK_BYTES:
        raise CodecError(f"max_payload {max_payload} bytes is too small for KV chunks (need > {overhead + 1024})")
    return budget


def build_frame(header: KVChunkHeader, payload: Buffer) -> bytes:
    """``MAGIC | u32 len | header JSON | payload``; the JSON is space-padded so the payload starts 16-aligned."""
    head = header.model_dump_json().encode()
    head += b" " * (-(PREFIX.size + len(head)) % PAYLOAD_ALIGN)  # receivers view tensors in place
    return b"".join((PREFIX.pack(MAGIC, len(head)), head, payload))


def blob_frames(blob: Buffer, fields: dict, *, max_payload: int, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """Split one tensor blob into sealed frames of at most ``max_payload`` bytes.

    ``fields`` holds every header field but ``chunk``, ``n_chunks``, ``chunk_size``, ``blob_bytes``,
    ``chunk_crc`` and ``blob_crc``, which are computed here.
    """
    size = header_budget(max_payload)
    if chunk_bytes is not None:
        size = max(1, min(size, chunk_bytes))
    view = memoryview(blob).cast("B")
    n_chunks = -(-len(view) // size)
    payloads = [view[i * size : (i + 1) * size] for i in range(n_chunks)]
    crcs = [zlib.crc32(p) for p in payloads]
    seed = identity_seed(fields["query_id"], fields["sender"], fields["layer"], fields["tensor"])
    base = KVChunkHeader(
        **fields,
        chunk=0,
        n_chunks=n_chunks,
        chunk_size=size,
        blob_bytes=len(view),
        chunk_crc=0,
        blob_crc=blob_crc(crcs, seed),
    )
    for i, (payload, crc) in enumerate(zip(payloads, crcs, strict=True)):
        header = seal(base.model_copy(update={"chunk": i}), crc)
        frame = build_frame(header, payload)
        if len(frame) > max_payload:  # cannot happen with header_budget; guard the invariant anyway
            raise CodecError(f"chunk frame of {len(frame)} bytes exceeds max_payload {max_payload}")
        yield frame


def read_frame(frame: Buffer) -> Chunk:
    """Split a frame into a validated header and its payload; check the length and ``chunk_crc``.

    Anything wrong (truncation, bit flips, a mutated header, a foreign version) is a :class:`ChunkError`.
    """
    view = memoryview(frame).cast("B")
    if len(view) < PREFIX.size:
        raise ChunkError(f"frame of {len(view)} bytes is too short", reason="malformed")
    magic, hlen = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ChunkError("frame does not start with the KV magic", reason="malformed")
    if hlen > MAX_HEADER_BYTES or PREFIX.size + hlen > len(view):
        raise ChunkError(f"header length {hlen} does not fit the {len(view)}-byte frame", reason="malformed")
    header = _parse_header(bytes(view[PREFIX.size : PREFIX.size + hlen]))
    payload = view[PREFIX.size + hlen :]
    if len(payload) != header.payload_len:
        raise ChunkError(
            f"chunk {header.chunk}/{header.n_chunks} of layer {header.layer} {header.tensor} has "
            f"{len(payload)} bytes, expected {header.payload_len}",
            reason="malformed",
        )
    crc = zlib.crc32(payload)
    unsigned = header.model_copy(update={"chunk_crc": 0})
    if zlib.crc32(unsigned.crc_seed(), crc) != header.chunk_crc:
        raise ChunkError(
            f"checksum mismatch in chunk {header.chunk} of layer {header.layer} {header.tensor}",
            reason="checksum",
            query_id=header.query_id,
        )
    return Chunk(header, payload, crc)


def parse_frame(frame: Buffer) -> tuple[KVChunkHeader, memoryview]:
    """Like :func:`read_frame`, returning ``(header, payload)``."""
    chunk = read_frame(frame)
    return chunk.header, chunk.payload


def _parse_header(head: bytes) -> KVChunkHeader:
    try:
        obj = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChunkError(f"chunk header is not JSON: {exc}", reason="malformed") from exc
    if not isinstance(obj, dict):
        raise ChunkError("chunk header is not a JSON object", reason="malformed")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ChunkError(
            f"unsupported KV chunk schema_version {version!r} (expected {SCHEMA_VERSION})", reason="version"
        )
    try:
        return KVChunkHeader.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ChunkError(f"invalid chunk header: {where}: {first['msg']}", reason="malformed") from exc
