"""Agents on tiny random models: a session-wide fuser registry and gate, and a ``fleet`` of in-process agents.

Each test's fleet has its own secure nats-server (authorization from its own credential store, TLS with the
session's certificate; ~40 ms to start) and subject prefix. Every agent connects with its own identity, issued on
first use (the server reloads its authorization then); the asker is the ``client`` identity, and
``fleet.connect()`` gives a test harness connection as the ``admin`` identity ``harness``. Agents run as asyncio
tasks in the test's event loop (fast); tests that must kill a process use ``agents.launch`` instead.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from nats.aio.client import Client

from agents.base import Agent
from agents.config import GateAgentConfig, ReceiverConfig, RephraserConfig, TransmitterConfig, make_config
from agents.gate import GateAgent
from agents.receiver import ReceiverAgent
from agents.rephraser import RephraserAgent
from agents.transmitter import TransmitterAgent
from bus.auth import ClientSecurity
from bus.connect import abort, close, connect
from bus.schemas import Answer, ErrorReply
from bus.server import NatsServer
from bus.subjects import Subjects
from bus.topology import Topology
from fusion.fuser import FuserConfig, PairFuser
from fusion.gate import GateConfig, GateNetwork, save_gate
from fusion.models import LanguageModel, ModelSpec
from fusion.prompts import Question
from fusion.registry import FuserRegistry
from ops.ask import Item, ReconnectWatch, ask_once
from privacy.credentials import CredentialStore
from tests.conftest import HARNESS_ID, secure_store

STOP_LIMIT_S = 30.0  # an agent's stop is bounded by its drain (3 s) and close timeouts; far more is a hang

QUESTIONS = [
    Question(
        id="q1",
        stem="Hi, I'm Mara Velt (account ACC-123456). What is the color of Zorbin?",
        options=("red", "blue", "green", "pink"),
        answer=2,
        pii=("Mara Velt", "ACC-123456"),
    ),
    Question(id="q2", stem="Which pet does Kalu have?", options=("cat", "dog", "owl", "fox"), answer=0),
    Question(id="q3", stem="Where does Brenna Tol live?", options=("Oslo", "Lima", "Pune", "Kyiv"), answer=3),
    Question(
        id="q4",
        stem="My email is tova.lind@example.com. What does Quorr eat?",
        options=("fish", "rice", "kelp", "figs"),
        answer=1,
        pii=("tova.lind@example.com",),
    ),
]


@dataclass
class TinyWorld:
    """Tiny random models, a fuser registry for two transmitter models, a gate, and one model without a fuser."""

    receiver: LanguageModel
    models: dict[str, LanguageModel]  # model name -> model (transmitters)
    fusers_dir: Path
    gate_path: Path
    orphan: LanguageModel  # a transmitter model no fuser exists for
    tail_fusers_dir: Path  # the same pairs with window-1 fusers (they read only the transmitter's final token)

    def fusers(self, root: Path | None = None) -> dict[str, PairFuser]:
        """Fingerprint -> fuser, loaded from the registry (what refine() in process gets)."""
        reg = FuserRegistry(root or self.fusers_dir)
        return {m.fingerprint: reg.load(m.fingerprint, self.receiver.fingerprint) for m in self.models.values()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    """Built once per session (well under a second)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-zoo")
    receiver = LanguageModel.load("tiny-qwen3")
    models = {name: LanguageModel.load(name) for name in ("tiny-llama", "tiny-qwen2")}
    for folder, window in (("fusers", None), ("tail-fusers", 1)):
        registry = FuserRegistry(root / folder)
        for i, model in enumerate(models.values()):
            torch.manual_seed(i)
            cfg = FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.5, window=window)
            registry.save(PairFuser(cfg).eval(), model.fingerprint, receiver.fingerprint)
    registry = FuserRegistry(root / "fusers")
    torch.manual_seed(7)
    profiles = {m.fingerprint: [1.0] * m.num_layers for m in models.values()}
    gate_path = save_gate(
        GateNetwork(GateConfig(hidden=8), profiles), registry.gate_path(receiver.fingerprint), receiver.fingerprint
    )
    orphan = LanguageModel.build("qwen3", ModelSpec(48, 2, 4, 2, 12, 96), seed=11, name="tiny-orphan")
    return TinyWorld(receiver, models, root / "fusers", gate_path, orphan, root / "tail-fusers")


STANDARD_IDENTITIES = (
    ("client", "client", None),
    ("admin", HARNESS_ID, None),
    ("receiver", "rx", None),
    ("rephraser", "reph", "rx"),
    ("gate", "gate", None),
    ("transmitter", "t1", None),
    ("transmitter", "t2", None),
)


