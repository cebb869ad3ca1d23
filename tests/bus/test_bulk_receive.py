"""``bus.client.BulkParser`` / ``BusClient``: the receive path for megabyte messages dispatches exactly what
nats-py's own parser does, for any way the socket splits the stream; a real server's large messages arrive whole
through it; a link cut half-way through one loses that message only."""

from __future__ import annotations

import asyncio
import random

import nats.errors
import pytest
import xxhash
from nats.protocol.parser import Parser

from bus import client as busclient
from bus import connect as busconn
from bus.tcpproxy import TcpProxy
from tests.conftest import eventually


class _Recorder:
    """What a parser hands its client: messages (as bytes), and PING / PONG / +OK / -ERR operations."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    async def _process_msg(self, sid, subject, reply, data, hdr) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), type(data).__name__, bytes(data), hdr))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))

    async def _process_info(self, info: dict) -> None:
        self.seen.append(("info", info))


def _msg(sid: int, size: int, reply: str = "", fill: int = 0) -> bytes:
    body = bytes((fill + i) % 251 for i in range(size))
    return f"MSG kv.{sid} {sid} {reply + ' ' if reply else ''}{size}\r\n".encode() + body + b"\r\n"


def _stream() -> bytes:
    big = busclient.BULK_MESSAGE_BYTES
    return b"".join(
        [
            b'INFO {"max_payload": 1048576}\r\n',
            _msg(1, 10),
            _msg(2, big, fill=3),  # exactly the threshold
            b"PING\r\n",
            _msg(3, big + 12_345, reply="_INBOX.x", fill=7),
            b"+OK\r\n",
            b"HMSG kv.4 4 12 " + str(12 + big).encode() + b"\r\nNATS/1.0\r\n\r\n" + bytes(big) + b"\r\n",
            _msg(5, 0),
            _msg(6, 3 * big + 1, fill=11),
            b"PONG\r\n",
            _msg(7, big - 1, fill=5),  # just under: nats-py's path
            _msg(8, 2 * big, fill=13),
            b"-ERR 'Permissions Violation'\r\n",
        ]
    )


async def _feed(parser: Parser, stream: bytes, cuts: list[int]) -> None:
    at = 0
    for cut in sorted(cuts) + [len(stream)]:
        await parser.parse(stream[at:cut])
        at = cut


def _as_stock(seen: list[tuple]) -> list[tuple]:
    """The bulk parser's record with every payload's type read as nats-py's (``bytes``)."""
    return [(*s[:4], "bytes", *s[5:]) if s[0] == "msg" else s for s in seen]


