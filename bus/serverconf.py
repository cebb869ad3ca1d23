"""Configuration blocks of an embedded nats-server that are about security and membership: TLS and cluster routes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bus.errors import ServerError

DEFAULT_TLS_TIMEOUT = 2.0  # seconds a client has to finish its TLS handshake


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate chain and private key (PEM files): every client connection must use TLS.

    ``ca_file`` is needed only in a cluster: routes verify each other's certificate against it.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    timeout: float = DEFAULT_TLS_TIMEOUT  # seconds

    def config_text(self, routes: bool = False) -> str:
        """The ``tls { ... }`` block of the server's configuration (``routes``: the cluster's, mutual)."""
        files = [self.cert_file, self.key_file] + ([self.ca_file] if routes and self.ca_file is not None else [])
        for path in files:
            if not Path(path).is_file():
                raise ServerError(f"TLS file not found: {path}", path=str(path))
        lines = [f'cert_file: "{Path(self.cert_file).resolve()}"', f'key_file: "{Path(self.key_file).resolve()}"']
        if routes:
            if self.ca_file is None:
                raise ServerError("a cluster with TLS needs the CA file to verify its routes")
            lines += [f'ca_file: "{Path(self.ca_file).resolve()}"', "verify: true"]
        lines.append(f"timeout: {self.timeout}")
        return "tls {\n  " + "\n  ".join(lines) + "\n}"


@dataclass(frozen=True)
class ClusterConfig:
    """Membership of a cluster: its name, this member's route port (-1: a free one) and the routes it dials."""

    name: str = "fedrefine"
    port: int = -1
    routes: tuple[str, ...] = ()  # nats-route://127.0.0.1:PORT of other members

    def config_text(self, host: str, tls: ServerTLS | None) -> str:
        """The ``cluster { ... }`` block."""
        routes = ", ".join(f'"{r}"' for r in self.routes)
        body = [f"name: {self.name}", f'listen: "{host}:{self.port}"', f"routes: [{routes}]"]
        if tls is not None:
            body.append(tls.config_text(routes=True).replace("\n", "\n  "))
        return "cluster {\n  " + "\n  ".join(body) + "\n}"


@dataclass(frozen=True)
class LeafListen:
    """A member that accepts leaf node connections on ``port`` (-1: a free one), over TLS when the server has it.

    A leaf node authenticates like a client, with a key of the server's authorization block (``privacy.permissions``
    gives leaf identities their own row): the subjects that identity may publish are what the leaf may send in, the
    subjects it may subscribe to are what the cluster sends out to the leaf.
    """

    port: int = -1

    def config_text(self, host: str, tls: ServerTLS | None) -> str:
        """The listening half of the ``leafnodes { ... }`` block."""
        body = [f'listen: "{host}:{self.port}"']
        if tls is not None:
            body.append(tls.config_text().replace("\n", "\n  "))
        return "\n  ".join(body)


@dataclass(frozen=True)
class LeafRemote:
    """A leaf node's link to the cluster: the members' leaf node URLs (tried in order when ``ordered``), the nkey
    seed of the leaf identity it logs in as, and the CA that verifies them (TLS)."""

    urls: tuple[str, ...]
    seed: str | None = None  # 'SU...' of the leaf identity (None: a server without authorization)
    ca_file: Path | None = None
    ordered: bool = True  # the first URL first, the next after a failure (nats-server's no_randomize)
    discover: bool = True  # also try the members the cluster advertises (False: only ``urls``, a fixed uplink)

    def config_text(self) -> str:
        """One entry of ``leafnodes { remotes [ ... ] }``."""
        if not self.urls:
            raise ServerError("a leaf node needs at least one URL to connect to")
        urls = ", ".join(f'"{u}"' for u in self.urls)
        body = [f"urls: [{urls}]"]
        if self.seed is not None:
            body.append(f'nkey: "{self.seed}"')
        if self.ordered:
            body.append("no_randomize: true")
        if not self.discover:
            body.append("ignore_discovered_servers: true")
        if self.ca_file is not None:
            if not Path(self.ca_file).is_file():
                raise ServerError(f"TLS file not found: {self.ca_file}", path=str(self.ca_file))
            body.append(f'tls {{ ca_file: "{Path(self.ca_file).resolve()}" }}')
        return "{\n    " + "\n    ".join(body) + "\n  }"
