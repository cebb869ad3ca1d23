"""Move KV caches over NATS: :func:`send_cache` publishes tensor packs and chunk frames with flow control,
:class:`KVReceiver` subscribes, reassembles and hands out complete layers per (query_id, sender).

Flow control: when it quantizes or compresses, the sender encodes the next layer in a worker thread while it
publishes the current one (a plain float cast is encoded inline: cheaper than GIL hand-offs). It round-trips a
PING every ``flush_every`` bytes, so it never runs further ahead of the server than that; the receiving
subscription's pending limits are raised (``bus.connect``) so a 64 MB cache is buffered, not dropped as a slow
consumer. An optional :class:`~bus.shaper.LinkShaper` paces publishes.

Copies: encoding hashes and seals chunks whose payloads are views of the encoded tensor (for uncompressed
fp16/bf16/fp32 that is the caller's tensor memory itself). A chunk that fills a message of its own goes on
nats-py's outgoing queue as its head and that view (``bus.connect.publish_views``): the socket reads the tensor
memory itself, no copy (``Client.publish`` would copy a payload twice); where that queue is not available (another
transport) the frame is assembled in one reused :class:`~bus.frames.FrameBuffer` and published. A tensor pack of
large tensors goes the same way (its head, then views); packs of smaller ones and frames that share a message are
joined once with their PUB line (``bus.connect.publish_joined``: TLS encrypts each queued buffer into records of
its own, so one buffer beats many small ones). Each message goes to the socket as it is built. On receipt,
one-chunk tensors are decoded in place from the message bytes; multi-chunk tensors are copied once into their
assembly buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import connect as busconn
from bus.codec import KVPair, Layers, check_layers, compression_codec, encode_layer_chunks, encode_pack_entries
from bus.errors import FedRefineError, SchemaError, TransportError
from bus.frames import (
    LAYER_PACK_TENSOR_BYTES,
    MAX_PACK_ENTRIES,
    PACK_ENTRY,
    Buffer,
    FrameBuffer,
    PackEntry,
    PackRead,
    SealedChunk,
    StreamCut,
    cut_frame,
    is_cut,
    is_pack,
    pack_overhead,
    pack_parts,
    packed_tensor_bytes,
    read_cut,
    read_frames,
    read_pack_entries,
)
from bus.quant import FloatFormat, get_format
from bus.reassembler import LayerDone, Reassembler, ReassemblyLimits
from bus.schemas import KVChunkHeader, validate_id
from bus.shaper import LinkShaper
from bus.subjects import SubjectParts, Subjects

log = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 8 * 1024 * 1024  # bytes published between PING/PONG round trips
DEFAULT_PACK_BYTES = 512 * 1024  # bytes of a tensor pack or of frames sharing one NATS message (an unshaped link):
# each message costs both ends ~0.2 ms of Python; a BusClient receives 512 KiB ones at full speed (nats-py's own
# parser took ~1.7x as long for 1 MiB ones as for 128 KiB). A real q' (1.4 MB): 3 messages, not 12
DEFAULT_PACK_SECONDS = 0.005  # on a shaped link, a shared message carries at most this much of its rate, but a
# small layer's K and V (bus.frames.LAYER_PACK_TENSOR_BYTES each) share one tensor pack, sent at the layer's end
PACK_VIEW_BYTES = 64 * 1024  # a pack whose tensors average this much goes on the socket as views of them, not joined
# (under TLS a queued view is TLS records of its own: below ~64 KB one copy into one buffer is cheaper)
BLOCK_BYTES = 8 * 1024 * 1024  # source bytes of small tensors encoded at once (a copy the sender holds meanwhile)
SMALL_TENSOR_ELEMENTS = 2048  # K/V tensors up to this size are encoded inline and never LZ4-probed by "auto"
DEFAULT_EXPIRE_INTERVAL = 1.0  # seconds between the receiver's deadline sweeps
DEFAULT_ERROR_MEMORY = 100  # recent receive errors a KVReceiver keeps


@dataclass(frozen=True)
class SendReport:
    """What :func:`send_cache` put on the wire."""

    query_id: str
    sender: str
    subject: str
    layers: tuple[int, ...]  # layers sent, in send order
    precision: str  # the precision asked for (a steered stream may have sent some layers cheaper)
    chunks: int
    wire_bytes: int  # frame bytes published, headers included
    seconds: float
    messages: int  # NATS messages they went in (small frames share one)
    precisions: tuple[str, ...] = ()  # per sent layer, in send order
    dropped: tuple[int, ...] = ()  # layers a steer left out


@dataclass(frozen=True)
class StreamProgress:
    """Where a stream stands between two layers (what a :data:`Steer` decides from)."""

    sent: tuple[tuple[int, str], ...]  # (layer, precision) already handed to the link, in send order
    remaining: tuple[tuple[int, str], ...]  # (layer, precision) still to send, in send order
    wire_bytes: int  # frame bytes handed to the link so far
    seconds: float  # since the stream started


# Called between layers; returns the new remaining (layer, precision) schedule (a subset of the remaining
# layers, any precision), or None to keep it. A steer re-plans a stream when its link slows down mid-stream.
Steer = Callable[[StreamProgress], "list[tuple[int, str]] | None"]


def _honour_cancel() -> None:
    """Re-raise a cancellation that nats-py swallowed.

    ``Client.publish`` waits for its flusher when its pending buffer is full and catches ``CancelledError`` while
    it does, so a cancelled sender would go on streaming. The task still counts the request (``cancelling()``).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _publish(nc: Client, subject: str, parts: tuple[Buffer, ...], views: bool = False) -> None:
    """One message: its parts queued as they are (``views``: large tensors, no copy), or joined with one copy
    (``publish_joined``: small parts, one entry for TLS to encrypt), or through ``Client.publish`` where nats-py's
    queue is not the one those expect."""
    try:
        if not busconn.can_publish_views(nc):
            await nc.publish(subject, parts[0] if len(parts) == 1 else b"".join(parts))
        elif views:
            await busconn.publish_views(nc, subject, parts)
        else:
            await busconn.publish_joined(nc, subject, parts)
    except nats.errors.MaxPayloadError as exc:
        size = sum(len(p) for p in parts)
        raise TransportError(f"{size}-byte frame exceeds the server's max_payload {nc.max_payload}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise TransportError(f"publish to {subject!r} failed: {exc or type(exc).__name__}", subject=subject) from exc
    _honour_cancel()


class _Outbox:
    """Publishes one stream: whole small tensors share a tensor pack (``bus.frames.pack_message``), larger ones go
    as chunk frames (a small last chunk shares a message with the next frames); paces messages with the shaper
    and round-trips a PING every ``flush_every`` bytes so it never runs far ahead of the server."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        shaper: LinkShaper | None,
        pack: int,
        flush_every: int,
        stream: tuple[str, str, int],
        entry_pack: int | None = None,
    ) -> None:
        self.nc, self.subject, self.shaper = nc, subject, shaper
        self.pack, self.flush_every = pack, flush_every
        self.entry_pack = pack if entry_pack is None else entry_pack  # bytes of whole tensors one pack may hold
        self.stream = stream  # query id, sender, layers in the send
        self.chunks = self.wire = self.messages = self._since_flush = 0
        self._buffer = FrameBuffer()  # nats-py copies a payload into its command before publish returns
        self._packed = bytearray()  # small frames waiting to share one message
        self._entries: list[PackEntry] = []  # whole tensors waiting to share one tensor pack
        self._pack_size = 0
        self._pack_overhead = pack_overhead(stream[0], stream[1])

    async def put_all(self, parts: list[SealedChunk | PackEntry]) -> None:
        """Queue a layer's chunks or whole tensors in order: a whole tensor into the pending pack (sent first when
        it is full), a chunk into the shared message or, when large, a message of its own."""
        for part in parts:
            if isinstance(part, PackEntry):
                if self._packed:
                    await self._send_frames()  # a message holds frames or a pack, not both
                size = part.size
                full = len(self._entries) >= MAX_PACK_ENTRIES
                if self._entries and (full or self._pack_size + size > self.entry_pack):
                    await self._send_pack()
                if not self._entries:
                    self._pack_size = self._pack_overhead
                    self.wire += self._pack_overhead
                self._entries.append(part)
                self._pack_size += size
                self.wire += size
            else:
                await self._send_pack()
                if self._packed and len(self._packed) + part.size > self.pack:
                    await self._send_frames()
                if part.size > self.pack:  # a message of its own: head and payload view queued as they are
                    if busconn.can_publish_views(self.nc):
                        await self._send(part.head, part.payload, views=True)
                    else:
                        await self._send(self._buffer.frame(part))
                else:
                    self._packed += part.head
                    self._packed += part.payload
                self.wire += part.size
            self.chunks += 1

    async def close(self) -> None:
        """Publish what is pending and round-trip a PING: everything reached the server."""
        await self._send_pack()
        await self._send_frames()
        await busconn.flush(self.nc)

    async def notice(self, frame: bytes) -> None:
        """Publish a control frame (a stream cut) as a message of its own after the stream, and flush it."""
        await self._send(frame)
        await busconn.flush(self.nc)

    async def end_layer(self) -> None:
        """A layer is queued: on a shaped link its pack goes now, so the link carries the stream layer by layer."""
        if self.shaper is not None:
            await self._send_pack()

    async def _send_pack(self) -> None:
        if self._entries:
            parts = pack_parts(*self.stream, self._entries)
            size = sum(len(p) for p in parts)
            self.wire += size - self._pack_size  # the estimate counted the most header padding
            views = size >= PACK_VIEW_BYTES * len(self._entries)
            self._entries = []  # with views, queued as they are: the tensors must not change before the flush
            await self._send(*parts, views=views)

    async def _send_frames(self) -> None:
        if self._packed:
            await self._send(self._packed)
            self._packed.clear()

    async def _send(self, *parts: Buffer, views: bool = False) -> None:
        """Publish one message made of ``parts`` (paced by the shaper), and round-trip a PING when it is due."""
        size = sum(len(p) for p in parts)
        if self.shaper is not None:
            await self.shaper.acquire(size)
        await _publish(self.nc, self.subject, parts, views)
        await asyncio.sleep(0)  # nats-py's flusher puts it on the socket now, while the next message is built
        self.messages += 1
        self._since_flush += size
        if self._since_flush >= self.flush_every:
            await busconn.flush(self.nc)
            _honour_cancel()
            self._since_flush = 0


Encoding = list[SealedChunk | PackEntry] | asyncio.Future[list[SealedChunk | PackEntry]]  # a layer's, or to come


class _Encoder:
    """Encodes one layer at a time into sealed chunks: in a worker thread when that overlaps real work (quantizing,
    LZ4 on big tensors), inline otherwise (a plain float cast is cheaper than the GIL hand-offs). Small tensors at a
    float precision without compression are encoded many layers at once (``bus.codec.encode_pack_entries``: one
    cast and one check instead of one per tensor), from the layer asked for on, up to ``BLOCK_BYTES``."""

    def __init__(self, layers: Layers, opts: dict[str, Any], small: bool) -> None:
        self.layers, self.opts, self.small = layers, opts, small
        self._order = list(layers)
        chunk_bytes = opts["chunk_bytes"]  # as encode_layer_chunks: what travels whole fits a chunk too
        self._limit = opts["pack_limit"] if chunk_bytes is None else min(opts["pack_limit"], chunk_bytes)
        self._ready: dict[tuple[int, str], list[SealedChunk | PackEntry]] = {}
        self._refused: set[str] = set()  # precisions whose tensors do not encode as a block

    def start(self, layer: int, precision: str) -> Encoding:
        """The layer's chunks at ``precision``: encoded already, or a future of them (encoding in a thread)."""
        ready = self._block(layer, precision)
        if ready is not None:
            return ready
        k, v = self.layers[layer]
        quantized = not isinstance(get_format(precision), FloatFormat)
        if self.opts["compress"] != "none" or (quantized and not self.small):
            return asyncio.ensure_future(
                asyncio.to_thread(encode_layer_chunks, layer, k, v, precision=precision, **self.opts)
            )
        return encode_layer_chunks(layer, k, v, precision=precision, **self.opts)

    def _block(self, layer: int, precision: str) -> list[SealedChunk | PackEntry] | None:
        """The layer's pack entries from a block encoded at once, when its tensors qualify (None: they do not)."""
        if (layer, precision) not in self._ready:
            if self.opts["compress"] != "none" or self._limit <= 0 or precision in self._refused:
                return None
            items, total = [], 0
            for m in self._order[self._order.index(layer) :]:
                k, v = self.layers[m]
                if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                    break  # not a tensor: layer by layer reports it
                total += k.numel() * k.element_size() + v.numel() * v.element_size()
                if items and total > BLOCK_BYTES:
                    break
                items.append((m, k, v))
            entries = encode_pack_entries(items, precision, self._limit)
            if entries is None:
                self._refused.add(precision)
                return None
            self._ready.update({(m, precision): e for m, e in entries.items()})
        return self._ready.pop((layer, precision))


