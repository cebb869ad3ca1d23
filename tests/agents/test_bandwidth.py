"""A transmitter on a slow shaped link: an adaptive policy meets the deadline that keep-all misses.

The transmitter runs a wide random model (4 layers, 4 kv heads x 64: ~64 KB of fp16 K+V per layer for the
question) on a 0.25 Mbit/s link (31 KB/s): its whole cache needs ~8 s, the deadline is 3 s. Keep-all plans
every layer at fp16, so the stream is still running when the receiver must answer; the adaptive policies
plan what the link estimate says fits (int4, the least important layer dropped) and it all arrives.
Margins are wide (seconds) so the test does not depend on machine speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.config import GateAgentConfig, make_config
from agents.gate import GateAgent
from bus.connect import close, connect
from bus.schemas import Answer, Plan
from fusion.fuser import FuserConfig, PairFuser
from fusion.gate import GateConfig, GateNetwork, save_gate
from fusion.models import LanguageModel, ModelSpec
from fusion.registry import FuserRegistry
from tests.agents.conftest import QUESTIONS, Fleet

LINK_MBIT = 0.25  # the transmitter's shaped uplink, Mbit/s (--link-mbps)
DEADLINE_S = 3.0
IMPORTANCE = (0.2, 1.0, 0.6, 0.4)  # the gate's per-layer profile of the wide model


async def _federation(fleet: Fleet, tmp_path: Path, policy: str) -> None:
    world = fleet.world
    wide = LanguageModel.build("llama", ModelSpec(64, 4, 4, 4, 64, 128), seed=5, name="wide")
    registry = FuserRegistry(tmp_path / "fusers")
    registry.save(PairFuser(FuserConfig.for_models(world.receiver, wide, hidden=8)), wide.fingerprint,
                  world.receiver.fingerprint)  # fmt: skip
    gate_path = save_gate(
        GateNetwork(GateConfig(hidden=8, min_weight=0.0), {wide.fingerprint: IMPORTANCE}),
        tmp_path / "gate.pt",
        world.receiver.fingerprint,
    )
    await fleet.receiver(fusers=tmp_path / "fusers")
    cfg = make_config(GateAgentConfig, fleet._base("gate", gate=str(gate_path), policy=policy), "gate")
    await fleet._start(GateAgent(cfg))
    await fleet.transmitter("t-slow", wide, link_mbps=LINK_MBIT)
    await fleet.wait_roster("gate", "transmitter", {"t-slow"})
    await fleet.wait_roster("gate", "receiver", {"rx"})


async def _ask_and_watch(fleet: Fleet) -> tuple[Answer, Plan]:
    spy = await connect(fleet.url, name="plan-spy")
    plans: list[Plan] = []

    async def keep(msg) -> None:
        plans.append(Plan.from_bytes(msg.data))

    await spy.subscribe(fleet.subjects.plans_all(), cb=keep)
    await spy.flush()
    try:
        reply = await fleet.ask(QUESTIONS[1], deadline_s=DEADLINE_S)
    finally:
        await close(spy)
    assert isinstance(reply, Answer), reply
    assert len(plans) == 1
    return reply, plans[0]


def _complete(answer: Answer, plan: Plan) -> bool:
    """Every planned layer of every planned transmitter arrived before the receiver answered."""
    used = {u.transmitter_id: set(u.layers) for u in answer.used}
    return all(set(e.layers) <= used.get(e.transmitter_id, set()) for e in plan.entries)


async def test_keep_all_misses_the_deadline_on_a_slow_link(fleet: Fleet, tmp_path: Path) -> None:
    await _federation(fleet, tmp_path, "keep-all")
    answer, plan = await _ask_and_watch(fleet)
    (entry,) = plan.entries
    assert entry.precision == "fp16" and len(entry.layers) == len(IMPORTANCE)
    assert not _complete(answer, plan)
    assert answer.latency_s <= DEADLINE_S  # the receiver still answers in time, without the late layers


@pytest.mark.parametrize("policy", ["deadline-aware", "precision-ladder"])
async def test_adaptive_policy_meets_the_deadline_keep_all_misses(fleet: Fleet, tmp_path: Path, policy: str) -> None:
    await _federation(fleet, tmp_path, policy)
    answer, plan = await _ask_and_watch(fleet)
    (entry,) = plan.entries
    assert entry.precision in ("int8", "int4")  # degraded precision to fit the link
    assert entry.layers[0] == 1  # most important layer first
    ranks = [IMPORTANCE[m] for m in entry.layers]
    assert ranks == sorted(ranks, reverse=True)
    assert _complete(answer, plan), (answer.used, answer.omitted, answer.notes)
    assert [u.transmitter_id for u in answer.used] == ["t-slow"]
    assert answer.latency_s <= DEADLINE_S
