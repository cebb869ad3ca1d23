"""Every agent is a nats micro service: ``$SRV.PING`` / ``$SRV.INFO`` / ``$SRV.STATS`` list the federation, and each
agent's counters are in its stats and behind its own ``<prefix>.status.<role>.<id>`` endpoint.

The service is named ``fedrefine-<role>`` (so ``nats micro ls`` groups agents by role) with the agent's id, role,
prefix and model fingerprint as metadata. Its one endpoint, ``status``, answers a request with the agent's
:meth:`~agents.base.Agent.stats`; the same dictionary is the endpoint's ``data`` in ``$SRV.STATS``.

What the stats say: message and byte counts in and out (every connection of the agent, KV included), reconnects,
rejected messages by subject kind and by error class, a latency summary over the last
``DEFAULT_LATENCY_WINDOW`` operations of the agent's main step, resident memory, and role counters (asks, offers,
plans, streams ...). Never a question, an option, an answer or a query id: monitors may read them
(``privacy.permissions``). A monitor may ask as often as it likes; a snapshot is computed at most every
``DEFAULT_SNAPSHOT_S`` and reused in between, so a flood of requests costs an agent one reply each.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import nats.micro
from nats.micro.request import Request
from nats.micro.service import Service

if TYPE_CHECKING:
    from agents.base import Agent

log = logging.getLogger(__name__)

SERVICE_PREFIX = "fedrefine"  # service names: fedrefine-receiver, fedrefine-gate, ...
SERVICE_VERSION = "1.0.0"  # of the stats' shape (semantic versioning, as nats micro requires)
DEFAULT_LATENCY_WINDOW = 1024  # operations a latency summary covers (a ring: memory does not grow)
DEFAULT_SNAPSHOT_S = 0.2  # seconds a stats snapshot is reused for
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def service_name(role: str) -> str:
    """The micro service name of a role's agents."""
    return f"{SERVICE_PREFIX}-{role}"


def rss_bytes() -> int:
    """This process's resident memory in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class LatencyWindow:
    """The last ``size`` durations (milliseconds) of one kind of operation, and their percentiles."""

    def __init__(self, size: int = DEFAULT_LATENCY_WINDOW) -> None:
        self._ms: deque[float] = deque(maxlen=size)
        self.count = 0  # operations ever recorded

    def add(self, ms: float) -> None:
        """Record one operation's duration in milliseconds."""
        self._ms.append(ms)
        self.count += 1

    def summary(self) -> dict[str, float | int | None]:
        """``n`` (ever), and p50 / p95 / p99 / max over the window, in milliseconds (None when empty)."""
        values = sorted(self._ms)

        def pct(q: float) -> float | None:
            return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 2) if values else None

        return {"n": self.count, "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0)}


class AgentService:
    """The micro service of one agent, on its subscribing connection (replies leave where requests came in)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.service: Service | None = None
        self._snapshot: dict[str, Any] = {}
        self._taken = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The agent's stats, computed at most every ``DEFAULT_SNAPSHOT_S``."""
        now = time.monotonic()
        if not self._snapshot or now - self._taken > DEFAULT_SNAPSHOT_S:
            self._snapshot, self._taken = self.agent.stats(), now
        return self._snapshot

    async def start(self) -> None:
        """Register the service and its status endpoint."""
        agent = self.agent
        assert agent.sub is not None
        metadata = {"role": agent.role, "id": agent.id, "prefix": agent.subjects.prefix}
        if agent.model_fingerprint:
            metadata["model"] = agent.model_fingerprint
        self.service = await nats.micro.add_service(
            agent.sub,
            name=service_name(agent.role),
            version=SERVICE_VERSION,
            description=f"FedRefine {agent.role} {agent.id}",
            metadata=metadata,
            stats_handler=lambda _endpoint: self.snapshot(),
        )
        await self.service.add_endpoint(
            name="status", subject=agent.subjects.status(agent.role, agent.id), handler=self._status
        )

    async def _status(self, request: Request) -> None:
        await request.respond(json.dumps(self.snapshot()).encode())

    async def stop(self) -> None:
        """Unregister (its subscriptions drain)."""
        if self.service is not None:
            try:
                await self.service.stop()
            except Exception as exc:  # noqa: BLE001 - a connection already gone: nothing to unregister
                log.debug("micro service of %s did not stop cleanly: %s", self.agent.id, exc)
            self.service = None


def agent_stats(agent: Agent) -> dict[str, Any]:
    """An agent's stats: identity, connections, traffic, rejects, latency, memory and its role counters."""
    conns = [nc for nc in (agent.pub, agent.sub) if nc is not None]
    traffic = {
        k: sum(int(nc.stats.get(k, 0)) for nc in conns) for k in ("in_msgs", "in_bytes", "out_msgs", "out_bytes")
    }
    server = next((nc.connected_url for nc in conns if nc.is_connected and nc.connected_url is not None), None)
    return {
        "role": agent.role,
        "id": agent.id,
        "prefix": agent.subjects.prefix,
        "model": agent.model_fingerprint,
        "uptime_s": round(time.monotonic() - agent.started_at, 1) if agent.started_at else 0.0,
        "rss_bytes": rss_bytes(),
        "load": agent.load,
        "server": f"{server.scheme}://{server.hostname}:{server.port}" if server is not None else None,
        "reconnects": sum(int(nc.stats.get("reconnects", 0)) for nc in conns),
        "msgs_in": traffic["in_msgs"],
        "bytes_in": traffic["in_bytes"],
        "msgs_out": traffic["out_msgs"],
        "bytes_out": traffic["out_bytes"],
        "rejects": {"by_subject": dict(agent.rejected), "by_error": dict(agent.rejected_by)},
        "latency_ms": agent.latency.summary(),
        "trace_events": agent.tracer.sent,
        "counters": agent.counters(),
    }
