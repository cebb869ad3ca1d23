"""``python -m fusion.train``: a fuser for any pair of models, or a gate for a receiver, from a JSONL file.

A fuser::

    python -m fusion.train --receiver M --transmitter M --data FILE --out DIR [--window 1] [--steps 300]

``M`` is what ``--model`` takes (a .gguf file, a checkpoint directory, a tiny name). Each line of FILE is one
item: ``stem`` (the question), ``answer`` (text, or an option index with ``options``), and optionally ``notes``
(the lines the transmitter reads before the question; ``coverage`` with them), ``shared_stem`` (q' of a private
question: the transmitter reads it, the receiver reads it then ``stem``), ``keep`` (true: train the receiver to
answer as it would alone: the transmitter's cache must do no harm), ``split`` (``"held-out"``: evaluated, never
trained on; otherwise a seeded ``--held-out`` share of the items is). Both models stay frozen; their caches are
computed once; the loss is on the answer tokens; progress bar; ``--resume`` continues from the last checkpoint
in DIR. The fuser lands in DIR as ``fuser-<transmitter fp>-to-<receiver fp>/`` (``fusion.registry``), with
its parameters, bytes and training facts, and the held-out accuracy fused and alone is printed as JSON.

A cache translator (``fusion.translate``: no answers needed, any text both models read)::

    python -m fusion.train --translator --receiver M --transmitter M --data FILE --out DIR [--rank 256]

where FILE is plain text, one note or sentence per line (read in seeded blocks of ``--lines-per-block``), or a
JSONL training file whose rows' ``notes`` are the blocks. The rows (each transmitter token's cache against the
receiver's) are checkpointed as they are computed (``--resume``); the fit is one ridge regression (seconds to
minutes); then ``--tune-steps`` of tuning make the receiver, reading the translation, write what a reader of the
real lines writes (each block repeated; a JSONL row's answer to its question); the held-out R^2, the tuning loss,
parameters and bytes are printed. A model into itself gets the exact identity.

A gate (after the fusers of every transmitter model into this receiver are in DIR)::

    python -m fusion.train --gate --receiver M --transmitter NAME=M [--transmitter NAME=M ...] --data FILE --out DIR

where each item's ``notes`` is an object: per transmitter NAME, ``{"lines": [...], "coverage": x}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.cli import OneLineParser
from bus.errors import ConfigError, FedRefineError

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT = 0.1  # share of items kept out of training to report accuracy on
DEFAULT_STEPS = 300
MAX_EVAL = 200  # held-out items evaluated at the end (generation is the slow part)


class TrainRow(BaseModel):
    """One line of a training file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stem: str = Field(min_length=1)
    answer: str | int
    options: tuple[str, ...] = ()
    notes: tuple[str, ...] | dict[str, dict[str, Any]] = ()
    coverage: float = Field(default=0.0, ge=0.0, le=1.0)
    shared_stem: str | None = None
    keep: bool = False
    split: str = ""
    id: str = ""


