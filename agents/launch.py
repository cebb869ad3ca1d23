"""Agents as separate processes: start a federation, wait until every agent heartbeats, stop it without leftovers.

Each agent is ``python -m agents.<role> --nats URL --id ID --prefix P ...`` in its own session (so a Ctrl-C
in the terminal reaches only the launcher, which then stops each agent once, cleanly), with its output in a
log file, and (on Linux) a parent-death signal so that an agent never outlives a launcher that was killed.
Stopping sends SIGTERM (the agent drains, says goodbye, exits), then SIGKILL after a grace period.

With a :class:`~privacy.credentials.CredentialStore` each agent gets its own ``--creds`` and the store's CA as
``--tls-ca`` (:func:`identities_for` lists the identities a set of agents needs, to issue before the server
starts); without one every agent runs ``--insecure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bus.connect import (
    DEFAULT_CONNECT_RETRIES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRY_WAIT,
    close,
    connect,
)
from bus.errors import AgentError
from bus.schemas import Presence, decode_message, validate_id
from bus.subjects import DEFAULT_PREFIX, Subjects
from privacy.credentials import CredentialStore

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 180.0  # seconds for every agent to load its model and heartbeat
DEFAULT_STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL
ROLES = ("receiver", "rephraser", "gate", "transmitter")
MONITOR_ID = "monitor"  # the identity the launcher watches heartbeats with (role monitor)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class AgentSpec:
    """One agent to run: its role, id and role-specific flags (``--model``, ``--fusers``, ``--link-mbps`` ...), and
    where it connects when not to the federation's URL (a member list of a cluster, its device's leaf node)."""

    role: str
    agent_id: str
    args: tuple[str, ...] = ()
    nats: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise AgentError(f"unknown role {self.role!r}; expected one of {ROLES}")
        validate_id(self.agent_id, "agent id")


def identities_for(specs: Iterable[AgentSpec]) -> list[tuple[str, str, str | None]]:
    """(role, id, served receiver) of every agent, and the launcher's monitor: what a store must issue for them."""
    out: list[tuple[str, str, str | None]] = [("monitor", MONITOR_ID, None)]
    for spec in specs:
        serves = None
        if spec.role == "rephraser":
            args = list(spec.args)
            serves = args[args.index("--receiver-id") + 1] if "--receiver-id" in args[:-1] else "*"
        out.append((spec.role, spec.agent_id, serves))
    return out


@dataclass
class AgentProcess:
    """A running agent process and where its log goes."""

    spec: AgentSpec
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Federation:
    """A set of agent processes on one NATS server; ``with Federation(...) as fed:`` always stops them."""

    url: str
    specs: Sequence[AgentSpec] = ()
    prefix: str = DEFAULT_PREFIX
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, AgentProcess] = field(default_factory=dict)
    store: CredentialStore | None = None  # credentials per agent and the CA; None: every agent runs --insecure

    def __post_init__(self) -> None:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="fedrefine-agents-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> Federation:
        """Start every agent of ``specs``."""
        for spec in self.specs:
            self.add(spec)
        return self

    def add(self, spec: AgentSpec) -> AgentProcess:
        """Start one more agent (a transmitter joining a running federation, say)."""
        if spec.agent_id in self.procs and self.procs[spec.agent_id].alive:
            raise AgentError(f"agent {spec.agent_id} is already running")
        assert self.log_dir is not None
        log_path = self.log_dir / f"{spec.agent_id}.log"
        cmd = [sys.executable, "-m", f"agents.{spec.role}", "--nats", spec.nats or self.url, "--id", spec.agent_id]
        cmd += ["--prefix", self.prefix, *self._security_args(spec), *spec.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        agent = AgentProcess(spec, proc, log_path)
        self.procs[spec.agent_id] = agent
        log.debug("started %s %s (pid %d)", spec.role, spec.agent_id, proc.pid)
        return agent

    def _security_args(self, spec: AgentSpec) -> list[str]:
        if self.store is None:
            return ["--insecure"]
        creds = self.store.creds_path(spec.agent_id)
        if not creds.is_file():
            raise AgentError(f"no credentials for {spec.role} {spec.agent_id} in {self.store.root}; issue them first")
        return ["--creds", str(creds), "--tls-ca", str(self.store.ca_file)]

    async def wait_ready(self, ids: Iterable[str] | None = None, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Return once each agent (default: all) has heartbeated; AgentError if one exits or time runs out."""
        want = set(self.procs if ids is None else ids)
        seen: set[str] = set()
        security = self.store.client_security(MONITOR_ID) if self.store is not None else None
        # the servers were just started beside many agent processes: keep trying for up to 30 s, not ~11 s
        patience = max(
            DEFAULT_CONNECT_RETRIES, int(min(timeout, 30.0) / (DEFAULT_CONNECT_TIMEOUT + DEFAULT_RETRY_WAIT))
        )
        nc = await connect(self.url, name="launcher", security=security, retries=patience)
        try:

            async def on_beat(msg) -> None:
                with contextlib.suppress(Exception):
                    beat = decode_message(msg.data)
                    if isinstance(beat, Presence):
                        seen.add(beat.agent_id)

            await nc.subscribe(Subjects(self.prefix).presence_all(), cb=on_beat)
            end = time.monotonic() + timeout
            while not want <= seen:
                for aid in want - seen:
                    agent = self.procs[aid]
                    if not agent.alive:
                        raise AgentError(
                            f"{agent.spec.role} {aid} exited with status {agent.proc.returncode}: "
                            f"{agent.tail(1) or 'no output'} (log: {agent.log_path})"
                        )
                if time.monotonic() > end:
                    raise AgentError(
                        f"agents not up after {timeout:.0f} s: {sorted(want - seen)} (logs: {self.log_dir})"
                    )
                await asyncio.sleep(0.1)
        finally:
            await close(nc)

    def kill(self, agent_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one agent (SIGKILL: it dies without a goodbye)."""
        agent = self.procs[agent_id]
        if agent.alive:
            agent.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                agent.proc.wait()

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> dict[str, int | None]:
        """SIGTERM every agent, wait up to ``grace`` seconds, SIGKILL the rest; return exit statuses."""
        for agent in self.procs.values():
            if agent.alive:
                with contextlib.suppress(ProcessLookupError):
                    agent.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for agent in self.procs.values():
            try:
                agent.proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %s did not stop in %.0f s; killing it", agent.spec.role, agent.spec.agent_id, grace)
                agent.proc.kill()
                agent.proc.wait()
        return {aid: a.proc.returncode for aid, a in self.procs.items()}

    @property
    def pids(self) -> list[int]:
        """Process ids of every agent started."""
        return [a.proc.pid for a in self.procs.values()]

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
