"""The KV chunk frame: ``MAGIC | u8 version | u8 0 | u16 header length | header | payload``.

A NATS message carries one or more whole frames back to back and nothing else (no NATS headers), so what
the server checks against ``max_payload`` is exactly the frames' length; a frame's own length follows
from its header (:func:`read_frames` walks a message, :func:`read_frame` reads a message of one). A message
may instead be a *tensor pack* (magic ``FRKP``: many whole small tensors under one header and one check,
:func:`pack_message` / :func:`read_pack`) or a *stream cut* (``FRKX``); :func:`read_message` reads either kind
of chunk-carrying message.

Frame version 4: a fixed binary header (64 bytes of big-endian fields, the two ids, zero padding so the
payload starts 16-aligned), checksums with xxHash (XXH3, 64-bit), chained so every payload byte is hashed
once on each side; each header field keeps the low 32 bits. docs/PROTOCOL.md section 6 is the byte-level spec.

- ``payload_hash = xxh3_64(payload)``; ``chunk_hash = low32(xxh3_64(header bytes with chunk_hash zeroed,
  seed=payload_hash))``: a flipped payload bit *or* a mutated header byte fails the chunk check;
- ``blob_hash = low32(xxh3_64(payload_hash_0 .. payload_hash_n-1 as 8-byte words, seed=xxh3_64(identity)))``:
  the whole tensor blob, chunk by chunk in order, bound to (query, sender, layer, tensor), so a chunk
  misplaced, swapped between tensors or re-signed after a payload change fails at reassembly.

Senders that publish at once (``bus.transport``) use :func:`seal_chunks` and a :class:`FrameBuffer`, so a
frame is assembled in one reused buffer instead of a fresh allocation; :func:`blob_frames` returns
standalone ``bytes`` frames for callers that keep them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import xxhash
from pydantic import ValidationError

from bus.errors import ChunkError, CodecError
from bus.schemas import ID_PATTERN, MAX_LAYER_INDEX, KVChunkHeader
from bus.schemas import KV_SCHEMA_VERSION as SCHEMA_VERSION

MAGIC = b"FRKV"
FRAME_VERSION = 4  # 3: the chunk checksum hashed a Python-formatted text of the fields; 4: the header bytes
PREFIX = struct.Struct(">4sBBH")  # magic, frame version, reserved (0), header length in bytes
PAYLOAD_ALIGN = 16  # bytes; payload offset within the frame
MAX_ID_BYTES = 64  # query ids and sender ids (bus.schemas.ID_PATTERN)
# schema_version, tensor, layer, precision, dtype, scale_axis, scale_dtype, shuffle, compression, layers_total,
# chunk, n_chunks, chunk_size, shape[4], raw_bytes, blob_bytes, chunk_hash, blob_hash; then u8 length + query_id,
# u8 length + sender, zero padding
FIELDS = struct.Struct(">BBHBBBBBBHIII4IQQII")
MAX_HEADER_BYTES = FIELDS.size + 2 + 2 * MAX_ID_BYTES + PAYLOAD_ALIGN  # a longer header is malformed
MIN_CHUNK_BYTES = 1024  # a max_payload leaving less than this per chunk is refused
CHECKSUM_MASK = 0xFFFFFFFF  # header hash fields (bus.schemas.Hash32) carry the low 32 bits of an xxh3_64 digest
CHUNK_HASH_AT = 56  # offset of chunk_hash in the header (zeroed while it is computed)
CHUNK_AT = 12  # offset of the chunk index in the header
_CHUNK_FIELD = struct.Struct(">I")  # the chunk index and chunk_hash fields

# one byte per enumerated field: the code is the value's position in its tuple
TENSORS = ("k", "v")
PRECISION_CODES = ("fp32", "fp16", "bf16", "int8", "int4")
DTYPE_CODES = ("float32", "float16", "bfloat16")
SCALE_AXIS_CODES = ("none", "channel", "token")
SCALE_DTYPE_CODES = (None, "float16")
COMPRESSION_CODES = ("none", "lz4", "deflate")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")  # a plain cast: a blob is the tensor's bytes
_COMPRESSION_AT = PREFIX.size + 9  # offset of the compression code in a frame
_ENUMS = (
    ("tensor", TENSORS),
    ("precision", PRECISION_CODES),
    ("dtype", DTYPE_CODES),
    ("scale_axis", SCALE_AXIS_CODES),
    ("scale_dtype", SCALE_DTYPE_CODES),
    ("compression", COMPRESSION_CODES),
)

Buffer = bytes | bytearray | memoryview


class PackBlock:
    """The blobs of a tensor pack whose tensors differ only in layer and K/V, all uncompressed floats, back to back
    without padding: the reassembler decodes them in one go (one NaN/inf check, one cast) and keeps the result in
    ``decoded``, or marks the block ``failed`` and decodes tensor by tensor (so a bad one fails alone). Its tensors
    are views of one buffer, each charged to its query as it completes; a tensor the receiver refuses after the block
    was decoded (a limit reached mid-pack) leaves its share of that buffer held until the others are freed: at most
    one message's decoded bytes."""

    __slots__ = ("view", "count", "decoded", "failed")

    def __init__(self, view: memoryview, count: int) -> None:
        self.view, self.count = view, count
        self.decoded = None  # its tensors once decoded (views of one buffer, in pack order)
        self.failed = False


