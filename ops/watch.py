"""``python -m ops.watch --nats URL --creds DIR/monitor.creds --tls-ca DIR/ca.pem``: a live view of a federation.

Two tables in the terminal, redrawn a few times a second (``rich``):

- **federation**: every agent (from its heartbeats and its nats micro stats, ``$SRV.STATS`` every ``--interval``
  seconds): role, id, the server it is on, load, its role's counters (asks / offers / plans / streams), bytes in
  and out, rejected messages, its step's p50 / p95 latency, resident memory, and how long ago it heartbeat;
- **queries**: the last queries as timelines from the agents' trace events, milliseconds after the ask:
  ``ask > query > offers > plan > kv > answer``, with bytes and how the answer came about.

It runs as a ``monitor`` identity, which may read heartbeats, trace events and answers of questions that are not
private, and ask agents for their stats: never a question's text (``privacy.permissions``). ``--once S`` collects
for S seconds, prints one frame and exits (scripts, tests); Ctrl-C ends the live view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from bus.auth import ClientSecurity
from bus.cli import NATS_HELP, OneLineParser, nats_argument, nats_from_env
from bus.connect import close, connect
from bus.errors import ConfigError, ConnectError, FedRefineError, SchemaError
from bus.schemas import Goodbye, Presence, decode_message
from bus.subjects import DEFAULT_PREFIX, Subjects
from bus.trace import Trace

DEFAULT_INTERVAL_S = 2.0  # seconds between $SRV.STATS rounds
DEFAULT_COLLECT_S = 0.5  # seconds replies to one $SRV.STATS request are gathered for
DEFAULT_REFRESH_HZ = 4.0  # redraws a second
DEFAULT_QUERIES = 12  # timelines shown
DEFAULT_KEPT_QUERIES = 256  # timelines kept (the oldest is forgotten beyond)
DEFAULT_GONE_S = 10.0  # an agent not heard of for this long is shown as gone
ORDER = ("ask", "rephrase", "query", "offer", "plan", "kv_out", "kv_in", "answer", "error")
ROLE_ORDER = {"receiver": 0, "rephraser": 1, "gate": 2, "transmitter": 3}


@dataclass
class AgentRow:
    """What the view knows of one agent."""

    role: str
    agent_id: str
    seen: float = 0.0  # monotonic time of its last heartbeat
    left: bool = False
    load: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timeline:
    """One query's trace events, in arrival order."""

    query_id: str
    first: float  # wall time of its first event
    events: list[Trace] = field(default_factory=list)