@dataclass
class Fleet:
    """In-process agents of one test on its own secure server, under their own prefix; ``close()`` stops them all."""

    world: TinyWorld
    store: CredentialStore
    server: NatsServer | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    client: Client | None = None
    watch: ReconnectWatch | None = None
    _asker: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def prefix(self) -> str:
        """The test's subject prefix (its identities' permissions are for it)."""
        return self.store.prefix

    @property
    def url(self) -> str:
        """The fleet's server."""
        assert self.server is not None, "the fleet's server is not running"
        return self.server.url

    @property
    def subjects(self) -> Subjects:
        """The test's subjects."""
        return Subjects(self.prefix)

    def start_server(self, port: int | None = None) -> NatsServer:
        """Start (or restart) the fleet's server with its store's authorization and TLS."""
        self.server = self.store.server(port).start()
        return self.server

    def security(self, agent_id: str, role: str | None = None, serves: str | None = None) -> ClientSecurity:
        """How identity ``agent_id`` connects; with ``role`` it is issued first if new (the server reloads)."""
        if role is not None and (self.store.get(agent_id) is None or self.store.get(agent_id).revoked):  # type: ignore[union-attr]
            self.store.issue(role, agent_id, serves)
            if self.server is not None and self.server.running:
                self.server.reload(self.store.authorization())
        return self.store.client_security(agent_id)

    async def connect(self, agent_id: str = HARNESS_ID, role: str | None = None, name: str | None = None) -> Client:
        """A connection as one identity (default: the harness's admin identity, which may do anything)."""
        return await connect(self.url, name=name or agent_id, security=self.security(agent_id, role))

    def _base(self, agent_id: str, role: str, serves: str | None = None, **extra: Any) -> dict[str, Any]:
        security = self.security(agent_id, role, serves)
        return {
            "nats": self.url,
            "id": agent_id,
            "prefix": self.prefix,
            "heartbeat_s": 0.5,
            "drain_s": 3.0,
            "creds": str(security.creds),
            "tls_ca": str(security.tls_ca),
            **extra,
        }

    async def _start(self, agent: Agent) -> Agent:
        await agent.start()
        self.agents[agent.id] = agent
        return agent

    async def receiver(self, agent_id: str = "rx", fusers: Path | None = None, **extra: Any) -> ReceiverAgent:
        """Start the receiver (tiny-qwen3, the session's fusers unless ``fusers`` names another registry)."""
        fusers_dir = str(fusers or self.world.fusers_dir)
        extra.setdefault("gates", "gate")
        cfg = make_config(
            ReceiverConfig, self._base(agent_id, "receiver", model="tiny-qwen3", fusers=fusers_dir, **extra), "receiver"
        )
        return await self._start(ReceiverAgent(cfg, model=self.world.receiver))  # type: ignore[return-value]

    async def rephraser(self, agent_id: str = "reph", receiver_id: str = "rx") -> RephraserAgent:
        """Start the rephraser for ``receiver_id`` (the receiver's model)."""
        cfg = make_config(
            RephraserConfig,
            self._base(agent_id, "rephraser", receiver_id, model="tiny-qwen3", receiver_id=receiver_id),
            "rephraser",
        )
        return await self._start(RephraserAgent(cfg, model=self.world.receiver))  # type: ignore[return-value]

    async def gate(self, agent_id: str = "gate", trained: bool = True, **extra: Any) -> GateAgent:
        """Start the gate (the session's random gating network unless ``trained=False``)."""
        gate = str(self.world.gate_path) if trained else None
        cfg = make_config(GateAgentConfig, self._base(agent_id, "gate", gate=gate, **extra), "gate")
        return await self._start(GateAgent(cfg))  # type: ignore[return-value]

    async def transmitter(self, agent_id: str, model: str | LanguageModel, **extra: Any) -> TransmitterAgent:
        """Start a transmitter with one of the session's models (by name) or any model."""
        lm = model if isinstance(model, LanguageModel) else self.world.models[model]
        cfg = make_config(TransmitterConfig, self._base(agent_id, "transmitter", model=lm.name, **extra), "transmitter")
        return await self._start(TransmitterAgent(cfg, model=lm))  # type: ignore[return-value]

    async def standard(self, transmitters: dict[str, str] | None = None) -> None:
        """Receiver, rephraser, gate, transmitters (default t1 = tiny-llama, t2 = tiny-qwen2); wait for the roster."""
        transmitters = {"t1": "tiny-llama", "t2": "tiny-qwen2"} if transmitters is None else transmitters
        await self.receiver()
        await self.rephraser()
        await self.gate()
        for tid, name in transmitters.items():
            await self.transmitter(tid, name)
        await self.wait_roster("gate", "transmitter", set(transmitters))
        await self.wait_roster("gate", "receiver", {"rx"})

    async def wait_roster(
        self, observer: str, role: str, ids: set[str], timeout: float = 10.0, since: float = 0.0
    ) -> None:
        """Until agent ``observer`` sees at least ``ids`` of ``role`` live (heartbeating after monotonic ``since``)."""
        agent = self.agents[observer]
        end = time.monotonic() + timeout

        def fresh() -> set[str]:
            return {aid for aid, m in agent.roster.live(role).items() if m.last_seen >= since}

        while not ids <= fresh():
            assert time.monotonic() < end, f"{observer} never saw {role}s {ids - fresh()}"
            await asyncio.sleep(0.05)

    async def ask(
        self,
        question: Question,
        *,
        private: bool = False,
        deadline_s: float = 5.0,
        resilient: bool = False,
        mode: str = "c2c",
    ) -> Answer | ErrorReply:
        """Push one question and return the reply (``resilient``: asked again across a failover, ops.ask)."""
        async with self._asker:  # one connection, however many ask at once
            if self.client is None:
                self.watch = ReconnectWatch()
                security = self.security("client")
                self.client = await connect(
                    self.url,
                    name="pytest-asker",
                    security=security,
                    reconnect_wait=0.1,
                    reconnected_cb=self.watch.on_reconnect,
                )
        item = Item(question.stem, question.options, private, question.answer, question.id, mode)
        return await ask_once(self.client, self.subjects, item, deadline_s, self.watch if resilient else None)

    async def stop(self, agent_id: str) -> None:
        """Stop one agent cleanly (it says goodbye)."""
        await self.agents.pop(agent_id).stop()

    async def crash(self, agent_id: str) -> Agent:
        """Kill one agent as SIGKILL would: its sockets cut, no goodbye, nothing more from it (in process, fast)."""
        agent = self.agents.pop(agent_id)
        await crash(agent)
        return agent

    async def close(self) -> None:
        """Stop every agent and the client; an agent that does not stop fails the test with every task's stack."""
        for agent_id in list(self.agents)[::-1]:
            stopping = asyncio.create_task(self.agents.pop(agent_id).stop())
            done, _ = await asyncio.wait({stopping}, timeout=STOP_LIMIT_S)
            if not done:
                stacks = io.StringIO()
                for task in asyncio.all_tasks():
                    task.print_stack(file=stacks)
                pytest.fail(f"agent {agent_id} did not stop within {STOP_LIMIT_S} s; tasks:\n{stacks.getvalue()}")
            stopping.result()
        if self.client is not None:
            await close(self.client)


