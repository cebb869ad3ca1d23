"""What the fault and load benchmarks share: a steady stream of questions kept in flight, and what came of each.

:class:`Pump` keeps ``in_flight`` questions outstanding (a new one as soon as one returns) from one or more asker
connections until told to stop, and records each :class:`Shot` (when it was sent, how long it took, the reply).
:func:`recovery_s` says when a federation was whole again after an event: the send time of the first question
from which on every question was answered as a healthy federation answers it.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nats.aio.client import Client

from bus.schemas import Answer, ErrorReply
from bus.subjects import Subjects
from ops.ask import Item, ReconnectWatch, ask_once

DEFAULT_SLACK_S = 0.25  # seconds past its deadline an answer may reach the asker and still count as in time


@dataclass(frozen=True)
class Shot:
    """One question asked: its index into the items, when (monotonic), how long the round trip took, the reply."""

    index: int
    sent: float
    seconds: float
    reply: Answer | ErrorReply

    @property
    def answered(self) -> bool:
        """An Answer came back."""
        return isinstance(self.reply, Answer)

    def in_time(self, deadline_s: float) -> bool:
        """Answered by the deadline (the receiver's clock and the asker's, with network slack)."""
        return (
            isinstance(self.reply, Answer)
            and self.reply.latency_s <= deadline_s
            and self.seconds <= deadline_s + DEFAULT_SLACK_S
        )

    def typed_error_in_time(self, deadline_s: float) -> bool:
        """An ErrorReply that came back by the deadline."""
        return isinstance(self.reply, ErrorReply) and self.seconds <= deadline_s + DEFAULT_SLACK_S


class Pump:
    """Keeps ``in_flight`` questions outstanding over ``askers`` (round robin) until :meth:`stop`."""

    def __init__(
        self,
        askers: Sequence[tuple[Client, ReconnectWatch | None]],
        subjects: Subjects,
        items: Sequence[Item],
        *,
        in_flight: int,
        deadline_s: float,
        limit: int | None = None,
    ) -> None:
        self.askers = list(askers)
        self.subjects = subjects
        self.items = list(items)
        self.in_flight = in_flight
        self.deadline_s = deadline_s
        self.limit = limit  # questions in all (None: until stopped)
        self.shots: list[Shot] = []
        self._stop = asyncio.Event()
        self._counter = itertools.count()

    def stop(self) -> None:
        """Send no more (those in flight still finish)."""
        self._stop.set()

    async def run(self) -> list[Shot]:
        """Until stopped (or ``limit`` questions); every shot."""
        await asyncio.gather(*(self._lane(lane) for lane in range(self.in_flight)))
        return self.shots

    async def _lane(self, lane: int) -> None:
        while not self._stop.is_set():
            n = next(self._counter)
            if self.limit is not None and n >= self.limit:
                return
            nc, watch = self.askers[(lane + n) % len(self.askers)]
            index = n % len(self.items)
            sent = time.monotonic()
            reply = await ask_once(nc, self.subjects, self.items[index], self.deadline_s, watch)
            self.shots.append(Shot(index, sent, time.monotonic() - sent, reply))


def recovery_s(shots: Sequence[Shot], since: float, whole: Callable[[Shot], bool]) -> float | None:
    """Seconds from ``since`` to the send time of the first shot after the last one that was not ``whole`` (0 when
    every shot sent after ``since`` was); None when the last one still is not (never whole again)."""
    after = sorted((s for s in shots if s.sent >= since), key=lambda s: s.sent)
    bad = [s for s in after if not whole(s)]
    if not bad:
        return 0.0
    following = [s for s in after if s.sent > bad[-1].sent]
    return round(following[0].sent - since, 2) if following else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``, or None."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency_row(shots: Sequence[Shot]) -> dict[str, float | None]:
    """p50 / p95 / p99 / mean of the answered shots' round trips, in milliseconds."""
    ms = [1000 * s.seconds for s in shots if s.answered]

    def r(v: float | None) -> float | None:
        return round(v, 1) if v is not None else None

    return {
        "p50_ms": r(percentile(ms, 0.5)),
        "p95_ms": r(percentile(ms, 0.95)),
        "p99_ms": r(percentile(ms, 0.99)),
        "mean_ms": r(statistics.fmean(ms)) if ms else None,
    }
