"""KV codec: tensors -> (quantize, byte-shuffle, LZ4) blobs -> checksummed chunks that fit ``max_payload``.

One NATS message carries one chunk as ``MAGIC | u32 header length | header JSON | payload``; the
whole message is the NATS payload (no NATS headers), so the size the server checks is exactly the
frame's length. A cache is a mapping ``{layer_index: (K, V)}`` of tensors ``(B, kv_heads, T, head_dim)``;
any subset of layers is a valid message. The receiving side is ``bus.reassembler.Reassembler``.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import lz4.frame
import numpy as np
import torch
from pydantic import ValidationError

from bus.errors import ChunkError, CodecError
from bus.quant import SCALE_DTYPE, get_format
from bus.schemas import CRC_MAX, MAX_CHUNKS, SCHEMA_VERSION, KVChunkHeader, validate_id

log = logging.getLogger(__name__)

MAGIC = b"FRKV"
_PREFIX = struct.Struct(">4sI")  # magic, header length in bytes
MAX_HEADER_BYTES = 4096  # a header longer than this is malformed
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes; nats-server's default when the connection does not say
LZ4_LEVEL = 0  # lz4.frame fast mode
_SOURCE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

KVPair = tuple[torch.Tensor, torch.Tensor]
Layers = Mapping[int, KVPair]


@dataclass(frozen=True)
class EncodedTensor:
    """One K or V tensor after quantization, shuffle and compression: the blob the chunks carry."""

    blob: bytes
    shape: tuple[int, int, int, int]
    dtype: str
    precision: str
    shuffle: bool
    compression: str
    scale_axis: str
    raw_bytes: int
    blob_crc: int


def _shuffle(section: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return section
    return section.reshape(-1, itemsize).T.copy().reshape(-1)  # byte j of every element together


def _unshuffle(section: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return section
    return section.reshape(itemsize, -1).T.copy().reshape(-1)


def _check_tensor(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{what} is {type(x).__name__}, not a torch tensor", reason="malformed")
    if x.dim() != 4 or x.numel() == 0:
        raise CodecError(f"{what} must be (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise CodecError(f"{what} has dtype {x.dtype}; KV tensors are floating point")
    return x.detach().to("cpu").contiguous()


def encode_tensor(
    x: torch.Tensor, precision: str, *, tensor: str = "k", compress: bool = True, seed: bytes = b""
) -> EncodedTensor:
    """Quantize ``x`` (K per channel, V per token), then byte-shuffle and LZ4 when ``compress``.

    LZ4 output that is not smaller than its input is dropped (``compression="none"``): quantized
    integers rarely compress. ``seed`` is mixed into ``blob_crc`` to bind the blob to its identity.
    """
    fmt = get_format(precision)
    x = _check_tensor(x, f"{tensor.upper()} tensor")
    axis = fmt.scale_axis(tensor)
    sections = fmt.encode(x, axis)
    if compress:
        sections = [(_shuffle(arr, size), size) for arr, size in sections]
    raw = b"".join(arr.tobytes() for arr, _ in sections) if len(sections) > 1 else sections[0][0].tobytes()
    blob, compression = raw, "none"
    if compress:
        packed = lz4.frame.compress(raw, compression_level=LZ4_LEVEL, store_size=True)
        if len(packed) < len(raw):
            blob, compression = packed, "lz4"
    shape = tuple(int(s) for s in x.shape)
    return EncodedTensor(
        blob=blob,
        shape=shape,
        dtype=_SOURCE_DTYPES.get(x.dtype, "float32"),
        precision=precision,
        shuffle=compress,
        compression=compression,
        scale_axis=axis,
        raw_bytes=len(raw),
        blob_crc=zlib.crc32(blob, zlib.crc32(seed)),
    )


def decode_blob(
    blob: bytes | bytearray | memoryview, header: KVChunkHeader, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decompress, unshuffle and dequantize a complete, checksummed blob described by ``header``."""
    if header.compression == "lz4":
        try:
            dec = lz4.frame.LZ4FrameDecompressor()
            raw = dec.decompress(bytes(blob), max_length=header.raw_bytes + 1)
            finished = dec.eof
        except (RuntimeError, ValueError, OSError) as exc:
            raise ChunkError(
                f"LZ4 data of layer {header.layer} {header.tensor} is corrupt: {exc}", reason="decode"
            ) from exc
        if len(raw) != header.raw_bytes or not finished:
            raise ChunkError(
                f"layer {header.layer} {header.tensor} decompressed to {len(raw)} bytes, expected {header.raw_bytes}",
                reason="decode",
            )
        buf = bytearray(raw)
    else:
        buf = blob
    fmt = get_format(header.precision)
    flat = np.frombuffer(buf, dtype=np.uint8)
    sections, at = [], 0
    for nbytes, size in fmt.layout(header.shape, header.scale_axis):
        part = flat[at : at + nbytes]
        sections.append(_unshuffle(part, size) if header.shuffle else part)
        at += nbytes
    if at != len(flat):
        raise ChunkError(
            f"layer {header.layer} {header.tensor} holds {len(flat)} bytes, expected {at}", reason="decode"
        )
    return fmt.decode(sections, header.shape, header.scale_axis, out_dtype)


