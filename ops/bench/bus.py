"""``python -m ops.bench bus``: raw nats-py publishes vs a KV cache through our transport, same bytes, one run.

Both legs use the same embedded server (authorization and TLS on, an ``admin`` identity, unless ``--insecure``),
a publisher and a subscriber connection in one process, and the same message size; with ``--split`` the
subscriber is a child process of its own, as a receiver runs apart from its transmitters, so the two ends' work
overlaps (both legs alike). Raw: the cache's
fp16 bytes are published as plain messages and counted at a subscriber. KV: ``send_cache`` (fp16, no
compression: the same bytes) to a ``KVReceiver`` until every layer is reassembled, checksummed and decoded. Legs
alternate after a warm-up, their order rotating (each leg runs first, second and third equally often); medians
are reported. Extra rows show other precisions (throughput counted in fp16-cache bytes, i.e. effective).

``--real-size``: one real transmitter's query at SmolLM2-135M's shape (30 layers, 3 kv heads x 64): ``q`` (the
default) a 60-token q' cache, 1.4 MB in 60 tensors of 23 KB; ``tail`` the one-token tail the real kit's fusers
send, 23 KB in 60 tensors of 384 bytes. There per-tensor work (encoding, validation, decoding, reassembly, on the
same event loop as both connections) weighs against bytes that nats-py moves in a millisecond or two; at the
default 59 MB it is amortised. Small tensors travel in tensor packs (one header and check per message).

Raw legs run on nats-py's own client (``bus.connect.connect(bulk_receive=False)``); the KV leg on the clients every
agent uses (``bus.client.BusClient``: a read loop taking a megabyte at a time and a parser that copies a large
payload once). Three raw baselines: ``raw`` publishes each tensor's bytes as its own message(s), as a plain nats-py
sender of a cache would; ``raw_packed`` publishes the same bytes concatenated, in messages of the transport's pack
size (what nats-py does best for small tensors); ``raw_bus`` is ``raw`` received by a ``BusClient``, so the gain of
the client and the cost of the KV framing show apart. ``ratio`` is against ``raw``, ``ratio_vs_packed`` and
``ratio_vs_raw_bus`` against the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import torch

from bus.auth import ClientSecurity
from bus.cli import nats_argument
from bus.connect import BusConnections, subscribe, subscribed
from bus.errors import BusError, FedRefineError, TransportError
from bus.frames import header_budget
from bus.server import DEFAULT_MAX_PAYLOAD, NatsServer
from bus.transport import DEFAULT_FLUSH_EVERY, DEFAULT_PACK_BYTES, KVReceiver, send_cache
from ops.bench.codec import make_cache
from ops.server import INSECURE_WARNING
from privacy.credentials import CredentialStore

log = logging.getLogger(__name__)
T = TypeVar("T")

TARGET_RATIO = 0.95  # the transport's target: KV at >= 0.95x raw nats-py for the same bytes
DEFAULT_TIMEOUT = 20.0  # seconds for one leg
MAX_ATTEMPTS = 3  # core NATS is at-most-once: a leg that lost a message is run again, and counted
REAL_SIZE = {"q": (30, 3, 64, 60), "tail": (30, 3, 64, 1)}  # layers, kv heads, head dim, tokens (SmolLM2-135M)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cache size, repeats, server."""
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the Qwen3-0.6B-shaped cache (512 = 59 MB)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--real-size",
        nargs="?",
        const="q",
        choices=("q", "tail"),
        default=None,
        help="one real transmitter's query at SmolLM2-135M's shape (30 layers, 3 kv heads x 64): "
        "q = a 60-token q' (1.4 MB, the default), tail = the one-token tail the real kit sends (23 KB)",
    )
    parser.add_argument("--repeats", type=int, default=9, help="alternating timed runs per leg; medians reported")
    parser.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, help="embedded server max_payload")
    parser.add_argument("--nats", type=nats_argument, default=None, help="use this server instead of an embedded one")
    parser.add_argument(
        "--extra", default="fp16+lz4,int8,int4,int4+deflate", help="extra KV rows (precision[+lz4|+deflate]), or ''"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the subscriber in a child process (as a receiver runs apart from its transmitters): the ends overlap",
    )
    parser.add_argument("--insecure", action="store_true", help="embedded server without authorization or TLS")


