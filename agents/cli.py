"""The entry point every ``python -m agents.<role>`` shares: config, logging, threads, model, serve, exit status."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from agents import tracing
from agents.base import Agent, serve
from agents.config import AgentConfig, parse_config
from bus.errors import FedRefineError

log = logging.getLogger(__name__)

C = TypeVar("C", bound=AgentConfig)


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
