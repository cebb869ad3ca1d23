"""``python -m ops.server [--port N] [--jetstream DIR] [--max-payload BYTES]``: run an embedded nats-server.

Prints the server's URL on stdout, then runs until Ctrl-C (or SIGTERM) and stops the server cleanly.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from types import FrameType

from bus.errors import FedRefineError
from bus.server import DEFAULT_MAX_PAYLOAD, NatsServer

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
    parser = argparse.ArgumentParser(prog="python -m ops.server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    parser.add_argument("--jetstream", metavar="DIR", default=None, help="enable JetStream with this store dir")
    parser.add_argument(
        "--max-payload", type=parse_size, default=DEFAULT_MAX_PAYLOAD, help="largest message, e.g. 8MB (default)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start the server, print its URL, wait for Ctrl-C or SIGTERM, stop it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server: NatsServer | None = None
    try:
        server = NatsServer(args.port, max_payload=args.max_payload, jetstream_dir=args.jetstream)
        server.start()
        print(server.url, flush=True)
        print(f"nats-server pid {server.pid}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print("error: nats-server exited unexpectedly", file=sys.stderr)
                return 1
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
