"""Faults under load: what each costs the questions in flight, and how soon the federation is whole again.

    python -m ops.bench faults [--quick | --tiny] [--in-flight 20] [--deadline-s 10] [--after-s 10] [--only A,B]

A federation of processes (the demo's agents with two gates and two rephrasers, unshaped links) on a 3-member
cluster with a leaf node per transmitter (``ops.cluster``); the last fault runs on a single server. Questions are
kept ``--in-flight`` at a time throughout (``ops.bench.loadkit``), asked as ``ops.ask`` does (again after a
failover). Each fault, in turn, on the same federation made whole in between:

    transmitter-sigkill   SIGKILL a transmitter on a slow uplink (its streams last ~50 ms: kills land mid-stream)
    gate-sigkill          SIGKILL one of the two gates
    rephraser-sigkill     SIGKILL one of the two rephrasers
    member-killed         SIGKILL the cluster member the receiver side and the asker are connected to
    leaf-link-cut         cut a transmitter's leaf link (a TCP relay drops it) for --cut-s, then mend it
    transmitter-leaves    a transmitter leaves (SIGTERM, goodbye) and joins again --cut-s later
    server-restart        a single server, SIGKILLed and started again at once on its port

Per row: ``queries`` asked from ``--before-s`` before the fault to ``--after-s`` after the fault (or the mend),
``answered_by_deadline`` and ``typed_errors`` (shares of them, an error counting only when it came by the deadline),
``wrong`` (answers whose letter is not ``refine()``'s with the transmitters they used: ``ops.bench.referee``;
``unverified`` those it cannot replay), and ``recovery_s``: from the fault (from the mend or the rejoin for the
last two of the cluster) to the first question from which on every one was answered as the healthy federation
answers it (the same transmitters, bar one killed for good; no fallback note). None: not whole again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from agents.launch import AgentSpec, Federation, identities_for
from bus.connect import close, connect
from bus.schemas import Answer
from bus.subjects import Subjects
from bus.tcpproxy import TcpProxy
from bus.topology import free_ports
from ops.ask import ReconnectWatch
from ops.bench.loadkit import Pump, Shot, recovery_s
from ops.bench.referee import Referee
from ops.cluster import ClusterRun, leaf_of
from ops.demo import ASKER_ID, Setup, items_of, tiny_setup, zoo_setup
from privacy.credentials import CredentialStore

FAULTS = (
    "transmitter-sigkill",
    "gate-sigkill",
    "rephraser-sigkill",
    "member-killed",
    "leaf-link-cut",
    "transmitter-leaves",
    "server-restart",
)
DEFAULT_IN_FLIGHT = 20  # questions outstanding throughout
DEFAULT_DEADLINE_S = 10.0
DEFAULT_BEFORE_S = 2.0  # seconds of healthy load before each fault
DEFAULT_AFTER_S = 10.0  # seconds of load after the fault (or the mend)
DEFAULT_CUT_S = 4.0  # seconds a leaf link stays cut / a transmitter stays away
DEFAULT_SETTLE_S = 3.0  # seconds after healing before the next fault (heartbeats, relinks)
SLOW_LINK = ("--link-mbps", "0.005", "--link-burst-bytes", "64", "--inline-kv-bytes", "0")  # the SIGKILL victim's
FALLBACKS = ("no plan from", "rephraser unavailable", "too little of its deadline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench faults``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick zoo (default: the full one if built)")
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help="questions outstanding")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per-question deadline")
    parser.add_argument("--before-s", type=float, default=DEFAULT_BEFORE_S, help="healthy load before a fault")
    parser.add_argument("--after-s", type=float, default=DEFAULT_AFTER_S, help="load after a fault or its mend")
    parser.add_argument("--cut-s", type=float, default=DEFAULT_CUT_S, help="how long a link is cut / an agent away")
    parser.add_argument("--questions", type=int, default=60, help="distinct questions cycled through")
    parser.add_argument("--only", default=None, help=f"comma-separated faults (of {', '.join(FAULTS)})")


class FaultBench:
    """One federation, its asker, the healthy answers, and the rows so far."""

    def __init__(self, setup: Setup, args: argparse.Namespace, referee: Referee | None) -> None:
        self.setup = setup
        self.args = args
        self.referee = referee
        self.items = items_of(setup.questions)
        self.healthy: dict[int, frozenset[str]] = {}
        self.healthy_whole = 0.0
        self.askers: list[tuple] = []

    async def open_asker(self, url: str, store: CredentialStore, prefix: str) -> None:
        """The asker's connection (again after a failover: ``ops.ask.ReconnectWatch``)."""
        watch = ReconnectWatch()
        nc = await connect(
            url,
            name="bench-faults",
            security=store.client_security(ASKER_ID),
            reconnect_wait=0.1,
            max_reconnect_attempts=-1,
            reconnected_cb=watch.on_reconnect,
        )
        self.askers = [(nc, watch)]
        self.subjects = Subjects(prefix)

    async def close_asker(self) -> None:
        for nc, _ in self.askers:
            await close(nc)
        self.askers = []

    async def baseline(self) -> None:
        """Every question once under the same load: which transmitters a healthy federation uses for each."""
        pump = Pump(self.askers, self.subjects, self.items, in_flight=self.args.in_flight,
                    deadline_s=self.args.deadline_s, limit=2 * len(self.items))  # fmt: skip
        shots = await pump.run()
        seen: dict[int, Counter[frozenset[str]]] = {}
        for s in shots:
            if isinstance(s.reply, Answer):
                seen.setdefault(s.index, Counter())[frozenset(u.transmitter_id for u in s.reply.used)] += 1
        self.healthy = {i: c.most_common(1)[0][0] for i, c in seen.items()}
        ok = [self._whole(s, frozenset()) for s in shots]
        self.healthy_whole = round(sum(ok) / len(ok), 4) if ok else 0.0

    def _whole(self, shot: Shot, gone: frozenset[str]) -> bool:
        reply = shot.reply
        if not shot.in_time(self.args.deadline_s) or not isinstance(reply, Answer):
            return False
        if any(f in n for n in reply.notes for f in FALLBACKS):
            return False
        expected = self.healthy.get(shot.index, frozenset()) - gone
        return expected <= {u.transmitter_id for u in reply.used}

    async def run_fault(self, name: str, inject, mend=None, gone: frozenset[str] = frozenset()) -> dict:
        """Load, the fault (and its mend), more load; the row."""
        pump = Pump(
            self.askers, self.subjects, self.items, in_flight=self.args.in_flight, deadline_s=self.args.deadline_s
        )
        reconnects = sum(w.reconnects for _, w in self.askers)
        task = asyncio.ensure_future(pump.run())
        await asyncio.sleep(self.args.before_s)
        t_fault = time.monotonic()
        await inject()
        since = t_fault
        if mend is not None:
            await asyncio.sleep(self.args.cut_s)
            await mend()
            since = time.monotonic()  # mended: the link is back, the transmitter heartbeats again
        await asyncio.sleep(self.args.after_s)
        pump.stop()
        shots = await task
        row = self.row(name, shots, t_fault, since, gone)
        row["asker_reconnects"] = sum(w.reconnects for _, w in self.askers) - reconnects
        return row

    def row(self, name: str, shots: list[Shot], t_fault: float, since: float, gone: frozenset[str]) -> dict:
        """The issue's row for one fault, and a few more facts."""
        d = self.args.deadline_s
        n = len(shots)
        verdicts = Counter()
        for s in shots:
            if self.referee is not None and isinstance(s.reply, Answer):
                q = self.setup.questions[s.index]
                v = self.referee.judge(q, self.items[s.index].private, s.reply)
                verdicts["wrong" if v.wrong else "right" if v.checked else "unverified"] += 1
        errors = Counter(s.reply.code for s in shots if not isinstance(s.reply, Answer))
        return {
            "fault": name,
            "queries": n,
            "answered_by_deadline": round(sum(s.in_time(d) for s in shots) / n, 4) if n else None,
            "typed_errors": round(sum(s.typed_error_in_time(d) for s in shots) / n, 4) if n else None,
            "wrong": verdicts["wrong"] if self.referee is not None else None,
            "recovery_s": recovery_s(shots, since, lambda s: self._whole(s, gone)),
            "unverified": verdicts["unverified"],
            "degraded": sum(isinstance(s.reply, Answer) and not self._whole(s, gone) for s in shots),
            "errors": dict(errors),
            "late_or_lost": sum(not s.in_time(d) and not s.typed_error_in_time(d) for s in shots),
            "in_flight_at_fault": sum(s.sent <= t_fault < s.sent + s.seconds for s in shots),
        }


