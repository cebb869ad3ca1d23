"""The pipeline over a real nats-server: answers, parity with refine(), joins, fallbacks, concurrency."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bus.connect import close, subscribed
from bus.schemas import Answer
from fusion.gate import load_gate
from fusion.prompts import LETTERS
from fusion.refine import refine
from tests.agents.conftest import QUESTIONS, Fleet
from tests.conftest import eventually


def _answer(reply) -> Answer:
    assert isinstance(reply, Answer), f"expected an answer, got {reply!r}"
    return reply


async def test_end_to_end_answer_with_provenance(fleet: Fleet) -> None:
    await fleet.standard()
    q = QUESTIONS[1]
    a = _answer(await fleet.ask(q))
    assert a.choice in set(LETTERS) and a.text == f"{a.choice}) {q.options[LETTERS.index(a.choice)]}"
    assert {u.transmitter_id for u in a.used} | {o.transmitter_id for o in a.omitted} == {"t1", "t2"}
    for use in a.used:
        assert use.layers and use.bytes > 0 and use.precision == "fp16"
    assert a.bytes_received == sum(u.bytes for u in a.used)
    assert len(a.probs) == 4 and abs(sum(a.probs) - 1) < 1e-3


@pytest.mark.parametrize("private", [False, True])
async def test_over_the_bus_equals_refine_in_process(fleet: Fleet, private: bool) -> None:
    await fleet.standard()
    world = fleet.world
    gate = load_gate(world.gate_path)
    transmitters = {"t1": world.models["tiny-llama"], "t2": world.models["tiny-qwen2"]}  # sorted by id, as the bus
    for q in QUESTIONS:
        a = _answer(await fleet.ask(q, private=private))
        ref = refine(
            q,
            world.receiver,
            transmitters,
            mode="c2c",
            fusers=world.fusers(),
            gate=gate,
            private=private,
            precision="fp16",
        )
        assert a.choice == ref.answer, q.id
        assert a.probs == pytest.approx(ref.probs, abs=1e-5), q.id
        assert {u.transmitter_id: list(u.layers) for u in a.used} == ref.used


@pytest.mark.parametrize("private", [False, True])
async def test_text_to_text_over_the_bus_equals_refine_in_process(fleet: Fleet, private: bool) -> None:
    """``--mode t2t``: every transmitter writes its hint into its offer, no gate plans, no KV travels; the answer is
    the one ``refine(mode="t2t")`` reads from the same hints, with each hint's bytes as its provenance."""
    await fleet.standard()
    world = fleet.world
    transmitters = {"t1": world.models["tiny-llama"], "t2": world.models["tiny-qwen2"]}
    for q in QUESTIONS[:2]:
        a = _answer(await fleet.ask(q, private=private, mode="t2t", deadline_s=10.0))
        ref = refine(q, world.receiver, transmitters, mode="t2t", private=private)
        assert a.choice == ref.answer, (q.id, a.notes, ref.hints)
        assert a.probs == pytest.approx(ref.probs, abs=1e-5), q.id
        sent = {n: h for n, h in ref.hints.items() if h}
        assert {u.transmitter_id: u.bytes for u in a.used} == {n: len(h.encode()) for n, h in sent.items()}
        assert all(u.precision is None and u.layers == () for u in a.used)
        assert a.bytes_received == sum(len(h.encode()) for h in sent.values())
    assert fleet.agents["gate"].count.get("skipped", 0) >= 2  # the gate plans no text-to-text query