def _steered(
    steer: Steer, remaining: list[tuple[int, str]], sent: list[tuple[int, str]], wire: int, start: float
) -> list[tuple[int, str]] | None:
    """The steer's new schedule for the remaining layers, checked (TransportError when it is not a subset)."""
    progress = StreamProgress(tuple(sent), tuple(remaining), wire, time.perf_counter() - start)
    new = steer(progress)
    if new is None:
        return None
    new = [(int(m), str(p)) for m, p in new]
    allowed = {m for m, _ in remaining}
    if any(m not in allowed for m, _ in new) or len({m for m, _ in new}) != len(new):
        raise TransportError(f"steer returned layers {[m for m, _ in new]} for remaining {sorted(allowed)}")
    for _, precision in new:
        get_format(precision)
    return new


async def _cancel(pending: Encoding | None) -> None:
    if isinstance(pending, asyncio.Future) and not pending.done():
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending


async def send_cache(
    nc: Client,
    subject: str,
    layers: Layers,
    *,
    precision: str = "fp16",
    query_id: str,
    sender: str,
    compress: bool | str = "auto",
    chunk_bytes: int | None = None,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    shaper: LinkShaper | None = None,
    max_payload: int | None = None,
    pack_bytes: int | None = None,
    steer: Steer | None = None,
) -> SendReport:
    """Send ``layers`` (``{layer: (K, V)}``, in the mapping's order) to ``subject`` as KV chunk frames and packs.

    A tensor whose blob fits ``pack_bytes`` (default: ``DEFAULT_PACK_BYTES``, or ``DEFAULT_PACK_SECONDS`` of a
    shaper's rate, so a slow link still delivers layer by layer) travels whole in a tensor pack with the next
    ones (one header and one check for all: ``bus.frames.pack_message``); a larger one as chunk frames, small
    frames sharing a message up to that size. A one-token tail of every layer is then one message. On a shaped
    link a layer's K and V share a pack when each fits ``LAYER_PACK_TENSOR_BYTES``, sent at the layer's end.

    Chunks fit the connected server's ``max_payload`` (or the smaller ``max_payload`` given). The tensors must not
    change until this returns: the socket reads chunk payloads from their memory (after a cancelled send, until the
    connection has flushed; a tensor changed before that fails the receiver's checksum and is not decoded).
    ``compress``: ``"none"`` (or False), ``"lz4"`` (or True), ``"deflate"`` (``bus.codec.encode_tensor``: smaller,
    slower; it pays on slow links), or ``"auto"``, which tries shuffle+LZ4 on the first layer and keeps it for the
    rest only if it shrank a tensor there (on fp16 and quantized KV it rarely does, and skipping it saves the work
    and a thread hand-off per layer); no codec is tried on small tensors (at most ``SMALL_TENSOR_ELEMENTS`` each,
    e.g. a one-token tail) under ``"auto"``.

    ``steer``, when given, is asked after every layer what to send of the rest (see :data:`Steer`): it may drop
    layers or send them at another precision (every chunk names its own dtype, so the receiver decodes either).
    When it dropped any, a stream-cut notice (:class:`bus.frames.StreamCut`, the layers sent) follows the last
    frame in a message of its own, so a receiver fuses at once instead of waiting for layers that will not come.
    """
    validate_id(query_id, "query id")
    validate_id(sender, "sender id")
    get_format(precision)
    check_layers(layers)
    if flush_every < 1:
        raise TransportError(f"flush_every must be positive, got {flush_every}")
    limit = busconn.max_payload(nc)
    if max_payload is not None:
        limit = min(limit, max_payload)
    schedule = [(m, precision) for m in layers]
    opts: dict[str, Any] = dict(
        query_id=query_id,
        sender=sender,
        layers_total=len(schedule),
        max_payload=limit,
        compress="lz4" if compress == "auto" else compression_codec(compress),
        chunk_bytes=chunk_bytes,
    )
    tensors = [t for kv in layers.values() for t in kv]  # a non-tensor is not small: encoding reports it
    small = all(isinstance(t, torch.Tensor) and t.numel() <= SMALL_TENSOR_ELEMENTS for t in tensors)
    if compress == "auto" and small:
        opts["compress"] = "none"  # a few hundred bytes: LZ4's frame would outweigh any saving
    if pack_bytes is None:
        pack_bytes = DEFAULT_PACK_BYTES if shaper is None else int(shaper.rate_bps * DEFAULT_PACK_SECONDS)
    pack = min(limit, max(0, pack_bytes))
    overhead = pack_overhead(query_id, sender)
    if shaper is None:  # packs of many layers, up to the pack size
        entry_pack = pack
        opts["pack_limit"] = max(0, pack - overhead - PACK_ENTRY.size)
    else:  # a pack per layer: its K and V, each up to LAYER_PACK_TENSOR_BYTES
        entry_pack = min(limit, max(pack, overhead + 2 * packed_tensor_bytes(LAYER_PACK_TENSOR_BYTES)))
        opts["pack_limit"] = min(LAYER_PACK_TENSOR_BYTES, max(0, entry_pack - overhead - PACK_ENTRY.size))
    outbox = _Outbox(nc, subject, shaper, pack, flush_every, (query_id, sender, len(schedule)), entry_pack)
    encoder = _Encoder(layers, opts, small)
    start = time.perf_counter()
    sent: list[tuple[int, str]] = []
    pending = encoder.start(*schedule[0]) if schedule else None
    try:
        while len(sent) < len(schedule):
            i = len(sent)
            sealed = await pending if isinstance(pending, asyncio.Future) else pending
            if i == 0 and compress == "auto" and not any(c.compressed for c in sealed):
                opts["compress"] = "none"
            pending = encoder.start(*schedule[i + 1]) if i + 1 < len(schedule) else None  # overlaps the publish
            await outbox.put_all(sealed)
            await outbox.end_layer()
            sent.append(schedule[i])
            if steer is None or len(sent) == len(schedule):
                continue
            new = _steered(steer, schedule[i + 1 :], sent, outbox.wire, start)
            if new is not None and new != schedule[i + 1 :]:
                if not new or new[0] != schedule[i + 1]:
                    await _cancel(pending)
                    pending = encoder.start(*new[0]) if new else None
                schedule = sent + new
        await outbox.close()
        if len(sent) < len(layers):  # a steer dropped layers: tell the receiver not to wait for them
            await outbox.notice(cut_frame(query_id, sender, [m for m, _ in sent]))
    finally:
        await _cancel(pending)
    seconds = time.perf_counter() - start
    log.debug(
        "sent %d layers of %s/%s: %d chunks in %d messages, %d bytes in %.3f s",
        len(sent),
        query_id,
        sender,
        outbox.chunks,
        outbox.messages,
        outbox.wire,
        seconds,
    )
    went = {m for m, _ in sent}
    dropped = tuple(m for m in layers if m not in went)
    return SendReport(
        query_id,
        sender,
        subject,
        tuple(m for m, _ in sent),
        precision,
        outbox.chunks,
        outbox.wire,
        seconds,
        outbox.messages,
        tuple(p for _, p in sent),
        dropped,
    )


