"""An embedded ``nats-server``: find the binary, configure, start, wait until ready, stop.

Usable synchronously (``start()`` / ``stop()``, ``with NatsServer() as s``) and as an async context
manager (``async with NatsServer() as s``). The server listens on 127.0.0.1 only; without a port it
lets ``nats-server`` pick a free one (``-1``), so two servers never race for the same port.

Security is given, not decided, here: ``authorization`` is an ``authorization { ... }`` block of nats-server
configuration (``privacy.permissions`` renders it from the permission table) and ``tls`` the certificate and key
every client connection must use (``privacy.credentials`` generates them). :meth:`NatsServer.reload` swaps the
authorization block of a running server (nats-server reloads on SIGHUP and cuts clients it no longer admits):
that is how an identity is revoked. Without either, the server is open to anyone who can reach the port.

A ``cluster`` joins servers by routes (:func:`start_cluster` starts several on loopback); with ``tls`` the routes
use it too, both ways: a server joins only with a certificate of the same CA. Every member has the same
authorization block, so an identity is what it is on whichever member it connects to. ``leafnodes`` makes a member
accept leaf node connections, ``remotes`` makes a server a leaf node of others (``bus.topology`` lays out a cluster
with leaf nodes on fixed ports, in configuration files a plain ``nats-server -c FILE`` runs as well).

``conf_dir`` keeps the configuration and the log in a directory of the caller's (``<name>.conf``, ``<name>.log``,
mode 0600: a leaf node's file holds its key) instead of a private temporary one, so the same server can be killed
and started again on the same ports (:meth:`NatsServer.kill`, :meth:`NatsServer.start`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from bus.errors import ServerError
from bus.serverconf import ClusterConfig, LeafListen, LeafRemote, ServerTLS

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024  # bytes per message, headers included (nats-server's own default: 1 MB)
DEFAULT_STARTUP_TIMEOUT = 10.0  # seconds until "Server is ready"
DEFAULT_STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
DEFAULT_POLL_INTERVAL = 0.01  # seconds between readiness checks
DEFAULT_RELOAD_TIMEOUT = 10.0  # seconds for nats-server to confirm a configuration reload
MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024  # bytes; nats-server refuses more
BINARY_ENV = "FEDREFINE_NATS_SERVER"

_LISTEN_RE = re.compile(r"Listening for client connections on ([0-9.]+):(\d+)")
_ROUTE_RE = re.compile(r"Listening for route connections on ([0-9.]+):(\d+)")
_LEAF_RE = re.compile(r"Listening for leafnode connections on ([0-9.]+):(\d+)")
_READY_MARK = "Server is ready"
_RELOADED_MARK = "Reloaded server configuration"
_ROUTED_MARK = "Route connection created"
_LEAF_LINK_MARK = "Leafnode connection created"
_LIVE_SERVERS: weakref.WeakSet[NatsServer] = weakref.WeakSet()


def find_nats_server(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``nats-server``: ``explicit``, the venv's ``bin/``, ``PATH``, then ``$FEDREFINE_NATS_SERVER``."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ServerError(f"nats-server binary not found or not executable: {explicit}", path=str(explicit))
    candidates = [Path(sys.executable).parent / "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    env = os.environ.get(BINARY_ENV)
    if env:
        candidates.append(Path(env))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServerError(
        f"nats-server binary not found (looked in {Path(sys.executable).parent}, PATH and ${BINARY_ENV}); "
        "run `make install` or set FEDREFINE_NATS_SERVER",
        path=None,
    )


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """True when nothing listens on ``host:port`` and it can be bound.

    Bound as nats-server binds, with SO_REUSEADDR: connections of a server that just stopped linger in TIME_WAIT
    on that port for a minute, and must not keep a new server from starting there at once.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class NatsServer:
    """One ``nats-server`` process on 127.0.0.1, with its config and logs in a private temp dir."""

    def __init__(
        self,
        port: int | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        jetstream_dir: str | os.PathLike[str] | None = None,
        max_pending: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        host: str = DEFAULT_HOST,
        authorization: str | None = None,
        tls: ServerTLS | None = None,
        cluster: ClusterConfig | None = None,
        leafnodes: LeafListen | None = None,
        remotes: tuple[LeafRemote, ...] = (),
        name: str | None = None,
        conf_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if name is not None and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) is None:
            raise ServerError(f"invalid server name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
        if port is not None and not 0 < port < 65536:
            raise ServerError(f"port must be 1..65535, got {port}", port=port)
        if not 0 < max_payload <= MAX_PAYLOAD_LIMIT:
            raise ServerError(f"max_payload must be 1..{MAX_PAYLOAD_LIMIT} bytes, got {max_payload}")
        self.requested_port = port
        self.max_payload = max_payload
        self.jetstream_dir = Path(jetstream_dir) if jetstream_dir is not None else None
        self.max_pending = max_pending
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.host = host
        self.authorization = authorization
        self.tls = tls
        self.cluster = cluster
        self.leafnodes = leafnodes
        self.remotes = tuple(remotes)
        self.name = name
        self.conf_dir = Path(conf_dir) if conf_dir is not None else None
        self.port: int | None = None
        self.route_port: int | None = None  # in a cluster, where the other members dial in
        self.leaf_port: int | None = None  # where leaf nodes dial in (with ``leafnodes``)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self._out_path: Path | None = None
        self._config_path: Path | None = None
        self._deadline = 0.0
        self._log_start: dict[Path, int] = {}  # log bytes written before this start (a kept log is appended to)

    # -- public surface -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` of the running server (``tls://`` when it requires TLS)."""
        if self.port is None:
            raise ServerError("nats-server is not running")
        return f"{'tls' if self.tls is not None else 'nats'}://{self.host}:{self.port}"

    @property
    def secure(self) -> bool:
        """Whether clients must authenticate and use TLS."""
        return self.authorization is not None and self.tls is not None

    def reload(self, authorization: str | None = None, timeout: float = DEFAULT_RELOAD_TIMEOUT) -> None:
        """Replace the authorization block (None: keep it) and make the running server reload its configuration.

        Blocks until nats-server confirms; clients whose identity the new block no longer admits are disconnected.
        """
        if not self.running or self._config_path is None or self._log_path is None:
            raise ServerError("nats-server is not running; nothing to reload")
        if authorization is not None:
            self.authorization = authorization
        before = self.log_text().count(_RELOADED_MARK)
        self._config_path.write_text(self._config_text(self._log_path))
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + timeout
        while self.log_text().count(_RELOADED_MARK) <= before:
            if not self.running:
                raise ServerError(f"nats-server exited while reloading: {self._failure_line(self.log_text())}")
            if time.monotonic() > end:
                raise ServerError(f"nats-server did not confirm the reload within {timeout:.0f} s")
            time.sleep(DEFAULT_POLL_INTERVAL)
        log.info("nats-server pid %d reloaded its configuration", self._proc.pid)

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NatsServer:
        """Start the server and block until it accepts connections."""
        self._spawn()
        try:
            while not self._check_ready():
                time.sleep(DEFAULT_POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise
        return self

    async def astart(self) -> NatsServer:
        """Start the server and wait (without blocking the event loop) until it accepts connections."""
        self._spawn()
        try:
            while not self._check_ready():
                await asyncio.sleep(DEFAULT_POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def config_path(self) -> Path | None:
        """The configuration file of the running server (kept after a stop with ``conf_dir``)."""
        return self._config_path

    def kill(self) -> None:
        """SIGKILL the server (a crash: clients and links see their connections drop); start() brings it back."""
        self.stop(timeout=0.0)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds (0: SIGKILL at once); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and timeout <= 0:
                proc.kill()
                proc.wait()
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("nats-server pid %d ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            log.debug("nats-server pid %d stopped (rc=%s)", proc.pid, proc.returncode)
        _LIVE_SERVERS.discard(self)
        self.port = None
        self.route_port = None
        self.leaf_port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_text(self) -> str:
        """The server's log since it was last started (empty when not started)."""
        parts = []
        for path in (self._log_path, self._out_path):
            if path is not None and path.exists():
                with open(path, "rb") as f:
                    f.seek(self._log_start.get(path, 0))
                    parts.append(f.read().decode(errors="replace"))
        return "".join(parts)

    def leaf_links(self) -> int:
        """Leaf node links this server made or accepted since it started (a leaf node waits for its first)."""
        return self.log_text().count(_LEAF_LINK_MARK)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"url={self.url}" if self.port is not None else "stopped"
        named = f"{self.name}, " if self.name else ""
        return f"NatsServer({named}{state}, max_payload={self.max_payload}, secure={self.secure})"

    # -- internals ------------------------------------------------------------------------------------

    def _config_text(self, log_path: Path) -> str:
        port = self.requested_port if self.requested_port is not None else -1
        lines = [f"server_name: {self.name}"] if self.name else []
        lines += [
            f'listen: "{self.host}:{port}"',
            f"max_payload: {self.max_payload}",
            f'log_file: "{log_path}"',
        ]
        if self.max_pending is not None:
            lines.append(f"max_pending: {self.max_pending}")
        if self.jetstream_dir is not None:
            lines.append(f'jetstream {{ store_dir: "{self.jetstream_dir.resolve()}" }}')
        if self.tls is not None:
            lines.append(self.tls.config_text())
        if self.cluster is not None:
            lines.append(self.cluster.config_text(self.host, self.tls))
        if self.leafnodes is not None or self.remotes:
            body = [self.leafnodes.config_text(self.host, self.tls)] if self.leafnodes is not None else []
            if self.remotes:
                body.append("remotes [\n  " + "\n  ".join(r.config_text() for r in self.remotes) + "\n  ]")
            lines.append("leafnodes {\n  " + "\n  ".join(body) + "\n}")
        if self.authorization is not None:
            lines.append(self.authorization)
        return "\n".join(lines) + "\n"

    def _spawn(self) -> None:
        if self._proc is not None:
            raise ServerError(f"nats-server already started ({self!r})")
        binary = find_nats_server(self.binary)
        if self.requested_port is not None and not port_is_free(self.requested_port, self.host):
            raise ServerError(f"port {self.requested_port} is already in use", port=self.requested_port)
        if self.jetstream_dir is not None:
            try:
                self.jetstream_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServerError(f"cannot create JetStream dir {self.jetstream_dir}: {exc}") from exc
        if self.conf_dir is not None:
            try:
                self.conf_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServerError(f"cannot create {self.conf_dir}: {exc}") from exc
            where, stem = self.conf_dir, self.name or "nats-server"
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedrefine-nats-")
            where, stem = Path(self._tmp.name), "nats-server"
        self._log_path = where / f"{stem}.log"
        self._out_path = where / f"{stem}.out"
        self._log_start = {p: p.stat().st_size if p.exists() else 0 for p in (self._log_path, self._out_path)}
        config = self._config_path = where / f"{stem}.conf"
        try:
            write_private(config, self._config_text(self._log_path))
        except (ServerError, OSError) as exc:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
            if isinstance(exc, OSError):
                raise ServerError(f"cannot write {config}: {exc}", path=str(config)) from exc
            raise
        with open(self._out_path, "ab") as out:
            try:
                self._proc = subprocess.Popen(
                    [str(binary), "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            except OSError as exc:
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None
                raise ServerError(f"cannot run {binary}: {exc}", path=str(binary)) from exc
        _LIVE_SERVERS.add(self)
        self._deadline = time.monotonic() + self.startup_timeout
        log.debug("nats-server pid %d starting with %s", self._proc.pid, config)

    def _check_ready(self) -> bool:
        """One readiness poll: True when ready; raises ServerError on exit or timeout."""
        assert self._proc is not None
        text = self.log_text()
        if self._proc.poll() is not None:
            message = self._failure_line(text)
            self.stop()
            raise ServerError(message, port=self.requested_port)
        if _READY_MARK in text:
            match = _LISTEN_RE.search(text)
            if match is None:
                self.stop()
                raise ServerError("nats-server is ready but did not report its client port")
            port = int(match.group(2))
            route = _ROUTE_RE.search(text)
            leaf = _LEAF_RE.search(text)
            # nats-server says it is ready before it reports its route port: poll on until it has (or time runs out)
            missing = (self.cluster is not None and route is None) or (self.leafnodes is not None and leaf is None)
            if not missing and _accepts(self.host, port):
                self.route_port = int(route.group(2)) if route is not None else None
                self.leaf_port = int(leaf.group(2)) if leaf is not None else None
                self.port = port
                log.info("nats-server pid %d ready at %s", self._proc.pid, self.url)
                return True
        if time.monotonic() > self._deadline:
            self.stop()
            raise ServerError(f"nats-server did not become ready within {self.startup_timeout:.0f} s")
        return False

    def _failure_line(self, text: str) -> str:
        if "address already in use" in text:
            return f"port {self.requested_port} is already in use"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "[FTL]" in ln or "[ERR]" in ln or "error" in ln.lower()]
        last = (errors or lines or ["no output"])[-1]
        return f"nats-server exited at start: {last}"


def start_cluster(size: int, name: str = "fedrefine", **options: object) -> list[NatsServer]:
    """``size`` servers on loopback joined in one cluster (each dials the first; the rest is gossip), started and
    stopped together: if one fails to start, the others are stopped."""
    if size < 1:
        raise ServerError(f"a cluster needs at least one server, got {size}")
    servers: list[NatsServer] = []
    try:
        first = NatsServer(cluster=ClusterConfig(name), **options).start()  # type: ignore[arg-type]
        servers.append(first)
        route = (f"nats-route://{first.host}:{first.route_port}",)
        for _ in range(size - 1):
            servers.append(NatsServer(cluster=ClusterConfig(name, routes=route), **options).start())  # type: ignore[arg-type]
        end = time.monotonic() + first.startup_timeout
        while size > 1 and not all(_ROUTED_MARK in s.log_text() for s in servers):  # every member is routed
            if time.monotonic() > end:
                raise ServerError(f"the {size} servers did not form a cluster within {first.startup_timeout:.0f} s")
            time.sleep(DEFAULT_POLL_INTERVAL)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (a configuration can hold a leaf node's key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@atexit.register
def _stop_leftovers() -> None:
    """Never leave a server behind when the interpreter exits without stopping it."""
    for server in list(_LIVE_SERVERS):
        server.stop(timeout=1.0)
