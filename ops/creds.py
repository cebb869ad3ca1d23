"""Issue, revoke and list a federation's identities: ``python -m ops.creds issue|revoke|list [--creds-dir DIR]``.

    python -m ops.creds issue transmitter phone-7          # a new device: writes DIR/phone-7.creds
    python -m ops.creds issue rephraser reph-2 --serves rx  # a rephraser for receiver rx only
    python -m ops.creds issue leaf leaf-7 --serves phone-7   # the leaf node of phone-7's device (carries it only)
    python -m ops.creds revoke phone-7                     # stolen: its key is no longer admitted
    python -m ops.creds list

After a change, a running ``python -m ops.server`` on the same directory is signalled (SIGHUP) and reloads: a new
identity may connect at once, a revoked one is disconnected and refused. Without a running server the change
applies when one starts. Roles and what each may do: ``privacy.permissions``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from bus.cli import OneLineParser
from bus.errors import ConfigError, FedRefineError
from ops.server import PID_FILE
from privacy.credentials import DEFAULT_CREDS_DIR, CredentialStore
from privacy.permissions import ROLES


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    p = OneLineParser(prog="python -m ops.creds", description=__doc__.splitlines()[0])
    p.add_argument("--creds-dir", type=Path, default=DEFAULT_CREDS_DIR, help="the federation's credentials directory")
    sub = p.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="a new identity (a new device, a new agent)")
    issue.add_argument("role", choices=ROLES)
    issue.add_argument("id", help="its id (A-Z a-z 0-9 _ -, at most 64); the agent's --id")
    issue.add_argument(
        "--serves",
        default=None,
        help="rephraser: the receiver id it serves; leaf: the transmitter id it carries (default: every one)",
    )
    revoke = sub.add_parser("revoke", help="stop admitting an identity and delete its credentials file")
    revoke.add_argument("id")
    sub.add_parser("list", help="every identity, revoked ones too")
    return p


def signal_server(root: Path) -> int | None:
    """SIGHUP the ``ops.server`` running on ``root`` (its pid file); the pid, or None when none runs."""
    try:
        pid = int((root / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return None
    return pid


def main(argv: list[str] | None = None) -> int:
    """0 done, 2 bad input."""
    args = build_parser().parse_args(argv)
    try:
        store = CredentialStore.open(args.creds_dir)
        if args.command == "list":
            for i in store.identities:
                serves = f" serves {i.serves}" if i.serves else ""
                print(f"{i.id:<24} {i.role:<12}{' REVOKED' if i.revoked else ''}{serves}  {i.public_key}")
            return 0
        if args.command == "issue":
            path = store.issue(args.role, args.id, args.serves)
            print(f"issued {args.role} {args.id}: {path} (give it to that device only; CA: {store.ca_file})")
        elif args.command == "revoke":
            store.revoke(args.id)
            print(f"revoked {args.id}")
        else:  # pragma: no cover - argparse only allows the three
            raise ConfigError(f"unknown command {args.command}")
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pid = signal_server(store.root)
    print(f"server (pid {pid}) reloading" if pid else "no server running on this directory: applies at its start")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