class FederationView:
    """The state the tables are drawn from: agents and query timelines (fed by heartbeats, stats, traces)."""

    def __init__(self, keep: int = DEFAULT_KEPT_QUERIES) -> None:
        self.agents: dict[tuple[str, str], AgentRow] = {}
        self.queries: OrderedDict[str, Timeline] = OrderedDict()
        self.keep = keep
        self.stats_rounds = 0

    def presence(self, msg: Presence | Goodbye) -> None:
        """A heartbeat or a goodbye."""
        row = self.agents.setdefault((msg.role, msg.agent_id), AgentRow(msg.role, msg.agent_id))
        row.seen = time.monotonic()
        row.left = isinstance(msg, Goodbye)
        if isinstance(msg, Presence):
            row.load = msg.load

    def stats(self, reply: dict[str, Any]) -> None:
        """One agent's ``$SRV.STATS`` reply."""
        meta = reply.get("metadata") or {}
        endpoints = reply.get("endpoints") or [{}]
        data = endpoints[0].get("data") or {}
        role, agent_id = meta.get("role"), meta.get("id")
        if not role or not agent_id:
            return
        row = self.agents.setdefault((role, agent_id), AgentRow(role, agent_id))
        row.stats = data
        row.seen = max(row.seen, time.monotonic())

    def trace(self, event: Trace) -> None:
        """One trace event."""
        line = self.queries.get(event.query_id)
        if line is None:
            line = self.queries[event.query_id] = Timeline(event.query_id, event.t_unix)
            while len(self.queries) > self.keep:
                self.queries.popitem(last=False)
        line.first = min(line.first, event.t_unix)
        line.events.append(event)

    # ---- drawing ----------------------------------------------------------------------------------------------

    def agents_table(self) -> Table:
        """The federation table."""
        table = Table(title="federation", title_justify="left", expand=True)
        for name in ("role", "id", "server", "load", "work", "in", "out", "rejects", "p50/p95 ms", "RSS", "seen"):
            table.add_column(name, no_wrap=True, justify="right" if name in ("load", "in", "out", "RSS") else "left")
        now = time.monotonic()
        rows = sorted(self.agents.values(), key=lambda r: (ROLE_ORDER.get(r.role, 9), r.agent_id))
        for row in rows:
            s = row.stats
            gone = row.left or now - row.seen > DEFAULT_GONE_S
            lat = s.get("latency_ms") or {}
            rejects = sum((s.get("rejects") or {}).get("by_subject", {}).values())
            style = "dim" if gone else None
            table.add_row(
                row.role,
                row.agent_id,
                _server(s.get("server")),
                f"{row.load:g}",
                _work(row.role, s.get("counters") or {}),
                _size(s.get("bytes_in")),
                _size(s.get("bytes_out")),
                str(rejects) if s else "",
                f"{_ms(lat.get('p50'))}/{_ms(lat.get('p95'))}" if lat.get("n") else "",
                _size(s.get("rss_bytes")),
                "left" if row.left else f"{now - row.seen:.0f} s ago" if row.seen else "",
                style=style,
            )
        return table

    def queries_table(self, n: int = DEFAULT_QUERIES) -> Table:
        """The last ``n`` query timelines, newest first."""
        table = Table(title="queries (ms after the ask)", title_justify="left", expand=True)
        table.add_column("query", no_wrap=True)
        table.add_column("receiver", no_wrap=True)
        table.add_column("timeline", overflow="fold")
        for line in list(self.queries.values())[-n:][::-1]:
            receiver = next((e.agent_id for e in line.events if e.role == "receiver"), "")
            table.add_row(line.query_id, receiver, timeline_text(line))
        return table

    def render(self) -> Group:
        """Both tables."""
        return Group(self.agents_table(), self.queries_table())


def timeline_text(line: Timeline) -> str:
    """``ask 0 > query 2 (gate) > offers 4 @9 > plan 12 (2) > kv 1.2 KB > answer 25 fused 2``."""
    by: dict[str, list[Trace]] = {}
    for e in line.events:
        by.setdefault(e.event, []).append(e)

    def at(e: Trace) -> str:
        return f"{1000 * (e.t_unix - line.first):.0f}"

    parts = []
    for kind in ORDER:
        events = by.get(kind)
        if not events:
            continue
        last = max(events, key=lambda e: e.t_unix)
        if kind == "offer":
            parts.append(f"offers {len(events)} @{at(last)} ({_size(sum(e.bytes for e in events))})")
        elif kind == "plan":
            mine = [e for e in events if e.role == "gate"] or events
            by_gate = f" by {mine[0].agent_id}" if mine[0].role == "gate" else ""
            parts.append(f"plan @{at(last)} {mine[0].count or 0} planned{by_gate}")
        elif kind in ("kv_out", "kv_in"):
            if kind == "kv_in" or "kv_in" not in by:
                parts.append(f"kv {_size(sum(e.bytes for e in events))} @{at(last)}")
        elif kind == "query":
            parts.append(f"query @{at(last)}" + (f" to {last.peer}" if last.peer else ""))
        elif kind == "answer":
            parts.append(f"answer @{at(last)} {last.detail}")
        elif kind == "ask":
            parts.append("ask" + (f" (queued {last.ms:.0f})" if last.detail == "queued" and last.ms else ""))
        else:
            parts.append(f"{kind} @{at(last)} {last.detail}".strip())
    return " > ".join(parts)