class _RawCounter:
    """A raw leg's subscriber: keeps every message (as the KV receiver keeps the cache) until ``total`` bytes came."""

    def __init__(self, total: int) -> None:
        self.total, self.got, self.kept = total, 0, []
        self.done = asyncio.Event()

    async def on_msg(self, msg) -> None:
        self.kept.append(msg.data)
        self.got += len(msg.data)
        if self.got >= self.total:
            self.done.set()

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), DEFAULT_TIMEOUT)
        except TimeoutError as exc:
            raise TransportError(f"raw leg lost messages: {self.got} of {self.total} bytes arrived") from exc


async def _publish_raw(nc, subject: str, blobs: list[bytes], chunk: int) -> None:
    """Publish every blob in ``chunk``-byte messages at send_cache's flush cadence (a fair, loss-free baseline)."""
    since_flush = 0
    for blob in blobs:
        view = memoryview(blob)
        for at in range(0, len(blob), chunk):
            message = blob if len(blob) <= chunk else bytes(view[at : at + chunk])
            await nc.publish(subject, message)
            since_flush += len(message)
            if since_flush >= DEFAULT_FLUSH_EVERY:
                await nc.flush()
                since_flush = 0
    await nc.flush()


@contextlib.asynccontextmanager
async def _raw_subscription(nc, subject: str, total: int) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A raw leg's subscriber on ``nc``, the server holding its subscription: yields the wait for all its bytes."""
    counter = _RawCounter(total)
    sub = await subscribe(nc, subject, counter.on_msg)
    try:
        await subscribed(nc)  # as KVReceiver.start(): one flush can return before the server has the SUB
        yield counter.wait
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def _kv_subscription(nc, subject: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A KV leg's receiver on ``nc``: yields the wait for every layer; on leaving, its errors fail the leg."""
    async with KVReceiver(nc, subject, out_dtype=torch.float16) as rx:

        async def whole() -> None:
            await rx.wait_complete("bench", "tx", timeout=DEFAULT_TIMEOUT)

        yield whole
        if rx.stats["errors"]:
            raise TransportError(f"KV leg had {rx.stats['errors']} receive errors: {rx.errors[0][1]}")
        rx.close_query("bench")


async def _raw_leg(pub, sub, blobs: list[bytes], chunk: int) -> float:
    """Publish every blob in ``chunk``-byte messages; seconds until the subscriber has all bytes."""
    assert pub is not None and sub is not None
    subject = f"bench.raw.{uuid.uuid4().hex}"
    async with _raw_subscription(sub, subject, sum(len(b) for b in blobs)) as whole:
        start = time.perf_counter()
        await _publish_raw(pub, subject, blobs, chunk)
        await whole()
        seconds = time.perf_counter() - start
    return seconds


async def _kv_leg(conns: BusConnections, cache: dict, precision: str, compress: str) -> tuple[float, int]:
    """Send the cache through our transport; seconds until every layer is decoded, and wire bytes."""
    assert conns.pub is not None and conns.sub is not None
    subject = f"bench.kv.{uuid.uuid4().hex}"
    async with _kv_subscription(conns.sub, subject) as whole:
        start = time.perf_counter()
        report = await _send(conns.pub, subject, cache, precision, compress)
        await whole()
        seconds = time.perf_counter() - start
    return seconds, report.wire_bytes


async def _send(nc, subject: str, cache: dict, precision: str, compress: str):
    return await send_cache(nc, subject, cache, precision=precision, compress=compress, query_id="bench", sender="tx")


Leg = tuple[float, int, float]  # seconds, wire bytes, CPU seconds of both ends


class _OneProcess:
    """Both ends in this process, on one event loop: every cost of either end adds to the leg's time. Raw legs on
    ``stock`` (nats-py's clients), or with ``bus_client`` a raw subscriber on ``bus``'s; KV legs on ``bus``."""

    label = "one process"

    def __init__(self, stock: BusConnections, bus: BusConnections) -> None:
        self.stock, self.bus = stock, bus

    async def raw(self, blobs: list[bytes], chunk: int, bus_client: bool = False) -> Leg:
        cpu = time.process_time()  # CPU of this process (all threads): less sensitive to a loaded machine
        seconds = await _raw_leg(self.stock.pub, (self.bus if bus_client else self.stock).sub, blobs, chunk)
        return seconds, sum(len(b) for b in blobs), time.process_time() - cpu

    async def kv(self, cache: dict, precision: str, compress: str) -> Leg:
        cpu = time.process_time()
        seconds, wire = await _kv_leg(self.bus, cache, precision, compress)
        return seconds, wire, time.process_time() - cpu


class _TwoProcesses:
    """The sender here, the subscriber in a child process with its own connection, as a transmitter and a receiver
    run: the ends overlap. A leg runs from the first publish (this process's monotonic clock) to the moment the
    child has every byte (raw) or every layer decoded (KV), on the same system-wide clock."""

    label = "two processes"

    def __init__(
        self, stock: BusConnections, bus: BusConnections, url: str, security: ClientSecurity | None, threads: int
    ) -> None:
        self.stock, self.bus = stock, bus
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked event loop or torch state
        self._pipe, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_subscriber_main, args=(child_end, url, security, threads), daemon=True)
        self._proc.start()
        child_end.close()

    async def _reply(self) -> tuple:
        def recv() -> tuple:
            if not self._pipe.poll(DEFAULT_TIMEOUT + 30):
                raise TransportError("the subscriber process did not answer in time")
            return self._pipe.recv()

        try:
            reply = await asyncio.to_thread(recv)
        except (EOFError, OSError) as exc:
            raise BusError(f"the subscriber process died (exit code {self._proc.exitcode})") from exc
        if reply[0] == "error":
            raise TransportError(reply[1])
        return reply

    async def _leg(self, kind: str, total: int, publish: Callable[[str], Awaitable[int]]) -> Leg:
        cpu = time.process_time()
        subject = f"bench.{kind}.{uuid.uuid4().hex}"
        self._pipe.send((kind, subject, total))
        await self._reply()  # subscribed, and the server has the subscription
        start = time.monotonic()
        try:
            wire = await publish(subject)
        except TransportError:
            with contextlib.suppress(TransportError):  # the child's answer to this leg, so the next leg reads its own
                await self._reply()
            raise
        _, end, child_cpu = await self._reply()
        return end - start, wire, time.process_time() - cpu + child_cpu

    async def raw(self, blobs: list[bytes], chunk: int, bus_client: bool = False) -> Leg:
        assert self.stock.pub is not None
        total = sum(len(b) for b in blobs)

        async def publish(subject: str) -> int:
            await _publish_raw(self.stock.pub, subject, blobs, chunk)
            return total

        return await self._leg("raw_bus" if bus_client else "raw", total, publish)

    async def kv(self, cache: dict, precision: str, compress: str) -> Leg:
        assert self.bus.pub is not None

        async def publish(subject: str) -> int:
            return (await _send(self.bus.pub, subject, cache, precision, compress)).wire_bytes

        return await self._leg("kv", 0, publish)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(("stop", "", 0))
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()
        self._pipe.close()


