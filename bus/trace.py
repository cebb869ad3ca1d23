"""The trace event: one step of one query at one agent, for monitors (``<prefix>.trace.<role>.<agent_id>``).

Content-free by construction: ids, a time, byte counts, a duration and a short detail made of fixed words
(``fused 2``, ``alone``, ``gate down``), never a question's text, an option or an answer. ``agents.tracing``
publishes it; ``ops.watch`` draws a query's events as a timeline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bus.schemas import Id, Message, Role

TraceEvent = Literal[
    "ask",  # receiver: took an ask (detail "queued" when it waited for a slot)
    "rephrase",  # rephraser: q' made (ms)
    "query",  # receiver: published q' (peer: the gate it asked)
    "offer",  # transmitter: offered (bytes: the offer, inline cache included; ms: its prefill)
    "plan",  # gate: published a plan (count: transmitters planned; ms: since the query); receiver: received it
    "kv_out",  # transmitter: streamed its planned layers (bytes, ms; peer: the receiver)
    "kv_in",  # receiver: what one transmitter's stream or inline cache brought (bytes; peer: the transmitter)
    "answer",  # receiver: replied (ms since the ask; bytes: KV received; count: transmitters fused; detail)
    "error",  # receiver: replied with an error (detail: its code)
]
MAX_DETAIL_CHARS = 64


class Trace(Message):
    """One trace event (see the module docstring)."""

    kind: Literal["trace"] = "trace"
    role: Role
    agent_id: Id
    query_id: Id
    event: TraceEvent
    t_unix: float = Field(gt=0, allow_inf_nan=False)
    bytes: int = Field(default=0, ge=0)
    peer: Id | None = None
    count: int | None = Field(default=None, ge=0)
    ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    detail: str = Field(default="", max_length=MAX_DETAIL_CHARS)
