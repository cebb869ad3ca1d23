"""Shared fixtures: real ``nats-server`` processes on free ports, and connections to them.

- ``nats_server``: session-wide server with ``max_payload`` 8 MB (our default); ``.url``, ``.pid``, ...
- ``nats_server_1mb``: session-wide server with nats-server's default ``max_payload`` of 1 MB.
- ``nats_client``: a fresh nats-py connection to ``nats_server`` per test (drained afterwards).
- ``subject``: a unique subject per test, so tests never see each other's traffic.

The server fixtures are synchronous, so they work whatever event-loop scope a test uses.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client

from bus.connect import close, connect
from bus.server import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A running nats-server (max_payload 8 MB) shared by the session."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server_1mb() -> Iterator[NatsServer]:
    """A running nats-server with the stock 1 MB max_payload."""
    server = NatsServer(max_payload=1024 * 1024).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A connection to ``nats_server`` for one test."""
    nc = await connect(nats_server.url, name="pytest")
    try:
        yield nc
    finally:
        await close(nc)


@pytest.fixture
def subject() -> str:
    """A subject no other test uses."""
    return f"test.{uuid.uuid4().hex}"
