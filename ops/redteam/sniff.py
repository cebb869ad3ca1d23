"""What one identity can read off the bus, and which secrets (raw questions, planted details) were in it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.auth import ClientSecurity
from bus.connect import close, connect


@dataclass
class Watch:
    """A connection's asynchronous errors: the server reports each refused publish or subscription to the client."""

    errors: list[str] = field(default_factory=list)

    async def cb(self, exc: Exception) -> None:
        """nats-py's ``error_cb``."""
        self.errors.append(str(exc).lower())

    def violations(self, kind: str = "") -> int:
        """Refused publishes (``kind="publish"``), subscriptions (``"subscription"``) or both."""
        return sum(f"permissions violation for {kind}" in e for e in self.errors)


@dataclass
class Sniffer:
    """One identity subscribed to ``patterns`` (``>`` and receiver-side ones included: the server refuses those)."""

    url: str
    security: ClientSecurity | None
    patterns: Sequence[str]
    name: str = "sniffer"
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    watch: Watch = field(default_factory=Watch)
    nc: Client | None = None

    async def start(self) -> Sniffer:
        """Connect and subscribe to every pattern."""
        self.nc = await connect(self.url, name=self.name, security=self.security, error_cb=self.watch.cb)

        async def record(msg: Msg) -> None:
            self.messages.append((msg.subject, bytes(msg.data)))

        for pattern in self.patterns:
            await self.nc.subscribe(pattern, cb=record)
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        """Flush what is in flight and disconnect."""
        if self.nc is not None:
            await close(self.nc)
            self.nc = None


def _texts(data: bytes) -> str:
    """Every string a message holds, lower-cased: its raw bytes as UTF-8, and the string values of its JSON."""
    raw = data.decode("utf-8", errors="replace")
    parts = [raw]
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return "\n".join(parts).lower()


def secret_hits(messages: Iterable[tuple[str, bytes]], secrets: Iterable[str]) -> dict[str, list[str]]:
    """Secret -> the subjects of the messages it appeared in (case-insensitive); secrets never seen are left out."""
    wanted = [s for s in dict.fromkeys(secrets) if s.strip()]
    hits: dict[str, list[str]] = {}
    for subject, data in messages:
        text = _texts(data)
        for secret in wanted:
            if secret.lower() in text:
                hits.setdefault(secret, []).append(subject)
    return hits
