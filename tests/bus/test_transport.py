"""KV caches over a real nats-server: big caches through 1 MB and 8 MB servers, interleaving, checks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bus.codec import encode_cache, encode_tensor
from bus.connect import BusConnections, close, connect, subscribe
from bus.errors import CodecError, ConnectError, SchemaError, TransportError
from bus.frames import read_frame, read_frames, read_message
from bus.shaper import LinkShaper
from bus.subjects import Subjects
from bus.transport import KVReceiver, send_cache
from tests.conftest import HarnessServer as NatsServer

MB = 1024 * 1024


def _cache(total_bytes: int, n_layers: int = 28, seed: int = 0) -> dict:
    """An fp16 cache of about ``total_bytes`` shaped like Qwen3-0.6B (8 kv heads, head_dim 128)."""
    tokens = max(1, total_bytes // (n_layers * 2 * 8 * 128 * 2))
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 8, tokens, 128)
    return {
        i: (torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()) for i in range(n_layers)
    }


async def _send_and_receive(server: NatsServer, subject: str, cache: dict, **kw) -> tuple[dict, KVReceiver]:
    async with BusConnections(server.url, name="t", security=server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        async with KVReceiver(conns.sub, subject, out_dtype=torch.float16) as rx:
            report = await send_cache(conns.pub, subject, cache, query_id="q1", sender="tx", **kw)
            out = await rx.wait_complete("q1", "tx", timeout=60)
            assert report.chunks == rx.stats["frames"] and report.wire_bytes == rx.stats["bytes"]  # packs too
            return out, rx


@pytest.mark.parametrize("which", ["1mb", "8mb"])
async def test_16mb_cache_through_server(which: str, nats_server, nats_server_1mb, subject: str) -> None:
    server = nats_server_1mb if which == "1mb" else nats_server
    cache = _cache(16 * MB)
    out, rx = await _send_and_receive(server, subject, cache, precision="fp16", compress=False)
    assert rx.stats["errors"] == 0
    assert sorted(out) == sorted(cache)
    assert all(torch.equal(out[i][0], cache[i][0]) and torch.equal(out[i][1], cache[i][1]) for i in cache)
    if which == "1mb":
        assert rx.stats["frames"] > 16  # really chunked below the 1 MB limit


async def test_64mb_cache_no_slow_consumer_drops(nats_server, subject: str) -> None:
    cache = _cache(64 * MB, n_layers=8)
    out, rx = await _send_and_receive(nats_server, subject, cache, precision="fp16", compress=False)
    assert rx.stats["errors"] == 0 and len(out) == 8
    assert all(torch.equal(out[i][1], cache[i][1]) for i in cache)


@pytest.mark.parametrize("compress", ["auto", "deflate"])
async def test_int4_compressed_cache_round_trip(nats_server_1mb, subject: str, compress: str) -> None:
    cache = _cache(2 * MB, n_layers=4)
    out, rx = await _send_and_receive(nats_server_1mb, subject, cache, precision="int4", compress=compress)
    for i, (k, _v) in cache.items():
        rel = float((out[i][0].float() - k.float()).norm() / k.float().norm())
        assert rel < 0.2
    if compress == "deflate":  # Huffman codes shrink quantized values; the bytes on the wire show it
        plain = sum(
            len(encode_tensor(t, "int4", tensor=n, compress=False).blob)
            for kv in cache.values()
            for n, t in zip("kv", kv, strict=True)
        )
        assert rx.stats["bytes"] < 0.95 * plain


async def test_two_caches_interleaved_on_one_subscription(nats_server, subject: str) -> None:
    a, b = _cache(MB, n_layers=6, seed=1), _cache(MB, n_layers=4, seed=2)
    async with BusConnections(nats_server.url, security=nats_server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        async with KVReceiver(conns.sub, f"{subject}.>", out_dtype=torch.float16) as rx:
            frames_a = list(encode_cache(a, precision="fp16", query_id="qa", sender="ta", chunk_bytes=64 * 1024))
            frames_b = list(encode_cache(b, precision="int8", query_id="qb", sender="tb", chunk_bytes=64 * 1024))
            for i in range(max(len(frames_a), len(frames_b))):  # strictly alternating chunks
                if i < len(frames_a):
                    await conns.pub.publish(f"{subject}.a", frames_a[i])
                if i < len(frames_b):
                    await conns.pub.publish(f"{subject}.b", frames_b[i])
            out_a = await rx.wait_complete("qa", "ta", timeout=30)
            out_b = await rx.wait_complete("qb", "tb", timeout=30)
    assert sorted(out_a) == list(range(6)) and sorted(out_b) == list(range(4))
    assert all(torch.equal(out_a[i][0], a[i][0]) for i in a)
    assert all(float((out_b[i][1].float() - b[i][1].float()).norm() / b[i][1].float().norm()) < 0.01 for i in b)


async def test_layers_stream_out_as_they_complete(nats_client, subject: str) -> None:
    cache = _cache(MB, n_layers=5)
    order = [4, 0, 3, 1, 2]  # most important first, as a policy would send them
    seen = []
    async with KVReceiver(nats_client, subject, on_layer=lambda d: seen.append(d.layer)) as rx:

        async def collect() -> list[int]:
            got = []
            async for done in rx.iter_layers():
                got.append(done.layer)
                if len(got) == 5:
                    return got
            return got

        task = asyncio.create_task(collect())
        await asyncio.sleep(0)
        await send_cache(nats_client, subject, {i: cache[i] for i in order}, precision="bf16", query_id="q", sender="t")
        assert await asyncio.wait_for(task, 30) == order
    assert seen == order


async def test_subject_must_match_header(nats_client) -> None:
    subjects = Subjects("fuzzy")
    cache = _cache(64 * 1024, n_layers=1)
    errors = []
    sub = subjects.kv_for_receiver("rx")
    async with KVReceiver(nats_client, sub, subjects=subjects, on_error=lambda e, s: errors.append(e)) as rx:
        # a transmitter claiming to be "tx" but publishing on mallory's subject
        await send_cache(nats_client, subjects.kv("rx", "q", "mallory"), cache, query_id="q", sender="tx")
        await send_cache(nats_client, subjects.kv("rx", "q2", "tx"), cache, query_id="q2", sender="tx")
        await rx.wait_complete("q2", "tx", timeout=10)
    assert errors and all(isinstance(e, SchemaError) for e in errors)
    assert rx.completed("q", "tx") == {}


async def test_wait_timeout_is_transport_error(nats_client, subject: str) -> None:
    async with KVReceiver(nats_client, subject) as rx:
        with pytest.raises(TransportError, match="timed out"):
            await rx.wait_complete("nobody", "nothing", timeout=0.2)


async def test_garbage_on_subject_is_counted_not_fatal(nats_client, subject: str) -> None:
    cache = _cache(64 * 1024, n_layers=2)
    async with KVReceiver(nats_client, subject) as rx:
        await nats_client.publish(subject, b"not a frame")
        await send_cache(nats_client, subject, cache, query_id="q", sender="t", precision="int8")
        out = await rx.wait_complete("q", "t", timeout=10)
    assert len(out) == 2 and rx.stats["errors"] == 1


async def test_send_rejects_bad_arguments(nats_client, subject: str) -> None:
    cache = _cache(64 * 1024, n_layers=1)
    with pytest.raises(SchemaError):
        await send_cache(nats_client, subject, cache, query_id="a.b", sender="t")
    with pytest.raises(Exception, match="precision"):
        await send_cache(nats_client, subject, cache, query_id="q", sender="t", precision="fp8")


async def test_connect_errors_are_one_line() -> None:
    with pytest.raises(ConnectError) as info:
        await connect("nats://127.0.0.1:1", retries=2, retry_wait=0.01, connect_timeout=0.5)
    assert "\n" not in str(info.value)


async def test_subscribe_helper_raises_limits(nats_client, subject: str) -> None:
    sub = await subscribe(nats_client, subject)
    assert sub._pending_bytes_limit >= 256 * MB  # noqa: SLF001 - nats-py has no public getter
    await sub.unsubscribe()
    await close(nats_client)
    await close(nats_client)  # closing twice is fine


async def test_close_is_bounded_when_the_drain_hangs_and_swallows_its_cancel(nats_server: NatsServer) -> None:
    """nats-py's drain can wait on its socket and swallow a cancel (CI once hung 900 s in a teardown): close cuts it."""
    nc = await connect(nats_server.url, name="stuck", security=nats_server.security)
    ended = asyncio.Event()

    async def stuck_drain() -> None:
        while True:
            try:
                await nc._transport.wait_closed()  # noqa: SLF001 - what a hung nats-py close waits on
                await asyncio.sleep(3600)  # the socket closing is not enough: only the cancel after it ends this
            except asyncio.CancelledError:
                if nc._transport._io_writer.transport.is_closing():  # noqa: SLF001
                    ended.set()
                    return
                continue  # swallowed, as nats-py does

    nc.drain = stuck_drain  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await close(nc, timeout=0.3)
    assert loop.time() - t0 < 2.0
    assert ended.is_set()


