"""KV codec: tensors -> (quantize, byte-shuffle, LZ4) blobs -> checksummed frames that fit ``max_payload``.

A cache is a mapping ``{layer_index: (K, V)}`` of tensors ``(B, kv_heads, T, head_dim)``; any subset of
layers is a valid message. Per tensor: the format (``bus.quant``) gives byte sections, optionally
byte-shuffled and LZ4-compressed into one blob, which ``bus.frames`` splits into sealed chunk frames.
The receiving side is ``bus.reassembler`` (``Reassembler``, ``decode_frames``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import lz4.frame
import numpy as np
import torch

from bus.errors import ChunkError, CodecError
from bus.frames import Buffer, PackEntry, SealedChunk, pack_entry, seal_chunks
from bus.quant import SCALE_DTYPE, FloatFormat, Section, get_format
from bus.schemas import MAX_LAYER_INDEX, KVChunkHeader, validate_id

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes; nats-server's stock limit, for callers without a connection
LZ4_LEVEL = 0  # lz4.frame fast mode
DEFLATE_LEVEL = 1  # zlib's fastest: nearly all of level 6's saving on KV here (4.29x vs 4.30x at int4)
CODECS = ("none", "lz4", "deflate")  # what ``compress`` may name (bus.frames.COMPRESSION_CODES)
_SOURCE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

KVPair = tuple[torch.Tensor, torch.Tensor]
Layers = Mapping[int, KVPair]


@dataclass(frozen=True)
class EncodedTensor:
    """One K or V tensor after quantization, shuffle and compression: the blob its chunks carry."""

    blob: Buffer
    shape: tuple[int, int, int, int]
    dtype: str  # the source dtype, informational
    precision: str
    shuffle: bool
    compression: str
    scale_axis: str
    raw_bytes: int  # before compression


def compression_codec(compress: bool | str) -> str:
    """The codec a ``compress`` argument names: False/"none", True/"lz4", "deflate"; anything else is a CodecError."""
    if isinstance(compress, bool):
        return "lz4" if compress else "none"
    if compress not in CODECS:
        raise CodecError(f"unknown compression {compress!r}; choose one of {', '.join(CODECS)}")
    return compress


def _shuffle(section: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return section
    return section.reshape(-1, itemsize).T.copy().reshape(-1)  # byte j of every element together


def _unshuffle(section: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return section
    return section.reshape(itemsize, -1).T.copy().reshape(-1)


def _join(sections: list[Section]) -> Buffer:
    if len(sections) == 1:
        return memoryview(sections[0][0])  # no copy: framing copies once anyway
    return b"".join(memoryview(arr) for arr, _ in sections)


def _check_tensor(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{what} is {type(x).__name__}, not a torch tensor", reason="malformed")
    if x.dim() != 4 or x.numel() == 0:
        raise CodecError(f"{what} must be (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise CodecError(f"{what} has dtype {x.dtype}; KV tensors are floating point")
    return x.detach().to("cpu").contiguous()


def encode_tensor(x: torch.Tensor, precision: str, *, tensor: str = "k", compress: bool | str = True) -> EncodedTensor:
    """Quantize ``x`` (scale axes: ``bus.schemas.int_scale_axis``), then byte-shuffle and compress.

    ``compress``: False or ``"none"``; True or ``"lz4"`` (fast, finds runs: zeros, bf16 exponents); ``"deflate"``
    (zlib level 1: Huffman codes find the skew of quantized values and fp16 exponents, 4.3-4.8x fp16 at int4 on the
    real models' caches vs 3.8x without, at ~50 MB/s). Output that is not smaller than its input is dropped
    (``compression="none"``, ``shuffle=False``).
    """
    codec = compression_codec(compress)
    fmt = get_format(precision)
    x = _check_tensor(x, f"{tensor.upper()} tensor")
    axis = fmt.scale_axis(tensor, tuple(x.shape))
    sections = fmt.encode(x, axis)
    raw_bytes = sum(arr.nbytes for arr, _ in sections)
    blob, compression, shuffled = _join(sections), "none", False
    if codec != "none":
        shuffled_bytes = _join([(_shuffle(arr, size), size) for arr, size in sections])
        if codec == "lz4":
            packed = lz4.frame.compress(shuffled_bytes, compression_level=LZ4_LEVEL, store_size=True)
        else:
            packed = zlib.compress(shuffled_bytes, DEFLATE_LEVEL)
        if len(packed) < raw_bytes:  # else send the plain bytes: the receiver skips unshuffling too
            blob, compression, shuffled = packed, codec, True
    return EncodedTensor(
        blob=blob,
        shape=tuple(int(s) for s in x.shape),
        dtype=_SOURCE_DTYPES.get(x.dtype, "float32"),
        precision=precision,
        shuffle=shuffled,
        compression=compression,
        scale_axis=axis,
        raw_bytes=raw_bytes,
    )


def decode_blob(blob: Buffer, header: KVChunkHeader, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decompress, unshuffle and dequantize a complete, checksummed blob described by ``header``.

    Without compression, shuffle or a dtype change the result shares ``blob``'s memory (no copy).
    """
    where = f"layer {header.layer} {header.tensor}"
    if header.compression != "none":
        try:  # at most raw_bytes + 1 out: a blob that inflates further is refused, not held
            if header.compression == "lz4":
                dec = lz4.frame.LZ4FrameDecompressor()
                raw = dec.decompress(bytes(blob), max_length=header.raw_bytes + 1)
                finished = dec.eof
            else:
                inflate = zlib.decompressobj()
                raw = inflate.decompress(bytes(blob), header.raw_bytes + 1)
                finished = inflate.eof and not inflate.unused_data
        except (RuntimeError, ValueError, OSError, zlib.error) as exc:
            raise ChunkError(f"{header.compression} data of {where} is corrupt: {exc}", reason="decode") from exc
        if len(raw) != header.raw_bytes or not finished:
            raise ChunkError(f"{where} decompressed to {len(raw)} bytes, expected {header.raw_bytes}", reason="decode")
        blob = bytearray(raw)
    fmt = get_format(header.precision)
    flat = np.frombuffer(blob, dtype=np.uint8)
    sections, at = [], 0
    for nbytes, size in fmt.layout(header.shape, header.scale_axis):
        part = flat[at : at + nbytes]
        sections.append(_unshuffle(part, size) if header.shuffle else part)
        at += nbytes
    if at != len(flat):
        raise ChunkError(f"{where} holds {len(flat)} bytes, expected {at}", reason="decode")
    return fmt.decode(sections, header.shape, header.scale_axis, out_dtype)


def decode_block(
    block: Buffer, header: KVChunkHeader, count: int, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``count`` tensors that ``header`` describes but for their layer and K/V (uncompressed, unshuffled floats),
    back to back in ``block``, decoded at once: ``(count, *shape)``, one NaN/inf check and one cast for all (a
    tensor pack of small tensors, ``bus.frames.PackBlock``). The same values as :func:`decode_blob` of each."""
    fmt = get_format(header.precision)
    if not isinstance(fmt, FloatFormat) or header.compression != "none" or header.shuffle:
        raise CodecError(f"a block of {header.precision} tensors with {header.compression} compression is not plain")
    flat = np.frombuffer(block, dtype=np.uint8)
    if len(flat) != count * header.raw_bytes:
        raise ChunkError(f"a block of {count} tensors holds {len(flat)} bytes, expected {count * header.raw_bytes}")
    b, h, t, d = header.shape
    return fmt.decode([flat], (count * b, h, t, d), "none", out_dtype).reshape(count, b, h, t, d)


def _header_fields(enc: EncodedTensor) -> dict:
    """The chunk-header fields that describe an encoded tensor."""
    return dict(
        dtype=enc.dtype,
        shape=enc.shape,
        precision=enc.precision,
        shuffle=enc.shuffle,
        compression=enc.compression,
        scale_axis=enc.scale_axis,
        scale_dtype=SCALE_DTYPE if enc.scale_axis != "none" else None,
        raw_bytes=enc.raw_bytes,
    )


def tensor_chunks(
    enc: EncodedTensor,
    *,
    query_id: str,
    sender: str,
    layer: int,
    tensor: str,
    layers_total: int,
    max_payload: int,
    chunk_bytes: int | None = None,
) -> list[SealedChunk]:
    """Split an encoded tensor into sealed chunks whose frames are no longer than ``max_payload`` bytes."""
    fields = dict(
        query_id=query_id, sender=sender, layer=layer, tensor=tensor, layers_total=layers_total, **_header_fields(enc)
    )
    return seal_chunks(enc.blob, fields, max_payload=max_payload, chunk_bytes=chunk_bytes)


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
    """Like :func:`tensor_chunks`, as standalone ``bytes`` frames (one copy of each payload)."""
    chunks = tensor_chunks(
        enc,
        query_id=query_id,
        sender=sender,
        layer=layer,
        tensor=tensor,
        layers_total=layers_total,
        max_payload=max_payload,
        chunk_bytes=chunk_bytes,
    )
    return (sealed.frame() for sealed in chunks)


def encode_layer_chunks(
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: str,
    query_id: str,
    sender: str,
    layers_total: int,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    compress: bool | str = True,
    chunk_bytes: int | None = None,
    pack_limit: int = 0,
) -> list[SealedChunk | PackEntry]:
    """Encode one layer's K and V into sealed chunks (K first); payloads are views of the encoded blobs.

    A tensor whose blob is at most ``pack_limit`` bytes (and ``chunk_bytes``, when given) comes out whole, as a
    :class:`~bus.frames.PackEntry` for a tensor pack (``bus.frames.pack_message``), instead of a sealed chunk.
    """
    if chunk_bytes is not None:
        pack_limit = min(pack_limit, chunk_bytes)
    chunks: list[SealedChunk | PackEntry] = []
    for name, x in (("k", k), ("v", v)):
        enc = encode_tensor(x, precision, tensor=name, compress=compress)
        if len(enc.blob) <= pack_limit:
            chunks.append(pack_entry(layer, name, enc.blob, _header_fields(enc)))
            continue
        chunks += tensor_chunks(
            enc,
            query_id=query_id,
            sender=sender,
            layer=layer,
            tensor=name,
            layers_total=layers_total,
            max_payload=max_payload,
            chunk_bytes=chunk_bytes,
        )
    return chunks


def encode_pack_entries(
    items: Sequence[tuple[int, torch.Tensor, torch.Tensor]], precision: str, pack_limit: int
) -> dict[int, list[PackEntry]] | None:
    """Many layers' K and V (``(layer, K, V)``) as tensor-pack entries at a float precision without compression,
    encoded at once: one copy into one buffer, one cast and one NaN/inf check for all, each blob a view of it
    (:func:`encode_layer_chunks` per layer gives the same entries, tensor by tensor). None when they do not all
    qualify (4-D float tensors of one shape and dtype, each blob within ``pack_limit``) or a value is NaN/inf:
    encoding layer by layer then sends what it can and reports the bad tensor where it is."""
    fmt = get_format(precision)
    tensors = [t for _, k, v in items for t in (k, v)]
    if not isinstance(fmt, FloatFormat) or not tensors or not isinstance(tensors[0], torch.Tensor):
        return None
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return None
    nbytes = first.numel() * fmt.itemsize
    if first.dim() != 4 or not first.is_floating_point() or not 0 < nbytes <= pack_limit:
        return None
    try:
        with torch.no_grad():
            stacked = torch.stack(tensors).to("cpu")  # refuses tensors of other shapes or devices
        ((data, _),) = fmt.encode(stacked, "none")
    except (CodecError, RuntimeError):
        return None
    view = memoryview(data)
    like = EncodedTensor(  # what encode_tensor gives each of them, but for its blob
        blob=view[:nbytes],
        shape=tuple(int(x) for x in first.shape),
        dtype=_SOURCE_DTYPES.get(first.dtype, "float32"),
        precision=precision,
        shuffle=False,
        compression="none",
        scale_axis="none",
        raw_bytes=nbytes,
    )
    fields = pack_entry(items[0][0], "k", like.blob, _header_fields(like)).fields
    return {
        layer: [
            PackEntry(layer, "k", view[2 * i * nbytes : (2 * i + 1) * nbytes], fields),
            PackEntry(layer, "v", view[(2 * i + 1) * nbytes : (2 * i + 2) * nbytes], fields),
        ]
        for i, (layer, _, _) in enumerate(items)
    }


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
    compress: bool | str = True,
    chunk_bytes: int | None = None,
) -> list[bytes]:
    """Like :func:`encode_layer_chunks`, as standalone ``bytes`` frames (one copy of each payload)."""
    chunks = encode_layer_chunks(
        layer,
        k,
        v,
        precision=precision,
        query_id=query_id,
        sender=sender,
        layers_total=layers_total,
        max_payload=max_payload,
        compress=compress,
        chunk_bytes=chunk_bytes,
    )
    return [sealed.frame() for sealed in chunks]


def encode_cache(
    layers: Layers,
    *,
    precision: str,
    query_id: str,
    sender: str,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    compress: bool | str = True,
    chunk_bytes: int | None = None,
) -> Iterator[bytes]:
    """Frames of a whole cache (or a subset of its layers), layer by layer in the mapping's order."""
    validate_id(query_id, "query id")
    validate_id(sender, "sender id")
    get_format(precision)
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
        if not isinstance(layer, int) or not 0 <= layer <= MAX_LAYER_INDEX:
            raise CodecError(f"layer index {layer!r} must be an int in 0..{MAX_LAYER_INDEX}", reason="range")
        if not isinstance(kv, tuple | list) or len(kv) != 2:
            raise CodecError(f"layer {layer} must be a (K, V) pair")
