"""A bare NATS client over TLS with an nkey: subscribes, then never reads (a slow consumer, for the attack matrix).

nats-py always reads its socket, so it cannot be a slow consumer on the server's side; this speaks the text
protocol itself: INFO (plain) -> TLS -> CONNECT with the nonce signed by the identity's seed -> SUB -> PING/PONG,
then nothing. The server buffers what it owes this client up to its ``max_pending`` and then cuts it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from urllib.parse import urlparse

import nkeys

from bus.auth import ClientSecurity, tls_context

DEFAULT_TIMEOUT_S = 5.0  # seconds for the handshake


class SlowConsumer:
    """One connection that subscribes to ``subjects`` and stops reading; :meth:`cut` says whether the server left."""

    def __init__(self, url: str, security: ClientSecurity, subjects: list[str]) -> None:
        self.url = url
        self.security = security
        self.subjects = subjects
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> SlowConsumer:
        """Connect, authenticate, subscribe, and confirm with one PING/PONG."""
        parsed = urlparse(self.url)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname, parsed.port, limit=1 << 20), DEFAULT_TIMEOUT_S
        )
        info = json.loads((await reader.readline()).decode().removeprefix("INFO ").strip())
        if parsed.scheme == "tls" or info.get("tls_required"):
            ctx: ssl.SSLContext = tls_context(self.security.tls_ca)
            await writer.start_tls(ctx, server_hostname=parsed.hostname)
        creds = self.security.identity()
        connect: dict = {"verbose": False, "pedantic": False, "protocol": 1, "name": "slow-consumer"}
        connect["tls_required"] = parsed.scheme == "tls"
        if creds is not None and creds.seed is not None:
            kp = nkeys.from_seed(bytearray(creds.seed.encode()))
            connect["nkey"] = kp.public_key.decode()
            connect["sig"] = base64.b64encode(kp.sign(info["nonce"].encode())).decode()
        lines = [f"CONNECT {json.dumps(connect)}"]
        lines += [f"SUB {subject} {sid}" for sid, subject in enumerate(self.subjects, 1)]
        writer.write(("\r\n".join([*lines, "PING"]) + "\r\n").encode())
        await writer.drain()
        while True:
            line = (await asyncio.wait_for(reader.readline(), DEFAULT_TIMEOUT_S)).decode()
            if not line:
                raise ConnectionError("the server closed the connection during the handshake")
            if line.startswith("-ERR"):
                raise ConnectionError(line.strip())
            if line.startswith("PONG"):
                break
        self.reader, self.writer = reader, writer
        return self

    async def cut(self, timeout: float = 2.0) -> bool:
        """Read what is left: True when the server closed the connection (it gave up on this consumer)."""
        assert self.reader is not None
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(1 << 20):
                    pass
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
        return True

    async def close(self) -> None:
        """Drop the socket."""
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 1.0)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                pass
