"""``python -m ops.server [--creds-dir DIR] [--cluster N] [--leaves N] [--insecure]``: run embedded nats-servers.

Authorization and TLS are on: the server admits exactly the identities of ``--creds-dir`` (default
``.cache/creds``; created with one identity per demo agent, a ``client`` and a ``monitor`` when missing) with the
permissions of ``privacy.permissions``, over TLS with the directory's certificate. Each agent connects with
``--creds DIR/<id>.creds --tls-ca DIR/ca.pem``. ``python -m ops.creds issue|revoke`` changes who is admitted and
signals this process (SIGHUP), which reloads the server: a revoked identity is cut off at once.

``--cluster N`` runs N servers joined by routes (mutual TLS with the directory's CA), each with the same
authorization, and prints their URLs comma-separated: agents take that list as ``--nats`` and fail over.
``--leaves N`` adds N leaf nodes (``leaf1``..), each linked to every member in turn (``leaf<i>`` to member
``i mod N`` first) and logging in as its own leaf identity, issued when missing, that carries transmitter ``t<i>``
(``python -m ops.creds issue leaf ID --serves TID`` for others); a device's transmitter connects to its leaf's URL.
Every server's configuration file and log go to ``--conf-dir`` (default ``DIR/servers``): ``nats-server -c
DIR/servers/n1.conf`` runs the same member by hand. Each line after the first names one leaf node and its URL.

``--insecure`` runs without authorization or TLS (anyone who reaches the port may read and forge everything);
it says so on stderr. Prints the server's URL on stdout, then runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from bus.cli import OneLineParser
from bus.errors import FedRefineError, ServerError
from bus.server import DEFAULT_MAX_PAYLOAD, NatsServer
from bus.subjects import DEFAULT_PREFIX
from bus.topology import Topology
from privacy.credentials import DEFAULT_CREDS_DIR, DEFAULT_IDENTITIES, REGISTRY_FILE, CredentialStore

PID_FILE = "server.pid"  # in the creds dir: the ops.server process that ops.creds signals after a change
DEFAULT_TICK_S = 0.1  # seconds between checks for a stop or a reload
INSECURE_WARNING = (
    "warning: --insecure: no authorization and no TLS; anyone who reaches this port can read every question and "
    "forge every message"
)

_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?i?b?)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """``8MB`` / ``512k`` / ``1048576`` -> bytes (binary units)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512k, 8MB)")
    unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(match.group(1)) * _UNITS[unit]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = OneLineParser(prog="python -m ops.server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    parser.add_argument("--cluster", type=int, default=1, metavar="N", help="N servers joined in a cluster")
    parser.add_argument("--leaves", type=int, default=0, metavar="N", help="N leaf nodes linked to the cluster")
    parser.add_argument("--conf-dir", type=Path, default=None, help="configuration files and logs (DIR/servers)")
    parser.add_argument("--creds-dir", type=Path, default=DEFAULT_CREDS_DIR, help="identities, keys and certificates")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix new credentials are made for")
    parser.add_argument("--insecure", action="store_true", help="no authorization, no TLS (prints a warning)")
    parser.add_argument("--jetstream", metavar="DIR", default=None, help="enable JetStream with this store dir")
    parser.add_argument(
        "--max-payload", type=parse_size, default=DEFAULT_MAX_PAYLOAD, help="largest message, e.g. 8MB (default)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def open_store(root: Path, prefix: str) -> tuple[CredentialStore, bool]:
    """The credentials directory, created with the default identities when it has none; (store, created)."""
    created = not (root / REGISTRY_FILE).is_file()
    store = CredentialStore(root, prefix) if created else CredentialStore.open(root)
    store.ensure(DEFAULT_IDENTITIES if created else ())
    return store, created


def main(argv: list[str] | None = None) -> int:
    """Start the server, print its URL, reload on SIGHUP, stop on Ctrl-C or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    stop, reload = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        (reload if signum == signal.SIGHUP else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    servers: list[NatsServer] = []
    topology: Topology | None = None
    pid_file: Path | None = None
    try:
        if args.port is not None and not 0 < args.port < 65536:
            raise ServerError(f"port must be 1..65535, got {args.port}", port=args.port)
        if not 1 <= args.cluster <= 16 or not 0 <= args.leaves <= 64:
            raise ServerError("--cluster takes 1..16 servers and --leaves 0..64 leaf nodes")
        if (args.cluster > 1 or args.leaves) and (args.port is not None or args.jetstream):
            raise ServerError("--cluster and --leaves pick free ports themselves (no --port, --jetstream)")
        store = None
        if args.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        else:
            store, created = open_store(args.creds_dir, args.prefix)
            if created:
                ids = ", ".join(f"{i.role} {i.id}" for i in store.active())
                print(f"wrote credentials to {store.root}: {ids}", file=sys.stderr, flush=True)
        if args.cluster > 1 or args.leaves:
            topology = _topology(args, store).start()
            servers = topology.servers()
            print(",".join(topology.urls), flush=True)
            for name, leaf in topology.leaves.items():
                print(f"{name} {leaf.url}", flush=True)
            print(f"configuration files and logs: {topology.conf_dir}", file=sys.stderr, flush=True)
        else:
            servers = _start(args, store)
            print(",".join(s.url for s in servers), flush=True)
        if store is not None:
            pid_file = store.root / PID_FILE
            pid_file.write_text(f"{os.getpid()}\n")
            pids = ", ".join(str(s.pid) for s in servers)
            print(
                f"nats-server pid {pids}; agents: --creds {store.root}/<id>.creds --tls-ca {store.ca_file}; "
                "Ctrl-C to stop",
                file=sys.stderr,
                flush=True,
            )
        while not stop.wait(DEFAULT_TICK_S):
            if not all(s.running for s in servers):
                print("error: nats-server exited unexpectedly", file=sys.stderr)
                return 1
            if reload.is_set():
                reload.clear()
                if store is not None:
                    store = CredentialStore.open(store.root)
                    for server in servers:
                        server.reload(store.authorization())
                    print(f"reloaded: {len(store.active())} identities admitted", file=sys.stderr, flush=True)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        if topology is not None:
            topology.stop()
        for server in servers:
            server.stop()
    return 0


LEAF_ID = "leaf{}"  # the leaf identities --leaves issues
LEAF_CARRIES = "t{}"  # ... and the transmitter each one carries


def _topology(args: argparse.Namespace, store: CredentialStore | None) -> Topology:
    """The cluster and its leaf nodes (not started); leaf identities issued when missing."""
    leaves = [(LEAF_ID.format(i), (i - 1) % args.cluster) for i in range(1, args.leaves + 1)]
    options = {"max_payload": args.max_payload}
    if store is None:
        from bus.topology import LeafSpec

        conf_dir = args.conf_dir or Path(".cache") / "servers"
        return Topology(args.cluster, [LeafSpec(n, None, p) for n, p in leaves], conf_dir=conf_dir, **options)
    store.ensure([("leaf", name, LEAF_CARRIES.format(i)) for i, (name, _) in enumerate(leaves, 1)])
    return store.topology(args.cluster, leaves, args.conf_dir, **options)


def _start(args: argparse.Namespace, store: CredentialStore | None) -> list[NatsServer]:
    """One server, started."""
    options = {"max_payload": args.max_payload}
    if store is not None:
        return [store.server(args.port, jetstream_dir=args.jetstream, **options).start()]
    return [NatsServer(args.port, jetstream_dir=args.jetstream, **options).start()]


if __name__ == "__main__":
    raise SystemExit(main())