def _size(n: Any) -> str:
    if not isinstance(n, int | float) or n is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _ms(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else "-"


def _server(url: Any) -> str:
    return str(url).rsplit(":", 1)[-1] if url else ""


def _work(role: str, c: dict[str, Any]) -> str:
    if role == "receiver":
        asks, fused, alone = c.get("asks", 0), c.get("fused", 0), c.get("alone", 0)
        return f"asks {asks} fused {fused} alone {alone} queued {c.get('queued_now', 0)}"
    if role == "transmitter":
        return f"offers {c.get('offers', 0)} streams {c.get('streams', 0)} sent {_size(c.get('bytes', 0))}"
    if role == "gate":
        return f"plans {c.get('plans', 0)} offers {c.get('offers', 0)} skipped {c.get('skipped', 0)}"
    if role == "rephraser":
        return f"served {c.get('served', 0)}"
    return ""


# ---- the bus side ---------------------------------------------------------------------------------------------


class Watcher:
    """Subscribes the view to a federation and polls its stats."""

    def __init__(self, nc: Client, subjects: Subjects, view: FederationView) -> None:
        self.nc = nc
        self.subjects = subjects
        self.view = view

    async def start(self) -> None:
        """Heartbeats and trace events."""
        await self.nc.subscribe(self.subjects.presence_all(), cb=self._on_presence)
        await self.nc.subscribe(self.subjects.traces_all(), cb=self._on_trace)

    async def _on_presence(self, msg: Msg) -> None:
        try:
            beat = decode_message(msg.data)
        except SchemaError:
            return
        if isinstance(beat, Presence | Goodbye):
            self.view.presence(beat)

    async def _on_trace(self, msg: Msg) -> None:
        try:
            self.view.trace(Trace.from_bytes(msg.data))
        except SchemaError:
            return

    async def poll_stats(self, collect_s: float = DEFAULT_COLLECT_S) -> int:
        """One ``$SRV.STATS`` round: every reply within ``collect_s``; how many agents answered."""
        inbox = self.nc.new_inbox()
        got = 0

        async def on_reply(msg: Msg) -> None:
            nonlocal got
            try:
                reply = json.loads(msg.data)
            except ValueError:
                return
            if (reply.get("metadata") or {}).get("prefix") == self.subjects.prefix:
                self.view.stats(reply)
                got += 1

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish("$SRV.STATS", b"", reply=inbox)
            await asyncio.sleep(collect_s)
        finally:
            await sub.unsubscribe()
        self.view.stats_rounds += 1
        return got


# ---- the command ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    env = os.environ
    p = OneLineParser(prog="python -m ops.watch", description=__doc__.splitlines()[0])
    p.add_argument(
        "--nats",
        type=nats_argument,
        default=nats_from_env(env),
        help=NATS_HELP,
    )
    p.add_argument("--prefix", default=env.get("FEDREFINE_PREFIX", DEFAULT_PREFIX), help="subject prefix")
    p.add_argument("--creds", default=env.get("FEDREFINE_CREDS") or None, help="a monitor identity's credentials")
    p.add_argument("--tls-ca", default=env.get("FEDREFINE_TLS_CA") or None, help="CA certificate of the server")
    p.add_argument("--insecure", action="store_true", help="no credentials, no TLS (a server run with --insecure)")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between stats rounds")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="query timelines shown")
    p.add_argument("--once", type=float, default=None, metavar="S", help="collect S seconds, print once, exit")
    return p


async def _run(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.queries < 1 or (args.once is not None and args.once <= 0):
        raise ConfigError("--interval, --queries and --once must be positive")
    if args.creds is None and not args.insecure:
        raise ConfigError("--creds FILE is required (a monitor identity: DIR/monitor.creds); --insecure otherwise")
    security = ClientSecurity(creds=args.creds, tls_ca=args.tls_ca)
    try:
        nc = await connect(args.nats, name="ops.watch", retries=1, security=security)
    except ConnectError as exc:
        raise ConnectError(f"no NATS server at {args.nats}; start one with `python -m ops.server`") from exc
    view = FederationView()
    watcher = Watcher(nc, Subjects(args.prefix), view)
    try:
        await watcher.start()
        if args.once is not None:
            end = time.monotonic() + args.once
            while time.monotonic() < end:
                await watcher.poll_stats(min(DEFAULT_COLLECT_S, max(0.05, end - time.monotonic())))
            console = Console(width=max(120, Console().width))
            console.print(view.agents_table())
            console.print(view.queries_table(args.queries))
            return 0
        await _live(watcher, view, args)
    finally:
        await close(nc)
    return 0


async def _live(watcher: Watcher, view: FederationView, args: argparse.Namespace) -> None:
    with Live(view.render(), refresh_per_second=DEFAULT_REFRESH_HZ, screen=False, transient=False) as live:
        next_poll = 0.0
        while True:
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + args.interval
                asyncio.ensure_future(watcher.poll_stats())
            live.update(Group(view.agents_table(), view.queries_table(args.queries)))
            await asyncio.sleep(1 / DEFAULT_REFRESH_HZ)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.watch``: 0 on Ctrl-C or after ``--once``, 2 bad input or no server."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
