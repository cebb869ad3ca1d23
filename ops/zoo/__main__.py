"""``python -m ops.zoo build [--quick] [--seed N] [--force]`` and ``python -m ops.zoo info [--quick] [--json]``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from bus.cli import OneLineParser
from bus.errors import FedRefineError


def zoo_paths(root: Path, manifest: Any) -> dict[str, Any]:
    """Absolute paths of the zoo, each model, each pair fuser (named by its models) and each gate."""
    root = root.resolve()
    names = {m.fingerprint[:16]: m.name for m in manifest.models}

    def named(fp: str) -> str:
        return names.get(fp, fp)

    fusers, gates = {}, {}
    for path in sorted((root / "fusers").glob("fuser-*-to-*")):
        src, dst = path.name.removeprefix("fuser-").split("-to-", 1)
        fusers[f"{named(src)} -> {named(dst)}"] = str(path)
    for path in sorted((root / "fusers").glob("gate-*")):
        gates[named(path.name.removeprefix("gate-"))] = str(path)
    return {
        "root": str(root),
        "models": {m.name: str((root / m.path).resolve()) for m in manifest.models},
        "fusers_dir": str(root / "fusers"),
        "fusers": fusers,
        "gates": gates,
        "questions": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")},
    }


def paths_text(paths: dict[str, Any]) -> str:
    """The paths of :func:`zoo_paths` as lines a person reads."""
    lines = [f"zoo:     {paths['root']}"]
    lines += [f"model    {name:<24} {path}" for name, path in paths["models"].items()]
    lines.append(f"fusers:  {paths['fusers_dir']}")
    lines += [f"fuser    {pair:<24} {path}" for pair, path in paths["fusers"].items()]
    lines += [f"gate     {'for ' + name:<24} {path}" for name, path in paths["gates"].items()]
    if not paths["fusers"]:
        lines.append("(no fusers yet: they are trained on first use, e.g. by make demo)")
    lines += [f"questions {split:<23} {path}" for split, path in paths["questions"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the command, run it; one ``error: ...`` line and exit 2 on a FedRefine error."""
    parser = OneLineParser(prog="python -m ops.zoo", description="the toy world and its model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("build", "build (or reuse) the zoo"), ("info", "print the manifest of a built zoo")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--quick", action="store_true", help="the small zoo used by tests (about a minute)")
        p.add_argument("--seed", type=int, default=0, help="world, split and training seed (default 0)")
    build = sub.choices["build"]
    build.add_argument("--force", action="store_true", help="rebuild even if a zoo with this spec exists")
    build.add_argument("--workers", type=int, default=2, help="models trained at a time (default 2)")
    sub.choices["info"].add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from ops.zoo.build import build_zoo, manifest_json, manifest_summary, read_manifest
        from ops.zoo.manifest import zoo_dir
        from ops.zoo.spec import zoo_spec

        spec = zoo_spec(args.quick, args.seed)
        if args.command == "build":
            if args.workers < 1:
                raise FedRefineError(f"--workers must be >= 1, got {args.workers}")
            root = build_zoo(spec, force=args.force, workers=args.workers, echo=print)
            print(manifest_summary(read_manifest(root)))
            return 0
        manifest = read_manifest(zoo_dir(spec))
        if manifest is None:
            raise FedRefineError(
                f"no {spec.name} zoo for seed {args.seed} at {zoo_dir(spec)}; run `python -m ops.zoo build"
                f"{' --quick' if args.quick else ''} --seed {args.seed}` first"
            )
        paths = zoo_paths(zoo_dir(spec), manifest)
        if args.json:
            print(json.dumps({**json.loads(manifest_json(manifest)), "paths": paths}, indent=2))
        else:
            print(manifest_summary(manifest) + "\n" + paths_text(paths))
        return 0
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
