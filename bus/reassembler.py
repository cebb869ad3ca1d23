"""Reassemble KV chunks (any order, duplicates tolerated) into decoded layers, within limits.

State is kept per query, then per sender (a *stream*), then per layer and tensor. A bad chunk raises
a :class:`ChunkError` or :class:`LimitError` and changes nothing else; a tensor whose assembled blob
fails its checksum is dropped whole (its chunks can be sent again). Queries are freed when taken,
closed, or past their deadline (``expire``); chunks for a closed query are refused as late.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from bus.codec import KVPair, decode_blob, decode_block
from bus.errors import ChunkError, CodecError, LimitError
from bus.frames import Buffer, Chunk, PackBlock, PackRead, StreamCut, blob_hash, identity_seed, read_frame
from bus.schemas import KVChunkHeader

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES_PER_QUERY = 1 << 30  # bytes: blobs in flight plus decoded tensors, all senders of a query
DEFAULT_MAX_QUERIES = 64  # queries with state at once
DEFAULT_MAX_SENDERS_PER_QUERY = 32  # transmitters per query
DEFAULT_MAX_CHUNKS_PER_TENSOR = 65536  # chunks one K or V tensor may be split into
DEFAULT_TTL = 120.0  # seconds a query's state lives without an explicit deadline
DEFAULT_CLOSED_MEMORY = 4096  # recently closed query ids remembered to refuse late chunks


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds that keep a receiver's memory safe from a faulty or hostile sender."""

    max_bytes_per_query: int = DEFAULT_MAX_BYTES_PER_QUERY
    max_queries: int = DEFAULT_MAX_QUERIES
    max_senders_per_query: int = DEFAULT_MAX_SENDERS_PER_QUERY
    max_chunks_per_tensor: int = DEFAULT_MAX_CHUNKS_PER_TENSOR
    ttl: float = DEFAULT_TTL


@dataclass(frozen=True)
class LayerDone:
    """One layer whose K and V both arrived, verified and decoded."""

    query_id: str
    sender: str
    layer: int
    k: torch.Tensor  # (B, kv_heads, T, head_dim)
    v: torch.Tensor  # (B, kv_heads, T, head_dim)
    layers_total: int


@dataclass
class _Tensor:
    first: KVChunkHeader  # its first chunk's header (a packed tensor: the header of its kind, maybe for another layer)
    buf: bytearray | memoryview | None
    crcs: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk index -> (chunk_hash, payload hash)
    decoded: torch.Tensor | None = None
    reserved: int = 0  # bytes charged to the query
    packed: bool = False  # came whole in a tensor pack, whose check covered it

    def header(self, key: tuple[int, str]) -> KVChunkHeader:
        """Its first chunk's header, for its ``key`` (layer, K/V)."""
        self.first = self.first.for_tensor(*key)
        return self.first


@dataclass
class _Stream:
    tensors: dict[tuple[int, str], _Tensor] = field(default_factory=dict)
    complete: dict[int, KVPair] = field(default_factory=dict)
    layers_total: int = 0
    precisions: dict[int, str] = field(default_factory=dict)  # complete layer -> the precision it travelled at
    cut: tuple[int, ...] | None = None  # the layers sent, when the sender cut the stream short (bus.frames.StreamCut)


@dataclass
class _Query:
    deadline: float
    streams: dict[str, _Stream] = field(default_factory=dict)
    bytes: int = 0


