"""NATS connection helpers: bounded connect retries, quiet error routing, raised subscription limits.

Large KV transfers want two connections per agent (one publishes, one subscribes) so a big outgoing
cache never delays incoming control messages; :class:`BusConnections` holds such a pair. Every connection made
here is a :class:`bus.client.BusClient` (nats-py's client with a receive path for megabyte messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.auth import ClientSecurity
from bus.client import Buffer, BusClient
from bus.errors import AuthError, ConnectError, TransportError

log = logging.getLogger(__name__)


class _QuietTLSClose(logging.Filter):
    """nats-py's protocol returns True from ``eof_received``; asyncio warns about it on every TLS close."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in str(record.msg)


logging.getLogger("asyncio").addFilter(_QuietTLSClose())

DEFAULT_CONNECT_RETRIES = 5  # attempts before giving up on the first connection (agents: --connect-retries)
DEFAULT_RETRY_WAIT = 0.2  # seconds between first-connection attempts
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds per TCP attempt
DEFAULT_MAX_RECONNECT_ATTEMPTS = 60  # after a connection was up; -1 = forever
DEFAULT_RECONNECT_WAIT = 0.5  # seconds between reconnect attempts
DEFAULT_SUB_PENDING_BYTES = 512 * 1024 * 1024  # bytes a subscription may buffer before nats-py drops (slow consumer)
DEFAULT_SUB_PENDING_MSGS = 1_000_000  # messages a subscription may buffer
DEFAULT_FLUSH_TIMEOUT = 10.0  # seconds for a PING/PONG round trip
DEFAULT_CLOSE_TIMEOUT = 5.0  # seconds a drain may take before the socket is cut
DEFAULT_ABANDON_TIMEOUT = 1.0  # seconds to wait for nats-py's close to finish once the socket is cut

ErrorCallback = Callable[[Exception], Awaitable[None]]


def _quiet_error_cb(name: str) -> ErrorCallback:
    async def error_cb(exc: Exception) -> None:
        text = str(exc).lower()
        if "permissions violation" in text or "authorization violation" in text:
            # a misconfigured or revoked identity: the server drops what it was not allowed to do
            log.warning("nats client %s: %s", name, exc)
            return
        log.debug("nats client %s: %s: %s", name, type(exc).__name__, exc)

    return error_cb


def is_auth_failure(exc: BaseException) -> bool:
    """Whether a connect failure means refused credentials or a certificate that does not verify."""
    text = str(exc).lower()
    return isinstance(exc, ssl.SSLError) or "authorization violation" in text or "authentication" in text


