"""The entry point every ``python -m agents.<role>`` (and ``fedrefine <role>``) shares.

Flags are parsed before the role's module, and so torch, is imported: ``--help`` and a bad flag answer at once.
Then logging, threads, the model, and serving until a signal; the exit status says how it ended.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from agents import tracing
from agents.base import Agent, serve
from agents.config import (
    AgentConfig,
    GateAgentConfig,
    ReceiverConfig,
    RephraserConfig,
    TransmitterConfig,
    parse_config,
)
from bus.errors import FedRefineError

log = logging.getLogger(__name__)

C = TypeVar("C", bound=AgentConfig)

# role -> (its settings model, the agent class in agents.<role>)
ROLES: dict[str, tuple[type[AgentConfig], str]] = {
    "transmitter": (TransmitterConfig, "TransmitterAgent"),
    "receiver": (ReceiverConfig, "ReceiverAgent"),
    "gate": (GateAgentConfig, "GateAgent"),
    "rephraser": (RephraserConfig, "RephraserAgent"),
}


def role_description(role: str) -> str:
    """The first line of ``agents.<role>``'s docstring, read without importing the module (and torch)."""
    spec = importlib.util.find_spec(f"agents.{role}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    return doc.splitlines()[0] if doc else ""


def main(role: str, argv: Sequence[str] | None = None) -> int:
    """``python -m agents.<role>``: parse the flags, then import the role's agent, build and serve it."""
    cls, agent_name = ROLES[role]

    def factory(cfg: AgentConfig) -> Agent:
        return getattr(importlib.import_module(f"agents.{role}"), agent_name)(cfg)

    return run_agent(role, cls, factory, argv, role_description(role))


def setup_logging(level: str) -> None:
    """One log line per event on stderr, with the logger's name and the query it is about (``[q=<id>]``)."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=tracing.LOG_FORMAT, force=True)
    tracing.install()
    for noisy in ("nats", "asyncio", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def run_agent(
    role: str,
    cls: type[C],
    factory: Callable[[C], Agent],
    argv: Sequence[str] | None = None,
    description: str = "",
) -> int:
    """Parse the config, build the agent (loading its model), serve until a signal; 0 ok, 2 bad input."""
    try:
        cfg = parse_config(cls, role, argv, description=description)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help (0) or a bad flag (2, already reported on one line)
        return int(exc.code or 0)
    setup_logging(cfg.log_level)
    import torch

    # one core for model math, in every role: torch's default (all cores) makes its idle OpenMP workers spin
    # after each op, which cost the gate ~7 ms of CPU per query that the other agents were waiting for
    torch.set_num_threads(cfg.threads)
    try:
        agent = factory(cfg)
        asyncio.run(serve(agent))
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
