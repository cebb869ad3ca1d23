"""Building the real kit: data files, translators, and (``--c2c``) four pair fusers and two gates (``ops.real.kit``).

Caches are shared: a receiver's prefix of a question serves every transmitter into it, and a device's read of a
question (its notes, then q') serves every receiver it fuses into and that receiver's gate. Steps finish in
order and are recorded in the manifest with their seconds; a finished step is not run again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bus.errors import ConfigError
from fusion.examples import FusionItem, combine, receiver_sides, text_targets, transmitter_sides
from fusion.gate_train import GateTrainConfig, gate_example, train_gate
from fusion.models import LanguageModel
from fusion.registry import FuserRegistry
from fusion.train_cli import TrainRow, fit_pair, fit_translator_pair, fuser_config, to_item, translator_rows_both
from ops.real.data import (
    train_questions,
    translator_blocks,
    translator_tune_items,
    write_notes,
    write_test,
    write_training,
)
from ops.real.kit import FORMAT_VERSION, RealSpec, elapsed, kit_dir, model_files, read_manifest, write_manifest
from ops.real.world import NotesWorld, generate_notes_world

log = logging.getLogger(__name__)

STEPS = ("data", "fusers", "gates", "translators")
# what `python -m ops.real build` and a benchmark's first use of the kit build: the translators (translate mode, which
# carries the devices' notes); the C2C fusers and gates (c2c mode) come with `build --c2c` (docs/TRANSFER.md: their
# one-token fusers carry nothing measurable on the kit's tasks, and they take longer to train than the translators)
DEFAULT_STEPS = ("translators",)
DEFAULT_GATE_QUESTIONS = 160  # training questions the gate sees (each read by every device)
# A translator's text (not in the spec: adding the step kept every kit built before it): blocks of three training
# facts and single standard-library paragraphs (ops.real.data.translator_blocks; docs/TRANSFER.md for the sizes)
TRANSLATOR_NOTE_BLOCKS = 300
TRANSLATOR_GENERIC = 200
# tuning items: questions about training facts (half) and generic paragraphs repeated (half); longer tuning at a
# higher rate taught the training values (docs/TRANSFER.md). The questions are answered by the bare value (a share
# TRANSLATOR_TUNE_SENTENCES by the fact's sentence: 0.5 until the fifth stop of 2026-12-07, when value answers took
# free-text exact match from 0.507 to 0.840 on Gemma-held notes, choice and the shuffled control unchanged)
TRANSLATOR_TUNE_SENTENCES = 0.0
TRANSLATOR_TUNE_QUESTIONS = 300
TRANSLATOR_TUNE_GENERIC = 300
TRANSLATOR_TUNE_STEPS = 100
# a translator's two matrices stored at int8 (fusion.translate.pack_weights): half of fp16, the same answers on 300
# questions (docs/TRANSFER.md); a kit built before stores its translators again on the next build
TRANSLATOR_WEIGHTS = "int8"


def _rows(path: Path) -> list[TrainRow]:
    return [TrainRow.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def _qkey(row: TrainRow) -> tuple:
    return (row.stem, row.shared_stem)


def _rkey(model: str, item: FusionItem) -> tuple:
    return (model, item.stem, item.shared_stem, item.notes)


class _Caches:
    """Receiver sides per (model, question) and transmitter reads per (model, question, notes), computed once."""

    def __init__(self, models: dict[str, LanguageModel]) -> None:
        self.models = models
        self.sides: dict[tuple, object] = {}
        self.reads: dict[tuple, object] = {}

    def ensure_sides(self, model: str, items: Sequence[FusionItem]) -> None:
        todo = list(
            {(i.stem, i.shared_stem): i for i in items if (model, i.stem, i.shared_stem) not in self.sides}.values()
        )
        for item, side in zip(todo, receiver_sides(self.models[model], todo, progress=True), strict=True):
            self.sides[(model, item.stem, item.shared_stem)] = side

    def ensure_reads(self, model: str, items: Sequence[FusionItem]) -> None:
        todo = list({_rkey(model, i): i for i in items if _rkey(model, i) not in self.reads}.values())
        for item, pre in zip(todo, transmitter_sides(self.models[model], todo, progress=True), strict=True):
            self.reads[_rkey(model, item)] = pre

    def examples(self, receiver: str, transmitter: str, items: Sequence[FusionItem]):
        self.ensure_sides(receiver, items)
        self.ensure_reads(transmitter, items)
        sides = [self.sides[(receiver, i.stem, i.shared_stem)] for i in items]
        reads = [self.reads[_rkey(transmitter, i)] for i in items]
        return combine(sides, reads, text_targets(self.models[receiver], items, sides))


def build_kit(
    spec: RealSpec,
    threads: int | None = None,
    receivers: list[str] | None = None,
    only: Sequence[str] | None = None,
) -> Path:
    """Build (or finish building) the kit of ``spec``; returns its directory. ``receivers``: only the fusers,
    gates and translators into these receiver models; ``only``: only these of the pair steps (``fusers``,
    ``gates``, ``translators``; the data comes first always). A later build without them finishes the rest."""
    unknown = sorted(set(only or ()) - set(STEPS[1:]))
    if unknown:
        raise ConfigError(f"unknown build step(s) {unknown}; choose from {list(STEPS[1:])}")
    pair_steps = set(only) if only else set(STEPS[1:])
    root = kit_dir(spec)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root) or {"format": FORMAT_VERSION, "spec": spec.model_dump(mode="json"), "done": {}}
    done = manifest.setdefault("done", {})
    if threads:
        torch.set_num_threads(threads)
    t_build, cpu_build = time.perf_counter(), time.process_time()
    files = model_files(spec)
    if "data" not in done:
        t0 = time.perf_counter()
        world = generate_notes_world(spec.notes)
        (root / "world.json").write_text(world.model_dump_json())
        write_notes(world, list(spec.devices), root)
        write_test(world, root)
        write_training(
            world, spec.devices, root, train_questions(world, spec.train_questions, spec.seed), seed=spec.seed
        )
        done["data"] = {"seconds": elapsed(t0)}
        write_manifest(root, manifest)
    names = sorted(set(spec.devices.values()))
    models: dict[str, LanguageModel] = {}
    manifest["models"] = []
    for name in names:
        t0 = time.perf_counter()
        lm = LanguageModel.load(files[name])
        lm.name = name
        models[name] = lm
        manifest["models"].append(
            {
                "name": name,
                "file": str(files[name]),
                "fingerprint": lm.fingerprint,
                "params": lm.num_params,
                "kv_bytes_per_token_fp16": lm.num_layers * 2 * lm.kv_heads * lm.head_dim * 2,
                "load_s": elapsed(t0),
            }
        )
    caches = _Caches(models)
    registry = FuserRegistry(root / "fusers")
    fusers_done = done.setdefault("fusers", {})
    wanted = [n for n in names if receivers is None or n in receivers]
    if receivers is not None and set(receivers) - set(names):
        raise ConfigError(f"unknown receiver model(s) {sorted(set(receivers) - set(names))}; the kit has {names}")
    for receiver in wanted if "fusers" in pair_steps else ():
        for transmitter in names:
            pair = f"{transmitter}->{receiver}"
            if pair in fusers_done:
                continue
            t0 = time.perf_counter()
            rows = _rows(root / "train" / f"fuser-{transmitter}.jsonl")
            items = [to_item(r) for r in rows]
            train, held = items[: -spec.held_out], items[-spec.held_out :]
            examples = caches.examples(receiver, transmitter, train)
            scored = caches.examples(receiver, transmitter, held)
            prepare_s = elapsed(t0)
            cfg = fuser_config(
                models[receiver], spec.window, spec.steps, batch_size=spec.batch_size, lr=spec.lr, hidden=spec.hidden
            )
            result = fit_pair(models[receiver], models[transmitter], examples, scored, cfg, root / "fusers")
            fusers_done[pair] = result | {
                "pair": [receiver, transmitter],
                "prepare_s": prepare_s,
                "seconds": elapsed(t0),
            }
            write_manifest(root, manifest)
    gates_done = done.setdefault("gates", {})
    gate_rows = _rows(root / "train" / "gate.jsonl")[:DEFAULT_GATE_QUESTIONS]
    for receiver in wanted if "gates" in pair_steps else ():
        if receiver in gates_done:
            continue
        t0 = time.perf_counter()
        r_model = models[receiver]
        base = [to_item(r.model_copy(update={"notes": ()})) for r in gate_rows]
        caches.ensure_sides(receiver, base)
        sides = [caches.sides[(receiver, i.stem, i.shared_stem)] for i in base]
        targets = text_targets(r_model, base, sides)
        per_device = {}
        for device, model in spec.devices.items():
            reads = [
                FusionItem(
                    i.stem,
                    (),
                    i.target,
                    shared_stem=i.shared_stem,
                    notes=tuple(r.notes[device]["lines"]),
                    coverage=float(r.notes[device]["coverage"]),
                )
                for i, r in zip(base, gate_rows, strict=True)
            ]
            caches.ensure_reads(model, reads)
            per_device[device] = [caches.reads[_rkey(model, x)] for x in reads]
        fusers = [registry.load(models[m].fingerprint, r_model.fingerprint) for m in spec.devices.values()]
        examples = [
            gate_example(side.view, side.prefix, target, [per_device[d][j] for d in spec.devices], fusers)
            for j, (side, target) in enumerate(
                tqdm(list(zip(sides, targets, strict=True)), desc="gate examples", leave=False)
            )
        ]
        prepare_s = elapsed(t0)
        trained = train_gate(r_model, examples, fusers, GateTrainConfig(steps=spec.gate_steps, seed=spec.seed))
        from fusion.gate import save_gate

        meta = {"prepare_s": prepare_s, "train_s": round(trained.seconds, 1), "examples": len(examples)}
        save_gate(trained.gate, registry.gate_path(r_model.fingerprint), r_model.fingerprint, meta)
        gates_done[receiver] = meta | {"seconds": elapsed(t0), "devices": dict(spec.devices)}
        write_manifest(root, manifest)
    translators_done = done.setdefault("translators", {})
    blocks = None
    shared: dict[str, float] = {}  # pair -> seconds of the one pass that made both directions' rows
    for receiver in wanted if "translators" in pair_steps else ():
        for transmitter in names:
            pair = f"{transmitter}->{receiver}"
            if pair in translators_done:
                continue
            if blocks is None:
                world = NotesWorld.model_validate_json((root / "world.json").read_text())
                blocks = translator_blocks(world, TRANSLATOR_NOTE_BLOCKS, TRANSLATOR_GENERIC, spec.seed)
                tune = translator_tune_items(
                    world, TRANSLATOR_TUNE_QUESTIONS, TRANSLATOR_TUNE_GENERIC, spec.seed, TRANSLATOR_TUNE_SENTENCES
                )
                # both directions of a two-model kit to build: one pass reads every block once per model for both
                cross = [f"{t}->{r}" for r in wanted for t in names if t != r]
                if len(cross) == 2 and not set(cross) & set(translators_done):
                    seconds = translator_rows_both(models[names[0]], models[names[1]], blocks, root / "fusers")
                    shared = dict.fromkeys(cross, round(seconds, 1))
            t0 = time.perf_counter()
            # a small kit (the tests') tunes as many steps as its fusers train
            steps = TRANSLATOR_TUNE_STEPS if spec.steps >= 100 else min(spec.steps, TRANSLATOR_TUNE_STEPS)
            result = fit_translator_pair(
                models[receiver],
                models[transmitter],
                blocks,
                root / "fusers",
                seed=spec.seed,
                tune_items=tune,
                tune_steps=steps,
                weights=TRANSLATOR_WEIGHTS,
                resume=True,  # rows of an interrupted build, or of the pass above
            )
            translators_done[pair] = result | {
                "pair": [receiver, transmitter],
                "seconds": elapsed(t0),
                "tune_sentences": TRANSLATOR_TUNE_SENTENCES,
            }
            if pair in shared:
                translators_done[pair]["rows_shared_s"] = shared[pair]
            write_manifest(root, manifest)
    for entry in translators_done.values() if "translators" in pair_steps else ():
        if entry.get("params") and entry.get("weights", "fp16") != TRANSLATOR_WEIGHTS:
            from fusion.translate import restore_translator

            stored = restore_translator(entry["translator"], TRANSLATOR_WEIGHTS)
            entry.update(weights=TRANSLATOR_WEIGHTS, bytes=stored)
            write_manifest(root, manifest)
    manifest["build_s"] = round(manifest.get("build_s", 0.0) + time.perf_counter() - t_build, 1)
    manifest["cpu_s"] = round(manifest.get("cpu_s", 0.0) + time.process_time() - cpu_build, 1)
    write_manifest(root, manifest)
    log.info("real kit at %s: %s", root, json.dumps(manifest.get("done", {}))[:200])
    return root
