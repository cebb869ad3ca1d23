"""A flush that is cancelled or times out must not kill the connection's reader (nats-py leaves its cancelled PONG
future queued; the PONG then raises InvalidStateError in the read loop, which stops for good)."""

from __future__ import annotations

import asyncio

import nats
import pytest

from bus import connect as busconn
from tests.conftest import eventually


async def _cancelled_flushes(nc, flush, times: int = 5) -> None:
    for _ in range(times):
        task = asyncio.ensure_future(flush(nc))
        await asyncio.sleep(0)  # the PING is on its way; the PONG comes back after the cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(0.2)  # every PONG has arrived


async def test_a_cancelled_flush_leaves_the_connection_reading(nats_server, subject: str) -> None:
    nc = await busconn.connect(nats_server.url, name="pytest-flush", security=nats_server.security)
    try:
        got: list[bytes] = []

        async def keep(msg) -> None:
            got.append(msg.data)

        await nc.subscribe(subject, cb=keep)
        await busconn.flush(nc)
        await _cancelled_flushes(nc, busconn.flush)
        await nc.publish(subject, b"still here")
        await busconn.flush(nc)  # completes: PONGs still match their PINGs
        await eventually(lambda: got == [b"still here"], timeout=3.0, what="a message after cancelled flushes")
    finally:
        await busconn.close(nc)


async def test_nats_py_alone_loses_its_reader_on_a_cancelled_flush(nats_server, subject: str) -> None:
    """What the guard is for: the same cancels on nats-py's own flush stop the read loop (if a later nats-py fixes
    this, the test says so and the guard can go)."""
    nc = await busconn.connect(nats_server.url, name="pytest-flush-raw", security=nats_server.security)
    try:
        await _cancelled_flushes(nc, lambda c: c.flush(timeout=2), times=1)
        assert nc._reading_task is not None and nc._reading_task.done()  # a later flush would not even wait
    finally:
        await busconn.close(nc)
    assert nats  # the client under test
