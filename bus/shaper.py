"""A token-bucket link shaper: makes a publisher on loopback behave like a link of a given rate.

``await shaper.acquire(n)`` returns once ``n`` more bytes fit the rate: the bucket holds up to
``burst_bytes`` and refills at ``rate_bps``; a request larger than the bucket is allowed and paid
for by waiting (the bucket goes into debt), so any chunk size works and the long-run rate holds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from bus.errors import PolicyError

DEFAULT_BURST_SECONDS = 0.01  # default bucket size, in seconds of traffic at the configured rate
MIN_BURST_BYTES = 16 * 1024  # bytes; the smallest default bucket


class LinkShaper:
    """Token bucket in bytes: ``rate_bps`` bytes per second, up to ``burst_bytes`` at once."""

    def __init__(
        self,
        rate_bps: float,
        burst_bytes: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not (isinstance(rate_bps, int | float) and math.isfinite(rate_bps) and rate_bps > 0):
            raise PolicyError(f"link rate must be a positive number of bytes/s, got {rate_bps!r}")
        if burst_bytes is None:
            burst_bytes = max(MIN_BURST_BYTES, int(rate_bps * DEFAULT_BURST_SECONDS))
        if burst_bytes < 1:
            raise PolicyError(f"burst must be at least 1 byte, got {burst_bytes}")
        self._rate_bps = float(rate_bps)
        self.burst_bytes = int(burst_bytes)
        self.clock = clock
        self.sleep = sleep
        self.bytes_total = 0
        self.waited_s = 0.0
        self._tokens = float(self.burst_bytes)
        self._stamp = clock()

    @property
    def rate_bps(self) -> float:
        """The link's rate now (bytes/s)."""
        return self._rate_bps

    def backlog_bytes(self) -> int:
        """Bytes reserved but not yet carried by the link (the bucket's debt)."""
        tokens = min(float(self.burst_bytes), self._tokens + (self.clock() - self._stamp) * self._rate_bps)
        return max(0, math.ceil(-tokens))

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes from the bucket now; return how many seconds the caller must wait."""
        if n < 0:
            raise PolicyError(f"cannot send {n} bytes")
        now = self.clock()
        self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._stamp) * self._rate_bps)
        self._stamp = now
        self._tokens -= n
        self.bytes_total += n
        return max(0.0, -self._tokens / self._rate_bps)

    async def acquire(self, n: int) -> float:
        """Wait until ``n`` bytes may go out at the configured rate; return the seconds waited."""
        delay = self.reserve(n)
        if delay > 0:
            await self.sleep(delay)
            self.waited_s += delay
        return delay

    def __repr__(self) -> str:
        return f"LinkShaper(rate_bps={self.rate_bps:.0f}, burst_bytes={self.burst_bytes})"