async def test_publish_copies_the_payload_before_returning(nats_client, subject: str) -> None:
    """send_cache reuses one FrameBuffer for every frame: that is only safe while nats-py copies on publish."""
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def on_msg(msg) -> None:
        got.append(msg.data)
        arrived.set()

    sub = await subscribe(nats_client, subject, on_msg)
    await nats_client.flush()
    buffer = bytearray(b"a" * 4096)
    await nats_client.publish(subject, memoryview(buffer))
    buffer[:] = b"b" * 4096  # before anything was flushed to the socket
    await nats_client.flush()
    await asyncio.wait_for(arrived.wait(), 10)
    await sub.unsubscribe()
    assert got == [b"a" * 4096]


@pytest.mark.parametrize(("pack", "messages"), [(None, 1), (0, 12), (200_000, 2), (65_536, 6)])
async def test_send_cache_frames_equal_standalone_frames(nats_client, subject: str, pack, messages) -> None:
    """The frames published (through the reused buffer, or packed several to a message) are byte-identical to
    encode_cache's frames, in order; ``pack_bytes`` decides how many share a message."""
    cache = _cache(256 * 1024, n_layers=3)
    got: list[bytes] = []

    async def on_msg(msg) -> None:
        got.append(msg.data)

    sub = await subscribe(nats_client, subject, on_msg)
    await nats_client.flush()
    kw = {} if pack is None else {"pack_bytes": pack}
    report = await send_cache(nats_client, subject, cache, query_id="q", sender="t", chunk_bytes=40_000, **kw)
    for _ in range(100):
        if len(got) == report.messages:
            break
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    expected = list(encode_cache(cache, precision="fp16", query_id="q", sender="t", chunk_bytes=40_000))
    assert report.messages == len(got) == messages and report.chunks == len(expected)
    assert b"".join(got) == b"".join(expected) and report.wire_bytes == sum(map(len, expected))
    payloads = [bytes(chunk.payload) for message in got for chunk in read_frames(message)]  # each message parses
    assert payloads == [bytes(read_frame(f).payload) for f in expected]