def _subscriber_main(pipe: Connection, url: str, security: ClientSecurity | None, threads: int) -> None:
    """The child process of ``--split``: subscribes for each leg the parent names and reports when it is whole."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_subscriber(pipe, url, security))


async def _subscriber(pipe: Connection, url: str, security: ClientSecurity | None) -> None:
    async with (
        BusConnections(url, name="bench-rx-stock", security=security, bulk_receive=False) as stock,
        BusConnections(url, name="bench-rx", security=security) as bus,
    ):
        while True:
            kind, subject, total = await asyncio.to_thread(pipe.recv)
            if kind == "stop":
                return
            cpu = time.process_time()
            try:
                subscription = (
                    _kv_subscription(bus.sub, subject)
                    if kind == "kv"
                    else _raw_subscription((stock if kind == "raw" else bus).sub, subject, total)
                )
                async with subscription as whole:
                    pipe.send(("ready",))
                    await whole()
                    end = time.monotonic()
            except FedRefineError as exc:
                pipe.send(("error", f"{kind} leg (subscriber process): {exc}"))
                continue
            pipe.send(("done", end, time.process_time() - cpu))


async def _retry(lost: dict[str, int], name: str, leg: Callable[[], Awaitable[T]]) -> T:
    """Run a leg; if a message was lost on the way (TransportError), count it and run the leg again."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return await leg()
        except TransportError as exc:
            lost[name] = lost.get(name, 0) + 1
            log.warning("%s leg attempt %d lost data: %s", name, attempt, exc)
            if attempt == MAX_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _legs(
    args: argparse.Namespace, ends, cache: dict, blobs: list[bytes], packed: list[bytes], chunk: int, pack_chunk: int
) -> tuple:
    """Warm every leg up, then alternate them (order rotating) and run the extra precisions."""
    cache_bytes = sum(len(b) for b in blobs)
    await ends.raw(blobs, chunk)  # warm-up every leg
    await ends.raw(packed, pack_chunk)
    await ends.raw(blobs, chunk, bus_client=True)
    await ends.kv(cache, "fp16", "none")
    raw_s, packed_s, raw_bus_s, kv_s, raw_cpu, kv_cpu = [], [], [], [], [], []
    wire = 0
    lost: dict[str, int] = {}

    async def raw() -> None:
        seconds, _, cpu = await _retry(lost, "raw", lambda: ends.raw(blobs, chunk))
        raw_s.append(seconds)
        raw_cpu.append(cpu)

    async def raw_packed() -> None:
        packed_s.append((await _retry(lost, "raw_packed", lambda: ends.raw(packed, pack_chunk)))[0])

    async def raw_bus() -> None:
        raw_bus_s.append((await _retry(lost, "raw_bus", lambda: ends.raw(blobs, chunk, bus_client=True)))[0])

    async def kv() -> None:
        nonlocal wire
        seconds, wire, cpu = await _retry(lost, "kv", lambda: ends.kv(cache, "fp16", "none"))
        kv_s.append(seconds)
        kv_cpu.append(cpu)

    legs = [raw, raw_packed, raw_bus, kv]
    for i in range(args.repeats):  # each leg in each place equally often: a leg's time depends on the one
        for leg in legs[i % 4 :] + legs[: i % 4]:  # before it (a KV leg after the packed one: ~+10%)
            await leg()
    extra = []
    for spec in [s for s in args.extra.split(",") if s]:
        precision, _, comp = spec.partition("+")
        runs = [
            await _retry(lost, spec, lambda p=precision, c=comp: ends.kv(cache, p, c or "none"))
            for _ in range(args.repeats)
        ]
        med = statistics.median(r[0] for r in runs)
        extra.append(
            {
                "precision": spec,
                "wire_bytes": runs[0][1],
                "seconds": round(med, 4),
                "effective_mb_s": round(cache_bytes / med / 1e6, 1),
            }
        )
    return raw_s, packed_s, raw_bus_s, kv_s, raw_cpu, kv_cpu, wire, extra, lost


