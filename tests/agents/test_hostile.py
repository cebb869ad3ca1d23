"""Malformed and hostile messages on every subject, each published by an identity the server lets publish there:
each is rejected with a logged warning, every agent serves on."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import torch

from bus.codec import encode_layer_frames
from bus.connect import close, subscribed
from bus.schemas import Answer, ErrorReply, Plan, Query, decode_message
from tests.agents.conftest import QUESTIONS, Fleet

OK_QUERY = {"query_id": "q0", "receiver_id": "rx", "text": "hi?", "options": ["a", "b", "c", "d"]}


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()


async def test_garbage_on_every_subject_is_rejected_and_everyone_keeps_serving(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.standard()
    caplog.set_level(logging.WARNING)
    s = fleet.subjects
    asker, rx, t1, gate = [await fleet.connect(i, name=f"hostile-{i}") for i in ("client", "rx", "t1", "gate")]
    nc = asker
    future = time.time() + 30
    try:
        # fr.ask: bad JSON, other schema version, injected id, three options, oversized -> error replies
        for payload in (
            b"{not json",
            _json({"schema_version": 1, "kind": "ask", "question": "x?", "options": ["a", "b", "c", "d"]}),
            _json({"question": "x?", "options": ["a", "b", "c", "d"], "ask_id": "a.>"}),
            _json({"question": "x?", "options": ["a", "b", "c"]}),
            _json({"question": "x" * 300_000, "options": ["a", "b", "c", "d"]}),
            _json({"question": "x?", "options": ["a", "b", "c", "d"], "deadline_s": 3600}),  # an hour of memory
        ):
            reply = await nc.request(s.ask(), payload, timeout=5)
            err = decode_message(reply.data)
            assert isinstance(err, ErrorReply) and err.code in ("bad_request", "limit")
        # fr.rephrase.<rx>: not an ask, or an ask without the query id (only rx may ask here)
        reply = await rx.request(s.rephrase("rx"), b"[1, 2]", timeout=5)
        assert decode_message(reply.data).kind == "error"
        reply = await rx.request(
            s.rephrase("rx"), _json({"question": "x?", "options": ["a", "b", "c", "d"]}), timeout=5
        )
        assert decode_message(reply.data).kind == "error"
        # fr.query.<rx>: transmitters and the gate
        for payload in (
            b"\xff\xfe",
            _json({**OK_QUERY, "deadline_unix": future, "query_id": "x.*"}),
            _json({**OK_QUERY, "deadline_unix": future, "schema_version": 9}),
            _json({**OK_QUERY, "deadline_unix": 1.0}),
            _json(
                {**OK_QUERY, "deadline_unix": future, "receiver_id": "rx", "text": "hi", "options": ["", "", "", ""]}
            ),
            _json({**OK_QUERY, "deadline_unix": time.time() + 3600}),  # holds a transmitter's memory for an hour
            _json({**OK_QUERY, "deadline_unix": future, "receiver_id": "t2"}),  # another receiver's id
        ):
            await rx.publish(s.query("rx"), payload)
        # fr.offer.<qid>.<t1>: gate and receiver
        await t1.publish(s.offer("q1", "t1"), b"null")
        await t1.publish(
            s.offer("q1", "t1"),
            _json(
                {
                    "kind": "offer",
                    "query_id": "q2",
                    "transmitter_id": "t",
                    "model_fingerprint": "ab",
                    "n_tokens": 2,
                    "n_layers": 1,
                    "kv_heads": 1,
                    "head_dim": 1,
                    "confidence": 0.5,
                    "offsets": [[0, 1]],
                }
            ),
        )
        # fr.plan.<qid>.<gate>: transmitters and receiver
        await gate.publish(s.plan("q1", "gate"), b"{}")
        await gate.publish(
            s.plan("q1", "gate"),
            _json(
                {
                    "query_id": "q1",
                    "receiver_id": "rx",
                    "deadline_unix": future,
                    "entries": [
                        {"transmitter_id": "t1", "layers": [0, 0], "precision": "fp16", "weight": 1, "byte_budget": 1}
                    ],
                }
            ),
        )
        # fr.presence.transmitter.t1: not a heartbeat, a goodbye for another agent, a phantom that says "wait for me"
        await t1.publish(s.presence("transmitter", "t1"), b"[]")
        await t1.publish(
            s.presence("transmitter", "t1"), _json({"kind": "goodbye", "role": "transmitter", "agent_id": "t2"})
        )
        phantom = {"kind": "presence", "role": "transmitter", "agent_id": "t1", "sent_unix": time.time()}
        await t1.publish(s.presence("transmitter", "t1"), _json({**phantom, "interval_s": 1e6}))
        # fr.kv.<rx>.<qid>.<t1>: garbage, and a well-formed frame for a query the receiver never opened
        await t1.publish(s.kv("rx", "q1", "t1"), b"FRKV\x00\x00\x00\x05hello")
        k = torch.randn(1, 2, 3, 4)
        for frame in encode_layer_frames(
            0,
            k,
            k,
            precision="fp16",
            query_id="q1",
            sender="t1",
            layers_total=1,
            max_payload=1 << 20,
            compress=True,
            chunk_bytes=None,
        ):
            await t1.publish(s.kv("rx", "q1", "t1"), frame)
        for conn in (asker, rx, t1, gate):
            await conn.flush()
        await asyncio.sleep(0.5)
    finally:
        for conn in (asker, rx, t1, gate):
            await close(conn)
    rejected = {aid: dict(agent.rejected) for aid, agent in fleet.agents.items()}
    assert {"ask", "kv", "presence"} <= set(rejected["rx"]), rejected  # offers/plans of unknown queries: ignored
    assert {"query", "offer", "presence"} <= set(rejected["gate"]), rejected
    assert {"query"} <= set(rejected["t1"]), rejected  # plans for queries it did not offer on: ignored unread
    assert {"rephrase"} <= set(rejected["reph"]), rejected
    warned = {
        r.getMessage().split(" rejected")[0] for r in caplog.records if " rejected a message on " in r.getMessage()
    }
    assert {"receiver rx", "gate gate", "transmitter t1", "transmitter t2", "rephraser reph"} <= warned
    assert fleet.agents["gate"].roster.is_live("transmitter", "t2")  # the spoofed goodbye changed nothing
    a = await fleet.ask(QUESTIONS[0], private=True)
    assert isinstance(a, Answer) and [u.transmitter_id for u in a.used] == ["t1", "t2"]


async def test_chunks_from_a_sender_not_in_the_plan_are_rejected(fleet: Fleet) -> None:
    await fleet.receiver()
    await fleet.rephraser()
    await fleet.gate()
    await fleet.transmitter("t1", "tiny-llama", link_mbps=0.4)  # slow: the query stays open while we attack
    await fleet.wait_roster("gate", "transmitter", {"t1"})
    s = fleet.subjects
    nc = await fleet.connect("rogue", role="transmitter")  # another transmitter's stolen credentials
    gate = await fleet.connect("gate")  # and the gate's
    sent = asyncio.Event()

    async def on_plan(msg) -> None:
        plan = decode_message(msg.data)
        assert isinstance(plan, Plan)
        k = torch.randn(1, 2, 30, 16)
        for frame in encode_layer_frames(
            0,
            k,
            k,
            precision="fp16",
            query_id=plan.query_id,
            sender="rogue",
            layers_total=1,
            max_payload=1 << 20,
            compress=True,
            chunk_bytes=None,
        ):
            await nc.publish(s.kv("rx", plan.query_id, "rogue"), frame)
        await gate.publish(msg.subject, msg.data)  # a second plan for the open query
        await nc.publish(s.offer(plan.query_id, "rogue"), b'{"kind": "offer"}')
        await nc.flush()
        await gate.flush()
        sent.set()

    await nc.subscribe(s.plans_all(), cb=on_plan)
    await subscribed(nc)
    try:
        a = await fleet.ask(QUESTIONS[1], deadline_s=8.0)
    finally:
        await close(nc)
        await close(gate)
    assert sent.is_set()
    assert isinstance(a, Answer) and [u.transmitter_id for u in a.used] == ["t1"]
    rejected = fleet.agents["rx"].rejected
    assert rejected["kv"] >= 1 and rejected["plan"] >= 1 and rejected["offer"] >= 1, rejected


async def test_queries_that_collide_or_are_late_do_not_disturb_the_next(fleet: Fleet) -> None:
    await fleet.standard()
    nc = await fleet.connect("rx", name="replayer")
    try:
        late = Query(query_id="old", receiver_id="rx", text="x?", options=("a", "b", "c", "d"), deadline_unix=1.0)
        await nc.publish(fleet.subjects.query("rx"), late.to_bytes())
        await nc.flush()
    finally:
        await close(nc)
    a = await fleet.ask(QUESTIONS[3])
    assert isinstance(a, Answer) and len(a.used) == 2


async def test_a_corrupt_cache_inside_an_offer_leaves_that_transmitter_out_and_the_rest_is_answered(
    fleet: Fleet, monkeypatch
) -> None:
    """An inline tail whose bytes fail its digest: one warning, that transmitter omitted with reason error."""
    import agents.transmitter as transmitter_module

    honest = transmitter_module.prefill_with_inline

    def corrupt_for_t2(name, *args):
        pre, inline = honest(name, *args)
        if name == "t2" and inline is not None:
            inline = inline.model_copy(update={"digest": (inline.digest + 1) % (1 << 64)})
        return pre, inline

    monkeypatch.setattr(transmitter_module, "prefill_with_inline", corrupt_for_t2)
    world = fleet.world
    await fleet.receiver(fusers=world.tail_fusers_dir)
    await fleet.gate(trained=False)  # uniform weights: both transmitters are planned
    for tid, name in (("t1", "tiny-llama"), ("t2", "tiny-qwen2")):
        await fleet.transmitter(tid, name)
    await fleet.wait_roster("gate", "transmitter", {"t1", "t2"})
    a = await fleet.ask(QUESTIONS[0])
    assert isinstance(a, Answer) and [u.transmitter_id for u in a.used] == ["t1"]
    [out] = [o for o in a.omitted if o.transmitter_id == "t2"]
    assert out.reason == "error" and "digest" in out.detail
    assert fleet.agents["rx"].rejected["offer"] == 1
    assert isinstance(await fleet.ask(QUESTIONS[1]), Answer)  # and it serves on