def _spec(fed: Federation, agent_id: str) -> AgentSpec:
    return fed.procs[agent_id].spec


async def _cluster_faults(bench: FaultBench, run: ClusterRun, proxy: TcpProxy, wanted: set[str]) -> list[dict]:
    fed, topo, rows = run.fed, run.topology, []
    tids = list(bench.setup.transmitters)
    victim, leaver = tids[0], tids[2 % len(tids)]

    async def heal(agent_id: str, spec: AgentSpec | None = None) -> None:
        fed.add(spec or _spec(fed, agent_id))
        await fed.wait_ready([agent_id])
        await asyncio.sleep(DEFAULT_SETTLE_S)

    if "transmitter-sigkill" in wanted:
        spec = _spec(fed, victim)
        rows.append(await bench.run_fault("transmitter-sigkill", _now(fed.kill, victim), gone=frozenset({victim})))
        lan_args = spec.args[: len(spec.args) - len(SLOW_LINK)]  # SLOW_LINK was appended
        lan = AgentSpec(spec.role, spec.agent_id, lan_args, spec.nats)  # back on a fast link for the other faults
        await heal(victim, lan)
    for fault, agent in (("gate-sigkill", "gate"), ("rephraser-sigkill", "rephraser")):
        if fault in wanted:
            rows.append(await bench.run_fault(fault, _now(fed.kill, agent)))
            await heal(agent)
    if "member-killed" in wanted:
        home = topo.members[0]
        rows.append(await bench.run_fault("member-killed", _now(home.kill)))
        topo.restart(home)
        topo.wait_routes()
        await asyncio.sleep(DEFAULT_SETTLE_S)
    if "leaf-link-cut" in wanted:
        rows.append(await bench.run_fault("leaf-link-cut", _now(proxy.cut), _now(proxy.restore)))
        await asyncio.sleep(DEFAULT_SETTLE_S)
    if "transmitter-leaves" in wanted:
        spec = _spec(fed, leaver)

        async def rejoin() -> None:
            gone = fed.procs[leaver]
            while gone.alive:  # it drains its work before its goodbye
                await asyncio.sleep(0.05)
            fed.add(spec)
            await fed.wait_ready([leaver])  # it has joined: its first heartbeat

        rows.append(await bench.run_fault("transmitter-leaves", _now(fed.kill, leaver, signal.SIGTERM), rejoin))
    for row in rows:
        row["topology"] = f"{len(topo.members)} members, a leaf node per transmitter"
    return rows