def read_rows(path: str | Path) -> list[TrainRow]:
    """Every row of a JSONL training file (``ConfigError`` naming the first bad line)."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read training data {str(path)!r}: {exc}", path=str(path)) from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(TrainRow.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "line"
            raise ConfigError(f"{path}:{n}: {where}: {first['msg']}", path=str(path), line=n) from exc
    if not rows:
        raise ConfigError(f"{path} has no training items", path=str(path))
    return rows


def split_rows(rows: list[TrainRow], share: float, seed: int) -> tuple[list[TrainRow], list[TrainRow]]:
    """``(train, held_out)``: rows marked ``held-out``, or else a seeded ``share`` of them, are held out."""
    marked = [r for r in rows if r.split == "held-out"]
    if marked:
        return [r for r in rows if r.split != "held-out"], marked
    order = list(range(len(rows)))
    random.Random(f"held-out/{seed}").shuffle(order)
    n = round(len(rows) * share)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def to_item(row: TrainRow):
    """A ``fusion.examples.FusionItem`` of a fuser training row."""
    from fusion.examples import KEEP_OWN, FusionItem

    if isinstance(row.notes, dict):
        raise ConfigError("a fuser's training rows have notes as a list of lines (an object is for --gate)")
    target = KEEP_OWN if row.keep else row.answer
    if isinstance(target, int) and not row.keep:
        if not 0 <= target < len(row.options):
            raise ConfigError(f"answer index {target} is out of range for the options of {row.stem!r}")
        target = row.options[target]
    return FusionItem(
        row.stem, row.options, target, shared_stem=row.shared_stem, notes=row.notes, coverage=row.coverage
    )


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m fusion.train", description=__doc__.splitlines()[0])
    p.add_argument("--receiver", required=True, help="receiver model (.gguf, checkpoint directory, tiny name)")
    p.add_argument("--transmitter", required=True, action="append", help="transmitter model (--gate: NAME=MODEL)")
    p.add_argument("--data", required=True, type=Path, help="JSONL training items")
    p.add_argument("--out", required=True, type=Path, help="fuser registry directory (the receiver's --fusers)")
    p.add_argument("--gate", action="store_true", help="train the receiver's gate instead of a fuser")
    p.add_argument("--translator", action="store_true", help="fit a cache translator instead of a fuser")
    p.add_argument("--rank", type=int, default=None, help="translator rank (default 256)")
    p.add_argument("--ridge", type=float, default=None, help="translator ridge on standardised features")
    p.add_argument("--lines-per-block", type=int, default=3, help="translator: text lines read as one block")
    p.add_argument("--tune-steps", type=int, default=100, help="translator: tuning steps after the fit (0: none)")
    p.add_argument(
        "--tune-window",
        type=int,
        default=None,
        help="translator: answer tokens scored per tuning item (a random window of a longer answer; 0: all; "
        "default 16)",
    )
    p.add_argument(
        "--weights",
        choices=["int8", "fp16"],
        default="int8",
        help="translator: how its two matrices are stored (int8: half the bytes, one scale per column)",
    )
    p.add_argument("--window", default="1", help="fuse the last N shared tokens, or 'all' (default 1)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="items per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--hidden", type=int, default=64, help="fuser MLP width")
    p.add_argument("--held-out", type=float, default=DEFAULT_HELD_OUT, help="share of items held out")
    p.add_argument("--seed", type=int, default=0, help="initialisation, split and batch order")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--dtype", default="float32", help="models' dtype")
    p.add_argument("--device", default=None, help="torch device")
    return p


def _window(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--window: {text!r} is not a number of tokens or 'all'") from None
    if value < 1:
        raise ConfigError("--window must be at least 1")
    return value


def fuser_config(receiver, window: int | None, steps: int, **kwargs):
    """The ``FuserTrainConfig`` for a pair: pretrained (text-style) receivers get RMS-scaled deltas and fuse the
    held-back last prompt token as it is computed (``fusion.live``)."""
    from fusion.train import FuserTrainConfig

    text = receiver.style == "text"
    return FuserTrainConfig(
        steps=steps, window=window, rms_scale=text, fuse_last=text, warmup=min(20, max(1, steps // 10)), **kwargs
    )


def fit_pair(receiver, transmitter, examples, held, cfg, out: Path, resume: bool = False) -> dict:
    """Train one pair fuser on prepared examples, measure it on held-out ones, save it in registry ``out``."""
    from fusion.registry import FuserRegistry, module_size
    from fusion.train import fused_accuracy, train_fuser

    registry = FuserRegistry(out)
    ckpt = out / f"checkpoint-{transmitter.fingerprint}-to-{receiver.fingerprint}.pt"
    if not resume and ckpt.exists():
        ckpt.unlink()
    trained = train_fuser(receiver, transmitter, examples, cfg, checkpoint=ckpt, progress=True)
    params, nbytes = module_size(trained.fuser)
    meta = trained.meta() | {"train_s": round(trained.seconds, 1)}
    if held:
        meta["held_out"] = {
            "n": len(held),
            "fused": round(fused_accuracy(receiver, trained.fuser, held), 4),
            "alone": round(fused_accuracy(receiver, None, held), 4),
        }
    path = registry.save(trained.fuser, transmitter.fingerprint, receiver.fingerprint, meta)
    ckpt.unlink(missing_ok=True)
    return {"fuser": str(path), "params": params, "bytes_fp16": nbytes, **meta}


def train_pair(args: argparse.Namespace) -> dict:
    """Train and save one pair fuser from the command line's data file; returns what happened."""
    import torch

    from fusion.examples import prepare_examples
    from fusion.models import LanguageModel

    if len(args.transmitter) != 1:
        raise ConfigError("a fuser has one --transmitter (several are for --gate)")
    window = _window(args.window)
    torch.set_num_threads(args.threads)
    rows = read_rows(args.data)
    train_rows, held = split_rows(rows, args.held_out, args.seed)
    receiver = LanguageModel.load(args.receiver, device=args.device, dtype=args.dtype)
    transmitter = LanguageModel.load(args.transmitter[0], device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    examples = prepare_examples(receiver, transmitter, [to_item(r) for r in train_rows], progress=True)
    scored = prepare_examples(receiver, transmitter, [to_item(r) for r in held[:MAX_EVAL]])
    prepare_s = time.perf_counter() - t0
    cfg = fuser_config(
        receiver, window, args.steps, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, seed=args.seed
    )
    result = fit_pair(receiver, transmitter, examples, scored, cfg, args.out, resume=args.resume)
    return result | {"prepare_s": round(prepare_s, 1)}


def read_blocks(path: Path, lines_per_block: int, seed: int) -> list[list[str]]:
    """Blocks of note lines a translator is fitted on: a JSONL training file's ``notes``, or a text file's lines
    in seeded blocks of ``lines_per_block``."""
    if lines_per_block < 1:
        raise ConfigError("--lines-per-block must be at least 1")
    if path.suffix == ".jsonl":
        blocks = [list(r.notes) for r in read_rows(path) if isinstance(r.notes, tuple) and r.notes]
    else:
        try:
            lines = [" ".join(x.split()) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read translator text {str(path)!r}: {exc}", path=str(path)) from exc
        random.Random(f"translator-blocks/{seed}").shuffle(lines)
        blocks = [lines[i : i + lines_per_block] for i in range(0, len(lines), lines_per_block)]
    if not blocks:
        raise ConfigError(f"{path} has no text lines to fit a translator on", path=str(path))
    return blocks


def rows_checkpoint(out: Path, transmitter, receiver) -> Path:
    """Where a pair's translator rows are checkpointed as they are computed (``fit_translator_pair``)."""
    return out / f"rows-{transmitter.fingerprint}-to-{receiver.fingerprint}.pt"


def translator_rows_both(a, b, blocks, out: Path, every: int = 100) -> float:
    """The translator rows of ``a`` into ``b`` and of ``b`` into ``a`` for every block in one pass, each model
    reading each block once (``fusion.translate.translation_rows_both``: half the prefills of two passes), into the
    checkpoints ``fit_translator_pair(..., resume=True)`` continues from; resumes itself. Returns its seconds."""
    import torch
    from tqdm.auto import tqdm

    from fusion.translate import translation_rows_both

    out.mkdir(parents=True, exist_ok=True)
    into_a, into_b = rows_checkpoint(out, b, a), rows_checkpoint(out, a, b)
    rows = [torch.load(p) if p.exists() else ([], []) for p in (into_a, into_b)]
    done = min(len(rows[0][0]), len(rows[1][0]))
    rows = [(xs[:done], ys[:done]) for xs, ys in rows]
    t0 = time.perf_counter()
    todo = blocks[done:]
    for n, lines in enumerate(
        tqdm(todo, desc="translator rows (both directions)", unit="block", initial=done, total=len(blocks))
    ):
        for (xs, ys), (x, y) in zip(rows, translation_rows_both(a, b, lines), strict=True):
            xs.append(x.half())
            ys.append(y.half())
        if (n + 1) % every == 0 or n + 1 == len(todo):
            for path, pair in zip((into_a, into_b), rows, strict=True):
                torch.save(pair, path)
    return time.perf_counter() - t0


def fit_translator_pair(
    receiver,
    transmitter,
    blocks,
    out: Path,
    rank=None,
    ridge=None,
    resume=False,
    seed=0,
    tune_items=(),
    tune_steps: int = 0,
    weights: str = "int8",
    tune_window: int | None = None,
):
    """Rows of every block (checkpointed in ``out``), the ridge fit, the tuning on ``tune_items`` (``tune_steps``
    steps; ``fusion.translate.tune_translator``), and the translator saved in registry ``out`` with ``weights``
    (``fusion.translate.pack_weights``)."""
    import torch
    from tqdm.auto import tqdm

    from fusion.registry import FuserRegistry, module_size
    from fusion.translate import TranslatorConfig, fit_translator, save_translator, translation_rows

    kwargs = {k: v for k, v in (("rank", rank), ("ridge", ridge)) if v is not None}
    cfg = TranslatorConfig.for_models(receiver, transmitter, **kwargs)
    registry = FuserRegistry(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = rows_checkpoint(out, transmitter, receiver)
    xs, ys = (torch.load(ckpt)) if resume and ckpt.exists() and not cfg.identity else ([], [])
    t0 = time.perf_counter()
    if not cfg.identity:
        todo = blocks[len(xs) :]
        for n, lines in enumerate(tqdm(todo, desc="translator rows", unit="block", initial=len(xs), total=len(blocks))):
            x, y = translation_rows(receiver, transmitter, lines)
            xs.append(x.half())
            ys.append(y.half())
            if (n + 1) % 100 == 0:
                torch.save((xs, ys), ckpt)
    rows_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if cfg.identity:
        x = y = torch.zeros(0)
    else:
        x, y = torch.cat(xs).float(), torch.cat(ys).float()
    translator, stats = fit_translator(cfg, x, y, seed=seed)
    meta = stats | {"blocks": len(blocks), "rows_s": round(rows_s, 1), "fit_s": round(time.perf_counter() - t1, 1)}
    if tune_steps > 0 and tune_items and not cfg.identity:
        from fusion.translate import DEFAULT_TUNE_WINDOW, tune_translator

        t2 = time.perf_counter()
        window = DEFAULT_TUNE_WINDOW if tune_window is None else tune_window
        losses = tune_translator(
            translator, receiver, transmitter, list(tune_items), tune_steps, seed=seed, progress=True, window=window
        )
        tail = max(1, len(losses) // 10)
        meta |= {
            "tune_steps": tune_steps,
            "tune_window": window,
            "tune_items": len(tune_items),
            "tune_loss_first": round(sum(losses[:tail]) / tail, 4),
            "tune_loss_last": round(sum(losses[-tail:]) / tail, 4),
            "tune_s": round(time.perf_counter() - t2, 1),
        }
    path = save_translator(
        translator,
        registry.translator_path(transmitter.fingerprint, receiver.fingerprint),
        transmitter.fingerprint,
        receiver.fingerprint,
        meta,
        weights=weights,
    )
    ckpt.unlink(missing_ok=True)
    params, nbytes = module_size(translator)
    stored = {"weights": weights, "bytes": json.loads((path / "config.json").read_text())["bytes"]}
    return {"translator": str(path), "params": params, "bytes_fp16": nbytes, **stored, **meta}


def train_pair_translator(args: argparse.Namespace) -> dict:
    """Fit and save one pair's cache translator from the command line's text file; returns what happened."""
    import torch

    from fusion.models import LanguageModel

    if len(args.transmitter) != 1:
        raise ConfigError("a translator has one --transmitter")
    torch.set_num_threads(args.threads)
    blocks = read_blocks(args.data, args.lines_per_block, args.seed)
    items = tune_items(args.data, blocks)
    receiver = LanguageModel.load(args.receiver, device=args.device, dtype=args.dtype)
    transmitter = LanguageModel.load(args.transmitter[0], device=args.device, dtype=args.dtype)
    if receiver.style != "text" or transmitter.style != "text":
        raise ConfigError("a translator is for pretrained (text-style) models; zoo models answer by letter")
    if args.tune_steps < 0:
        raise ConfigError("--tune-steps must be 0 or more")
    if args.tune_window is not None and args.tune_window < 0:
        raise ConfigError("--tune-window must be 0 (whole answers) or more tokens")
    return fit_translator_pair(
        receiver,
        transmitter,
        blocks,
        args.out,
        args.rank,
        args.ridge,
        resume=args.resume,
        seed=args.seed,
        tune_items=items,
        tune_steps=args.tune_steps,
        weights=args.weights,
        tune_window=args.tune_window,
    )


def tune_items(path: Path, blocks: list[list[str]]) -> list:
    """What a translator is tuned on: every block written back (``repeat_item``), and a JSONL file's rows with notes
    and a text answer (an option index: its option) as questions about them."""
    from fusion.translate import TuneItem, repeat_item

    items = [repeat_item(b) for b in blocks]
    if path.suffix == ".jsonl":
        for row in read_rows(path):
            if not isinstance(row.notes, tuple) or not row.notes or row.keep:
                continue
            answer = row.answer if isinstance(row.answer, str) else None
            if isinstance(row.answer, int) and 0 <= row.answer < len(row.options):
                answer = row.options[row.answer]
            if answer:
                items.append(TuneItem(tuple(row.notes), row.stem, answer))
    return items


def train_receiver_gate(args: argparse.Namespace) -> dict:
    """Train and save the gate of a receiver over named transmitters; returns what happened."""
    import torch

    from fusion.gate import save_gate
    from fusion.gate_train import GateTrainConfig, prepare_gate_examples, train_gate
    from fusion.models import LanguageModel
    from fusion.notes import Retrieved
    from fusion.registry import FuserRegistry

    torch.set_num_threads(args.threads)
    named = {}
    for spec in args.transmitter:
        name, sep, model = spec.partition("=")
        if not sep or not name or not model:
            raise ConfigError(f"--transmitter {spec!r}: with --gate, give NAME=MODEL")
        named[name] = model
    rows = read_rows(args.data)
    receiver = LanguageModel.load(args.receiver, device=args.device, dtype=args.dtype)
    loaded: dict[str, LanguageModel] = {}
    transmitters = {
        n: loaded.setdefault(m, LanguageModel.load(m, device=args.device, dtype=args.dtype)) for n, m in named.items()
    }
    registry = FuserRegistry(args.out)
    fusers = {n: registry.load(t.fingerprint, receiver.fingerprint) for n, t in transmitters.items()}
    items, notes = [], []
    for row in rows:
        if not isinstance(row.notes, dict):
            raise ConfigError('--gate rows need notes as an object: {NAME: {"lines": [...], "coverage": x}}')
        items.append(to_item(row.model_copy(update={"notes": ()})))
        notes.append(
            {n: Retrieved(tuple(v.get("lines", ())), float(v.get("coverage", 0.0))) for n, v in row.notes.items()}
        )
    t0 = time.perf_counter()
    examples = prepare_gate_examples(receiver, transmitters, fusers, items, progress=True, notes=notes)
    prepare_s = time.perf_counter() - t0
    trained = train_gate(receiver, examples, list(fusers.values()), GateTrainConfig(seed=args.seed))
    path = save_gate(
        trained.gate,
        registry.gate_path(receiver.fingerprint),
        receiver.fingerprint,
        {"prepare_s": round(prepare_s, 1), "train_s": round(trained.seconds, 1), "examples": len(examples)},
    )
    return {"gate": str(path), "prepare_s": round(prepare_s, 1), "train_s": round(trained.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fusion.train``."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (already reported on one line)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.gate and args.translator:
            raise ConfigError("--gate and --translator are two different jobs: give one")
        if args.translator:
            result = train_pair_translator(args)
        else:
            result = train_receiver_gate(args) if args.gate else train_pair(args)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (run again with --resume to continue)", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0
