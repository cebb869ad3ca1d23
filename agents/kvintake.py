"""The receiver's KV intake: ``bus.transport.KVReceiver`` plus a guard and per-stream byte counts.

Before a chunk reaches the reassembler, the guard asks the receiver whether it wants it: chunks for a query
this receiver has not opened, or from a sender that the query's plan does not name, are rejected with a
warning (a chunk that arrives before the receiver has read the plan is held provisionally; only planned
senders are ever fused). Chunks for a query the receiver just answered are late, not hostile: logged at
debug level only.

Memory per query: with ``budget`` (``(query_id, sender) -> planned wire bytes``, None while no plan is known), a
stream's messages are refused once they would take it past its planned bytes (the plan's ``byte_budget``, which
counts every frame header; a transmitter that re-plans mid-stream only ever sends less), so reassembly never holds
more than the plan allowed. Without a plan yet, the reassembler's per-query limit still bounds it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from bus.errors import FedRefineError, LimitError, SchemaError
from bus.transport import KVReceiver

log = logging.getLogger(__name__)

Verdict = Callable[[str, str], str | None]  # (query_id, sender) -> None to accept, else why not
Budget = Callable[[str, str], int | None]  # (query_id, sender) -> the stream's planned wire bytes (None: unknown)


class GuardedKVReceiver(KVReceiver):
    """A :class:`KVReceiver` that drops unwanted streams before reassembly and counts wire bytes per stream."""

    def __init__(
        self, *args: Any, guard: Verdict, is_late: Callable[[str], bool], budget: Budget | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.is_late = is_late
        self.budget = budget
        self.stream_bytes: Counter[tuple[str, str]] = Counter()
        self.late_frames = 0  # KV messages for a query already answered

    async def _on_msg(self, msg: Msg) -> None:
        try:
            if self.subjects is None:
                raise SchemaError("guarded KV intake needs subjects to parse")
            parts = self.subjects.parse(msg.subject)
            if parts.kind != "kv" or parts.query_id is None or parts.sender is None:
                raise SchemaError(f"{msg.subject!r} is not a KV subject")
            if self.is_late(parts.query_id):
                self.late_frames += 1
                log.debug("late KV message on %s (query already answered)", msg.subject)
                return
            why = self.guard(parts.query_id, parts.sender)
            if why is not None:
                raise SchemaError(why)
            key = (parts.query_id, parts.sender)
            planned = self.budget(*key) if self.budget is not None else None
            if planned is not None and self.stream_bytes[key] + len(msg.data) > planned:
                raise LimitError(
                    f"KV from {parts.sender} for {parts.query_id} would exceed its planned {planned} bytes; dropped",
                    reason="planned",
                    query_id=parts.query_id,
                )
        except FedRefineError as exc:
            self.stats["messages"] += 1
            await self._error(exc, msg.subject)
            return
        self.stream_bytes[(parts.query_id, parts.sender)] += len(msg.data)
        await super()._on_msg(msg)

    def forget(self, query_id: str) -> None:
        """Free a query's state and byte counts."""
        self.close_query(query_id)
        for key in [k for k in self.stream_bytes if k[0] == query_id]:
            del self.stream_bytes[key]