class Reassembler:
    """Turns chunk frames into complete, decoded layers per (query_id, sender)."""

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        *,
        out_dtype: torch.dtype = torch.float32,
        on_layer: Callable[[LayerDone], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LimitError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        self.limits = limits or ReassemblyLimits()
        self.out_dtype = out_dtype
        self.on_layer = on_layer
        self.clock = clock
        self._queries: dict[str, _Query] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()

    # -- feeding --------------------------------------------------------------------------------------

    def feed(self, frame: Buffer) -> list[LayerDone]:
        """Parse and check one frame, add it; return the layers it completed."""
        return self.add(read_frame(frame))

    def add(self, chunk: Chunk) -> list[LayerDone]:
        """Add a chunk checked by ``bus.frames.read_frame``; return the layers it completed."""
        h, payload = chunk.header, chunk.payload
        if h.query_id in self._closed:
            raise ChunkError(f"late chunk for closed query {h.query_id}", reason="late", query_id=h.query_id)
        if h.n_chunks > self.limits.max_chunks_per_tensor:
            raise LimitError(
                f"{h.n_chunks} chunks per tensor exceeds the limit {self.limits.max_chunks_per_tensor}",
                reason="chunks",
                query_id=h.query_id,
            )
        stream = self._stream(h.query_id, h.sender)
        key = (h.layer, h.tensor)
        state = stream.tensors.get(key)
        if state is None:
            state = self._new_tensor(h)
            state.packed = chunk.packed
            stream.tensors[key] = state
        elif state.header(key).tensor_fields != h.tensor_fields:
            raise ChunkError(
                f"chunk {h.chunk} of layer {h.layer} {h.tensor} from {h.sender} conflicts with "
                "earlier chunks (shape, dtype, size or checksum differ)",
                reason="conflict",
                query_id=h.query_id,
            )
        if h.chunk in state.crcs:
            if state.crcs[h.chunk] == (h.chunk_hash, chunk.payload_hash):
                return []  # exact duplicate: same header checksum and the same 64-bit payload digest
            raise ChunkError(
                f"conflicting duplicate of chunk {h.chunk} of layer {h.layer} {h.tensor}",
                reason="conflict",
                query_id=h.query_id,
            )
        state.crcs[h.chunk] = (h.chunk_hash, chunk.payload_hash)
        if state.buf is None:
            state.buf = payload
        else:
            state.buf[h.chunk * h.chunk_size : h.chunk * h.chunk_size + len(payload)] = payload
        stream.layers_total = max(stream.layers_total, h.layers_total)
        if len(state.crcs) < h.n_chunks:
            return []
        self._finish_tensor(h, stream, key, state, chunk.block, chunk.index)
        return self._layer_if_complete(stream, h.query_id, h.sender, h.layer, h.precision)

    def add_pack(self, pack: PackRead, done: list[LayerDone] | None = None) -> list[LayerDone]:
        """Add a checked tensor pack's tensors in order (``bus.frames.read_pack_entries``), as :meth:`add` of each of
        its chunks would, without a chunk or header object per tensor; return the layers they completed, appended
        to ``done`` (when given) as each completes. An error on one tensor raises with the tensors before it added
        (their layers in ``done``), and nothing of it or after it."""
        if pack.query_id in self._closed:
            raise ChunkError(f"late chunk for closed query {pack.query_id}", reason="late", query_id=pack.query_id)
        stream = self._stream(pack.query_id, pack.sender)
        query = self._queries[pack.query_id]
        block = pack.block
        done = [] if done is None else done
        tensors, rooms = stream.tensors, {}  # rooms: _sizes per kind (a pack repeats one or two)
        for i, (layer, tensor, kind, blob, digest) in enumerate(pack.entries):
            key = (layer, tensor)
            if key in tensors:  # a duplicate or a conflict, judged as any chunk is
                done += self.add(pack.chunk(i))
                continue
            sizes = rooms.get(id(kind))
            if sizes is None:
                sizes = rooms[id(kind)] = self._sizes(kind)
            _, keep = self._room(query, kind, sizes)
            decoded = self._from_block(block, kind) if block is not None else None
            if decoded is not None:
                out = decoded[i]
            else:  # with its own header, so an error names this tensor's layer and K/V
                out = decode_blob(blob, kind.for_tensor(layer, tensor), self.out_dtype)
            tensors[key] = _Tensor(kind, None, {0: (0, digest)}, out, keep, True)
            query.bytes += keep
            stream.layers_total = max(stream.layers_total, pack.layers_total)
            done += self._layer_if_complete(stream, pack.query_id, pack.sender, layer, kind.precision)
        return done

    def cut(self, notice: StreamCut) -> None:
        """Record that a stream ends early: its sender sent only ``notice.layers`` (see :meth:`cut_layers`)."""
        if notice.query_id in self._closed:
            raise ChunkError(
                f"late stream cut for closed query {notice.query_id}", reason="late", query_id=notice.query_id
            )
        self._stream(notice.query_id, notice.sender).cut = notice.layers

    def _stream(self, query_id: str, sender: str) -> _Stream:
        query = self._queries.get(query_id)
        if query is None:
            if len(self._queries) >= self.limits.max_queries:
                raise LimitError(
                    f"{len(self._queries)} queries in flight; limit {self.limits.max_queries}",
                    reason="queries",
                    query_id=query_id,
                )
            query = _Query(deadline=self.clock() + self.limits.ttl)
            self._queries[query_id] = query
        stream = query.streams.get(sender)
        if stream is None:
            if len(query.streams) >= self.limits.max_senders_per_query:
                raise LimitError(
                    f"query {query_id} already has {len(query.streams)} senders",
                    reason="senders",
                    query_id=query_id,
                )
            stream = _Stream()
            query.streams[sender] = stream
        return stream

    def _sizes(self, h: KVChunkHeader) -> tuple[int, int]:
        """Bytes a tensor of ``h`` holds while it decodes (blob, a decompressed copy, the output) and after (the
        output)."""
        keep = h.shape[0] * h.shape[1] * h.shape[2] * h.shape[3] * self.out_dtype.itemsize
        return h.blob_bytes + h.raw_bytes + keep, keep

    def _room(self, query: _Query, h: KVChunkHeader, sizes: tuple[int, int] | None = None) -> tuple[int, int]:
        """:meth:`_sizes` of ``h`` (or ``sizes``, computed already); a LimitError when the query has no room for the
        first."""
        need, keep = self._sizes(h) if sizes is None else sizes
        if query.bytes + need > self.limits.max_bytes_per_query:
            raise LimitError(
                f"query {h.query_id} would hold {query.bytes + need} bytes; limit {self.limits.max_bytes_per_query}",
                reason="bytes",
                query_id=h.query_id,
            )
        return need, keep

    def _new_tensor(self, h: KVChunkHeader) -> _Tensor:
        query = self._queries[h.query_id]
        need, _ = self._room(query, h)
        query.bytes += need
        # a one-chunk tensor decodes straight from its message (no copy); others assemble into a buffer
        return _Tensor(first=h, buf=bytearray(h.blob_bytes) if h.n_chunks > 1 else None, reserved=need)

    def _finish_tensor(
        self,
        h: KVChunkHeader,
        stream: _Stream,
        key: tuple[int, str],
        state: _Tensor,
        block: PackBlock | None = None,
        index: int = 0,
    ) -> None:
        query = self._queries[h.query_id]
        blob, state.buf = state.buf, None
        assert blob is not None
        try:
            if not state.packed:  # a pack's own check covered a packed tensor's blob
                digests = [state.crcs[i][1] for i in range(h.n_chunks)]
                if blob_hash(digests, identity_seed(h.query_id, h.sender, h.layer, h.tensor)) != h.blob_hash:
                    raise ChunkError(
                        f"blob checksum mismatch for layer {h.layer} {h.tensor} from {h.sender}",
                        reason="checksum",
                        query_id=h.query_id,
                    )
            decoded = self._from_block(block, h) if block is not None else None
            state.decoded = decode_blob(blob, h, self.out_dtype) if decoded is None else decoded[index]
        except ChunkError:
            del stream.tensors[key]  # drop it whole so a resend can start clean
            query.bytes -= state.reserved
            raise
        keep = state.decoded.numel() * state.decoded.element_size()
        query.bytes -= state.reserved - keep
        state.reserved = keep

    def _from_block(self, block: PackBlock, h: KVChunkHeader) -> tuple[torch.Tensor, ...] | None:
        """A pack's tensors decoded together, once (None when that failed: each then decodes alone, so a NaN fails
        only its own tensor, as it would have arrived in a pack of one)."""
        if block.decoded is None and not block.failed:
            try:
                block.decoded = decode_block(block.view, h, block.count, self.out_dtype).unbind(0)
            except (ChunkError, CodecError):
                block.failed = True
        return block.decoded

    def _layer_if_complete(
        self, stream: _Stream, query_id: str, sender: str, layer: int, precision: str
    ) -> list[LayerDone]:
        k_state = stream.tensors.get((layer, "k"))
        v_state = stream.tensors.get((layer, "v"))
        if k_state is None or v_state is None or k_state.decoded is None or v_state.decoded is None:
            return []
        k, v = k_state.decoded, v_state.decoded
        if k.shape[:3] != v.shape[:3]:
            raise ChunkError(
                f"layer {layer} from {sender}: K {tuple(k.shape)} and V {tuple(v.shape)} "
                "disagree on batch, heads or tokens",
                reason="shape",
                query_id=query_id,
            )
        stream.complete[layer] = (k, v)
        stream.precisions[layer] = precision
        done = LayerDone(query_id, sender, layer, k, v, stream.layers_total)
        if self.on_layer is not None:
            self.on_layer(done)
        return [done]

    # -- reading and freeing --------------------------------------------------------------------------

    def completed(self, query_id: str, sender: str) -> dict[int, KVPair]:
        """Complete layers of one stream so far (a copy of the mapping; tensors are shared)."""
        stream = self._get_stream(query_id, sender)
        return dict(sorted(stream.complete.items())) if stream else {}

    def is_complete(self, query_id: str, sender: str) -> bool:
        """True when a stream delivered as many complete layers as its sender announced (or, cut short, every
        layer its cut names)."""
        stream = self._get_stream(query_id, sender)
        if stream is not None and stream.cut is not None:
            return set(stream.cut) <= set(stream.complete)
        return bool(stream and stream.layers_total and len(stream.complete) >= stream.layers_total)

    def cut_layers(self, query_id: str, sender: str) -> tuple[int, ...] | None:
        """The layers a stream's sender says it sent when it cut the stream short; None while it has not."""
        stream = self._get_stream(query_id, sender)
        return stream.cut if stream else None

    def layer_precisions(self, query_id: str, sender: str) -> dict[int, str]:
        """The precision each complete layer of a stream travelled at (a re-planned stream may mix them)."""
        stream = self._get_stream(query_id, sender)
        return dict(stream.precisions) if stream else {}

    def senders(self, query_id: str) -> list[str]:
        """Senders with state for a query."""
        query = self._queries.get(query_id)
        return list(query.streams) if query else []

    def query_bytes(self, query_id: str) -> int:
        """Bytes currently charged to a query."""
        query = self._queries.get(query_id)
        return query.bytes if query else 0

    @property
    def queries_in_flight(self) -> int:
        """Queries holding state."""
        return len(self._queries)

    def set_deadline(self, query_id: str, deadline: float) -> None:
        """Free the query's state at ``deadline`` (same clock as ``clock``), even before any chunk arrived."""
        query = self._queries.get(query_id)
        if query is None:
            if len(self._queries) >= self.limits.max_queries:
                raise LimitError(
                    f"{len(self._queries)} queries in flight; limit {self.limits.max_queries}",
                    reason="queries",
                    query_id=query_id,
                )
            query = self._queries[query_id] = _Query(deadline=deadline)
        query.deadline = deadline

    def expire(self, now: float | None = None) -> list[str]:
        """Close every query past its deadline; return their ids."""
        now = self.clock() if now is None else now
        gone = [qid for qid, q in self._queries.items() if q.deadline <= now]
        for qid in gone:
            log.debug("query %s expired with %d bytes of state", qid, self._queries[qid].bytes)
            self.close(qid)
        return gone

    def close(self, query_id: str) -> None:
        """Free a query's state and refuse its later chunks."""
        self._queries.pop(query_id, None)
        self._closed[query_id] = None
        self._closed.move_to_end(query_id)
        while len(self._closed) > DEFAULT_CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _get_stream(self, query_id: str, sender: str) -> _Stream | None:
        query = self._queries.get(query_id)
        return query.streams.get(sender) if query else None


def decode_frames(frames: Iterable[Buffer], out_dtype: torch.dtype = torch.float32) -> dict[int, KVPair]:
    """Reassemble the frames of one (query, sender) cache in any order; return its complete layers."""
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