async def test_a_one_token_tail_of_every_layer_is_one_message(nats_server, subject: str) -> None:
    cache = {i: (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)) for i in range(28)}
    out, rx = await _send_and_receive(nats_server, subject, cache, precision="fp16")
    assert rx.stats["messages"] == 1 and rx.stats["frames"] == 56 and len(out) == 28


async def test_a_shaped_link_packs_only_what_it_carries_in_a_few_milliseconds(nats_server, subject: str) -> None:
    """At 50 kB/s frames share at most 250 bytes (5 ms) and a tensor pack holds one layer, sent at its end, so a
    slow link still delivers layer by layer (a pack: 2 x 64 bytes of fp16 and their table rows)."""
    cache = {i: (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)) for i in range(4)}
    shaper = LinkShaper(50_000, burst_bytes=100_000)
    out, rx = await _send_and_receive(nats_server, subject, cache, precision="fp16", shaper=shaper)
    assert rx.stats["messages"] == 4 and rx.stats["frames"] == 8 and len(out) == 4
    assert rx.stats["bytes"] <= 4 * 250


async def test_receiver_is_subscribed_when_start_returns(nats_server, subject: str) -> None:
    """A frame published right after start() from another connection always arrives (nats-py can send a flush's
    PING ahead of the queued SUB; start() must not return before the server has the subscription)."""
    async with BusConnections(nats_server.url, name="t", security=nats_server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        lost = 0
        for i in range(150):
            rx = await KVReceiver(conns.sub, f"{subject}.{i}").start()
            try:
                await conns.pub.publish(f"{subject}.{i}", b"probe")
                await conns.pub.flush()
                for _ in range(100):
                    if rx.stats["messages"]:
                        break
                    await asyncio.sleep(0.005)
                lost += rx.stats["messages"] == 0
            finally:
                await rx.stop()
    assert lost == 0


class _SwallowingClient:
    """Publishes like nats-py's client when its pending buffer is full: a cancellation landing inside is swallowed."""

    is_connected = True
    max_payload = MB

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, subject: str, payload: bytes) -> None:
        try:
            await asyncio.sleep(0.002)
        except asyncio.CancelledError:
            pass
        self.published += 1

    async def flush(self, timeout: float) -> None:
        await asyncio.sleep(0)


