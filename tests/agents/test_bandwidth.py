"""A transmitter on a slow shaped link: an adaptive policy meets the deadline that keep-all misses.

The transmitter runs a wide random model (4 layers, 4 kv heads x 64: ~64 KB of fp16 K+V per layer for the
question) on a 0.03125 MB/s link (31 KB/s): its whole cache needs ~8 s, the deadline is 3 s. Keep-all plans
every layer at fp16, so the stream is still running when the receiver must answer; the adaptive policies
plan what the link estimate says fits (int4, the least important layer dropped) and it all arrives.
Margins are wide (seconds) so the test does not depend on machine speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agents.config import GateAgentConfig, make_config
from agents.gate import GateAgent
from bus.connect import close, subscribed
from bus.schemas import Answer, Plan
from fusion.fuser import FuserConfig, PairFuser
from fusion.gate import GateConfig, GateNetwork, save_gate
from fusion.models import LanguageModel, ModelSpec
from fusion.registry import FuserRegistry
from tests.agents.conftest import QUESTIONS, Fleet

LINK_MBPS = 0.03125  # the transmitter's shaped uplink, MB/s (--link-mbps)
DEADLINE_S = 3.0
IMPORTANCE = (0.2, 1.0, 0.6, 0.4)  # the gate's per-layer profile of the wide model


async def _federation(fleet: Fleet, tmp_path: Path, gate_policy: str, **link: object) -> None:
    world = fleet.world
    wide = LanguageModel.build("llama", ModelSpec(64, 4, 4, 4, 64, 128), seed=5, name="wide")
    registry = FuserRegistry(tmp_path / "fusers")
    registry.save(PairFuser(FuserConfig.for_models(world.receiver, wide, hidden=8)), wide.fingerprint,
                  world.receiver.fingerprint)  # fmt: skip
    gate_path = save_gate(
        GateNetwork(GateConfig(hidden=8, min_weight=0.0), {wide.fingerprint: IMPORTANCE}),
        tmp_path / "gate",
        world.receiver.fingerprint,
    )
    await fleet.receiver(fusers=tmp_path / "fusers")
    cfg = make_config(GateAgentConfig, fleet._base("gate", "gate", gate=str(gate_path), policy=gate_policy), "gate")
    await fleet._start(GateAgent(cfg))
    await fleet.transmitter("t-slow", wide, **(link or {"link_mbps": LINK_MBPS}))
    await fleet.wait_roster("gate", "transmitter", {"t-slow"})
    await fleet.wait_roster("gate", "receiver", {"rx"})


async def _ask_and_watch(fleet: Fleet, deadline_s: float = DEADLINE_S) -> tuple[Answer, Plan]:
    spy = await fleet.connect(name="plan-spy")
    plans: list[Plan] = []

    async def keep(msg) -> None:
        plans.append(Plan.from_bytes(msg.data))

    await spy.subscribe(fleet.subjects.plans_all(), cb=keep)
    await subscribed(spy)
    try:
        reply = await fleet.ask(QUESTIONS[1], deadline_s=deadline_s)
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


async def test_gate_runs_a_users_policy(fleet: Fleet, tmp_path: Path) -> None:
    """docs/POLICIES.md's worked example as the gate's --policy: never fp16, everything arrives."""
    await _federation(fleet, tmp_path, "examples.policies:MeteredPhone")
    answer, plan = await _ask_and_watch(fleet)
    (entry,) = plan.entries
    assert entry.precision in ("int8", "int4")
    assert _complete(answer, plan), (answer.used, answer.omitted, answer.notes)


# ---- a link that drops mid-stream (--link-trace) --------------------------------------------------------------

DROP_AT_S = 30.0  # the trace's 1 MB/s lasts this long, then 0.06 MB/s


def _drop_trace(tmp_path: Path) -> Path:
    path = tmp_path / "drop.csv"
    path.write_text(f"time_s,rate_mbps\n0,1\n{DROP_AT_S},0.06\n90,0.06\n")
    return path


@pytest.mark.parametrize("tx_policy", ["deadline-aware", "keep-all"])
async def test_link_drop_mid_stream_is_replanned(fleet: Fleet, tmp_path: Path, tx_policy: str) -> None:
    """The gate plans every layer at fp16 on the 1 MB/s the trace gives at offer time; 10 ms into the stream the
    trace drops to 0.06 MB/s (the rest at fp16 would take ~3.2 s of the ~2.5 s left). The deadline-aware
    transmitter re-plans the remaining layers cheaper and they all arrive; a keep-all one does not adapt."""
    await _federation(fleet, tmp_path, "deadline-aware", link_trace=str(_drop_trace(tmp_path)), policy=tx_policy)
    tx = fleet.agents["t-slow"]
    assert tx.link_now() == pytest.approx(1e6)  # the estimate follows the trace
    send = tx._send

    async def drop_then_send(*args):  # the trace's clock jumps to 10 ms before its drop as the stream starts
        tx.shaper.origin = time.monotonic() - (DROP_AT_S - 0.01)
        return await send(*args)

    tx._send = drop_then_send
    answer, plan = await _ask_and_watch(fleet, deadline_s=4.0)
    (entry,) = plan.entries
    assert entry.precision == "fp16" and len(entry.layers) == len(IMPORTANCE)
    assert answer.latency_s <= 4.0
    assert tx.link_now() <= 0.06e6 + 1
    if tx_policy == "keep-all":
        assert tx.replans == 0 and not _complete(answer, plan)
        return
    assert tx.replans == 1 and tx.layers_sent.get("fp16") == 1, tx.layers_sent
    assert sum(tx.layers_sent.values()) == len(IMPORTANCE)  # cheaper, not fewer
    assert _complete(answer, plan), (answer.used, answer.omitted, answer.notes)
    # the answer says what travelled: the coarsest precision that went in, and the mix in a note
    (use,) = answer.used
    assert use.precision in ("int8", "int4") and use.precision != entry.precision
    assert any("re-planned mid-stream" in n and "1 at fp16" in n for n in answer.notes), answer.notes


async def test_a_stream_cut_short_is_fused_at_once(fleet: Fleet, tmp_path: Path) -> None:
    """After the first layer the transmitter's estimate of its link collapses to 200 B/s: the deadline-aware steer
    drops the rest and says so (a stream cut); the receiver fuses the layer it has at once instead of waiting out
    its deadline. (The link itself stays at 1 MB/s, so the test does not hang on the timing of a trace.)"""
    await _federation(fleet, tmp_path, "deadline-aware", link_mbps=1.0, policy="deadline-aware")
    tx = fleet.agents["t-slow"]
    make_steer = tx._steer

    def collapsing(plan, layers, whole=False):
        steer = make_steer(plan, layers, whole)
        steer.rate = lambda: 200.0
        return steer

    tx._steer = collapsing
    deadline_s = 8.0
    answer, plan = await _ask_and_watch(fleet, deadline_s=deadline_s)
    (entry,) = plan.entries
    (use,) = answer.used
    assert tx.replans == 1 and use.layers == (entry.layers[0],), (answer.used, answer.notes)
    assert use.sent == (entry.layers[0],)  # the answer says what the transmitter sent before it cut the stream
    assert any("cut the stream" in n for n in answer.notes), answer.notes
    assert answer.latency_s < deadline_s / 2  # not the deadline minus the reserve: the cut ended the wait


def test_trace_and_rate_are_exclusive(tmp_path: Path) -> None:
    from agents.config import TransmitterConfig
    from bus.errors import ConfigError

    base = {"model": "tiny-llama", "insecure": True}
    with pytest.raises(ConfigError, match="give one"):
        make_config(TransmitterConfig, {**base, "link_trace": str(_drop_trace(tmp_path)), "link_mbps": 1}, "t")
    (tmp_path / "bad.csv").write_text("0,1\n0,2\n")
    with pytest.raises(ConfigError, match="--link-trace: trace bad line 2"):
        make_config(TransmitterConfig, {**base, "link_trace": str(tmp_path / "bad.csv")}, "t")


# ---- the benchmark's pieces (python -m ops.bench bandwidth) ---------------------------------------------------


def test_bench_rates_parse_and_reject_nonsense() -> None:
    from bus.errors import ConfigError
    from ops.bench.bandwidth import parse_rates

    assert parse_rates("0.25, 1,unshaped") == [0.25, 1.0, None]
    assert parse_rates("") == []  # traces only (--traces)
    for bad in ("fast", "-1", "0", "nan"):
        with pytest.raises(ConfigError, match="--rates"):
            parse_rates(bad)


def test_bench_t2t_row_adds_the_link_time_and_falls_back_when_late() -> None:
    from ops.bench.bandwidth import HintRun, t2t_row

    runs = [HintRun({"a": (0.1, 1000, 10), "b": (0.2, 10, 1)}, read_s=0.05, right_with=True, right_alone=False)]
    fast = t2t_row(runs, None, deadline_s=1.0)
    assert fast["p50_ms"] == pytest.approx(250.0) and fast["accuracy"] == 1.0 and fast["deadline_met"] == 1.0
    assert fast["bytes_per_query"] == 1010 and fast["bytes_per_token"] == pytest.approx(1010 / 11, abs=0.01)
    slow = t2t_row(runs, 0.001, deadline_s=1.0)  # 1000 bytes at 1 KB/s: 1.1 s + read
    assert slow["p50_ms"] == pytest.approx(1150.0) and slow["deadline_met"] == 0.0 and slow["accuracy"] == 0.0


async def test_bench_cell_on_tiny_models(fleet: Fleet, tmp_path: Path) -> None:
    from ops.bench.bandwidth import World, run_cell
    from ops.demo import tiny_setup

    setup = tiny_setup(tmp_path, 2)
    world = fleet.world
    models = {"tiny-llama": world.models["tiny-llama"], "tiny-qwen2": world.models["tiny-qwen2"]}
    txs = {tid: models[name] for tid, name in sorted(setup.transmitters.items())}
    bench_world = World(setup, world.receiver, txs, list(setup.questions))
    row = await run_cell(bench_world, "deadline-aware", 0.008, deadline_s=DEADLINE_S, tls_from=fleet.store)
    assert row["answered"] == row["n"] == 2 and row["link_mbps"] == 0.008 == row["link"]
    assert row["deadline_met"] == 1.0 and row["precisions"]
    assert 0 < row["bytes_per_query"] <= row["planned_bytes_per_query"]
    assert sum(row["precision_mix"].values()) == pytest.approx(1.0) and row["layers_sent"] > 0


async def test_bench_cell_on_a_trace_with_a_users_policy(fleet: Fleet, tmp_path: Path) -> None:
    from ops.bench.bandwidth import World, parse_links, run_cell
    from ops.demo import tiny_setup

    setup = tiny_setup(tmp_path, 2)
    world = fleet.world
    txs = {tid: world.models[name] for tid, name in sorted(setup.transmitters.items())}
    bench_world = World(setup, world.receiver, txs, list(setup.questions))
    (link,) = parse_links("", "lte-congested.mahi")
    row = await run_cell(
        bench_world, "examples.policies:MeteredPhone", link, deadline_s=DEADLINE_S, tls_from=fleet.store
    )
    assert row["link"] == row["trace"] == "lte-congested" and row["link_mbps"] is None
    assert row["policy"] == "metered-phone" and row["answered"] == 2
    assert set(row["precision_mix"]) <= {"int8", "int4"}  # the example never sends fp16


def test_bench_links_and_policies_parse() -> None:
    from bus.errors import ConfigError, PolicyError
    from ops.bench.bandwidth import parse_links, parse_policies

    links = parse_links("0.25,unshaped", "wifi-walkout")
    assert [link.label for link in links] == [0.25, "unshaped", "wifi-walkout"]
    assert links[2].transmitter_flags()["link_trace"].endswith("wifi-walkout.csv")
    assert parse_policies("keep,examples.policies:MeteredPhone") == [
        ("keep", "keep-all"),
        ("examples.policies:MeteredPhone", "metered-phone"),
    ]
    with pytest.raises(ConfigError, match="no trace file"):
        parse_links("", "nowhere.csv")
    with pytest.raises(ConfigError, match="at least one link"):
        parse_links("", "")
    with pytest.raises(PolicyError, match="has no Nope"):
        parse_policies("keep-all,examples.policies:Nope")
