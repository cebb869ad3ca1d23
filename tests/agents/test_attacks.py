"""The attack matrix on a real server: no credentials, a stolen transmitter's, a gate's and a user's try everything
the issue found working (and more) while legitimate questions run; every attempt fails and no answer changes."""

from __future__ import annotations

import logging

import pytest

from ops.ask import Item
from ops.redteam.attacks import Matrix, Target, attacker_identities
from ops.redteam.attempts import ATTEMPTS
from tests.agents.conftest import QUESTIONS, Fleet


def target_of(fleet: Fleet, deadline_s: float = 5.0) -> Target:
    """The fleet as the matrix sees it (its attackers' identities issued)."""
    for role, agent_id, serves in attacker_identities():
        fleet.security(agent_id, role, serves)
    items = [Item(q.stem, q.options, private=bool(q.pii), answer=q.answer, id=q.id) for q in QUESTIONS]
    secrets = [s for q in QUESTIONS if q.pii for s in (q.stem, *q.pii)]
    return Target(
        url=fleet.url,
        store=fleet.store,
        items=items,
        secrets=secrets,
        receiver_id="rx",
        gate_id="gate",
        transmitters=("t1", "t2"),
        deadline_s=deadline_s,
    )


@pytest.mark.slow
async def test_every_attempt_of_the_matrix_fails_and_no_legitimate_answer_changes(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.standard()
    caplog.set_level(logging.INFO, logger="ops.redteam.attacks")
    async with Matrix(target_of(fleet)) as matrix:
        await matrix.run(ATTEMPTS)
    report = matrix.report()
    blocked = {f"{r['attacker']}/{r['attempt']}": r["blocked"] for r in report["rows"]}
    succeeded = {k: v for k, v in report["details"].items() if not blocked[k]}
    assert not succeeded, succeeded
    assert report["attempts"] >= 15 and report["blocked"] == report["attempts"]
    assert report["legit_queries"] == report["legit_answered"] == len(ATTEMPTS) * len(QUESTIONS)
    assert report["legit_changed"] == 0
    assert {r["attacker"] for r in report["rows"]} == {"none", "transmitter", "gate", "client"}
    for agent in fleet.agents.values():  # every agent still serves, and said no to what reached it
        assert not agent.draining
    assert sum(fleet.agents["rx"].rejected.values()) > 0 and sum(fleet.agents["gate"].rejected.values()) > 0