async def _bench(args: argparse.Namespace, url: str, security: ClientSecurity | None = None) -> dict:
    load_before = os.getloadavg()[0]
    if args.real_size:
        args.layers, args.kv_heads, args.head_dim, args.tokens = REAL_SIZE[args.real_size]
    cache = make_cache(args.layers, 1, args.kv_heads, args.tokens, args.head_dim, seed=0)
    blobs = [t.contiguous().view(torch.uint8).numpy().tobytes() for kv in cache.values() for t in kv]
    cache_bytes = sum(len(b) for b in blobs)
    async with (
        BusConnections(url, name="bench-stock", security=security, bulk_receive=False) as stock,
        BusConnections(url, name="bench", security=security) as bus,
    ):
        assert stock.pub is not None
        chunk = header_budget(stock.pub.max_payload)  # the payload our chunks carry, for equal message counts
        packed = [b"".join(blobs)]  # the same bytes in messages of the transport's pack size
        pack_chunk = min(chunk, DEFAULT_PACK_BYTES)
        ends = _TwoProcesses(stock, bus, url, security, args.threads) if args.split else _OneProcess(stock, bus)
        try:
            result = await _legs(args, ends, cache, blobs, packed, chunk, pack_chunk)
        finally:
            if isinstance(ends, _TwoProcesses):
                await ends.close()
        server_payload = stock.pub.max_payload
    raw_s, packed_s, raw_bus_s, kv_s, raw_cpu, kv_cpu, wire, extra, lost = result
    raw_mb_s = cache_bytes / statistics.median(raw_s) / 1e6
    packed_mb_s = cache_bytes / statistics.median(packed_s) / 1e6
    raw_bus_mb_s = cache_bytes / statistics.median(raw_bus_s) / 1e6
    kv_mb_s = cache_bytes / statistics.median(kv_s) / 1e6
    return {
        "benchmark": "bus",
        "cache_bytes": cache_bytes,
        "raw_nats_mb_s": round(raw_mb_s, 1),
        "raw_packed_mb_s": round(packed_mb_s, 1),
        "raw_bus_client_mb_s": round(raw_bus_mb_s, 1),
        "kv_transfer_mb_s": round(kv_mb_s, 1),
        "ratio": round(kv_mb_s / raw_mb_s, 3),
        "ratio_vs_packed": round(kv_mb_s / packed_mb_s, 3),
        "ratio_vs_raw_bus": round(kv_mb_s / raw_bus_mb_s, 3),
        "target_ratio_ge_0.95": kv_mb_s / raw_mb_s >= TARGET_RATIO,
        "kv_wire_bytes": wire,
        "message_payload_bytes": chunk,
        "raw_packed_message_bytes": pack_chunk,
        "server_max_payload": server_payload,
        "repeats": args.repeats,
        "leg_order": "rotating: raw, raw_packed, raw_bus, kv; then raw_packed, raw_bus, kv, raw; ...",
        "pair_ratios": [round(r / k, 3) for r, k in zip(raw_s, kv_s, strict=True)],
        "client_cpu_ms": {
            "raw": round(statistics.median(raw_cpu) * 1e3, 1),
            "kv": round(statistics.median(kv_cpu) * 1e3, 1),
            "ratio": round(statistics.median(raw_cpu) / statistics.median(kv_cpu), 3),
        },
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "raw_seconds": [round(s, 4) for s in raw_s],
        "kv_seconds": [round(s, 4) for s in kv_s],
        "extra_kv": extra,
        "legs_rerun_after_loss": lost,
        "cache": {
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "tokens": args.tokens,
            "head_dim": args.head_dim,
            "dtype": "float16",
        },
        "ends": ends.label,
        "notes": (
            f"{ends.label} (one: publisher and subscriber connections on one event loop; two: the subscriber's in a "
            "child process, a leg timed on the system-wide monotonic clock), server on loopback; "
            "MB/s = 1e6 bytes of the fp16 cache per second, first publish to last byte (raw) or last layer "
            "decoded (KV); KV = fp16 without compression (the same bytes) incl. chunk headers, xxh3 checksums, "
            "NaN/inf checks at both ends, reassembly; raw = nats-py's own clients, Client.publish (copies each "
            "payload twice); raw_bus = raw received by a bus.client.BusClient; KV = BusClient at both ends (a "
            "megabyte read at a time, a large payload copied once on receipt), one-message chunk frames on "
            "nats-py's queue as views (bus.connect.publish_views, no copy); "
            "pair_ratios = raw/KV seconds of each alternating pair; load_avg = 1-min load before and after; "
            "client_cpu_ms = median CPU time per leg of both ends (publisher, subscriber, encode thread; "
            "setup and any re-run included; the server's CPU is not), raw/KV"
        ),
        "torch_threads": args.threads,
    }


def run(args: argparse.Namespace) -> dict:
    """Run both legs on an embedded server (or ``--nats URL``) and return the comparison."""
    torch.set_num_threads(args.threads)
    if args.nats:
        return asyncio.run(_bench(args, args.nats))

    async def embedded() -> dict:
        if args.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
            async with NatsServer(max_payload=args.max_payload) as server:
                return await _bench(args, server.url) | {"secure": False}
        root = Path(tempfile.mkdtemp(prefix="fedrefine-bench-bus-"))
        store = CredentialStore(root)
        store.ensure([("admin", "bench", None)])
        try:
            async with store.server(max_payload=args.max_payload) as server:
                return await _bench(args, server.url, store.client_security("bench")) | {"secure": True}
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return asyncio.run(embedded())
