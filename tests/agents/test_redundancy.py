"""No single point of failure on the receiver side: two gates and two rephrasers at once, exactly one plan per
query, a dead gate left out and a returning one used again, and a private question never sent unrephrased."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from bus.connect import close, subscribed
from bus.schemas import Answer, Query, decode_message
from tests.agents.conftest import QUESTIONS, Fleet


def _answer(reply) -> Answer:
    assert isinstance(reply, Answer), reply
    return reply


async def _two_of_each(fleet: Fleet) -> None:
    await fleet.receiver(gates="gate,gate-2")
    await fleet.rephraser("reph")
    await fleet.rephraser("reph-2")
    await fleet.gate("gate")
    await fleet.gate("gate-2")
    for tid, name in {"t1": "tiny-llama", "t2": "tiny-qwen2"}.items():
        await fleet.transmitter(tid, name)
    for gate in ("gate", "gate-2"):
        await fleet.wait_roster(gate, "transmitter", {"t1", "t2"})
    await fleet.wait_roster("rx", "gate", {"gate", "gate-2"})


async def test_two_gates_share_the_queries_and_each_query_gets_exactly_one_plan(fleet: Fleet) -> None:
    await _two_of_each(fleet)
    plans: Counter[str] = Counter()
    spy = await fleet.connect(name="pytest-spy")
    try:

        async def on_plan(msg) -> None:
            plans[msg.subject.split(".")[-2]] += 1

        await spy.subscribe(f"{fleet.prefix}.plan.*.*", cb=on_plan)
        await subscribed(spy)
        answers = [_answer(await fleet.ask(QUESTIONS[i % 4], private=i % 2 == 0)) for i in range(8)]
        await asyncio.sleep(0.2)
    finally:
        await close(spy)
    assert all(len(a.used) == 2 for a in answers)
    assert len(plans) == 8 and set(plans.values()) == {1}  # one plan per query, whichever gate made it
    assert fleet.agents["gate"].plans_published > 0 and fleet.agents["gate-2"].plans_published > 0  # type: ignore[attr-defined]
    assert not fleet.agents["rx"].rejected  # no second plan to refuse, no stray offers
    assert not fleet.agents["gate"].rejected and not fleet.agents["gate-2"].rejected


async def test_a_killed_gate_is_left_out_and_used_again_when_it_comes_back(fleet: Fleet) -> None:
    await _two_of_each(fleet)
    await fleet.crash("gate")
    killed = time.monotonic()
    t_whole = None
    answers = []
    while time.monotonic() - killed < 6:
        a = _answer(await fleet.ask(QUESTIONS[1], deadline_s=2.0))
        answers.append(a)
        assert a.latency_s <= 2.0
        if len(a.used) == 2 and t_whole is None:
            t_whole = time.monotonic() - killed
        if len(a.used) == 2 and len(answers) > 3:
            break
    assert t_whole is not None and t_whole < 5.0  # the heartbeats expired (3 x 0.5 s): only gate-2 is asked
    assert all(len(a.used) == 2 or any("gate down" in n for n in a.notes) for a in answers)
    back = time.monotonic()
    await fleet.gate("gate")  # back, same identity: no one restarts
    await fleet.wait_roster("rx", "gate", {"gate"}, since=back)  # its first heartbeat (one interval after start)
    for q in QUESTIONS:
        assert len(_answer(await fleet.ask(q)).used) == 2
    assert fleet.agents["gate"].plans_published > 0  # type: ignore[attr-defined]


async def test_with_every_gate_gone_the_receiver_answers_alone_by_its_deadline_and_says_why(fleet: Fleet) -> None:
    await _two_of_each(fleet)
    await fleet.crash("gate")
    await fleet.stop("gate-2")
    await asyncio.sleep(1.6)  # the killed one's heartbeats expire
    a = _answer(await fleet.ask(QUESTIONS[2], deadline_s=2.0))
    assert a.used == () and a.latency_s <= 2.0
    assert any("no plan from the gate" in n and "no gate is heartbeating" in n for n in a.notes), a.notes


async def test_a_private_question_is_never_sent_unrephrased_whoever_dies(fleet: Fleet) -> None:
    await _two_of_each(fleet)
    sent: list[str] = []
    spy = await fleet.connect(name="pytest-spy")
    try:

        async def on_query(msg) -> None:
            query = decode_message(msg.data)
            assert isinstance(query, Query)
            sent.append(query.text)

        await spy.subscribe(f"{fleet.prefix}.query.*", cb=on_query)
        await subscribed(spy)
        question = QUESTIONS[0]
        one = _answer(await fleet.ask(question, private=True))
        await fleet.crash("reph")
        two = [_answer(await fleet.ask(question, private=True, deadline_s=2.0)) for _ in range(3)]
        await fleet.crash("reph-2")
        await fleet.crash("gate")
        three = _answer(await fleet.ask(question, private=True, deadline_s=2.0))
        await asyncio.sleep(0.2)
    finally:
        await close(spy)
    assert not any("rephraser unavailable" in n for a in (one, *two) for n in a.notes)  # the other one served
    assert any("rephraser unavailable" in n for n in three.notes)  # rules only, still rephrased
    assert len(sent) == 5
    for text in sent:
        assert not any(detail in text for detail in question.pii), text