@dataclass(frozen=True)
class Chunk:
    """A parsed, checked frame: its header, a view of its payload, and the payload's xxh3_64 digest."""

    header: KVChunkHeader
    payload: memoryview
    payload_hash: int
    packed: bool = False  # from a tensor pack: the pack's check covers it (chunk and blob hashes are 0)
    block: PackBlock | None = None  # a pack's tensors that decode together; this chunk is tensor ``index`` of it
    index: int = 0


@dataclass(frozen=True)
class SealedChunk:
    """A sealed chunk not yet framed: the frame's head (prefix and padded header) and its payload."""

    head: bytes
    payload: memoryview

    @property
    def compressed(self) -> bool:
        """Whether its tensor blob is compressed (the header's ``compression`` byte)."""
        return self.head[_COMPRESSION_AT] != COMPRESSION_CODES.index("none")

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
    """Bytes that start ``blob_hash``, so a blob cannot pass as another layer's, tensor's or sender's."""
    return f"{SCHEMA_VERSION}|{query_id}|{sender}|{layer}|{tensor}".encode()


def blob_hash(payload_hashes: list[int], seed: bytes) -> int:
    """Low 32 bits of XXH3 over a tensor's chunk payload digests in order, seeded by ``seed``'s digest."""
    words = struct.pack(f">{len(payload_hashes)}Q", *payload_hashes)
    return xxhash.xxh3_64_intdigest(words, seed=xxhash.xxh3_64_intdigest(seed)) & CHECKSUM_MASK


def chunk_hash(header_bytes: Buffer, payload_digest: int) -> int:
    """Low 32 bits of XXH3 over the header bytes (``chunk_hash`` zeroed), seeded by the payload's digest."""
    view = memoryview(header_bytes).cast("B")
    zeroed = b"".join((view[:CHUNK_HASH_AT], bytes(4), view[CHUNK_HASH_AT + 4 :]))
    return xxhash.xxh3_64_intdigest(zeroed, seed=payload_digest) & CHECKSUM_MASK


def seal(header: KVChunkHeader, payload_digest: int) -> KVChunkHeader:
    """Return ``header`` with ``chunk_hash`` set for a payload whose :func:`payload_hash` is ``payload_digest``."""
    head = frame_head(header)
    return header.model_copy(update={"chunk_hash": chunk_hash(head[PREFIX.size :], payload_digest)})


