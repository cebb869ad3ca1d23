"""Mid-stream re-planning: when the link slows down during a stream, a policy re-plans the layers not yet sent.

:class:`DeadlineSteer` is a :data:`bus.transport.Steer`. Between two layers it projects the finish time of the
rest of the stream at the link's rate now (``rate()``, e.g. the transmitter's link estimate, which follows a
replayed trace) behind the bytes still queued on the link (``backlog()``). If the rest lands after the deadline
(less ``reserve_s``, the receiver's time to fuse and answer), it asks the bandwidth policy again, for the
remaining layers only, with the time and rate left, at the stream's precision or cheaper: the deadline-aware
policy then degrades the remaining layers' precision and, when even int4 is too much, drops the least important
ones. A stream the receiver reads only whole (``whole``: a model read into itself in translate mode) never loses
a layer: its rest goes cheaper, or, when even that is late, the stream is cut there (what went is of no use
alone). While the projection holds, the stream goes on unchanged. Pure: no bus, no clock of its own (``clock``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from bus.budget import LADDER, LayerCost, PolicyRequest, layer_wire_bytes, link_budget
from bus.errors import PolicyError
from bus.frames import MAX_FRAME_OVERHEAD
from bus.policy import DEFAULT_MAX_PAYLOAD, DEFAULT_SAFETY, BandwidthPolicy, plan_whole
from bus.schemas import PRECISIONS
from bus.transport import StreamProgress

log = logging.getLogger(__name__)

MIN_TIME_LEFT_S = 1e-3  # seconds; with less left the rest of the stream is dropped without asking the policy


def cheaper_or_equal(precision: str, ladder: Sequence[str] = LADDER) -> tuple[str, ...]:
    """``precision`` and the ladder's cheaper ones (a steer never sends a layer better than the plan said)."""
    if precision not in PRECISIONS:
        raise PolicyError(f"unknown precision {precision!r}")
    if precision not in ladder:
        return (precision, *ladder)
    return tuple(ladder[ladder.index(precision) :])


class DeadlineSteer:
    """Re-plans the rest of a stream with ``policy`` whenever the link can no longer carry it by the deadline."""

    def __init__(
        self,
        policy: BandwidthPolicy,
        *,
        deadline: float,
        shapes: Mapping[int, Sequence[int]],
        importance: Mapping[int, float],
        rate: Callable[[], float | None],
        backlog: Callable[[], int] = lambda: 0,
        reserve_s: float = 0.0,
        safety: float = DEFAULT_SAFETY,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        frame_overhead: int = MAX_FRAME_OVERHEAD,
        clock: Callable[[], float] = time.monotonic,
        whole: bool = False,
    ) -> None:
        self.policy = policy
        self.whole = whole  # the receiver reads the stream only whole: the rest goes cheaper, or the stream is cut
        self.deadline = deadline  # on ``clock``
        self.shapes = {m: tuple(s) for m, s in shapes.items()}
        self.importance = dict(importance)
        self.rate = rate
        self.backlog = backlog
        self.reserve_s = reserve_s
        self.safety = safety
        self.max_payload = max_payload
        self.frame_overhead = frame_overhead
        self.clock = clock
        self.replans = 0  # times the rest of the stream was re-planned
        self.history: list[tuple[float, list[tuple[int, str]]]] = []  # (time left, new schedule) per re-plan

    def _bytes(self, layer: int, precision: str) -> int:
        return layer_wire_bytes(
            self.shapes[layer], precision, max_payload=self.max_payload, frame_overhead=self.frame_overhead
        )

    def __call__(self, progress: StreamProgress) -> list[tuple[int, str]] | None:
        """The new schedule of the remaining layers, or None while they still fit the deadline."""
        rate = self.rate()
        if not progress.remaining or rate is None or rate <= 0:
            return None
        left = self.deadline - self.reserve_s - self.clock()
        backlog = max(0, int(self.backlog()))
        need = backlog + sum(self._bytes(m, p) for m, p in progress.remaining)
        if need / rate <= left:
            return None
        if left < MIN_TIME_LEFT_S:
            return self._replanned(left, [])
        allowed = cheaper_or_equal(progress.remaining[0][1])
        costs = tuple(
            LayerCost(layer=m, importance=self.importance.get(m, 0.0), bytes={p: self._bytes(m, p) for p in allowed})
            for m, _ in progress.remaining
        )
        try:
            req = PolicyRequest(
                layers=costs,
                budget_bytes=link_budget(rate, left, backlog_bytes=backlog, safety=self.safety),
                link_rate_bps=rate,
                time_left_s=left,
                backlog_bytes=backlog,
                precisions=allowed,
                whole=self.whole,
            )
            plan = plan_whole(self.policy, req)
        except PolicyError as exc:  # a policy that cannot re-plan (e.g. a fixed precision above the stream's)
            log.debug("no re-plan by %s: %s", getattr(self.policy, "name", self.policy), exc)
            return None
        new = plan.pairs()
        if new == list(progress.remaining):
            return None  # the policy keeps the rest as it is (e.g. keep-all)
        return self._replanned(left, new)

    def _replanned(self, left: float, schedule: list[tuple[int, str]]) -> list[tuple[int, str]]:
        self.replans += 1
        self.history.append((left, schedule))
        log.debug("re-planned the rest of a stream with %.3f s left: %s", left, schedule)
        return schedule