@pytest.mark.parametrize("seed", range(8))
async def test_any_split_of_the_stream_dispatches_what_nats_py_does(seed: int) -> None:
    stream = _stream()
    rng = random.Random(seed)
    pieces = [1, 2, 7, 1000, 16_384, 32_768, 100_000][seed % 7]
    cuts = rng.sample(range(1, len(stream)), k=min(len(stream) - 1, len(stream) // pieces + rng.randint(0, 40)))
    stock, bulk = _Recorder(), _Recorder()
    await _feed(Parser(stock), stream, cuts)
    await _feed(busclient.BulkParser(bulk), stream, cuts)
    assert len(stock.seen) == 12  # +OK dispatches nothing
    assert _as_stock(bulk.seen) == stock.seen
    kinds = {s[1]: s[4] for s in bulk.seen if s[0] == "msg"}  # the payload's type depends only on its size
    assert kinds == {1: "bytes", 2: "bytearray", 3: "bytearray", 4: "bytes", 5: "bytes", 6: "bytearray",
                     7: "bytes", 8: "bytearray"}  # fmt: skip


async def test_a_large_payload_without_its_crlf_is_a_protocol_error() -> None:
    parser = busclient.BulkParser(_Recorder())
    size = busclient.BULK_MESSAGE_BYTES
    await parser.parse(f"MSG kv.1 1 {size}\r\n".encode() + bytes(size // 2))
    with pytest.raises(nats.errors.ProtocolError):
        await parser.parse(bytes(size // 2) + b"XX" + b"PING\r\n")


async def test_a_reset_mid_message_drops_it_and_parses_what_follows() -> None:
    rec = _Recorder()
    parser = busclient.BulkParser(rec)
    size = busclient.BULK_MESSAGE_BYTES * 2
    await parser.parse(f"MSG kv.1 1 {size}\r\n".encode() + bytes(size // 3))
    parser.reset()  # nats-py's reconnect
    await parser.parse(_msg(2, 5) + b"PING\r\n")
    assert [s[:2] for s in rec.seen] == [("msg", 2), ("ping",)]


async def test_large_messages_arrive_whole_from_a_real_server(nats_server, subject: str) -> None:
    pub = await busconn.connect(nats_server.url, name="pytest-bulk-pub", security=nats_server.security)
    sub = await busconn.connect(nats_server.url, name="pytest-bulk-sub", security=nats_server.security)
    try:
        assert isinstance(sub, busclient.BusClient) and isinstance(sub._ps, busclient.BulkParser)
        got: list = []

        async def keep(msg) -> None:
            got.append(msg.data)

        await busconn.subscribe(sub, subject, keep)
        await busconn.subscribed(sub)
        sizes = [3, 900_000, busclient.BULK_MESSAGE_BYTES, 17, 2_000_000, busclient.READ_BYTES + 1]
        sent = [bytes((i * 31 + j) % 256 for j in range(n)) if n < 100 else random.randbytes(n) for i, n in
                enumerate(sizes)]  # fmt: skip
        for data in sent:
            await pub.publish(subject, data)
        await busconn.flush(pub)
        await eventually(lambda: len(got) == len(sent), timeout=10.0, what="every message")
        assert [bytes(g) for g in got] == sent
        assert [type(g) for g in got] == [bytes, bytearray, bytearray, bytes, bytearray, bytearray]  # by size
    finally:
        await busconn.close(pub)
        await busconn.close(sub)


async def test_the_baseline_client_is_nats_pys_own(nats_server) -> None:
    nc = await busconn.connect(nats_server.url, name="pytest-stock", security=nats_server.security, bulk_receive=False)
    try:
        assert type(nc) is busclient.Client and type(nc._ps) is Parser
    finally:
        await busconn.close(nc)


@pytest.mark.parametrize("line", [b"MSG kv.1 x 5\r\nhello\r\n", b"HMSG kv.1 x 12 17\r\nNATS/1.0\r\n\r\nhello\r\n"])
async def test_a_malformed_control_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(nats.errors.ProtocolError):
        await busclient.BulkParser(_Recorder()).parse(line)


async def test_a_link_cut_mid_message_drops_it_and_what_follows_arrives_whole(nats_server, subject: str) -> None:
    """The subscriber's link (a relay) is cut while a large payload is half read: the partial message is never
    delivered, the client reconnects (nats-py resets the parser), and later messages arrive whole and intact."""
    port = int(nats_server.url.rsplit(":", 1)[1])
    with TcpProxy([("127.0.0.1", port)]) as proxy:
        pub = await busconn.connect(nats_server.url, name="pytest-cut-pub", security=nats_server.security)
        sub = await busconn.connect(
            proxy.url("tls"), name="pytest-cut-sub", security=nats_server.security, reconnect_wait=0.1
        )
        try:
            got: list = []

            async def keep(msg) -> None:
                got.append(bytes(msg.data))

            await busconn.subscribe(sub, subject, keep)
            await busconn.subscribed(sub)
            size = 2_000_000  # more than READ_BYTES: a payload always takes several reads

            def message(i: int) -> bytes:
                body = random.Random(i).randbytes(size)
                return i.to_bytes(4, "big") + xxhash_digest(body) + body

            loop = asyncio.get_running_loop()
            mid_message = False
            for i in range(20):  # publish until the subscriber is seen half-way through a payload, then cut
                delivered = len(got)
                await pub.publish(subject, message(i))
                await busconn.flush(pub)
                until = loop.time() + 5.0
                while sub._ps._bulk is None and len(got) == delivered and loop.time() < until:
                    await asyncio.sleep(0)
                if sub._ps._bulk is not None:
                    mid_message = True
                    proxy.cut()
                    break
            assert mid_message, "never caught the subscriber inside a large payload"
            await asyncio.sleep(0.3)
            proxy.restore()
            await eventually(lambda: sub.is_connected and sub._ps._bulk is None, timeout=10.0, what="a reconnect")
            await busconn.subscribed(sub)
            before = len(got)
            after = [message(1000 + i) for i in range(3)]
            for data in after:
                await pub.publish(subject, data)
            await busconn.flush(pub)
            await eventually(lambda: len(got) >= before + 3, timeout=10.0, what="the messages after the cut")
            assert got[before:] == after
            for data in got:  # nothing partial or spliced was ever delivered
                assert len(data) == size + 12 and data[4:12] == xxhash_digest(data[12:])
        finally:
            await busconn.close(pub)
            await busconn.close(sub)


def xxhash_digest(body: bytes) -> bytes:
    return xxhash.xxh3_64_digest(body)
