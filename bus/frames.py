"""The KV chunk frame, one per NATS message: ``MAGIC | u8 version | u8 0 | u16 header length | header JSON | payload``.

The frame is the whole NATS payload (no NATS headers), so what the server checks against
``max_payload`` is exactly the frame's length. Frame version 2 checksums with xxHash (XXH3, 64-bit;
version 1 used zlib's CRC-32, ten times slower). They are chained so every payload byte is hashed once
on each side, and each header field keeps the low 32 bits (``bus.schemas.Crc`` is a 32-bit field):

- ``payload_hash = xxh3_64(payload)``; ``chunk_crc = low32(xxh3_64(header seed, seed=payload_hash))``:
  the payload and every other header field, so a flipped payload bit *or* a mutated header field fails
  the chunk check;
- ``blob_crc = low32(xxh3_64(payload_hash_0 .. payload_hash_n-1 as 8-byte words, seed=xxh3_64(identity)))``:
  the whole tensor blob, chunk by chunk in order, bound to (query, sender, layer, tensor), so a chunk
  misplaced, swapped between tensors or re-signed after a payload change fails at reassembly.

Senders that publish at once (``bus.transport``) use :func:`seal_chunks` and a :class:`FrameBuffer`, so a
frame is assembled in one reused buffer instead of a fresh allocation; :func:`blob_frames` returns
standalone ``bytes`` frames for callers that keep them.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash
from pydantic import ValidationError

from bus.errors import ChunkError, CodecError
from bus.schemas import CRC_MAX, MAX_CHUNKS, SCHEMA_VERSION, KVChunkHeader

MAGIC = b"FRKV"
FRAME_VERSION = 2  # 1: CRC-32 checksums, u32 header length; 2: xxh3_64 checksums
PREFIX = struct.Struct(">4sBBH")  # magic, frame version, reserved (0), header length in bytes
MAX_HEADER_BYTES = 4096  # a header longer than this is malformed
MIN_CHUNK_BYTES = 1024  # a max_payload leaving less than this per chunk is refused
PAYLOAD_ALIGN = 16  # bytes; payload offset within the frame
CHECKSUM_MASK = 0xFFFFFFFF  # header checksum fields (bus.schemas.Crc) carry the low 32 bits of an xxh3_64 digest

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Chunk:
    """A parsed, checked frame: its header, a view of its payload, and the payload's xxh3_64 digest."""

    header: KVChunkHeader
    payload: memoryview
    payload_hash: int


@dataclass(frozen=True)
class SealedChunk:
    """A sealed chunk not yet framed: the frame's head (prefix and padded header JSON) and its payload."""

    head: bytes
    payload: memoryview

    @property
    def size(self) -> int:
        """Bytes of the whole frame."""
        return len(self.head) + len(self.payload)

    def frame(self) -> bytes:
        """The frame as a standalone ``bytes`` object (one copy of the payload)."""
        return b"".join((self.head, self.payload))


class FrameBuffer:
    """One reusable buffer that frames are assembled in, one at a time: no allocation per frame.

    The view :meth:`frame` returns is valid until the next call; a publisher must have copied it by then
    (nats-py's ``publish`` builds its protocol command from the payload before it returns).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def frame(self, chunk: SealedChunk) -> memoryview:
        """Assemble ``chunk`` into the buffer and return a view of exactly its frame bytes."""
        size, head = chunk.size, len(chunk.head)
        if len(self._buf) < size:
            self._buf = bytearray(size)  # a new buffer: views of the old one stay valid for their holders
        view = memoryview(self._buf)[:size]
        view[:head] = chunk.head
        view[head:] = chunk.payload
        return view


def payload_hash(payload: Buffer) -> int:
    """The 64-bit XXH3 digest of a chunk payload (the first link of the checksum chain)."""
    return xxhash.xxh3_64_intdigest(payload)


def identity_seed(query_id: str, sender: str, layer: int, tensor: str) -> bytes:
    """Bytes that start ``blob_crc``, so a blob cannot pass as another layer's, tensor's or sender's."""
    return f"{SCHEMA_VERSION}|{query_id}|{sender}|{layer}|{tensor}".encode()


def blob_crc(payload_hashes: list[int], seed: bytes) -> int:
    """Low 32 bits of XXH3 over a tensor's chunk payload digests in order, seeded by ``seed``'s digest."""
    words = struct.pack(f">{len(payload_hashes)}Q", *payload_hashes)
    return xxhash.xxh3_64_intdigest(words, seed=xxhash.xxh3_64_intdigest(seed)) & CHECKSUM_MASK


