"""Rate limits of an agent: a token bucket, and rejection warnings that a flood cannot turn into a log flood."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("agents.base")  # the lines read as the agent's own


class TokenBucket:
    """``rate`` events a second with bursts of ``burst``: :meth:`take` says whether one more fits now."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RejectLog:
    """One warning line per rejected message up to a burst, then ``rate`` a second; the rest summed up in one line."""

    def __init__(self, who: str, rate: float, burst: float) -> None:
        self.who = who
        self.bucket = TokenBucket(rate, burst)
        self.unlogged = 0

    def warn(self, subject: str, reason: str) -> None:
        """Log one rejection (or count it, in a flood)."""
        if not self.bucket.take():
            self.unlogged += 1
            return
        self.summarize(force=True)
        reason = " ".join(reason.split())  # one line, whatever the reason holds
        log.warning("%s rejected a message on %s: %s", self.who, subject, reason)

    def summarize(self, force: bool = False) -> None:
        """The line that counts what a flood kept from the log (called on every heartbeat, and before a line)."""
        if self.unlogged and (force or self.bucket.take()):
            log.warning("%s rejected %d more message(s) not logged one by one (a flood)", self.who, self.unlogged)
            self.unlogged = 0
