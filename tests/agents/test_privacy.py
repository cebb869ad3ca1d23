"""Private mode: a subscriber on ``>`` outside the receiver side never sees the raw question or its personal details,
and the server does not even let an identity outside the receiver side subscribe there."""

from __future__ import annotations

import asyncio

from bus.connect import close, connect, subscribed
from bus.schemas import Answer, Query, decode_message
from tests.agents.conftest import QUESTIONS, Fleet
from tests.conftest import eventually


async def test_a_wildcard_listener_sees_only_the_rephrased_question(fleet: Fleet) -> None:
    await fleet.standard()
    seen: list[tuple[str, bytes]] = []
    spy = await fleet.connect(name="spy")

    async def record(msg) -> None:
        seen.append((msg.subject, bytes(msg.data)))

    await spy.subscribe(">", cb=record)
    await subscribed(spy)
    private = [q for q in QUESTIONS if q.pii]
    try:
        for q in private:
            a = await fleet.ask(q, private=True)
            assert isinstance(a, Answer) and a.used
        await asyncio.sleep(0.2)
    finally:
        await close(spy)
    receiver_side = {fleet.subjects.ask(), fleet.subjects.rephrase("rx")}
    outside = [(subject, data) for subject, data in seen if subject not in receiver_side]
    queries = [decode_message(d) for s, d in outside if s == fleet.subjects.query("rx")]
    assert len(queries) == len(private) and all(isinstance(m, Query) for m in queries)
    assert any(fleet.subjects.kv("rx", m.query_id, "t1") == s for m in queries for s, _ in outside)
    for q in private:
        assert any(q.stem.encode() in d for s, d in seen if s == fleet.subjects.ask())  # the spy does see asks
        for secret in (q.stem, *q.pii):
            leaks = [s for s, d in outside if secret.encode() in d]
            assert not leaks, f"{secret!r} seen on {leaks}"


async def test_identities_outside_the_receiver_side_cannot_listen_there(fleet: Fleet) -> None:
    await fleet.standard()
    violations: list[str] = []
    seen: list[bytes] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    async def record(msg) -> None:
        seen.append(bytes(msg.data))

    spies = []
    for agent_id, role in (("spy-gate", "gate"), ("spy-tx", "transmitter"), ("spy-mon", "monitor")):
        spy = await connect(fleet.url, name=agent_id, security=fleet.security(agent_id, role), error_cb=on_error)
        for pattern in (">", fleet.subjects.ask(), f"{fleet.prefix}.rephrase.*", "_INBOX.>"):
            await spy.subscribe(pattern, cb=record)
        await subscribed(spy)
        spies.append(spy)
    try:
        private = [q for q in QUESTIONS if q.pii]
        for q in private:
            assert isinstance(await fleet.ask(q, private=True), Answer)
        await eventually(lambda: sum("permissions violation for subscription" in v for v in violations) >= 12)
    finally:
        for spy in spies:
            await close(spy)
    assert not seen  # every one of those subscriptions was refused by the server
    assert sum("permissions violation for subscription" in v for v in violations) == 3 * 4
