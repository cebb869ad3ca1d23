"""Dispatch ``python -m ops.bench <name>`` to ``ops.bench.<name>``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from bus.errors import FedRefineError
from ops.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    """Parse the benchmark name, run it, print (and optionally save) its JSON."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    modules = {}
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"ops.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ops.bench.{name}":
                raise
            continue  # not built yet
        modules[name] = module
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = modules[args.name].run(args)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
