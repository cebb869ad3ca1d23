"""Dispatch ``python -m ops.bench <name>`` to ``ops.bench.<name>`` (only that module is imported)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

from bus.cli import OneLineParser
from bus.errors import FedRefineError
from ops.bench import BENCHMARKS, write_json


def _usage() -> str:
    lines = ["usage: python -m ops.bench NAME [--json FILE] [options]", "", "benchmarks:"]
    lines += [f"  {name:<11} {text}" for name, text in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark, print its JSON and optionally save it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if not argv:
        print(f"error: name a benchmark: {', '.join(BENCHMARKS)} (see python -m ops.bench --help)", file=sys.stderr)
        return 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"ops.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ops.bench.{name}":
            raise
        print(f"error: benchmark {name!r} is not built yet", file=sys.stderr)
        return 2
    parser = OneLineParser(prog=f"python -m ops.bench {name}", description=BENCHMARKS[name])
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # --help (0), or a bad flag already reported on one line (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = module.run(args)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
