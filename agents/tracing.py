"""Query ids as trace ids: in every log line an agent writes about a query, and in trace events for monitors.

**Logs.** :data:`QUERY_ID` is a context variable that each piece of per-query work sets (a subscription callback
whose subject names a query, a task spawned for one, a call on the compute thread); :class:`QueryIdFilter` puts it
in every record as ``%(qid)s`` (``-`` outside any query), so ``grep <query id>`` over the logs of every agent of a
federation follows one query from the ask to the answer.

**Events.** An agent publishes a small :class:`~bus.trace.Trace` on ``<prefix>.trace.<role>.<id>`` at each step of a
query (the receiver: ask, query, plan, KV in, answer; a transmitter: offer, KV out; the gate: plan; a rephraser:
rephrase), fire and forget, so ``python -m ops.watch`` can draw a live timeline. An event carries ids, times, byte
counts and a short fixed word or two, never a question's text, an option or an answer letter: monitors may read it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from bus.errors import FedRefineError
from bus.schemas import Answer
from bus.trace import Trace, TraceEvent

if TYPE_CHECKING:
    from agents.base import Agent

log = logging.getLogger(__name__)

NO_QUERY = "-"
QUERY_ID: contextvars.ContextVar[str] = contextvars.ContextVar("fedrefine_query_id", default=NO_QUERY)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [q=%(qid)s]: %(message)s"

T = TypeVar("T")


class QueryIdFilter(logging.Filter):
    """Adds ``qid`` (the query the current task or thread works on, else ``-``) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "qid"):
            record.qid = QUERY_ID.get()
        return True


def install(handler: logging.Handler | None = None) -> None:
    """Give ``handler`` (default: every handler of the root logger) the query id filter."""
    handlers = [handler] if handler is not None else logging.getLogger().handlers
    for h in handlers:
        if not any(isinstance(f, QueryIdFilter) for f in h.filters):
            h.addFilter(QueryIdFilter())


def in_query(query_id: str | None) -> contextvars.Context:
    """A copy of the current context in which log lines name ``query_id`` (for a task or a thread)."""
    ctx = contextvars.copy_context()
    if query_id:
        ctx.run(QUERY_ID.set, query_id)
    return ctx


def run_in(ctx: contextvars.Context, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inside ``ctx`` (what an executor runs, so the compute thread logs the query id too)."""
    return ctx.run(fn, *args)


class Tracer:
    """Publishes one agent's trace events (a no-op when disabled)."""

    def __init__(self, agent: Agent, enabled: bool = True) -> None:
        self.agent = agent
        self.enabled = enabled
        self.sent = 0

    async def emit(
        self,
        query_id: str,
        event: TraceEvent,
        *,
        nbytes: int = 0,
        peer: str | None = None,
        count: int | None = None,
        ms: float | None = None,
        detail: str = "",
    ) -> None:
        """Publish one event about ``query_id``; a failure is only logged (tracing never stops the work)."""
        if not self.enabled:
            return
        agent = self.agent
        trace = Trace(
            role=agent.role,  # type: ignore[arg-type]
            agent_id=agent.id,
            query_id=query_id,
            event=event,
            t_unix=time.time(),
            bytes=max(0, int(nbytes)),
            peer=peer,
            count=count,
            ms=round(ms, 3) if ms is not None else None,
            detail=detail,
        )
        try:
            await agent.publish(agent.subjects.trace(agent.role, agent.id), trace)
            self.sent += 1
        except FedRefineError as exc:
            log.debug("trace event not sent: %s", exc)


def answer_detail(answer: Answer) -> str:
    """A few fixed words on how an answer came about (never its content)."""
    if answer.used:
        return f"fused {len(answer.used)}"
    notes = " ".join(answer.notes)
    if answer.alone:
        return "alone: knows it"
    if "in the receiver's queue" in notes:
        return "alone: queued too long"
    if "too little of its deadline" in notes:
        return "alone: busy"
    if "no plan from" in notes:
        return "alone: gate down"
    if "no live transmitter" in notes:
        return "alone: no transmitter"
    return "alone"


async def emit_answer(tracer: Tracer, answer: Answer) -> None:
    """The receiver's last events of a query: what each transmitter brought, then the answer itself."""
    for use in answer.used:
        await tracer.emit(answer.query_id, "kv_in", nbytes=use.bytes, peer=use.transmitter_id)
    await tracer.emit(
        answer.query_id,
        "answer",
        nbytes=answer.bytes_received,
        count=len(answer.used),
        ms=1000 * answer.latency_s,
        detail=answer_detail(answer),
    )