def frame_overhead(query_id: str, sender: str) -> int:
    """Bytes a frame adds to its payload for these ids: prefix, fixed fields, ids and padding."""
    raw = PREFIX.size + FIELDS.size + 2 + len(query_id.encode()) + len(sender.encode())
    return -(-raw // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


MAX_FRAME_OVERHEAD = frame_overhead("x" * MAX_ID_BYTES, "x" * MAX_ID_BYTES)  # the longest ids: 208 bytes


def header_budget(max_payload: int) -> int:
    """Payload bytes per chunk that always fit ``max_payload`` with the longest ids (64 characters each)."""
    budget = max_payload - MAX_FRAME_OVERHEAD
    if budget < MIN_CHUNK_BYTES:
        need = MAX_FRAME_OVERHEAD + MIN_CHUNK_BYTES
        raise CodecError(f"max_payload {max_payload} bytes is too small for KV chunks (need > {need})")
    return budget


def frame_head(header: KVChunkHeader) -> bytes:
    """``MAGIC | version | 0 | u16 len | header``: the binary fields, the ids, zeros up to a 16-aligned payload."""
    h = header
    code = {name: table.index(getattr(h, name)) for name, table in _ENUMS}
    fixed = FIELDS.pack(
        h.schema_version,
        code["tensor"],
        h.layer,
        code["precision"],
        code["dtype"],
        code["scale_axis"],
        code["scale_dtype"],
        int(h.shuffle),
        code["compression"],
        h.layers_total,
        h.chunk,
        h.n_chunks,
        h.chunk_size,
        *h.shape,
        h.raw_bytes,
        h.blob_bytes,
        h.chunk_hash,
        h.blob_hash,
    )
    qid, sender = h.query_id.encode(), h.sender.encode()
    head = b"".join((fixed, bytes((len(qid),)), qid, bytes((len(sender),)), sender))
    head += bytes(-(PREFIX.size + len(head)) % PAYLOAD_ALIGN)  # receivers view tensors in place
    return PREFIX.pack(MAGIC, FRAME_VERSION, 0, len(head)) + head


def build_frame(header: KVChunkHeader, payload: Buffer) -> bytes:
    """One standalone frame: :func:`frame_head` followed by ``payload``."""
    return b"".join((frame_head(header), payload))


def seal_chunks(blob: Buffer, fields: dict, *, max_payload: int, chunk_bytes: int | None = None) -> list[SealedChunk]:
    """Split one tensor blob into sealed chunks whose frames are at most ``max_payload`` bytes.

    ``fields`` holds every header field but ``chunk``, ``n_chunks``, ``chunk_size``, ``blob_bytes``,
    ``chunk_hash`` and ``blob_hash``, which are computed here. Payloads are views of ``blob`` (no copy).
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
        chunk_hash=0,
        blob_hash=blob_hash(digests, seed),
    )
    template = bytearray(frame_head(base))  # chunk 0, chunk_hash 0: patched per chunk below
    out = []
    for i, (payload, digest) in enumerate(zip(payloads, digests, strict=True)):
        head = bytearray(template)
        _CHUNK_FIELD.pack_into(head, PREFIX.size + CHUNK_AT, i)
        hashed = xxhash.xxh3_64_intdigest(memoryview(head)[PREFIX.size :], seed=digest) & CHECKSUM_MASK
        _CHUNK_FIELD.pack_into(head, PREFIX.size + CHUNK_HASH_AT, hashed)
        sealed = SealedChunk(bytes(head), payload)
        if sealed.size > max_payload:  # cannot happen with header_budget; guard the invariant anyway
            raise CodecError(f"chunk frame of {sealed.size} bytes exceeds max_payload {max_payload}")
        out.append(sealed)
    return out


def blob_frames(blob: Buffer, fields: dict, *, max_payload: int, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """Like :func:`seal_chunks`, as standalone ``bytes`` frames."""
    for sealed in seal_chunks(blob, fields, max_payload=max_payload, chunk_bytes=chunk_bytes):
        yield sealed.frame()


def read_frame(frame: Buffer) -> Chunk:
    """Split a frame into a validated header and a view of its payload; check the length and ``chunk_hash``.

    Anything wrong (truncation, bit flips, a mutated header, a foreign version) is a :class:`ChunkError`.
    """
    view = memoryview(frame).cast("B")
    chunk, end = _read_at(view, 0)
    if end != len(view):
        raise _payload_length_error(chunk.header, len(view) - end + chunk.header.payload_len)
    return chunk


def read_frames(message: Buffer) -> Iterator[Chunk]:
    """The frames of one NATS message, which holds one or more whole frames back to back (each frame's length
    follows from its header); each is checked as :func:`read_frame` checks one. A bad frame raises
    :class:`ChunkError` when it is reached (the frames before it were good; nothing after it can be found)."""
    view = memoryview(message).cast("B")
    pos = 0
    while True:
        chunk, pos = _read_at(view, pos)
        yield chunk
        if pos == len(view):
            return


def _read_at(view: memoryview, start: int) -> tuple[Chunk, int]:
    """The frame starting at ``start`` of ``view`` (checked) and the offset where it ends."""
    if len(view) - start < PREFIX.size:
        raise ChunkError(f"frame of {len(view) - start} bytes is too short", reason="malformed")
    magic, version, reserved, hlen = PREFIX.unpack_from(view, start)
    if magic != MAGIC:
        raise ChunkError("frame does not start with the KV magic", reason="malformed")
    if version != FRAME_VERSION:
        old = {0: " (a CRC-32 frame of format 1)", 2: " (a JSON-header frame of format 2)", 3: " (format 3)"}.get(
            version, ""
        )
        raise ChunkError(
            f"unsupported KV frame version {version}{old}; this build speaks {FRAME_VERSION}", reason="version"
        )
    if reserved != 0:
        raise ChunkError(f"reserved prefix byte is {reserved}, not 0", reason="malformed")
    body = start + PREFIX.size
    if hlen > MAX_HEADER_BYTES or body + hlen > len(view):
        raise ChunkError(f"header length {hlen} does not fit the {len(view) - start}-byte frame", reason="malformed")
    head = bytes(view[body : body + hlen])
    header = _parse_header(head)
    end = body + hlen + header.payload_len
    if end > len(view):
        raise _payload_length_error(header, len(view) - body - hlen)
    payload = view[body + hlen : end]
    digest = payload_hash(payload)
    if chunk_hash(head, digest) != header.chunk_hash:
        raise ChunkError(
            f"checksum mismatch in chunk {header.chunk} of layer {header.layer} {header.tensor}",
            reason="checksum",
            query_id=header.query_id,
        )
    return Chunk(header, payload, digest), end


def _payload_length_error(header: KVChunkHeader, got: int) -> ChunkError:
    return ChunkError(
        f"chunk {header.chunk}/{header.n_chunks} of layer {header.layer} {header.tensor} has {got} bytes, "
        f"expected {header.payload_len}",
        reason="malformed",
    )


def parse_frame(frame: Buffer) -> tuple[KVChunkHeader, memoryview]:
    """Like :func:`read_frame`, returning ``(header, payload)``."""
    chunk = read_frame(frame)
    return chunk.header, chunk.payload


def _parse_header(head: bytes) -> KVChunkHeader:
    if len(head) < FIELDS.size + 2:
        raise ChunkError(f"chunk header of {len(head)} bytes is shorter than its fixed fields", reason="malformed")
    values = FIELDS.unpack_from(head)
    version = values[0]
    if version != SCHEMA_VERSION:
        raise ChunkError(f"unsupported KV chunk schema_version {version} (expected {SCHEMA_VERSION})", reason="version")
    _, tensor, layer, precision, dtype, scale_axis, scale_dtype, shuffle, compression = values[:9]
    if shuffle not in (0, 1):
        raise ChunkError(f"chunk header shuffle byte is {shuffle}, not 0 or 1", reason="malformed")
    fields: dict = {"schema_version": version, "layer": layer}
    codes = (tensor, precision, dtype, scale_axis, scale_dtype, compression)  # in _ENUMS' order
    for (name, table), code in zip(_ENUMS, codes, strict=True):
        if code >= len(table):
            raise ChunkError(f"chunk header {name} code {code} is not defined", reason="malformed")
        fields[name] = table[code]
    fields["shuffle"] = bool(shuffle)
    (
        fields["layers_total"],
        fields["chunk"],
        fields["n_chunks"],
        fields["chunk_size"],
        *shape,
        fields["raw_bytes"],
        fields["blob_bytes"],
        fields["chunk_hash"],
        fields["blob_hash"],
    ) = values[9:]
    fields["shape"] = tuple(shape)
    pos = FIELDS.size
    for name in ("query_id", "sender"):
        n = head[pos] if pos < len(head) else 0
        raw = head[pos + 1 : pos + 1 + n]
        if n == 0 or len(raw) != n:
            raise ChunkError(f"chunk header {name} is empty or truncated", reason="malformed")
        text = raw.decode("latin-1")
        if ID_PATTERN.fullmatch(text) is None:
            raise ChunkError(f"chunk header {name} {text[:64]!r} is not a valid id", reason="malformed")
        fields[name] = text
        pos += 1 + n
    padding = head[pos:]
    if len(padding) >= PAYLOAD_ALIGN or any(padding) or (PREFIX.size + len(head)) % PAYLOAD_ALIGN:
        raise ChunkError("chunk header padding is not zeros up to a 16-byte boundary", reason="malformed")
    return _validated(fields, "chunk header", "header")


def _validated(fields: dict, what: str, whole: str) -> KVChunkHeader:
    """``fields`` as a checked header; the first schema violation is a malformed :class:`ChunkError` naming ``what``
    and the field (``whole`` for a rule across fields)."""
    try:
        return KVChunkHeader.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or whole
        raise ChunkError(f"invalid {what}: {where}: {first['msg']}", reason="malformed") from exc


def _ids(query_id: str, sender: str) -> bytes:
    """The two ids as every header writes them: ``u8 len | bytes`` each."""
    qid, snd = query_id.encode(), sender.encode()
    return b"".join((bytes((len(qid),)), qid, bytes((len(snd),)), snd))


def _read_ids(head: bytes, pos: int, what: str) -> tuple[str, str, int]:
    """The query id and sender at ``pos`` of a header (each ``u8 len | bytes``, a valid id) and the offset after."""
    ids = []
    for name in ("query_id", "sender"):
        n = head[pos] if pos < len(head) else 0
        raw = head[pos + 1 : pos + 1 + n]
        text = raw.decode("latin-1")
        if n == 0 or len(raw) != n or ID_PATTERN.fullmatch(text) is None:
            raise ChunkError(f"{what} {name} is empty, truncated or not a valid id", reason="malformed")
        ids.append(text)
        pos += 1 + n
    return ids[0], ids[1], pos


def _control_prefix(view: memoryview, magic: bytes, what: str, min_header: int) -> tuple[int, int]:
    """The reserved byte and header length of a stream cut or tensor pack, once its length, magic and version are
    checked (a :class:`ChunkError` otherwise)."""
    if len(view) < PREFIX.size + min_header:
        raise ChunkError(f"{what} of {len(view)} bytes is too short", reason="malformed")
    got, version, reserved, hlen = PREFIX.unpack_from(view)
    if got != magic:
        raise ChunkError(f"message is not a {what}", reason="malformed")
    if version != FRAME_VERSION:
        raise ChunkError(f"unsupported {what} version {version}; this build speaks {FRAME_VERSION}", reason="version")
    return reserved, hlen


# -- the stream-cut notice ------------------------------------------------------------------------------------

CUT_MAGIC = b"FRKX"
_CUT_COUNT = struct.Struct(">BH")  # schema_version, number of layers sent
MAX_CUT_LAYERS = MAX_LAYER_INDEX + 1  # a cut names at most every layer, each below this


@dataclass(frozen=True)
class StreamCut:
    """A sender's notice that its stream ends early: only ``layers`` were sent, the rest of its plan will not come
    (its link slowed and it re-planned mid-stream). A message of its own on the stream's KV subject."""

    query_id: str
    sender: str
    layers: tuple[int, ...]


def is_cut(message: Buffer) -> bool:
    """Whether a KV message is a stream-cut notice (not chunk frames)."""
    return bytes(memoryview(message)[: len(CUT_MAGIC)]) == CUT_MAGIC


def cut_frame(query_id: str, sender: str, layers: list[int] | tuple[int, ...]) -> bytes:
    """``"FRKX" | version | 0 | u16 header length | header``; the header: u8 schema version, u16 count, that many
    u16 layer indices (sent, in send order), the two ids as in a chunk header, then u32 ``low32(xxh3_64(header
    before it))``."""
    if len(layers) > MAX_CUT_LAYERS or any(not 0 <= m < MAX_CUT_LAYERS for m in layers):
        raise CodecError(f"a stream cut names at most {MAX_CUT_LAYERS} layers below {MAX_CUT_LAYERS}: {layers}")
    body = b"".join(
        (_CUT_COUNT.pack(SCHEMA_VERSION, len(layers)), struct.pack(f">{len(layers)}H", *layers), _ids(query_id, sender))
    )
    head = body + _CHUNK_FIELD.pack(xxhash.xxh3_64_intdigest(body) & CHECKSUM_MASK)
    return PREFIX.pack(CUT_MAGIC, FRAME_VERSION, 0, len(head)) + head


def read_cut(message: Buffer) -> StreamCut:
    """Parse and check a stream-cut notice; anything wrong is a :class:`ChunkError`."""
    view = memoryview(message).cast("B")
    reserved, hlen = _control_prefix(view, CUT_MAGIC, "stream cut", _CUT_COUNT.size + 4)
    if reserved != 0 or PREFIX.size + hlen != len(view):
        raise ChunkError("stream cut length or reserved byte is wrong", reason="malformed")
    head = bytes(view[PREFIX.size :])
    body, check = head[:-4], _CHUNK_FIELD.unpack(head[-4:])[0]
    if xxhash.xxh3_64_intdigest(body) & CHECKSUM_MASK != check:
        raise ChunkError("checksum mismatch in a stream cut", reason="checksum")
    schema, count = _CUT_COUNT.unpack_from(body)
    if schema != SCHEMA_VERSION:
        raise ChunkError(f"unsupported stream cut schema_version {schema}", reason="version")
    pos = _CUT_COUNT.size + 2 * count
    if count > MAX_CUT_LAYERS or pos > len(body):
        raise ChunkError(f"stream cut names {count} layers in a {len(body)}-byte header", reason="malformed")
    layers = struct.unpack_from(f">{count}H", body, _CUT_COUNT.size)
    if any(m >= MAX_CUT_LAYERS for m in layers) or len(set(layers)) != count:
        raise ChunkError("stream cut layers are out of range or repeated", reason="malformed")
    query_id, sender, pos = _read_ids(body, pos, "stream cut")
    if pos != len(body):
        raise ChunkError("stream cut has bytes after its ids", reason="malformed")
    return StreamCut(query_id, sender, tuple(layers))


# -- the tensor pack: many whole small tensors of one stream in one message ----------------------------------

PACK_MAGIC = b"FRKP"
_PACK_FIXED = struct.Struct(">BHH")  # schema_version, layers_total, number of entries
# tensor, layer, precision, dtype, scale_axis, scale_dtype, shuffle, compression, shape[4], raw_bytes, blob_bytes
PACK_ENTRY = struct.Struct(">BHBBBBBB4III")
MAX_PACK_ENTRIES = 1024  # tensors in one pack (its header length is a u16)
LAYER_PACK_TENSOR_BYTES = 16 * 1024  # a layer whose K and V blobs are each at most this travels as one pack or
# in one with other layers (bus.transport, on any link), so byte estimates (bus.budget) count it as packed
_ENTRY_ENUMS = (  # the entry's enumerated fields, in PACK_ENTRY's order after the layer
    ("precision", PRECISION_CODES),
    ("dtype", DTYPE_CODES),
    ("scale_axis", SCALE_AXIS_CODES),
    ("scale_dtype", SCALE_DTYPE_CODES),
)


class PackEntry(NamedTuple):
    """One whole K or V tensor of a stream, encoded, waiting to share a pack with others (see :func:`pack_message`).
    A named tuple: a real q' makes 60 of them a send, and a frozen dataclass costs ~1 us each to build."""

    layer: int
    tensor: str
    blob: Buffer
    fields: tuple  # PACK_ENTRY's values without the tensor and layer codes: precision .. blob_bytes

    @property
    def compressed(self) -> bool:
        """Whether its blob is compressed."""
        return self.fields[5] != COMPRESSION_CODES.index("none")

    @property
    def size(self) -> int:
        """Bytes the entry adds to a pack: its table row and its blob, padded to the payload alignment."""
        return packed_tensor_bytes(self.fields[-1])


def _padded(n: int) -> int:
    return -(-n // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def packed_tensor_bytes(blob_bytes: int) -> int:
    """Bytes a tensor of ``blob_bytes`` adds to a pack: its table row and its blob, padded."""
    return PACK_ENTRY.size + _padded(blob_bytes)


def pack_entry(layer: int, tensor: str, blob: Buffer, header: dict) -> PackEntry:
    """A tensor for a pack: ``header`` holds the chunk-header fields that describe an encoded tensor (``dtype``,
    ``shape``, ``precision``, ``shuffle``, ``compression``, ``scale_axis``, ``scale_dtype``, ``raw_bytes``)."""
    h = header
    fields = (
        PRECISION_CODES.index(h["precision"]),
        DTYPE_CODES.index(h["dtype"]),
        SCALE_AXIS_CODES.index(h["scale_axis"]),
        SCALE_DTYPE_CODES.index(h["scale_dtype"]),
        int(h["shuffle"]),
        COMPRESSION_CODES.index(h["compression"]),
        *h["shape"],
        h["raw_bytes"],
        len(memoryview(blob).cast("B")),
    )
    return PackEntry(layer, tensor, blob, fields)


def pack_overhead(query_id: str, sender: str) -> int:
    """Bytes of a pack message besides its entries: prefix, fixed fields, ids, check and the largest padding."""
    return PREFIX.size + _PACK_FIXED.size + 2 + len(query_id.encode()) + len(sender.encode()) + 4 + PAYLOAD_ALIGN


def pack_parts(query_id: str, sender: str, layers_total: int, entries: list[PackEntry]) -> list[Buffer]:
    """A tensor pack as the buffers it is made of, in order: its head (prefix, header, check, padding), then each
    blob (a view of the entry's memory, not copied) and its zero padding where it has any. Joined, they are
    :func:`pack_message`: ``"FRKP" | version | 0 | u16 header length | header | blobs``, each blob zero-padded to
    16 bytes.

    The header: u8 schema version, u16 layers_total, u16 entry count, the two ids as in a chunk header, one
    :data:`PACK_ENTRY` row per tensor (in blob order), then u32 ``low32(xxh3_64(header before it,
    seed=xxh3_64(the blobs' xxh3_64 digests as 8-byte words)))``, zeros up to a 16-aligned payload. Every byte of
    the message is checked (docs/PROTOCOL.md section 6).
    """
    if not 1 <= len(entries) <= MAX_PACK_ENTRIES:
        raise CodecError(f"a pack holds 1 to {MAX_PACK_ENTRIES} tensors, got {len(entries)}")
    rows = [PACK_ENTRY.pack(TENSORS.index(e.tensor), e.layer, *e.fields) for e in entries]
    body = b"".join((_PACK_FIXED.pack(SCHEMA_VERSION, layers_total, len(entries)), _ids(query_id, sender), *rows))
    parts, digests = [], []
    for e in entries:
        view = memoryview(e.blob).cast("B")
        digests.append(payload_hash(view))
        parts.append(view)
        if len(view) % PAYLOAD_ALIGN:
            parts.append(bytes(-len(view) % PAYLOAD_ALIGN))
    seed = xxhash.xxh3_64_intdigest(struct.pack(f">{len(digests)}Q", *digests))
    head = body + _CHUNK_FIELD.pack(xxhash.xxh3_64_intdigest(body, seed=seed) & CHECKSUM_MASK)
    head += bytes(-(PREFIX.size + len(head)) % PAYLOAD_ALIGN)
    return [PREFIX.pack(PACK_MAGIC, FRAME_VERSION, 0, len(head)) + head, *parts]


def pack_message(query_id: str, sender: str, layers_total: int, entries: list[PackEntry]) -> bytes:
    """A tensor pack as one message (:func:`pack_parts` joined; its layout and check are described there)."""
    return b"".join(pack_parts(query_id, sender, layers_total, entries))


def is_pack(message: Buffer) -> bool:
    """Whether a KV message is a tensor pack (not chunk frames)."""
    return bytes(memoryview(message)[: len(PACK_MAGIC)]) == PACK_MAGIC


def read_pack(message: Buffer) -> list[Chunk]:
    """Parse and check a tensor pack; each tensor comes out as a one-chunk :class:`Chunk` (``packed=True``: the
    pack's check stands for the chunk and blob checksums, which are 0). Anything wrong is a :class:`ChunkError`
    and nothing of the message is used."""
    return read_pack_entries(message).chunks()


def read_pack_entries(message: Buffer) -> PackRead:
    """Parse and check a tensor pack as :func:`read_pack` does, its tensors left as entries (no chunk or header
    object per tensor: ``bus.reassembler.Reassembler.add_pack`` takes them as they are)."""
    view = memoryview(message).cast("B")
    reserved, hlen = _control_prefix(view, PACK_MAGIC, "tensor pack", _PACK_FIXED.size)
    if reserved != 0 or PREFIX.size + hlen > len(view) or (PREFIX.size + hlen) % PAYLOAD_ALIGN:
        raise ChunkError("tensor pack header length or reserved byte is wrong", reason="malformed")
    head = bytes(view[PREFIX.size : PREFIX.size + hlen])
    schema, layers_total, count = _PACK_FIXED.unpack_from(head)
    if schema != SCHEMA_VERSION:
        raise ChunkError(f"unsupported tensor pack schema_version {schema}", reason="version")
    if not 1 <= count <= MAX_PACK_ENTRIES:
        raise ChunkError(f"tensor pack names {count} tensors", reason="malformed")
    query_id, sender, table = _read_ids(head, _PACK_FIXED.size, "tensor pack")
    check_at = table + count * PACK_ENTRY.size
    padding = head[check_at + 4 :]
    if check_at + 4 > len(head) or len(padding) >= PAYLOAD_ALIGN or any(padding):
        raise ChunkError("tensor pack header does not fit its entries, or its padding is not zeros", reason="malformed")
    rows = list(PACK_ENTRY.iter_unpack(head[table:check_at]))
    sizes = [row[-1] for row in rows]
    payload = PREFIX.size + hlen
    if payload + sum(_padded(n) for n in sizes) != len(view):
        raise ChunkError("tensor pack length does not match its entries' blobs", reason="malformed")
    blobs, at = [], payload
    if all(n % PAYLOAD_ALIGN == 0 for n in sizes):  # blobs back to back: no padding bytes to check
        for n in sizes:
            blobs.append(view[at : at + n])
            at += n
    else:
        for n in sizes:
            blobs.append(view[at : at + n])
            if any(view[at + n : at + _padded(n)]):
                raise ChunkError("tensor pack blob padding is not zeros", reason="malformed")
            at += _padded(n)
    digests = [payload_hash(blob) for blob in blobs]
    seed = xxhash.xxh3_64_intdigest(struct.pack(f">{count}Q", *digests))
    check = xxhash.xxh3_64_intdigest(head[:check_at], seed=seed) & CHECKSUM_MASK
    if check != _CHUNK_FIELD.unpack_from(head, check_at)[0]:
        raise ChunkError("checksum mismatch in a tensor pack", reason="checksum", query_id=query_id)
    block = None
    if count > 1 and len({row[2:] for row in rows}) == 1:  # tensors alike but for layer and K/V
        _, _, precision, _, _, _, shuffle, compression = rows[0][:8]
        plain = compression == COMPRESSION_CODES.index("none") and not shuffle and sizes[0] % PAYLOAD_ALIGN == 0
        if plain and precision < len(PRECISION_CODES) and PRECISION_CODES[precision] in FLOAT_PRECISIONS:
            block = PackBlock(view[payload:], count)  # the blobs back to back: nothing pads between them
    entries, seen = [], set()
    alike = _alike_header(rows[0], query_id, sender, layers_total) if block is not None else None
    for row, blob, digest in zip(rows, blobs, digests, strict=True):
        tensor, layer = row[0], row[1]
        if tensor >= len(TENSORS) or layer > MAX_LAYER_INDEX:
            _entry_header(row, query_id, sender, layers_total)  # raises, naming the field
        kind = alike or _alike_header(row, query_id, sender, layers_total)  # a block's rows differ in neither
        if (layer, tensor) in seen:
            raise ChunkError(f"tensor pack holds layer {layer} {TENSORS[tensor]} twice", reason="malformed")
        seen.add((layer, tensor))
        entries.append(PackedTensor(layer, TENSORS[tensor], kind, blob, digest))
    return PackRead(query_id, sender, layers_total, entries, block)


class PackedTensor(NamedTuple):
    """One tensor of a checked pack: its layer and K/V, the validated header of its kind (its own but maybe for the
    layer and K/V: :meth:`header`), its blob and the blob's xxh3_64 digest."""

    layer: int
    tensor: str
    kind: KVChunkHeader
    blob: memoryview
    digest: int

    def header(self) -> KVChunkHeader:
        """Its own one-chunk header."""
        return self.kind.for_tensor(self.layer, self.tensor)


@dataclass(frozen=True)
class PackRead:
    """A checked tensor pack (:func:`read_pack_entries`): its stream, its tensors in order, and the block they decode
    as when they are alike (:class:`PackBlock`)."""

    query_id: str
    sender: str
    layers_total: int
    entries: list[PackedTensor]
    block: PackBlock | None

    def chunk(self, i: int) -> Chunk:
        """Tensor ``i`` as a one-chunk :class:`Chunk` with its own header."""
        e = self.entries[i]
        return Chunk(e.header(), e.blob, e.digest, True, self.block, i)

    def chunks(self) -> list[Chunk]:
        """Every tensor as a :class:`Chunk`, in order."""
        return [self.chunk(i) for i in range(len(self.entries))]


_ALIKE_HEADERS: dict[tuple, KVChunkHeader] = {}  # validated pack entry headers by all but layer and K/V
_ALIKE_MEMORY = 256  # entries kept (a stream's packs repeat a handful of kinds; cleared when full)


def _alike_header(row: tuple, query_id: str, sender: str, layers_total: int) -> KVChunkHeader:
    """A validated header of an entry like ``row`` but maybe for its layer and K/V: the entries of a stream's packs
    differ in little else, so each kind validates once per stream, not once per tensor (a layer within range and
    K or V is valid for any entry that validated with another, ``KVChunkHeader`` judging neither with the rest)."""
    key = (query_id, sender, layers_total, row[2:])
    header = _ALIKE_HEADERS.get(key)
    if header is None:
        header = _entry_header(row, query_id, sender, layers_total)
        if len(_ALIKE_HEADERS) >= _ALIKE_MEMORY:
            _ALIKE_HEADERS.clear()
        _ALIKE_HEADERS[key] = header
    return header


def _entry_header(row: tuple, query_id: str, sender: str, layers_total: int) -> KVChunkHeader:
    """The one-chunk header a pack entry stands for (validated as a chunk header is)."""
    tensor, layer, *codes = row[:8]
    shuffle, compression = codes[4], codes[5]
    fields: dict = {"query_id": query_id, "sender": sender, "layer": layer, "layers_total": layers_total}
    if tensor >= len(TENSORS) or shuffle not in (0, 1) or compression >= len(COMPRESSION_CODES):
        raise ChunkError("tensor pack entry has an undefined tensor, shuffle or compression code", reason="malformed")
    fields.update(tensor=TENSORS[tensor], shuffle=bool(shuffle), compression=COMPRESSION_CODES[compression])
    for (name, table), code in zip(_ENTRY_ENUMS, codes[:4], strict=True):
        if code >= len(table):
            raise ChunkError(f"tensor pack entry {name} code {code} is not defined", reason="malformed")
        fields[name] = table[code]
    *shape, raw_bytes, blob_bytes = row[8:]
    fields.update(
        shape=tuple(shape),
        raw_bytes=raw_bytes,
        blob_bytes=blob_bytes,
        chunk=0,
        n_chunks=1,
        chunk_size=max(1, blob_bytes),
        chunk_hash=0,
        blob_hash=0,
    )
    return _validated(fields, "tensor pack entry", "entry")


def read_message(message: Buffer) -> list[Chunk] | Iterator[Chunk]:
    """The chunks of one KV message: a tensor pack's tensors (checked all at once) or its chunk frames (checked one
    by one as they are reached, see :func:`read_frames`). A stream cut is not chunks (:func:`is_cut`)."""
    return read_pack(message) if is_pack(message) else read_frames(message)