async def connect(
    url: str | list[str],
    *,
    name: str | None = None,
    retries: int = DEFAULT_CONNECT_RETRIES,
    retry_wait: float = DEFAULT_RETRY_WAIT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    allow_reconnect: bool = True,
    max_reconnect_attempts: int = DEFAULT_MAX_RECONNECT_ATTEMPTS,
    reconnect_wait: float = DEFAULT_RECONNECT_WAIT,
    error_cb: ErrorCallback | None = None,
    security: ClientSecurity | None = None,
    bulk_receive: bool = True,
    **options: Any,
) -> Client:
    """Connect to NATS, trying about ``retries`` times (at least twice); raise :class:`ConnectError` if nobody answers.

    ``security`` adds the identity's credentials, TLS and inbox prefix (``bus.auth``); a server that refuses them
    is an :class:`AuthError`. The first connection is bounded here; reconnects after a loss follow
    ``allow_reconnect``, ``max_reconnect_attempts`` and ``reconnect_wait``. The client is a
    :class:`bus.client.BusClient` (``bulk_receive=False``: nats-py's own, as a baseline). Extra ``options`` go to
    nats-py's ``connect`` unchanged.
    """
    if retries < 1:
        raise ConnectError(f"retries must be >= 1, got {retries}", url=url)
    label = name or "fedrefine"
    if isinstance(url, str) and "," in url:  # several servers (a cluster): nats-py fails over between them
        url = [u.strip() for u in url.split(",") if u.strip()]
    # several servers are tried in the order given (the nearest first), not nats-py's shuffled order
    options.setdefault("dont_randomize", True)
    if security is not None:
        options = {**security.connect_options(url), **options}
    try:
        # nats-py retries the first connection itself, max_reconnect_attempts + 1 times (0 would mean forever)
        nc = BusClient() if bulk_receive else Client()
        await nc.connect(
            url,
            name=name,
            allow_reconnect=False,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=max(1, retries - 1),
            reconnect_time_wait=retry_wait,
            error_cb=error_cb or _quiet_error_cb(label),
            **options,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        if is_auth_failure(exc):
            why = _auth_hint(exc, security)
            raise AuthError(f"the NATS server at {url} refused this client: {why}", url=url) from exc
        raise ConnectError(f"no NATS server answers at {url}: {exc or type(exc).__name__}", url=url) from exc
    nc.options["allow_reconnect"] = allow_reconnect
    nc.options["max_reconnect_attempts"] = max_reconnect_attempts
    nc.options["reconnect_time_wait"] = reconnect_wait
    return nc


def _auth_hint(exc: BaseException, security: ClientSecurity | None) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"its TLS certificate does not verify ({exc.reason or exc}); pass the federation's CA with --tls-ca"
    if security is None or security.creds is None:
        return "it requires credentials; pass --creds FILE (python -m ops.server --creds-dir DIR writes them)"
    return f"credentials {security.creds} are unknown to it or revoked"


def max_payload(nc: Client) -> int:
    """The connected server's ``max_payload`` in bytes (headers count against it)."""
    if not nc.is_connected:
        raise TransportError("not connected to NATS")
    return int(nc.max_payload)


_CRLF = b"\r\n"


def can_publish_views(nc: Client) -> bool:
    """Whether :func:`publish_views` can queue on ``nc``: a connected nats-py client on TCP (TLS or not) with the
    pending queue of the nats-py versions this project pins (checked, not assumed)."""
    from nats.aio.transport import TcpTransport

    return (
        isinstance(nc, Client)
        and nc.is_connected
        and not nc.is_draining_pubs
        and isinstance(getattr(nc, "_transport", None), TcpTransport)
        and isinstance(getattr(nc, "_pending", None), list)
        and isinstance(getattr(nc, "_pending_data_size", None), int)
        and isinstance(getattr(nc, "stats", None), dict)
    )


async def publish_views(nc: Client, subject: str, parts: tuple[Buffer, ...]) -> None:
    """Publish one message whose payload is ``parts`` joined, without joining them: the PUB line and the parts go
    on nats-py's outgoing queue as they are, and the socket writes them from there (TLS encrypts each in place).

    ``Client.publish`` copies a payload twice (``PUB`` line + payload, then + CRLF) before the socket write; a KV
    frame (a header and a megabyte view of the tensor) would be a third copy to assemble. Under TLS each queued
    part becomes TLS records of its own (up to 16 KB each): for parts much smaller than that,
    :func:`publish_joined` is cheaper. The parts must not change until the queue is flushed (``flush``). Use only
    where :func:`can_publish_views` holds; the checks of ``publish`` (subject, size) are made here.
    """
    size = sum(len(p) for p in parts)
    head = _pub_line(nc, subject, size)
    await _queue(nc, (head, *parts, _CRLF), len(head) + size + len(_CRLF), size)


async def publish_joined(nc: Client, subject: str, parts: tuple[Buffer, ...]) -> None:
    """Publish one message whose payload is ``parts`` joined, copied once: the PUB line, the parts and the CRLF in
    one buffer, one entry on nats-py's outgoing queue (``Client.publish`` of a joined payload copies it three
    times). One entry is what TLS wants for small parts: it encrypts each queued entry into records of its own, and
    a record costs about as much as encrypting several kilobytes. Use only where :func:`can_publish_views` holds."""
    size = sum(len(p) for p in parts)
    head = _pub_line(nc, subject, size)
    message = b"".join((head, *parts, _CRLF))
    await _queue(nc, (message,), len(message), size)


def _pub_line(nc: Client, subject: str, size: int) -> bytes:
    if not subject or any(c.isspace() for c in subject):
        raise TransportError(f"bad subject {subject!r}", subject=subject)
    if size > nc.max_payload:
        raise TransportError(f"{size}-byte message exceeds the server's max_payload {nc.max_payload}")
    return f"PUB {subject}  {size}\r\n".encode()


async def _queue(nc: Client, items: tuple[Buffer, ...], queued: int, size: int) -> None:
    """Queue one message's buffers on nats-py's outgoing queue and kick its flusher as ``Client.publish`` does."""
    nc._pending.extend(items)  # one synchronous step: no other publish can land in between
    nc._pending_data_size += queued
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
        await nc._flush_pending(force_flush=True)
    elif nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


async def subscribe(
    nc: Client,
    subject: str,
    cb: Callable[[Msg], Awaitable[None]] | None = None,
    *,
    queue: str = "",
    pending_bytes_limit: int = DEFAULT_SUB_PENDING_BYTES,
    pending_msgs_limit: int = DEFAULT_SUB_PENDING_MSGS,
) -> Subscription:
    """Subscribe with pending limits raised for bulk KV traffic; nats errors become :class:`TransportError`."""
    try:
        return await nc.subscribe(
            subject,
            queue=queue,
            cb=cb,
            pending_bytes_limit=pending_bytes_limit,
            pending_msgs_limit=pending_msgs_limit,
        )
    except nats.errors.Error as exc:
        raise TransportError(f"cannot subscribe to {subject!r}: {exc}", subject=subject) from exc


async def flush(nc: Client, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> None:
    """Round-trip a PING so everything published so far has reached the server.

    nats-py cancels its PONG future when a flush times out or its caller is cancelled (a stream cut at its
    deadline) but leaves it queued; when that PONG arrives, setting its result raises ``InvalidStateError`` inside
    the read loop, which then stops: the connection silently receives nothing more. So the flush runs in a task
    of its own that a cancelled caller leaves to finish, and a future that nats-py cancelled on its timeout is
    replaced by a fresh one at once (before any PONG can reach it), so the late PONG lands there and the next PONG
    still answers the next PING.
    """
    task = asyncio.ensure_future(_flush_guarded(nc, timeout))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: never "never retrieved"
        raise


async def _flush_guarded(nc: Client, timeout: float) -> None:
    try:
        await nc.flush(timeout=timeout)
    except (TimeoutError, nats.errors.Error) as exc:
        _replace_cancelled_pongs(nc)
        raise TransportError(f"flush failed: {exc or type(exc).__name__}") from exc


def _replace_cancelled_pongs(nc: Client) -> None:
    pongs = getattr(nc, "_pongs", None)
    if not isinstance(pongs, list):
        return
    for i, future in enumerate(pongs):
        if isinstance(future, asyncio.Future) and future.cancelled():
            pongs[i] = future.get_loop().create_future()


async def subscribed(nc: Client) -> None:
    """Return once the server has every subscription ``nc`` made so far, so a publish from any connection reaches it.

    nats-py writes a flush's PING straight to the socket, ahead of a SUB still queued for its flusher task, so one
    round trip can come back before the server has the subscription (measured: 3% of tries on a loaded machine);
    by the time it does, the flusher has written the SUB, and a second PING follows it.
    """
    await flush(nc)
    await flush(nc)


async def close(nc: Client, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
    """Drain and close a connection in at most about ``timeout`` seconds; a closed one is left alone.

    nats-py's drain and close swallow a cancel in places and can wait on a socket write that never completes, so
    ``asyncio.wait_for`` is no bound (on Python 3.11 it waits for the cancelled drain to return). A drain still
    running at ``timeout`` has its socket cut, which wakes every write waiting on it, and is then given up on.
    """
    if nc.is_closed:
        return
    closing = asyncio.ensure_future(_drain_or_close(nc))
    done, _ = await asyncio.wait({closing}, timeout=timeout)
    if done:
        closing.result()
        return
    log.warning("nats client %s did not close within %.1f s; cutting its socket", nc.options.get("name"), timeout)
    abort(nc)
    closing.cancel()
    done, _ = await asyncio.wait({closing}, timeout=DEFAULT_ABANDON_TIMEOUT)
    if done:
        with contextlib.suppress(BaseException):
            closing.result()
    else:
        log.warning("nats client %s still closing after its socket was cut; leaving it", nc.options.get("name"))


async def _drain_or_close(nc: Client) -> None:
    try:
        await nc.drain()
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        log.debug("drain failed (%s); closing", exc)
        if not nc.is_closed:
            try:
                await nc.close()
            except (AttributeError, RuntimeError) as broken:
                # nats-py writes its pending buffer to a TLS transport the server already dropped (its SSL protocol
                # is gone): the connection is dead anyway, so cut the socket and let it go
                log.debug("close of a dead connection failed (%s); cutting its socket", broken)
                abort(nc)


def abort(nc: Client) -> None:
    """Abort the connection's TCP socket (no flush): every coroutine writing to it or waiting for it to close wakes."""
    nc.options["allow_reconnect"] = False  # the lost socket must end the client, not start a reconnect
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)  # nats-py internals: guarded, may change
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()


class BusConnections:
    """A publishing and a subscribing connection to the same server; ``async with`` closes both."""

    def __init__(self, url: str, *, name: str = "fedrefine", **options: Any) -> None:
        self.url = url
        self.name = name
        self.options = options
        self.pub: Client | None = None
        self.sub: Client | None = None

    async def open(self) -> BusConnections:
        """Open both connections (publisher first)."""
        self.pub = await connect(self.url, name=f"{self.name}-pub", **self.options)
        try:
            self.sub = await connect(self.url, name=f"{self.name}-sub", **self.options)
        except BaseException:
            await close(self.pub)
            raise
        return self

    async def close(self) -> None:
        """Drain and close both connections."""
        for nc in (self.sub, self.pub):
            if nc is not None:
                await close(nc)

    async def __aenter__(self) -> BusConnections:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
