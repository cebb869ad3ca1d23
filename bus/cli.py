"""What every command shares on its surface: the one-line-error parser and the ``--nats`` address rule.

Every command answers a bad flag or value with one ``error: ...`` line on stderr and exit status 2
(:class:`OneLineParser`); every ``--nats`` takes what nats-py and the ``nats`` CLI take (:func:`nats_servers`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import NoReturn

from bus.errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_NATS_PORT = 4222  # the port of a server address given without one (as nats-py does)
NATS_URL_ENV = "NATS_URL"  # the NATS tools' own variable; FEDREFINE_NATS wins over it
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
NATS_HELP = (
    "NATS server: a URL (nats://, tls://, ws://, wss://), host:port or host, or several comma-separated "
    "(a cluster: tried in order, failed over); also read from FEDREFINE_NATS, then NATS_URL"
)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error: ...`` line and exit status 2 (subcommands too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):  # type: ignore[override]
        kwargs.setdefault("parser_class", OneLineParser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _one_server(text: str) -> str:
    """``host``, ``host:port`` or a URL -> a URL nats-py takes; ValueError names what is wrong."""
    if not text:
        raise ValueError("an empty server address (two commas, or a trailing one?)")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() not in NATS_SCHEMES:
            raise ValueError(f"{text!r}: scheme {scheme!r} is not one of {', '.join(NATS_SCHEMES)}")
    else:
        scheme, rest = "nats", text
    hostport = rest.rsplit("@", 1)[-1].split("/", 1)[0]  # user:pass@host:port/path
    host, sep, port = hostport.rpartition(":") if not hostport.endswith("]") else (hostport, "", "")
    if not sep:
        host, port = hostport, ""
    if not host:
        raise ValueError(f"{text!r} names no host (like nats://127.0.0.1:4222 or 127.0.0.1:4222)")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: port {port!r} is not 1..65535")
    if "://" in text:
        return text
    return f"{scheme}://{host}:{port or DEFAULT_NATS_PORT}"


def nats_servers(text: str) -> str:
    """The servers of a ``--nats`` value, comma-separated URLs; :class:`ConfigError` with one line when bad."""
    try:
        return ",".join(_one_server(part.strip()) for part in str(text).split(","))
    except ValueError as exc:
        raise ConfigError(f"--nats: {exc}") from exc


def nats_from_env(env: Mapping[str, str]) -> str:
    """``FEDREFINE_NATS``, else ``NATS_URL``, else the default (not yet checked: pass it to :func:`nats_servers`)."""
    return env.get("FEDREFINE_NATS") or env.get(NATS_URL_ENV) or DEFAULT_NATS_URL


def nats_argument(value: str) -> str:
    """An argparse ``type=`` for ``--nats``: a bad address is argparse's one-line error."""
    try:
        return nats_servers(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--nats: ")) from exc