def identity_seed(query_id: str, sender: str, layer: int, tensor: str) -> bytes:
    """Bytes mixed into ``blob_crc`` so a blob cannot pass as another layer's, tensor's or sender's."""
    return f"{SCHEMA_VERSION}|{query_id}|{sender}|{layer}|{tensor}".encode()


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
        scale_dtype=SCALE_DTYPE,
        raw_bytes=10**15,
        blob_bytes=10**15,
        layers_total=10**4,
        chunk_crc=CRC_MAX,
        blob_crc=CRC_MAX,
    )
    overhead = _PREFIX.size + len(probe.model_dump_json()) + 16
    budget = max_payload - overhead
    if budget < 1024:
        raise CodecError(f"max_payload {max_payload} bytes is too small for KV chunks (need > {overhead + 1024})")
    return budget


def build_frame(header: KVChunkHeader, payload: bytes | memoryview) -> bytes:
    """``MAGIC | u32 len | header JSON | payload``."""
    head = header.model_dump_json().encode()
    return b"".join((_PREFIX.pack(MAGIC, len(head)), head, payload))


def tensor_frames(
    enc: EncodedTensor,
    *,
    query_id: str,
    sender: str,
    layer: int,
    tensor: str,
    layers_total: int,
    max_payload: int,
    chunk_bytes: int | None = None,
) -> Iterator[bytes]:
    """Split an encoded tensor into frames no longer than ``max_payload`` bytes."""
    size = header_budget(max_payload)
    if chunk_bytes is not None:
        size = max(1, min(size, chunk_bytes))
    n_chunks = -(-len(enc.blob) // size)
    view = memoryview(enc.blob)
    base = dict(
        query_id=query_id,
        sender=sender,
        layer=layer,
        tensor=tensor,
        n_chunks=n_chunks,
        chunk_size=size,
        dtype=enc.dtype,
        shape=enc.shape,
        precision=enc.precision,
        shuffle=enc.shuffle,
        compression=enc.compression,
        scale_axis=enc.scale_axis,
        scale_dtype=SCALE_DTYPE if enc.scale_axis != "none" else None,
        raw_bytes=enc.raw_bytes,
        blob_bytes=len(enc.blob),
        layers_total=layers_total,
        blob_crc=enc.blob_crc,
    )
    for i in range(n_chunks):
        payload = view[i * size : (i + 1) * size]
        unsigned = KVChunkHeader(chunk=i, chunk_crc=0, **base)
        header = unsigned.model_copy(update={"chunk_crc": zlib.crc32(payload, zlib.crc32(unsigned.crc_seed()))})
        frame = build_frame(header, payload)
        if len(frame) > max_payload:  # cannot happen with header_budget; guard the invariant anyway
            raise CodecError(f"chunk frame of {len(frame)} bytes exceeds max_payload {max_payload}")
        yield frame


def encode_layer_frames(
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: str,
    query_id: str,
    sender: str,
    layers_total: int,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    compress: bool = True,
    chunk_bytes: int | None = None,
) -> list[bytes]:
    """Encode one layer's K and V into frames (K first)."""
    frames: list[bytes] = []
    for name, x in (("k", k), ("v", v)):
        enc = encode_tensor(
            x, precision, tensor=name, compress=compress, seed=identity_seed(query_id, sender, layer, name)
        )
        frames.extend(
            tensor_frames(
                enc,
                query_id=query_id,
                sender=sender,
                layer=layer,
                tensor=name,
                layers_total=layers_total,
                max_payload=max_payload,
                chunk_bytes=chunk_bytes,
            )
        )
    return frames


def encode_cache(
    layers: Layers,
    *,
    precision: str,
    query_id: str,
    sender: str,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    compress: bool = True,
    chunk_bytes: int | None = None,
) -> Iterator[bytes]:
    """Frames of a whole cache (or a subset of its layers), layer by layer in the mapping's order."""
    validate_id(query_id, "query id")
    validate_id(sender, "sender id")
    check_layers(layers)
    for layer, (k, v) in layers.items():
        yield from encode_layer_frames(
            layer,
            k,
            v,
            precision=precision,
            query_id=query_id,
            sender=sender,
            layers_total=len(layers),
            max_payload=max_payload,
            compress=compress,
            chunk_bytes=chunk_bytes,
        )


def check_layers(layers: Layers) -> None:
    """Reject an empty cache or bad layer indices before any work is done."""
    if not isinstance(layers, Mapping) or not layers:
        raise CodecError("a cache is a non-empty mapping {layer_index: (K, V)}")
    for layer, kv in layers.items():
        if not isinstance(layer, int) or not 0 <= layer <= 1023:
            raise CodecError(f"layer index {layer!r} must be an int in 0..1023", reason="range")
        if not isinstance(kv, tuple | list) or len(kv) != 2:
            raise CodecError(f"layer {layer} must be a (K, V) pair")


def parse_frame(frame: bytes | bytearray | memoryview) -> tuple[KVChunkHeader, memoryview]:
    """Split a frame into a validated header and its payload; check length and ``chunk_crc``.

    Anything wrong (truncation, bit flips, a mutated header, a foreign version) is a :class:`ChunkError`.
    """
    view = memoryview(frame)
    if len(view) < _PREFIX.size:
        raise ChunkError(f"frame of {len(view)} bytes is too short", reason="malformed")
    magic, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ChunkError("frame does not start with the KV magic", reason="malformed")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(view):
        raise ChunkError(f"header length {hlen} does not fit the {len(view)}-byte frame", reason="malformed")
    head = bytes(view[_PREFIX.size : _PREFIX.size + hlen])
    header = _parse_header(head)
    payload = view[_PREFIX.size + hlen :]
    if len(payload) != header.payload_len:
        raise ChunkError(
            f"chunk {header.chunk}/{header.n_chunks} of layer {header.layer} {header.tensor} has "
            f"{len(payload)} bytes, expected {header.payload_len}",
            reason="malformed",
        )
    if zlib.crc32(payload, zlib.crc32(header.crc_seed())) != header.chunk_crc:
        raise ChunkError(
            f"checksum mismatch in chunk {header.chunk} of layer {header.layer} {header.tensor}",
            reason="checksum",
            query_id=header.query_id,
        )
    return header, payload


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


def decode_frames(frames: Iterable[bytes], out_dtype: torch.dtype = torch.float32) -> dict[int, KVPair]:
    """Reassemble the frames of one (query, sender) cache in any order; return its complete layers."""
    from bus.reassembler import Reassembler

    reasm = Reassembler(out_dtype=out_dtype)
    keys = set()
    for frame in frames:
        for done in reasm.feed(frame):
            keys.add((done.query_id, done.sender))
    if len(keys) > 1:
        raise CodecError(f"frames of {len(keys)} different (query, sender) streams given to decode_frames")
    if not keys:
        return {}
    query_id, sender = keys.pop()
    return reasm.completed(query_id, sender)