LayerCallback = Callable[[LayerDone], Any]
ErrorCallback = Callable[[FedRefineError, str], Any]
CutCallback = Callable[[StreamCut], Any]


class KVReceiver:
    """Subscribes to a KV subject (or wildcard), reassembles chunks, exposes complete layers per stream."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        *,
        limits: ReassemblyLimits | None = None,
        out_dtype: torch.dtype = torch.float32,
        subjects: Subjects | None = None,
        on_layer: LayerCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_cut: CutCallback | None = None,
        pending_bytes_limit: int = busconn.DEFAULT_SUB_PENDING_BYTES,
        expire_interval: float = DEFAULT_EXPIRE_INTERVAL,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.reassembler = Reassembler(limits, out_dtype=out_dtype)
        self.subjects = subjects
        self.on_layer = on_layer
        self.on_error = on_error
        self.on_cut = on_cut
        self.pending_bytes_limit = pending_bytes_limit
        self.expire_interval = expire_interval
        self.errors: deque[tuple[str, FedRefineError]] = deque(maxlen=DEFAULT_ERROR_MEMORY)
        self.stats = {"messages": 0, "frames": 0, "bytes": 0, "layers": 0, "errors": 0}
        self._sub: Subscription | None = None
        self._cond = asyncio.Condition()
        self._listeners: list[asyncio.Queue[LayerDone]] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> KVReceiver:
        """Subscribe (with raised pending limits) and start the deadline sweeper."""
        if self._sub is not None:
            raise TransportError(f"receiver on {self.subject!r} already started")
        self._sub = await busconn.subscribe(
            self.nc, self.subject, self._on_msg, pending_bytes_limit=self.pending_bytes_limit
        )
        await busconn.subscribed(self.nc)
        self._sweeper = asyncio.create_task(self._sweep(), name=f"kv-sweeper:{self.subject}")
        return self

    async def stop(self) -> None:
        """Unsubscribe and stop the sweeper; state already received stays readable."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def __aenter__(self) -> KVReceiver:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- receiving ------------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        self.stats["messages"] += 1
        self.stats["bytes"] += len(msg.data)
        done: list[LayerDone] = []
        if is_cut(msg.data):
            await self._on_cut(msg)
            return
        parts = None  # the subject's parts, parsed once per message
        try:
            if is_pack(msg.data):
                pack = read_pack_entries(msg.data)
                self.stats["frames"] += len(pack.entries)
                self._check_subject(msg.subject, pack)
                self.reassembler.add_pack(pack, done)
            else:
                for chunk in read_frames(msg.data):
                    self.stats["frames"] += 1
                    parts = self._check_subject(msg.subject, chunk.header, parts)
                    done += self.reassembler.add(chunk)
        except FedRefineError as exc:
            await self._error(exc, msg.subject)  # the message's frames before this one are kept
        if not done:
            return
        self.stats["layers"] += len(done)
        for ev in done:
            for queue in self._listeners:
                queue.put_nowait(ev)
            if self.on_layer is not None:
                await self._callback("on_layer", ev, msg.subject)
        async with self._cond:
            self._cond.notify_all()

    async def _on_cut(self, msg: Msg) -> None:
        """A stream-cut notice: the stream's sender sent only the layers it names."""
        try:
            notice = read_cut(msg.data)
            self._check_subject(msg.subject, notice)
            self.reassembler.cut(notice)
        except FedRefineError as exc:
            await self._error(exc, msg.subject)
            return
        await self._callback("on_cut", notice, msg.subject)
        async with self._cond:
            self._cond.notify_all()

    async def _callback(self, name: str, event: LayerDone | StreamCut, subject: str) -> None:
        """Call the user's ``on_layer`` or ``on_cut`` (awaited when it is a coroutine); a failing callback is an
        error on ``subject``, never the end of the subscription."""
        callback = getattr(self, name)
        if callback is None:
            return
        try:
            result = callback(event)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            log.exception("%s callback failed for %s/%s", name, event.query_id, event.sender)
            await self._error(TransportError(f"{name} callback failed: {exc}"), subject)

    def _check_subject(
        self, subject: str, header: KVChunkHeader | StreamCut | PackRead, parts: SubjectParts | None = None
    ) -> SubjectParts | None:
        """With ``subjects`` set, a chunk, pack or cut must name the query and sender its subject names (no spoofing).
        Returns the subject's parts (``parts``: already parsed from ``subject``), None without ``subjects``."""
        if self.subjects is None:
            return None
        parts = parts or self.subjects.parse(subject)
        if parts.kind != "kv" or parts.query_id != header.query_id or parts.sender != header.sender:
            raise SchemaError(f"KV frame for {header.query_id}/{header.sender} arrived on {subject!r}; dropped")
        return parts

    async def _error(self, exc: FedRefineError, subject: str) -> None:
        self.stats["errors"] += 1
        self.errors.append((subject, exc))
        log.debug("KV receive error on %s: %s", subject, exc)
        if self.on_error is not None:
            try:
                result = self.on_error(exc, subject)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_error callback failed")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval)
            try:
                self.reassembler.expire()
            except Exception:  # never let the sweeper die silently
                log.exception("deadline sweep failed")

    # -- reading --------------------------------------------------------------------------------------

    def completed(self, query_id: str, sender: str) -> dict[int, KVPair]:
        """Complete layers of one stream so far."""
        return self.reassembler.completed(query_id, sender)

    def is_complete(self, query_id: str, sender: str) -> bool:
        """True once a stream delivered every layer its sender announced (or, cut short, every layer it sent)."""
        return self.reassembler.is_complete(query_id, sender)

    def cut_layers(self, query_id: str, sender: str) -> tuple[int, ...] | None:
        """The layers a stream's sender sent when it cut the stream short (None: not cut)."""
        return self.reassembler.cut_layers(query_id, sender)

    def layer_precisions(self, query_id: str, sender: str) -> dict[int, str]:
        """The precision each complete layer of a stream travelled at."""
        return self.reassembler.layer_precisions(query_id, sender)

    async def wait_complete(
        self, query_id: str, sender: str, *, layers: Iterable[int] | None = None, timeout: float
    ) -> dict[int, KVPair]:
        """Wait for the given layers (default: all announced) of one stream; TransportError on timeout."""
        wanted = set(layers) if layers is not None else None

        def ready() -> bool:
            if wanted is None:
                return self.is_complete(query_id, sender)
            return wanted <= set(self.completed(query_id, sender))

        try:
            async with self._cond:
                await asyncio.wait_for(self._cond.wait_for(ready), timeout)
        except TimeoutError as exc:
            have = sorted(self.completed(query_id, sender))
            raise TransportError(
                f"timed out after {timeout:.1f} s waiting for {query_id}/{sender}; complete layers: {have}",
                query_id=query_id,
                sender=sender,
            ) from exc
        return self.completed(query_id, sender)

    async def iter_layers(self) -> AsyncIterator[LayerDone]:
        """Yield every layer completed from now on, as it completes."""
        queue: asyncio.Queue[LayerDone] = asyncio.Queue()
        self._listeners.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.remove(queue)

    def set_deadline(self, query_id: str, seconds_from_now: float) -> None:
        """Free the query's state ``seconds_from_now`` seconds from now."""
        self.reassembler.set_deadline(query_id, self.reassembler.clock() + seconds_from_now)

    def close_query(self, query_id: str) -> None:
        """Free a query's state now and refuse its late chunks."""
        self.reassembler.close(query_id)
