"""Shared fixtures: real ``nats-server`` processes on free ports, and connections to them.

Every server here runs as the project's do by default: authorization on (identities from a
``privacy.credentials.CredentialStore``) and TLS on every connection.

- ``pki``: the session's credential store (a CA and server certificate made once; every other store copies them).
- ``nats_server``: session-wide server with ``max_payload`` 8 MB (our default); ``.url``, ``.pid``, ...; tests
  connect with ``security=nats_server.security`` (the ``admin`` identity ``harness``: tests of the bus itself
  publish anywhere).
- ``nats_server_1mb``: session-wide server with nats-server's default ``max_payload`` of 1 MB.
- ``nats_client``: a fresh nats-py connection to ``nats_server`` per test (drained afterwards).
- ``subject``: a unique subject per test, so tests never see each other's traffic.

The server fixtures are synchronous, so they work whatever event-loop scope a test uses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from bus.auth import ClientSecurity
from bus.connect import close, connect
from bus.server import NatsServer
from privacy.credentials import CredentialStore

HARNESS_ID = "harness"  # the admin identity tests of the bus connect with


class HarnessServer(NatsServer):
    """A secure :class:`NatsServer` of a credential store, and the admin identity tests connect with."""

    def __init__(self, store: CredentialStore, port: int | None = None, **options: Any) -> None:
        store.ensure([("admin", HARNESS_ID, None)])
        super().__init__(port, authorization=store.authorization(), tls=store.server_tls(), **options)
        self.store = store
        self.security: ClientSecurity = store.client_security(HARNESS_ID)


def secure_store(root: Path, pki: CredentialStore, prefix: str = "fr") -> CredentialStore:
    """A fresh credential store that shares the session's CA and server certificate (made once: they are slow)."""
    store = CredentialStore(root, prefix)
    store.copy_tls_from(pki)
    return store


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CredentialStore:
    """The session's CA and server certificate (in a store of their own)."""
    store = CredentialStore(tmp_path_factory.mktemp("pki"))
    store.ensure_tls()
    return store


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, pki: CredentialStore) -> Iterator[HarnessServer]:
    """A running nats-server (max_payload 8 MB, authorization and TLS on) shared by the session."""
    server = HarnessServer(secure_store(tmp_path_factory.mktemp("creds"), pki)).start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server_1mb(tmp_path_factory: pytest.TempPathFactory, pki: CredentialStore) -> Iterator[HarnessServer]:
    """A running nats-server with the stock 1 MB max_payload (authorization and TLS on)."""
    store = secure_store(tmp_path_factory.mktemp("creds-1mb"), pki)
    server = HarnessServer(store, max_payload=1024 * 1024).start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


@pytest.fixture
async def nats_client(nats_server: HarnessServer) -> AsyncIterator[Client]:
    """A connection to ``nats_server`` for one test."""
    nc = await connect(nats_server.url, name="pytest", security=nats_server.security)
    try:
        yield nc
    finally:
        await close(nc)


@pytest.fixture
def subject() -> str:
    """A subject no other test uses."""
    return f"test.{uuid.uuid4().hex}"


async def eventually(condition: Callable[[], bool], timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait until ``condition()`` holds (polled every 20 ms), instead of sleeping a guessed time; fail after
    ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} did not hold within {timeout} s"
        await asyncio.sleep(0.02)