async def test_a_cancelled_send_stops_even_when_the_client_swallows_the_cancel() -> None:
    nc = _SwallowingClient()
    cache = _cache(4 * MB, n_layers=8)
    task = asyncio.create_task(send_cache(nc, "s", cache, query_id="q", sender="t", chunk_bytes=16_000))  # type: ignore[arg-type]
    while nc.published < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert done and task.cancelled()
    total = len(list(encode_cache(cache, precision="fp16", query_id="q", sender="t", chunk_bytes=16_000)))
    assert nc.published < total // 2


class _RecordingClient:
    is_connected = True
    max_payload = MB

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def publish(self, subject: str, payload) -> None:
        self.frames.append(bytes(payload))

    async def flush(self, timeout: float) -> None:
        return None


@pytest.mark.parametrize(("compress", "layer1_lz4"), [("auto", False), (True, True)])
async def test_auto_compression_stops_trying_lz4_after_a_first_layer_it_did_not_shrink(compress, layer1_lz4) -> None:
    noise = torch.randn(1, 2, 64, 16)
    zeros = torch.zeros(1, 2, 64, 16)
    nc = _RecordingClient()
    layers = {0: (noise, noise), 1: (zeros, zeros)}
    await send_cache(nc, "s", layers, precision="fp16", query_id="q", sender="t", compress=compress)  # type: ignore[arg-type]
    headers = [c.header for f in nc.frames for c in read_message(f)]
    assert all(h.compression == "none" for h in headers if h.layer == 0)
    assert all((h.compression == "lz4") == layer1_lz4 for h in headers if h.layer == 1)


async def test_auto_compression_keeps_lz4_where_the_first_layer_shrank() -> None:
    zeros = torch.zeros(1, 2, 128, 16)
    nc = _RecordingClient()
    await send_cache(nc, "s", {0: (zeros, zeros), 1: (zeros, zeros)}, precision="fp32", query_id="q", sender="t")  # type: ignore[arg-type]
    assert {c.header.compression for f in nc.frames for c in read_message(f)} == {"lz4"}


async def test_auto_compression_does_not_try_small_tensors() -> None:
    """A one-token tail is a few hundred bytes: LZ4 is not tried (nor a worker thread used), even on zeros."""
    zeros = torch.zeros(1, 2, 1, 24)
    for precision in ("fp16", "int4"):
        nc = _RecordingClient()
        await send_cache(nc, "s", {0: (zeros, zeros), 1: (zeros, zeros)}, precision=precision, query_id="q", sender="t")  # type: ignore[arg-type]
        assert {c.header.compression for f in nc.frames for c in read_message(f)} == {"none"}
        assert sum(1 for f in nc.frames for _ in read_message(f)) == 4 and len(nc.frames) == 1  # one message