def _now(fn, *args):
    async def call() -> None:
        fn(*args)

    return call


async def _cluster(
    setup: Setup, args: argparse.Namespace, referee: Referee | None, wanted: set[str]
) -> tuple[list[dict], dict]:
    specs = setup.specs(redundant=True)
    tids = list(setup.transmitters)
    if "transmitter-sigkill" in wanted:  # its victim streams for a while (it is back on a fast link after)
        specs = [AgentSpec(s.role, s.agent_id, s.args + SLOW_LINK) if s.agent_id == tids[0] else s for s in specs]
    run = ClusterRun(setup, specs=specs)
    topo = run.topology
    proxy = TcpProxy([("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in topo.hub_leaf_urls]).start()
    topo.set_uplink(leaf_of(tids[1 % len(tids)]), [proxy.url("tls")])
    bench = FaultBench(setup, args, referee)
    try:
        run.start()
        await run.fed.wait_ready()
        await bench.open_asker(run.url, run.store, run.fed.prefix)
        await asyncio.sleep(DEFAULT_SETTLE_S)
        await bench.baseline()
        rows = await _cluster_faults(bench, run, proxy, wanted)
        return rows, {"healthy_whole_share": bench.healthy_whole}
    finally:
        await bench.close_asker()
        run.stop()
        proxy.stop()


async def _single(setup: Setup, args: argparse.Namespace, referee: Referee | None) -> dict:
    specs = setup.specs(redundant=True)
    store = CredentialStore(tempfile.mkdtemp(prefix="fedrefine-faults-"))
    store.ensure([*identities_for(specs), ("client", ASKER_ID, None)])
    server = store.server(free_ports(1)[0]).start()
    fed = Federation(server.url, specs, store=store)
    bench = FaultBench(setup, args, referee)
    try:
        fed.start()
        await fed.wait_ready()
        await bench.open_asker(server.url, store, fed.prefix)
        await asyncio.sleep(DEFAULT_SETTLE_S)
        await bench.baseline()

        async def restart() -> None:
            server.kill()
            server.start()  # at once, on its port

        row = await bench.run_fault("server-restart", restart)
        row["topology"] = "one server"
        return row
    finally:
        await bench.close_asker()
        fed.stop()
        server.stop()


def run(args: argparse.Namespace) -> dict:
    """Every fault asked for, in order."""
    import torch

    torch.set_num_threads(1)
    wanted = set(FAULTS if args.only is None else [f.strip() for f in args.only.split(",") if f.strip()])
    unknown = wanted - set(FAULTS)
    if unknown or args.in_flight < 1 or args.deadline_s <= 0:
        from bus.errors import ConfigError

        raise ConfigError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}" if unknown else
                          "--in-flight and --deadline-s must be positive")  # fmt: skip
    if args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-faults-")), args.questions)
    else:
        setup = zoo_setup(False if args.quick else None, args.questions)
    setup.links_mbps = {}  # unshaped (bar the SIGKILL victim): every answer has an in-process twin
    referee = None if args.tiny else Referee(setup)
    rows, extra = [], {}
    if wanted - {"server-restart"}:
        rows, extra = asyncio.run(_cluster(setup, args, referee, wanted))
    if "server-restart" in wanted:
        rows.append(asyncio.run(_single(setup, args, referee)))
    return {
        "rows": rows,
        "setup": setup.name,
        "in_flight": args.in_flight,
        "deadline_s": args.deadline_s,
        **extra,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