@pytest.mark.parametrize("inline", [True, False], ids=["inside-offers", "streamed"])
async def test_window_one_fusers_get_only_the_final_token_over_the_bus_and_match_refine(
    fleet: Fleet, inline: bool
) -> None:
    """A one-token tail rides inside the offer (no stream after the plan); streamed instead, the same answer."""
    world = fleet.world
    await fleet.receiver(fusers=world.tail_fusers_dir)
    await fleet.rephraser()
    await fleet.gate()
    senders = [
        await fleet.transmitter(tid, name, inline_kv_bytes=8192 if inline else 0)
        for tid, name in (("t1", "tiny-llama"), ("t2", "tiny-qwen2"))
    ]
    await fleet.wait_roster("gate", "transmitter", {"t1", "t2"})
    await fleet.wait_roster("gate", "receiver", {"rx"})
    transmitters = {"t1": world.models["tiny-llama"], "t2": world.models["tiny-qwen2"]}
    gate = load_gate(world.gate_path)
    for q in QUESTIONS[:2]:
        a = _answer(await fleet.ask(q))
        ref = refine(q, world.receiver, transmitters, mode="c2c", fusers=world.fusers(world.tail_fusers_dir), gate=gate)
        assert a.choice == ref.answer and a.probs == pytest.approx(ref.probs, abs=1e-5), q.id
        assert a.used and ref.tokens_sent == len(ref.used)  # one token per layer and transmitter in process ...
        assert all(0 < u.bytes < 3_000 for u in a.used)  # ... and over the bus: a few hundred bytes of K/V per layer
    if inline:
        assert all(t.sent["inline"] == 2 and t.sent["streams"] == 0 for t in senders)
    else:
        assert all(t.sent["inline"] == 0 for t in senders) and sum(t.sent["streams"] for t in senders) >= 2


async def test_a_slow_link_keeps_its_cache_out_of_the_offer(fleet: Fleet) -> None:
    """Inline only when the link carries the tail in --inline-kv-ms: at 1 kB/s even 100 bytes would take 100 ms."""
    fast = await fleet.transmitter("t1", "tiny-llama")
    slow = await fleet.transmitter("t2", "tiny-qwen2", link_mbps=0.001)
    assert fast.inline_budget() == 8192 and slow.inline_budget() == 1  # 1000 B/s x 2 ms, 3/4 of it before base64


async def test_the_gate_plans_tails_from_the_query_before_it_hears_the_receiver(fleet: Fleet) -> None:
    """The receiver's fuser list travels in each query: a gate that never heard its heartbeat still plans tails."""
    world = fleet.world
    await fleet.receiver(fusers=world.tail_fusers_dir, heartbeat_s=60.0)  # its one heartbeat is before the gate
    gate = await fleet.gate()
    for tid, name in (("t1", "tiny-llama"), ("t2", "tiny-qwen2")):
        await fleet.transmitter(tid, name)
    await fleet.wait_roster("gate", "transmitter", {"t1", "t2"})
    a = _answer(await fleet.ask(QUESTIONS[0]))
    assert gate.roster.get("receiver", "rx") is None
    assert a.used and all(u.bytes < 3_000 for u in a.used)


async def test_a_receiver_that_knows_answers_alone_and_asks_no_one(fleet: Fleet, monkeypatch) -> None:
    """With --self-check, a question the receiver knows (its P(none) below the threshold) never leaves it."""
    import agents.receiver as receiver_module

    real = receiver_module.receiver_self_check
    monkeypatch.setattr(receiver_module, "receiver_self_check", lambda r, s, o: (real(r, s, o)[0], 0.01))
    await fleet.receiver(self_check=0.5)
    await fleet.rephraser()
    await fleet.gate()
    await fleet.transmitter("t1", "tiny-llama")
    await fleet.wait_roster("gate", "transmitter", {"t1"})
    seen: list[str] = []
    spy = await fleet.connect(name="pytest-spy")
    try:

        async def note(msg) -> None:
            seen.append(msg.subject)

        await spy.subscribe(f"{fleet.prefix}.>", cb=note)
        await subscribed(spy)
        for private in (False, True):
            a = _answer(await fleet.ask(QUESTIONS[0], private=private))
            ref = refine(QUESTIONS[0], fleet.world.receiver, {}, mode="receiver")
            assert (a.choice, a.used, a.bytes_received, a.alone) == (ref.answer, (), 0, True)
            assert a.probs == pytest.approx(ref.probs, abs=1e-5)
            assert any("answered alone: the receiver knows this" in n for n in a.notes)
        await asyncio.sleep(0.2)
    finally:
        await close(spy)
    kinds = {s.split(".")[1] for s in seen}
    assert not kinds & {"query", "rephrase", "offer", "plan", "kv"}, kinds  # nothing about the question left


