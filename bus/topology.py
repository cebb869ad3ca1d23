"""A cluster of nats-servers with leaf nodes on loopback, on fixed ports, from configuration files kept on disk.

The layout NATS recommends for devices at the edge: a few servers joined by routes (the cluster), and a leaf node
per site or device that links to the cluster and serves the agents there. A leaf node links to every member of the
cluster in turn (its preferred one first), so it survives the loss of any of them; agents list several members
(``--nats A,B,C``) and fail over likewise::

    n1 ── n2 ── n3          routes (mutual TLS), every member accepts leaf links
     \\    |    /
      leaf1  leaf2 ...       one per device; its agents connect to it

Every port is chosen up front (free ports on 127.0.0.1) and written into one configuration file per server in
``conf_dir`` (``n1.conf``, ``leaf1.conf``, with their logs beside them), which a plain ``nats-server -c FILE`` runs
as well; a server killed or stopped starts again on the same ports (:meth:`Topology.restart`). Security is given:
the same authorization block and TLS files on every server, and each leaf node logs in to the cluster with its
own key (``privacy.credentials`` issues it; ``privacy.permissions`` says what a leaf may carry across).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bus.errors import ServerError
from bus.server import DEFAULT_HOST, DEFAULT_MAX_PAYLOAD, DEFAULT_POLL_INTERVAL, DEFAULT_STARTUP_TIMEOUT, NatsServer
from bus.serverconf import ClusterConfig, LeafListen, LeafRemote, ServerTLS

log = logging.getLogger(__name__)

DEFAULT_CLUSTER_NAME = "fedrefine"
MAX_MEMBERS = 16  # servers in one cluster here (loopback demos and tests)
MAX_LEAVES = 64  # leaf nodes


@dataclass(frozen=True)
class LeafSpec:
    """One leaf node: its server name, the nkey seed of the identity it logs in to the cluster as, and the member
    it links to first (index into the members; the others follow in order)."""

    name: str
    seed: str | None = None
    prefer: int = 0


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (held together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class Topology:
    """``size`` cluster members (``n1``..) and the ``leaves`` on fixed loopback ports; configuration in ``conf_dir``.

    Nothing runs until :meth:`start`; until then :meth:`set_uplink` may send a leaf's link elsewhere (a test's
    cuttable proxy in front of the cluster, say).
    """

    def __init__(
        self,
        size: int,
        leaves: Sequence[LeafSpec] = (),
        *,
        conf_dir: str | Path,
        authorization: str | None = None,
        tls: ServerTLS | None = None,
        name: str = DEFAULT_CLUSTER_NAME,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        host: str = DEFAULT_HOST,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        if not 1 <= size <= MAX_MEMBERS:
            raise ServerError(f"a cluster here has 1..{MAX_MEMBERS} members, got {size}")
        if len(leaves) > MAX_LEAVES:
            raise ServerError(f"at most {MAX_LEAVES} leaf nodes, got {len(leaves)}")
        names = [f"n{i + 1}" for i in range(size)] + [leaf.name for leaf in leaves]
        if len(set(names)) != len(names):
            raise ServerError(f"server names must be unique: {names}")
        self.conf_dir = Path(conf_dir)
        self.tls = tls
        self.host = host
        self.startup_timeout = startup_timeout
        scheme = "tls" if tls is not None else "nats"
        ports = free_ports(3 * size + len(leaves), host)
        clients, routes, hubs = ports[:size], ports[size : 2 * size], ports[2 * size : 3 * size]
        self.hub_leaf_urls = tuple(f"{scheme}://{host}:{p}" for p in hubs)  # where leaf nodes link in
        common = {"authorization": authorization, "tls": tls, "max_payload": max_payload, "host": host}
        self.members: list[NatsServer] = []
        for i in range(size):
            others = tuple(f"nats-route://{host}:{routes[j]}" for j in range(size) if j != i)
            cluster = ClusterConfig(name, port=routes[i], routes=others) if size > 1 else None
            self.members.append(
                NatsServer(
                    clients[i],
                    cluster=cluster,
                    leafnodes=LeafListen(hubs[i]),
                    name=names[i],
                    conf_dir=self.conf_dir,
                    startup_timeout=startup_timeout,
                    **common,  # type: ignore[arg-type]
                )
            )
        self.leaves: dict[str, NatsServer] = {}
        self._specs: dict[str, LeafSpec] = {}
        for spec, port in zip(leaves, ports[3 * size :], strict=True):
            if not 0 <= spec.prefer < size:
                raise ServerError(f"leaf {spec.name} prefers member {spec.prefer}; there are {size}")
            order = [*range(spec.prefer, size), *range(spec.prefer)]
            remote = LeafRemote(tuple(self.hub_leaf_urls[j] for j in order), spec.seed, self._ca())
            self._specs[spec.name] = spec
            self.leaves[spec.name] = NatsServer(
                port,
                remotes=(remote,),
                name=spec.name,
                conf_dir=self.conf_dir,
                startup_timeout=startup_timeout,
                **common,  # type: ignore[arg-type]
            )

    def _ca(self) -> Path | None:
        return self.tls.ca_file if self.tls is not None else None

    # ---- what agents connect to -------------------------------------------------------------------------------

    def url_of(self, server: NatsServer) -> str:
        """A server's client URL (known before it runs: every port is fixed)."""
        return f"{'tls' if self.tls is not None else 'nats'}://{self.host}:{server.requested_port}"

    @property
    def urls(self) -> list[str]:
        """Client URLs of the cluster members, in order (``--nats`` takes them comma-separated)."""
        return [self.url_of(s) for s in self.members]

    def url_list(self, first: int = 0) -> str:
        """Every member's URL, comma-separated, member ``first`` first (where an agent should connect)."""
        order = [*range(first, len(self.members)), *range(first)]
        return ",".join(self.url_of(self.members[i]) for i in order)

    def leaf_url(self, name: str) -> str:
        """The client URL of one leaf node (its device's agents connect there)."""
        return self.url_of(self._leaf(name))

    def servers(self) -> list[NatsServer]:
        """Members then leaf nodes."""
        return [*self.members, *self.leaves.values()]

    def _leaf(self, name: str) -> NatsServer:
        if name not in self.leaves:
            raise ServerError(f"no leaf node {name!r} (have {', '.join(self.leaves) or 'none'})")
        return self.leaves[name]

    # ---- life cycle -------------------------------------------------------------------------------------------

    def set_uplink(self, name: str, urls: Sequence[str]) -> None:
        """Link leaf ``name`` to ``urls`` only, instead of the members (before :meth:`start`): the members the
        cluster advertises are not tried either, so a relay there is the leaf's one way in."""
        leaf = self._leaf(name)
        if leaf.running:
            raise ServerError(f"leaf {name} is running; set its uplink before starting it")
        seed = self._specs[name].seed
        leaf.remotes = (LeafRemote(tuple(urls), seed, self._ca(), discover=False),)

    def start(self) -> Topology:
        """Start every member, wait until the routes formed, then every leaf node and its link; all or nothing."""
        try:
            for member in self.members:
                member.start()
            self.wait_routes()
            for leaf in self.leaves.values():
                leaf.start()
            for name in self.leaves:
                self.wait_leaf(name)
        except BaseException:
            self.stop()
            raise
        log.info("topology up: %s; leaves %s (configuration in %s)", self.urls, list(self.leaves), self.conf_dir)
        return self

    def wait_routes(self, timeout: float | None = None) -> None:
        """Until every running member is routed to the others (nothing to wait for with one member)."""
        running = [m for m in self.members if m.running]
        if len(self.members) < 2:
            return
        end = time.monotonic() + (timeout or self.startup_timeout)
        while not all(m.log_text().count("Route connection created") >= len(running) - 1 for m in running):
            if time.monotonic() > end:
                raise ServerError(f"{len(running)} members did not form a cluster within {self.startup_timeout:.0f} s")
            time.sleep(DEFAULT_POLL_INTERVAL)

    def wait_leaf(self, name: str, timeout: float | None = None, links: int = 1) -> None:
        """Until leaf ``name`` has made ``links`` links to the cluster since it started."""
        leaf = self._leaf(name)
        end = time.monotonic() + (timeout or self.startup_timeout)
        while leaf.leaf_links() < links:
            if not leaf.running:
                raise ServerError(f"leaf node {name} exited: {leaf.log_text().strip().splitlines()[-1:]}")
            if time.monotonic() > end:
                raise ServerError(f"leaf node {name} did not link to the cluster within {self.startup_timeout:.0f} s")
            time.sleep(DEFAULT_POLL_INTERVAL)

    def restart(self, server: NatsServer) -> NatsServer:
        """Start a stopped or killed member or leaf node again, on its ports and with its configuration."""
        if server.running:
            raise ServerError(f"{server.name} is running")
        server.start()
        return server

    def stop(self) -> None:
        """Stop every server (leaf nodes first); the configuration files and logs stay in ``conf_dir``."""
        for server in [*self.leaves.values(), *self.members]:
            server.stop()

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Topology(members={len(self.members)}, leaves={list(self.leaves)}, conf_dir={str(self.conf_dir)!r})"