@dataclass
class ClusterFleet(Fleet):
    """A fleet on a 3-member cluster: agents connect to the member list (n1 first) unless told otherwise; each
    transmitter of ``leaves`` has a leaf node of its own (``leaf_url(tid)``), linked to n2 or n3 first."""

    topology: Topology | None = None

    @property
    def url(self) -> str:
        """Every member, n1 first."""
        assert self.topology is not None
        return self.topology.url_list(0)

    def leaf_url(self, transmitter_id: str) -> str:
        """The leaf node of that transmitter's device."""
        assert self.topology is not None
        return self.topology.leaf_url(f"leaf-{transmitter_id}")

    def security(self, agent_id: str, role: str | None = None, serves: str | None = None) -> ClientSecurity:
        """As :meth:`Fleet.security`; a new identity reloads every running server."""
        if role is not None and (self.store.get(agent_id) is None or self.store.get(agent_id).revoked):  # type: ignore[union-attr]
            self.store.issue(role, agent_id, serves)
            assert self.topology is not None
            for server in self.topology.servers():
                if server.running:
                    server.reload(self.store.authorization())
        return self.store.client_security(agent_id)


def cluster_fleet(
    world: TinyWorld, root: Path, pki: CredentialStore, leaves: tuple[str, ...] = ("t1", "t2")
) -> ClusterFleet:
    """A cluster fleet (not started: ``fleet.topology.start()``), with a leaf identity per transmitter of ``leaves``."""
    store = fleet_store(root, pki)
    store.ensure([("monitor", "monitor", None), *(("leaf", f"leaf-{t}", t) for t in leaves)])
    plan = [(f"leaf-{t}", 1 + i % 2) for i, t in enumerate(leaves)]
    return ClusterFleet(world, store, topology=store.topology(3, plan, root / "servers"))


async def crash(agent: Agent) -> None:
    """An in-process agent dies at once: every task cancelled, both connections' sockets aborted (the server drops its
    subscriptions as it would for a killed process), no goodbye."""
    agent._stopped = agent.draining = True  # noqa: SLF001 - a crash skips the orderly stop
    for nc in (agent.pub, agent.sub):
        if nc is not None:
            abort(nc)
    for task in (*agent._tasks, *agent._background):  # noqa: SLF001
        task.cancel()
    await asyncio.sleep(0)
    for nc in (agent.pub, agent.sub):
        if nc is not None:
            await close(nc, timeout=1.0)
    agent._executor.shutdown(wait=False, cancel_futures=True)  # noqa: SLF001


def fleet_store(root: Path, pki: CredentialStore) -> CredentialStore:
    """A fresh credential store for one fleet: a random prefix, the standard identities, the session's TLS."""
    store = secure_store(root, pki, prefix=f"t{uuid.uuid4().hex[:10]}")
    store.ensure(STANDARD_IDENTITIES)
    return store


@pytest.fixture
async def fleet(tmp_path: Path, pki: CredentialStore, tiny: TinyWorld) -> AsyncIterator[Fleet]:
    """An empty fleet on its own secure server; every agent it started, and the server, are stopped afterwards."""
    f = Fleet(tiny, fleet_store(tmp_path / "creds", pki))
    f.start_server()
    try:
        yield f
    finally:
        await f.close()
        assert f.server is not None
        f.server.stop()
