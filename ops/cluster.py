"""A federation on a cluster with leaf nodes: the receiver side on one member, each transmitter on its own leaf.

    members n1 n2 n3 (routes, mutual TLS)      receiver, rephrasers, gates, the asker: n1 first (n2, n3 on failure)
    leaf-<tid> (one per transmitter)            links to n2 or n3 first (then the others), so KV crosses a leaf link
                                                and a route on its way to the receiver

Every agent, the asker and each leaf node has its own identity (a temporary credentials directory); the servers'
configuration files and logs are kept in ``DIR/servers``. :class:`ClusterRun` starts and stops it all; benchmarks
and tests reach into ``.topology`` (kill a member, cut a leaf link) and ``.fed`` (kill an agent).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from agents.launch import AgentSpec, Federation, identities_for
from bus.topology import Topology
from ops.ask import Outcome
from ops.demo import ASKER_ID, Setup, _drive, _Interrupted, _say
from privacy.credentials import CredentialStore

log = logging.getLogger(__name__)

DEFAULT_MEMBERS = 3  # cluster members
HOME = 0  # the member the receiver side connects to first
LEAF_ID = "leaf-{}"  # the leaf node (and its identity) of transmitter {}


def leaf_of(transmitter_id: str) -> str:
    """The leaf node a transmitter's device runs."""
    return LEAF_ID.format(transmitter_id)


def leaf_plan(transmitters: Sequence[str], members: int) -> list[tuple[str, int]]:
    """(leaf id, preferred member) per transmitter: away from the receiver side's member when there is another."""
    away = [m for m in range(members) if m != HOME] or [HOME]
    return [(leaf_of(t), away[i % len(away)]) for i, t in enumerate(transmitters)]


def place(specs: Sequence[AgentSpec], topology: Topology, leaves: Mapping[str, str]) -> list[AgentSpec]:
    """Each spec with where it connects: transmitters with a leaf to it, every other agent to the member list."""
    home = topology.url_list(HOME)
    out = []
    for spec in specs:
        leaf = leaves.get(spec.agent_id) if spec.role == "transmitter" else None
        url = topology.leaf_url(leaf) if leaf is not None else home
        out.append(AgentSpec(spec.role, spec.agent_id, spec.args, nats=url))
    return out


class ClusterRun:
    """Servers, identities and agent processes of one federation on a cluster with leaf nodes."""

    def __init__(
        self,
        setup: Setup,
        *,
        members: int = DEFAULT_MEMBERS,
        redundant: bool = True,
        specs: Sequence[AgentSpec] | None = None,
        log_dir: Path | None = None,
        extra_identities: Sequence[tuple[str, str, str | None]] = (),
    ) -> None:
        self.setup = setup
        self.specs = list(specs) if specs is not None else setup.specs(redundant=redundant)
        self.root = Path(tempfile.mkdtemp(prefix="fedrefine-cluster-"))
        self.store = CredentialStore(self.root / "creds")
        tids = [s.agent_id for s in self.specs if s.role == "transmitter"]
        self.leaves = dict(zip(tids, (leaf for leaf, _ in leaf_plan(tids, members)), strict=True))
        leaf_ids = [("leaf", leaf, tid) for tid, leaf in self.leaves.items()]
        self.store.ensure([*identities_for(self.specs), ("client", ASKER_ID, None), *leaf_ids, *extra_identities])
        self.topology = self.store.topology(members, leaf_plan(tids, members), self.root / "servers")
        self.fed = Federation(
            self.topology.url_list(HOME),
            place(self.specs, self.topology, self.leaves),
            log_dir=log_dir,
            store=self.store,
        )

    @property
    def url(self) -> str:
        """Where the asker connects: every member, the receiver side's first."""
        return self.topology.url_list(HOME)

    def start(self) -> ClusterRun:
        """Servers first, then every agent (not waited for: ``await self.fed.wait_ready()``)."""
        self.topology.start()
        try:
            self.fed.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int | None]:
        """Every agent, then every server; the temporary directory goes too. Agents' exit statuses."""
        try:
            return self.fed.stop()
        finally:
            self.topology.stop()
            shutil.rmtree(self.root, ignore_errors=True)

    def describe(self) -> str:
        """Where everything runs, one line per server."""
        lines = []
        for i, member in enumerate(self.topology.members):
            who = "receiver side, asker" if i == HOME else ""
            lines.append(f"  {member.name:<20} {self.topology.url_of(member):<28} {who}")
        for tid, leaf in self.leaves.items():
            server = self.topology.leaves[leaf]
            first = server.remotes[0].urls[0] if server.remotes else ""
            lines.append(f"  {leaf:<20} {self.topology.url_of(server):<28} transmitter {tid}; links to {first} first")
        return "\n".join(lines)


def run_cluster_demo(
    setup: Setup, deadline_s: float, concurrency: int, log_dir: Path | None, quiet: bool
) -> list[Outcome]:
    """``ops.demo.run_demo`` on a cluster with a leaf node per transmitter (``python -m ops.demo --cluster``)."""
    run = ClusterRun(setup, log_dir=log_dir).start()
    _say(f"cluster up (configuration in {run.topology.conf_dir}):\n{run.describe()}", quiet)
    try:
        try:
            return asyncio.run(_drive(run.fed, setup, deadline_s, concurrency, quiet))
        except _Interrupted:
            raise KeyboardInterrupt from None
    finally:
        _say("stopping agents and servers ...", quiet)
        unclean = {aid: rc for aid, rc in run.stop().items() if rc not in (0, None)}
        if unclean:
            log.warning("agents that did not exit cleanly: %s (logs in %s)", unclean, run.fed.log_dir)
