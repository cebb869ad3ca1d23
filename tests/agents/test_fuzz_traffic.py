"""While questions flow, mutated copies of every message seen come back on the same subjects from the identities
allowed to publish there: every agent stays up, every legitimate answer is unchanged, each reject is one log line
(no traceback), memory stays bounded."""

from __future__ import annotations

import asyncio
import logging
import resource
from pathlib import Path

import pytest

from bus.schemas import Answer
from ops.redteam.attacks import fingerprint
from ops.redteam.fuzz import MUTATIONS, Fuzzer, mutate
from tests.agents.conftest import QUESTIONS, Fleet

ROUNDS = 3  # times each question is asked while the fuzzer runs
RSS_GROWTH_LIMIT_MB = 200  # the in-process fleet, its models and nats-py buffers included


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def test_every_mutation_changes_something_or_is_a_duplicate() -> None:
    import random

    r = random.Random(1)
    data = b'{"kind": "offer", "query_id": "0123456789abcdef", "n_tokens": 3}'
    for kind in MUTATIONS:
        copy = mutate(data, kind, r, ["fedcba9876543210"])
        assert (copy == data) == (kind in ("duplicate", "no_reply")), kind


@pytest.mark.slow
async def test_mutated_copies_of_live_traffic_change_no_answer(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    await fleet.standard()
    asks = [(q, bool(q.pii)) for q in QUESTIONS]
    reference = []
    for q, private in asks:
        reply = await fleet.ask(q, private=private)
        assert isinstance(reply, Answer)
        reference.append(fingerprint(reply))
    caplog.clear()
    caplog.set_level(logging.WARNING)
    rss_before = _rss_mb()
    watcher = await fleet.connect(name="fuzz-watch")
    fuzzer = await Fuzzer(fleet.url, fleet.subjects, fleet.security, asker="client", seed=7).start(watcher)
    try:
        for _ in range(ROUNDS):
            replies = await asyncio.gather(*(fleet.ask(q, private=private) for q, private in asks))
            assert [fingerprint(r) for r in replies] == reference, [getattr(r, "notes", r) for r in replies]
        await asyncio.sleep(0.5)  # the last copies land
    finally:
        await fuzzer.stop()
        await watcher.close()
    rss_growth = _rss_mb() - rss_before
    assert sum(fuzzer.sent.values()) >= 200 and set(fuzzer.sent) >= {"bitflip", "other_query", "oversized"}
    for agent in fleet.agents.values():
        assert agent.accepting(), f"{agent.id} stopped serving"
    rejected = sum(sum(a.rejected.values()) for a in fleet.agents.values())
    assert rejected >= 100
    records = [r for r in caplog.records if r.name.startswith(("agents", "bus"))]
    assert not [r for r in records if r.exc_info], "a traceback was logged"
    assert all("\n" not in r.getMessage() for r in records)
    assert rss_growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {rss_growth:.0f} MB"