@pytest.mark.parametrize("block_bytes", [8 * MB, 3000])
async def test_small_float_layers_encode_in_blocks_and_send_what_layer_by_layer_sends(monkeypatch, block_bytes) -> None:
    """A real-shaped q' stream (3 kv heads x 64) at fp16 without compression: its layers encode a block at a time
    (one call for all, or one per ``BLOCK_BYTES``) and the messages are byte for byte the layer-by-layer ones."""
    import bus.transport as transport

    cache = {m: (torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64)) for m in range(6)}  # 1,536 B fp16 blobs
    calls: list[int] = []
    real = transport.encode_pack_entries

    def spy(items, precision, limit):
        calls.append(len(items))
        return real(items, precision, limit)

    monkeypatch.setattr(transport, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(transport, "encode_pack_entries", spy)
    blocked = _RecordingClient()
    await send_cache(blocked, "s", cache, precision="fp16", query_id="q", sender="t", compress="none")  # type: ignore[arg-type]
    monkeypatch.setattr(transport, "encode_pack_entries", lambda *a: None)
    plain = _RecordingClient()
    await send_cache(plain, "s", cache, precision="fp16", query_id="q", sender="t", compress="none")  # type: ignore[arg-type]
    assert blocked.frames == plain.frames and len(blocked.frames) >= 1
    assert calls == ([6] if block_bytes > MB else [1] * 6)  # 6,144 source bytes a layer: one layer a block


@pytest.mark.parametrize(
    ("shape", "way"),
    [((1, 4, 100, 128), "views"), ((1, 3, 60, 64), "joined"), ((1, 3, 1, 64), "joined")],
    ids=["100-KB tensors", "q'-sized", "one-token tail"],
)
async def test_packs_go_on_the_socket_as_views_or_joined_once_and_arrive_as_the_joined_message(
    nats_client, subject: str, monkeypatch, shape: tuple, way: str
) -> None:
    """A pack of large tensors (>= PACK_VIEW_BYTES on average) is queued as its head and views of the tensors (no
    copy); a pack of smaller ones (a q' at SmolLM2's shape, 23 KB a tensor; a one-token tail) is joined once with its
    PUB line (one entry for TLS to encrypt). Either way what arrives is byte for byte the joined pack."""
    import bus.connect as busconn

    calls: dict[str, list[int]] = {"views": [], "joined": []}
    for name in calls:
        real = getattr(busconn, f"publish_{name}")

        async def spy(nc, subj, parts, real=real, name=name):
            calls[name].append(len(parts))
            await real(nc, subj, parts)

        monkeypatch.setattr(busconn, f"publish_{name}", spy)
    cache = {m: (torch.randn(*shape).half(), torch.randn(*shape).half()) for m in range(8)}
    got: list[bytes] = []

    async def on_msg(msg) -> None:
        got.append(msg.data)

    sub = await subscribe(nats_client, subject, on_msg)
    await nats_client.flush()
    report = await send_cache(nats_client, subject, cache, precision="fp16", query_id="q", sender="t")
    for _ in range(100):
        if len(got) == report.messages:
            break
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    joined = _RecordingClient()
    await send_cache(joined, "s", cache, precision="fp16", query_id="q", sender="t")  # type: ignore[arg-type]
    assert got == joined.frames and report.wire_bytes == sum(map(len, got))
    other = "joined" if way == "views" else "views"
    assert len(calls[way]) == report.messages and calls[other] == []
    if way == "views":
        assert report.messages > 1 and min(calls["views"]) >= 2  # a head, then the tensors' views


async def test_a_cache_that_requires_grad_sends_the_same_bytes() -> None:
    """Tensors straight from a model run outside ``no_grad`` (requiring grad): the block and layer-by-layer encoders
    send what they send for the same values without grad, and no graph is left on them."""
    plain = {m: (torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64)) for m in range(3)}
    graded = {m: (k.clone().requires_grad_(), v.clone().requires_grad_()) for m, (k, v) in plain.items()}
    for precision in ("fp16", "fp32", "int8"):
        sent = []
        for cache in (plain, graded):
            nc = _RecordingClient()
            await send_cache(nc, "s", cache, precision=precision, query_id="q", sender="t", compress="none")  # type: ignore[arg-type]
            sent.append(nc.frames)
        assert sent[0] == sent[1] and sent[0]
    assert all(t.grad is None and t.grad_fn is None for kv in graded.values() for t in kv)


async def test_a_nan_in_a_small_float_stream_is_still_a_codec_error() -> None:
    cache = {m: (torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64)) for m in range(6)}
    cache[3][1][0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        await send_cache(_RecordingClient(), "s", cache, precision="fp16", query_id="q", sender="t", compress="none")  # type: ignore[arg-type]


async def test_a_bad_tensor_in_a_small_float_stream_is_still_a_codec_error() -> None:
    good = torch.randn(1, 3, 4, 64)
    for bad in ("tensor", torch.zeros(1, 3, 4), torch.zeros(1, 3, 4, 64, dtype=torch.int32)):
        cache = {0: (good, good), 1: (bad, good), 2: (good, good)}
        with pytest.raises(CodecError):
            await send_cache(
                _RecordingClient(), "s", cache, precision="fp16", query_id="q", sender="t", compress="none"
            )  # type: ignore[arg-type]
