"""Backpressure at the receiver: asks beyond its ``--max-inflight`` slots wait in order, up to ``--max-queued``.

A receiver works on ``max_inflight`` asks at once (the KV reassembler, the gate and each transmitter hold state for
at most 64 queries of one receiver); before this queue it refused the rest outright with ``unavailable``. Now an ask
that finds every slot taken waits, first in first out, and starts as soon as a slot is free; its deadline runs from
its receipt all the same (PROTOCOL.md section 7), and the receiver answers a queued ask alone when too little of it
is left to ask the others. Only beyond ``max_queued`` waiting asks is one refused, with ``limit``. Stopping, the
receiver serves the queue for as long as its drain allows and tells whoever still waits ``unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from bus.errors import FedRefineError
from bus.schemas import Ask, ErrorReply

if TYPE_CHECKING:
    from agents.base import Agent

Serve = Callable[[Msg, Ask, float, bool], Coroutine[Any, Any, None]]  # (request, ask, receipt, was queued)


class AskQueue:
    """The slots and the waiting line of one receiver."""

    def __init__(self, agent: Agent, serve: Serve, limit: int) -> None:
        self.agent = agent
        self.serve = serve
        self.limit = limit
        self.waiting: deque[tuple[Msg, Ask, float]] = deque()  # (request, ask, monotonic receipt)
        self.closed = False  # stopping and out of drain time: nobody else starts
        self.counts = {"queued_max": 0, "queued_total": 0, "refused_full": 0}

    def __len__(self) -> int:
        return len(self.waiting)

    def admit(self, msg: Msg, ask: Ask) -> ErrorReply | None:
        """Start ``ask`` now, or queue it; the refusal to send when the queue is full (None otherwise)."""
        now = time.monotonic()
        if self.agent.accepting() and not self.waiting:
            self._start(msg, ask, now, queued=False)
            return None
        if len(self.waiting) >= self.limit:
            self.counts["refused_full"] += 1
            why = f"receiver {self.agent.id} has {len(self.waiting)} asks waiting (its --max-queued)"
            return ErrorReply(code="limit", message=why)
        self.waiting.append((msg, ask, now))
        self.counts["queued_total"] += 1
        self.counts["queued_max"] = max(self.counts["queued_max"], len(self.waiting))
        return None

    def _start(self, msg: Msg, ask: Ask, t0: float, queued: bool) -> None:
        task = self.agent.spawn(self.serve(msg, ask, t0, queued), name="ask")
        task.add_done_callback(lambda _: self._next())  # after spawn's own callback has freed the slot

    def _next(self) -> None:
        while self.waiting and not self.closed and len(self.agent._tasks) < self.agent.cfg.max_inflight:  # noqa: SLF001
            msg, ask, t0 = self.waiting.popleft()
            self._start(msg, ask, t0, queued=True)

    async def drain(self, until: float) -> None:
        """Serve the queue until the monotonic time ``until``; then turn the rest away with ``unavailable``."""
        while (self.waiting or self.agent.load) and time.monotonic() < until:
            await asyncio.sleep(0.05)
        self.closed = True
        while self.waiting:
            msg, _, _ = self.waiting.popleft()
            with contextlib.suppress(FedRefineError):
                stopping = ErrorReply(code="unavailable", message=f"receiver {self.agent.id} is stopping")
                await self.agent.respond(msg, stopping)
