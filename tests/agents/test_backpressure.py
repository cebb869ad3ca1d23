"""A receiver past its --max-inflight queues asks (in order, up to --max-queued) instead of refusing them, answers a
queued ask alone when too little of its deadline is left, and refuses with ``limit`` only beyond the queue."""

from __future__ import annotations

import asyncio
import time

from bus.schemas import Answer, ErrorReply
from tests.agents.conftest import QUESTIONS, Fleet


async def _burst(fleet: Fleet, n: int, deadline_s: float = 10.0) -> list:
    return list(await asyncio.gather(*(fleet.ask(QUESTIONS[i % 4], deadline_s=deadline_s) for i in range(n))))


async def test_asks_beyond_the_slots_wait_their_turn_and_are_all_answered(fleet: Fleet) -> None:
    await fleet.receiver(max_inflight=2)
    await fleet.rephraser()
    await fleet.gate()
    await fleet.transmitter("t1", "tiny-llama")
    await fleet.wait_roster("gate", "transmitter", {"t1"})
    replies = await _burst(fleet, 24)
    rx = fleet.agents["rx"]
    assert all(isinstance(r, Answer) for r in replies), [r for r in replies if not isinstance(r, Answer)]
    assert rx.queue.counts["queued_max"] > 0 and rx.queue.counts["refused_full"] == 0  # type: ignore[attr-defined]
    assert sum(bool(r.used) for r in replies) >= 12  # most still fused: the queue is short
    assert not rx.queue.waiting  # type: ignore[attr-defined]


async def test_a_queued_ask_with_too_little_time_left_is_answered_alone_and_says_why(fleet: Fleet) -> None:
    rx = await fleet.receiver(max_inflight=1)
    await fleet.gate()
    await fleet.transmitter("t1", "tiny-llama")
    await fleet.wait_roster("gate", "transmitter", {"t1"})
    rx._fused.extend([(time.monotonic(), 5.0)] * 8)  # as if asking the others took seconds: no ask has time for it
    replies = await _burst(fleet, 6, deadline_s=3.0)
    assert all(isinstance(r, Answer) and r.latency_s <= 3.0 for r in replies), replies
    shed = [r for r in replies if any("too little of its deadline" in n for n in r.notes)]
    # the first ask finds the receiver idle and asks the others anyway (an idle receiver learns whether it may);
    # the five behind it wait in the queue and are answered alone
    assert len(shed) == 5 and all(r.used == () for r in shed) and rx.shed == 5
    assert sum(any("in the receiver's queue" in n for n in r.notes) for r in shed) >= 4  # most waited for a slot


async def test_beyond_the_queue_asks_are_refused_with_limit(fleet: Fleet) -> None:
    await fleet.receiver(max_inflight=1, max_queued=0)
    replies = await _burst(fleet, 8, deadline_s=2.0)
    refused = [r for r in replies if isinstance(r, ErrorReply)]
    assert refused and all(r.code == "limit" and "max-queued" in r.message for r in refused)
    assert any(isinstance(r, Answer) for r in replies)