def chunk_crc(header: KVChunkHeader, payload_digest: int) -> int:
    """Low 32 bits of XXH3 over every header field but ``chunk_crc``, seeded by the payload's digest."""
    return xxhash.xxh3_64_intdigest(header.crc_seed(), seed=payload_digest) & CHECKSUM_MASK


def seal(header: KVChunkHeader, payload_digest: int) -> KVChunkHeader:
    """Return ``header`` with ``chunk_crc`` set for a payload whose :func:`payload_hash` is ``payload_digest``."""
    return header.model_copy(update={"chunk_crc": chunk_crc(header, payload_digest)})


@functools.lru_cache(maxsize=64)  # pure in max_payload; senders ask once per tensor
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


def frame_head(header: KVChunkHeader) -> bytes:
    """``MAGIC | version | 0 | u16 len | header JSON``, the JSON space-padded so the payload starts 16-aligned."""
    head = header.model_dump_json().encode()
    head += b" " * (-(PREFIX.size + len(head)) % PAYLOAD_ALIGN)  # receivers view tensors in place
    return PREFIX.pack(MAGIC, FRAME_VERSION, 0, len(head)) + head


def build_frame(header: KVChunkHeader, payload: Buffer) -> bytes:
    """One standalone frame: :func:`frame_head` followed by ``payload``."""
    return b"".join((frame_head(header), payload))


def seal_chunks(blob: Buffer, fields: dict, *, max_payload: int, chunk_bytes: int | None = None) -> list[SealedChunk]:
    """Split one tensor blob into sealed chunks whose frames are at most ``max_payload`` bytes.

    ``fields`` holds every header field but ``chunk``, ``n_chunks``, ``chunk_size``, ``blob_bytes``,
    ``chunk_crc`` and ``blob_crc``, which are computed here. Payloads are views of ``blob`` (no copy).
    """
    size = header_budget(max_payload)
    if chunk_bytes is not None:
        size = max(1, min(size, chunk_bytes))
    view = memoryview(blob).cast("B")
    n_chunks = -(-len(view) // size)
    payloads = [view[i * size : (i + 1) * size] for i in range(n_chunks)]
    digests = [payload_hash(p) for p in payloads]
    seed = identity_seed(fields["query_id"], fields["sender"], fields["layer"], fields["tensor"])
    base = KVChunkHeader(
        **fields,
        chunk=0,
        n_chunks=n_chunks,
        chunk_size=size,
        blob_bytes=len(view),
        chunk_crc=0,
        blob_crc=blob_crc(digests, seed),
    )
    out = []
    for i, (payload, digest) in enumerate(zip(payloads, digests, strict=True)):
        sealed = SealedChunk(frame_head(seal(base.model_copy(update={"chunk": i}), digest)), payload)
        if sealed.size > max_payload:  # cannot happen with header_budget; guard the invariant anyway
            raise CodecError(f"chunk frame of {sealed.size} bytes exceeds max_payload {max_payload}")
        out.append(sealed)
    return out


def blob_frames(blob: Buffer, fields: dict, *, max_payload: int, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """Like :func:`seal_chunks`, as standalone ``bytes`` frames."""
    for sealed in seal_chunks(blob, fields, max_payload=max_payload, chunk_bytes=chunk_bytes):
        yield sealed.frame()


def read_frame(frame: Buffer) -> Chunk:
    """Split a frame into a validated header and a view of its payload; check the length and ``chunk_crc``.

    Anything wrong (truncation, bit flips, a mutated header, a foreign version) is a :class:`ChunkError`.
    """
    view = memoryview(frame).cast("B")
    if len(view) < PREFIX.size:
        raise ChunkError(f"frame of {len(view)} bytes is too short", reason="malformed")
    magic, version, reserved, hlen = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ChunkError("frame does not start with the KV magic", reason="malformed")
    if version != FRAME_VERSION:
        old = " (a CRC-32 frame of format 1)" if version == 0 else ""
        raise ChunkError(
            f"unsupported KV frame version {version}{old}; this build speaks {FRAME_VERSION}", reason="version"
        )
    if reserved != 0:
        raise ChunkError(f"reserved prefix byte is {reserved}, not 0", reason="malformed")
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
    digest = payload_hash(payload)
    if chunk_crc(header, digest) != header.chunk_crc:
        raise ChunkError(
            f"checksum mismatch in chunk {header.chunk} of layer {header.layer} {header.tensor}",
            reason="checksum",
            query_id=header.query_id,
        )
    return Chunk(header, payload, digest)


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
