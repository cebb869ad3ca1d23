"""A transmitter killed mid-stream, and the server restarted mid-run: answers still come, by the deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from agents.launch import AgentSpec, Federation
from bus.connect import close, subscribed
from bus.schemas import Answer
from fusion.fuser import FuserConfig, PairFuser
from fusion.models import LanguageModel, ModelSpec
from fusion.registry import FuserRegistry
from privacy.credentials import CredentialStore
from tests.agents.conftest import QUESTIONS, Fleet, TinyWorld, fleet_store


async def test_a_transmitter_killed_mid_stream_is_dropped_and_the_answer_arrives(fleet: Fleet, tmp_path: Path) -> None:
    # A wider model whose every KV tensor is larger than a layer pack (16 KiB each, bus.frames) and the shaper's
    # burst: K and V go as chunk frames, at 0.00625 MB/s the first leaves after ~1.5 s, and no layer (K and V) can
    # be complete when the process is killed on it.
    world = fleet.world
    wide = LanguageModel.build("llama", ModelSpec(256, 2, 8, 8, 32, 512), seed=5, name="wide")
    wide.save(tmp_path / "wide")
    registry = FuserRegistry(tmp_path / "fusers")
    for model in (wide, world.models["tiny-qwen2"]):
        fuser = PairFuser(FuserConfig.for_models(world.receiver, model, hidden=8))
        registry.save(fuser, model.fingerprint, world.receiver.fingerprint)
    await fleet.receiver(fusers=tmp_path / "fusers")
    await fleet.rephraser()
    await fleet.gate(policy="keep-all")  # plan the whole slow stream, so it is cut mid-way
    await fleet.transmitter("t2", "tiny-qwen2")
    args = ("--model", str(tmp_path / "wide"), "--link-mbps", "0.00625", "--heartbeat-s", "0.5")
    slow = AgentSpec("transmitter", "t-slow", args)
    fleet.security("t-slow", "transmitter")
    fleet.security("monitor", "monitor")
    fed = Federation(fleet.url, [slow], prefix=fleet.prefix, store=fleet.store).start()
    try:
        await fed.wait_ready(timeout=120)
        await fleet.wait_roster("gate", "transmitter", {"t2", "t-slow"})
        spy = await fleet.connect(name="spy")
        first_chunk = asyncio.Event()

        async def on_chunk(msg) -> None:
            if not first_chunk.is_set():
                first_chunk.set()
                fed.kill("t-slow")  # SIGKILL: no goodbye, half a stream on the wire

        await spy.subscribe(f"{fleet.prefix}.kv.rx.*.t-slow", cb=on_chunk)
        await subscribed(spy)
        deadline = 4.0
        t0 = time.monotonic()
        a = await fleet.ask(QUESTIONS[1], deadline_s=deadline)
        elapsed = time.monotonic() - t0
        await close(spy)
    finally:
        fed.stop(grace=5)
    assert first_chunk.is_set() and not fed.procs["t-slow"].alive
    assert isinstance(a, Answer)
    assert [u.transmitter_id for u in a.used] == ["t2"]
    assert [(o.transmitter_id, o.reason in ("left", "late")) for o in a.omitted] == [("t-slow", True)]
    assert a.latency_s <= deadline and elapsed < deadline + 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_agents_reconnect_after_the_server_restarts(
    tiny: TinyWorld, tmp_path: Path, pki: CredentialStore
) -> None:
    port = _free_port()
    fleet = Fleet(tiny, fleet_store(tmp_path / "creds", pki))
    server = fleet.start_server(port)
    try:
        await fleet.standard()
        before = await fleet.ask(QUESTIONS[1])
        assert isinstance(before, Answer) and len(before.used) == 2
        server.stop()
        await asyncio.sleep(1.0)
        # at once, although its old connections linger in TIME_WAIT; the same identities and certificate
        server = fleet.start_server(port)
        restarted = time.monotonic()
        end = restarted + 20
        while not all(a.pub.is_connected and a.sub.is_connected for a in fleet.agents.values()):  # type: ignore[union-attr]
            assert time.monotonic() < end, "agents did not reconnect"
            await asyncio.sleep(0.05)
        # a heartbeat after the restart: one from before may still be in the roster, about to expire
        await fleet.wait_roster("gate", "transmitter", {"t1", "t2"}, timeout=20, since=restarted)
        await fleet.wait_roster("gate", "receiver", {"rx"}, timeout=20, since=restarted)
        after = await fleet.ask(QUESTIONS[1])
        assert isinstance(after, Answer) and len(after.used) == 2
    finally:
        await fleet.close()
        server.stop()
