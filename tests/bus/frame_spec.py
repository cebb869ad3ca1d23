"""KV frames packed, unpacked and checksummed from docs/PROTOCOL.md section 6 alone (no ``bus``), for the tests.

``pack`` accepts any field values: a value outside a field's enumeration becomes code 255 and an integer is
cut to its field's width, so tests can forge frames the real encoder would never write. ``sealed`` and
``blob_hash`` compute the checksums as the doc writes them.
"""

from __future__ import annotations

import struct

import xxhash

PREFIX = struct.Struct(">4sBBH")
FIXED = struct.Struct(">BBHBBBBBBHIII4IQQII")  # the field table of PROTOCOL.md section 6, in order
ENUMS = {
    "tensor": ("k", "v"),
    "precision": ("fp32", "fp16", "bf16", "int8", "int4"),
    "dtype": ("float32", "float16", "bfloat16"),
    "scale_axis": ("none", "channel", "token"),
    "scale_dtype": (None, "float16"),
    "compression": ("none", "lz4", "deflate"),
}
ORDER = (
    "schema_version",
    "tensor",
    "layer",
    "precision",
    "dtype",
    "scale_axis",
    "scale_dtype",
    "shuffle",
    "compression",
    "layers_total",
    "chunk",
    "n_chunks",
    "chunk_size",
)
TAIL = ("raw_bytes", "blob_bytes", "chunk_hash", "blob_hash")
VERSION = 4
LOW32 = 0xFFFFFFFF
WIDTHS = dict(
    zip(
        ORDER + ("s0", "s1", "s2", "s3") + TAIL,
        [8, 8, 16, 8, 8, 8, 8, 8, 8, 16, 32, 32, 32] + [32] * 4 + [64, 64, 32, 32],
        strict=True,
    )
)


def _code(name: str, value) -> int:
    if name in ENUMS:
        return ENUMS[name].index(value) if value in ENUMS[name] else 255
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int):
        return (1 << WIDTHS[name]) - 1
    return value & ((1 << WIDTHS[name]) - 1)


def pack(fields: dict, payload: bytes, version: int = VERSION) -> bytes:
    """A frame of these header fields and payload."""
    shape = list(fields["shape"])
    values = [_code(n, fields[n]) for n in ORDER]
    values += [_code(f"s{i}", shape[i]) for i in range(4)] + [_code(n, fields[n]) for n in TAIL]
    head = FIXED.pack(*values)
    for name in ("query_id", "sender"):
        raw = str(fields[name]).encode()[:255]
        head += bytes((len(raw),)) + raw
    head += bytes(-(PREFIX.size + len(head)) % 16)
    return PREFIX.pack(b"FRKV", version, 0, len(head)) + head + payload


def unpack(frame: bytes) -> tuple[dict, bytes]:
    """``(header fields, payload)`` of a frame laid out as the doc says (its values need not be valid)."""
    magic, version, reserved, hlen = PREFIX.unpack_from(frame)
    assert (magic, version, reserved) == (b"FRKV", VERSION, 0)
    head = frame[PREFIX.size : PREFIX.size + hlen]
    values = FIXED.unpack_from(head)
    fields = dict(zip(ORDER, values[: len(ORDER)], strict=True))
    fields["shape"] = list(values[len(ORDER) : len(ORDER) + 4])
    fields.update(zip(TAIL, values[len(ORDER) + 4 :], strict=True))
    for name, table in ENUMS.items():
        fields[name] = table[fields[name]] if fields[name] < len(table) else fields[name]  # forged: the raw code
    fields["shuffle"] = bool(fields["shuffle"])
    pos = FIXED.size
    for name in ("query_id", "sender"):
        n = head[pos]
        fields[name] = head[pos + 1 : pos + 1 + n].decode()
        pos += 1 + n
    assert not any(head[pos:]) and (PREFIX.size + hlen) % 16 == 0
    return fields, frame[PREFIX.size + hlen :]


def sealed(fields: dict, payload: bytes) -> bytes:
    """The frame with its ``chunk_hash``: XXH3-64 of the header bytes (that field zeroed), seeded by the payload's."""
    frame = pack({**fields, "chunk_hash": 0}, payload)
    hlen = struct.unpack_from(">H", frame, 6)[0]
    header = frame[PREFIX.size : PREFIX.size + hlen]
    digest = xxhash.xxh3_64_intdigest(header, seed=xxhash.xxh3_64_intdigest(payload)) & LOW32
    return pack({**fields, "chunk_hash": digest}, payload)


def blob_hash(payloads: list[bytes], query_id: str, sender: str, layer: int, tensor: str) -> int:
    """XXH3-64 of the chunks' payload digests (8 bytes big-endian each), seeded by the digest of the identity."""
    words = b"".join(xxhash.xxh3_64_digest(p) for p in payloads)  # xxh3_64_digest is big-endian
    seed = xxhash.xxh3_64_intdigest(f"1|{query_id}|{sender}|{layer}|{tensor}".encode())
    return xxhash.xxh3_64_intdigest(words, seed=seed) & LOW32
