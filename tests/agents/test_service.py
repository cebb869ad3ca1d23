"""Every agent is a nats micro service with counters; trace events and log lines carry query ids and never text."""

from __future__ import annotations

import asyncio
import json
import logging

from agents import tracing
from bus.connect import close, subscribed
from bus.schemas import Answer
from bus.trace import Trace
from tests.agents.conftest import QUESTIONS, Fleet


async def _gather(nc, subject: str, wait: float = 0.5) -> list[dict]:
    """Every reply to one request within ``wait`` seconds (a $SRV request is answered by many)."""
    inbox = nc.new_inbox()
    replies: list[dict] = []

    async def on_reply(msg) -> None:
        replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=on_reply)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return replies


def _texts() -> list[str]:
    """Question stems and personal details a monitor must never see (substrings)."""
    out = []
    for q in QUESTIONS:
        out += [q.stem, *q.pii]
    return out


def _strings(value) -> set[str]:
    """Every string inside a JSON value (no option may be one of them)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) | {k} for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


OPTIONS = {o for q in QUESTIONS for o in q.options}


async def test_every_agent_answers_srv_requests_with_its_counters_and_no_text(fleet: Fleet) -> None:
    await fleet.standard()
    for i, q in enumerate(QUESTIONS):
        assert isinstance(await fleet.ask(q, private=i % 2 == 0), Answer)
    mon = await fleet.connect("mon", role="monitor", name="pytest-monitor")
    try:
        pings = await _gather(mon, "$SRV.PING")
        stats = await _gather(mon, "$SRV.STATS")
        status = json.loads((await mon.request(f"{fleet.prefix}.status.receiver.rx", b"", timeout=2)).data)
    finally:
        await close(mon)
    assert sorted(p["metadata"]["id"] for p in pings) == ["gate", "reph", "rx", "t1", "t2"]
    assert {p["name"] for p in pings} == {
        "fedrefine-receiver",
        "fedrefine-rephraser",
        "fedrefine-gate",
        "fedrefine-transmitter",
    }
    by_id = {s["metadata"]["id"]: s["endpoints"][0]["data"] for s in stats}
    rx, gate, t1 = by_id["rx"], by_id["gate"], by_id["t1"]
    assert rx["counters"]["asks"] == 4 and rx["counters"]["fused"] == 4 and rx["latency_ms"]["n"] == 4
    assert rx["bytes_in"] > 0 and rx["msgs_out"] > 0 and rx["rss_bytes"] > 0
    assert gate["counters"]["plans"] == 4 and t1["counters"]["offers"] == 4
    assert by_id["reph"]["counters"]["served"] == 2
    assert status["id"] == "rx" and status["counters"]["asks"] == 4
    dumped = json.dumps(stats) + json.dumps(status)
    assert not [t for t in _texts() if t in dumped]
    assert not (_strings(stats) | _strings(status)) & OPTIONS


async def test_trace_events_follow_each_query_and_log_lines_name_it(fleet: Fleet) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    tracing.install(handler)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    await fleet.standard()
    mon = await fleet.connect("mon", role="monitor", name="pytest-monitor")
    events: list[Trace] = []
    raw: list[bytes] = []

    async def on_trace(msg) -> None:
        raw.append(msg.data)
        events.append(Trace.from_bytes(msg.data))

    try:
        await mon.subscribe(f"{fleet.prefix}.trace.*.*", cb=on_trace)
        await subscribed(mon)
        answers = [await fleet.ask(q, private=True) for q in QUESTIONS[:2]]
        await asyncio.sleep(0.3)
    finally:
        await close(mon)
        root.removeHandler(handler)
        root.setLevel(old)
    qids = {a.query_id for a in answers if isinstance(a, Answer)}
    assert len(qids) == 2
    for qid in qids:
        kinds = [(e.role, e.event) for e in events if e.query_id == qid]
        for step in [
            ("receiver", "ask"),
            ("rephraser", "rephrase"),
            ("receiver", "query"),
            ("gate", "plan"),
            ("receiver", "plan"),
            ("receiver", "answer"),
        ]:
            assert step in kinds, (step, kinds)
        assert sum(1 for k in kinds if k == ("transmitter", "offer")) == 2
    assert not [t for t in _texts() if any(t.encode() in r for r in raw)]
    assert not set().union(*(_strings(json.loads(r)) for r in raw)) & OPTIONS
    about = [r for r in records if any(qid in r.getMessage() for qid in qids)]
    assert about, "no log line mentions a query id"
    assert all(getattr(r, "qid", None) in r.getMessage() for r in about), [
        (r.getMessage(), getattr(r, "qid", None)) for r in about if getattr(r, "qid", None) not in r.getMessage()
    ]
