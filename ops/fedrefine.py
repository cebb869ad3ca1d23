"""``fedrefine <command> [flags]``: every FedRefine command under one name (``python -m <module>`` works too).

Each command is the same as its module's ``python -m``: ``fedrefine transmitter --help`` is
``python -m agents.transmitter --help``. Only the chosen command's module is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module whose main(argv) runs it, one line for the list)
COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("ops.server", "an embedded nats-server with fresh credentials"),
    "receiver": ("agents.receiver", "the receiver agent: owns the question, fuses, answers"),
    "transmitter": ("agents.transmitter", "a transmitter agent: prefills q', offers and streams its cache"),
    "gate": ("agents.gate", "the fusion gate agent: scores offers, publishes plans"),
    "rephraser": ("agents.rephraser", "the rephraser agent: q -> q' for private questions"),
    "ask": ("ops.ask", "push a question (or a file of them) and print the answer"),
    "gateway": ("ops.gateway", "an OpenAI-compatible HTTP endpoint in front of a federation"),
    "demo": ("ops.demo", "the whole federation on one machine, with the sample questions"),
    "watch": ("ops.watch", "a live view of a running federation"),
    "creds": ("ops.creds", "issue, revoke and list identities"),
    "zoo": ("ops.zoo.__main__", "build or describe the toy world's model zoo"),
    "real": ("ops.real.__main__", "fetch and build the real-model kit"),
    "train": ("fusion.train_cli", "train a pair fuser (or a gate) from a JSONL file"),
    "bench": ("ops.bench.__main__", "run a benchmark, print (and save) its JSON"),
    "report": ("ops.report.build", "PNG figures and a summary from benchmark JSON"),
}
AGENTS = ("receiver", "transmitter", "gate", "rephraser")


def usage() -> str:
    """The list of commands."""
    lines = ["usage: fedrefine COMMAND [flags]   (fedrefine COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command with the rest of the arguments; 2 and one ``error:`` line for an unknown one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args or args[0] not in COMMANDS:
        what = f"unknown command {args[0]!r}" if args else "name a command"
        print(f"error: {what}; choose one of {', '.join(COMMANDS)} (see fedrefine --help)", file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    if name in AGENTS:  # flags are parsed before the agent's module (and torch) is imported
        from agents.cli import main as agent_main

        return agent_main(name, rest)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