async def test_no_transmitter_at_all_the_receiver_answers_alone_and_says_so(fleet: Fleet) -> None:
    await fleet.standard(transmitters={})
    a = _answer(await fleet.ask(QUESTIONS[1]))
    assert a.used == () and a.omitted == ()
    assert any("no live transmitter" in n for n in a.notes)


async def test_gate_down_receiver_falls_back_within_the_deadline(fleet: Fleet) -> None:
    await fleet.receiver()
    await fleet.rephraser()
    await fleet.transmitter("t1", "tiny-llama")
    a = _answer(await fleet.ask(QUESTIONS[0], private=True, deadline_s=2.0))
    assert a.used == ()
    assert any("no plan from the gate" in n for n in a.notes)
    assert a.latency_s <= 2.0


async def test_a_transmitter_joining_is_used_from_the_next_query(fleet: Fleet) -> None:
    await fleet.standard(transmitters={"t1": "tiny-llama"})
    first = _answer(await fleet.ask(QUESTIONS[1]))
    assert [u.transmitter_id for u in first.used] == ["t1"]
    await fleet.transmitter("t2", "tiny-qwen2")
    await fleet.wait_roster("gate", "transmitter", {"t1", "t2"})
    second = _answer(await fleet.ask(QUESTIONS[1]))
    assert [u.transmitter_id for u in second.used] == ["t1", "t2"]


async def test_a_transmitter_without_a_fuser_is_never_planned_and_the_gate_says_so_once(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.standard(transmitters={"t1": "tiny-llama"})
    await fleet.transmitter("t9", fleet.world.orphan)
    await fleet.wait_roster("gate", "transmitter", {"t1", "t9"})
    caplog.set_level(logging.WARNING, logger="agents.gate")
    for _ in range(3):
        a = _answer(await fleet.ask(QUESTIONS[2]))
        assert [u.transmitter_id for u in a.used] == ["t1"]
        assert [(o.transmitter_id, o.reason) for o in a.omitted] == [("t9", "no_fuser")]
    said = [r for r in caplog.records if r.name == "agents.gate" and "no fuser" in r.getMessage()]
    assert len(said) == 1 and "t9" in said[0].getMessage()


async def test_a_transmitter_that_leaves_is_dropped_and_queries_go_on(fleet: Fleet) -> None:
    await fleet.standard()
    await fleet.stop("t2")
    await eventually(lambda: "t2" not in fleet.agents["gate"].roster.live("transmitter"), what="t2's goodbye")
    a = _answer(await fleet.ask(QUESTIONS[1]))
    assert [u.transmitter_id for u in a.used] == ["t1"]
    assert "t2" not in fleet.agents["gate"].roster.live("transmitter")


async def test_twenty_concurrent_queries_are_all_answered(fleet: Fleet) -> None:
    await fleet.standard()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(20)]
    replies = await asyncio.gather(
        *(fleet.ask(q, private=i % 3 == 0, deadline_s=20.0) for i, q in enumerate(questions))
    )
    answers = [_answer(r) for r in replies]
    assert len({a.query_id for a in answers}) == 20
    assert all(a.used for a in answers)


async def test_a_receiver_without_fusers_says_once_that_c2c_asks_are_answered_alone(
    fleet: Fleet, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real federation built with translators only, asked in c2c mode: answered alone, and the receiver's log
    says why once (not on every ask)."""
    empty = tmp_path / "no-fusers"
    empty.mkdir()
    await fleet.receiver(fusers=empty)
    await fleet.gate(trained=False)
    await fleet.transmitter("t1", "tiny-llama")
    await fleet.wait_roster("gate", "transmitter", {"t1"})
    with caplog.at_level(logging.WARNING, logger="agents.receiver"):
        for q in QUESTIONS[:2]:
            a = _answer(await fleet.ask(q))
            assert not a.used
    said = [r.getMessage() for r in caplog.records if "no C2C fusers" in r.getMessage()]
    assert said == ["receiver rx has no C2C fusers: c2c asks are answered alone"]
