"""Training and test files of the notes world, as ``fusion.train`` and the benchmarks read them.

- ``notes/<device>.txt``: each device's notes (every fact it holds, train and test entities), one per line;
- ``questions/test.jsonl``: the held-out questions (test entities; four options or free text; some private);
- ``train/fuser-<model>.jsonl``: fuser training rows: every train question as each device of that model reads
  it (its notes retrieved from its notes of *train* entities only); a read whose notes hold the fact trains
  towards the answer, a sample of the others towards the receiver's own answer (``keep``: no harm);
- ``train/gate.jsonl``: gate training rows: the same questions with every device's read.

A share of training questions is private: the transmitter reads q' (rules redaction), the receiver q' then q.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from fusion.notes import DEFAULT_TOP_K, DeviceNotes
from fusion.prompts import Question
from ops.real.world import NotesWorld, make_questions, save_jsonl
from privacy.rephrase import rephrase

DEFAULT_KEEP_SHARE = 0.2  # of a model's fuser rows, at most this share trains "keep the receiver's own answer"


def write_notes(world: NotesWorld, devices: Sequence[str], root: Path) -> dict[str, Path]:
    """One notes file per device; returns device -> path."""
    out = {}
    for d, name in enumerate(devices):
        path = root / "notes" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in world.device_notes(d)))
        out[name] = path
    return out


def test_questions(world: NotesWorld) -> list[Question]:
    """Held-out questions: every test entity's facts, four options and free text."""
    return make_questions(world, world.split("test"), "test")


def train_questions(world: NotesWorld, limit: int, seed: int) -> list[Question]:
    """Up to ``limit`` free-text questions about train entities (deterministic)."""
    facts = list(world.split("train"))
    random.Random(f"train-questions/{seed}").shuffle(facts)
    questions = [q for q in make_questions(world, facts, "train") if q.format == "text"]
    return questions[:limit]


def _read(notes: DeviceNotes, stem: str, top_k: int) -> dict:
    got = notes.retrieve(stem, top_k)
    return {"lines": list(got.lines), "coverage": got.coverage}


def write_training(
    world: NotesWorld,
    devices: Mapping[str, str],
    root: Path,
    questions: Sequence[Question],
    keep_share: float = DEFAULT_KEEP_SHARE,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
) -> dict[str, Path]:
    """The fuser rows of every model and the gate rows (``devices``: device name -> model name, in device order).
    Returns ``{"fuser-<model>": path, ..., "gate": path}``."""
    rng = random.Random(f"training-rows/{seed}")
    names = list(devices)
    train_notes = {name: DeviceNotes(world.device_notes(d, "train")) for d, name in enumerate(names)}
    fuser_rows: dict[str, list[dict]] = {model: [] for model in devices.values()}
    keep_rows: dict[str, list[dict]] = {model: [] for model in devices.values()}
    gate_rows = []
    for q in questions:
        shared = rephrase(q.stem).text if q.pii else None
        read_as = shared or q.stem
        reads = {name: _read(train_notes[name], read_as, top_k) for name in names}
        base = {"stem": q.stem, "answer": q.answer, "id": q.id}
        if shared is not None:
            base["shared_stem"] = shared
        gate_rows.append({**base, "notes": reads})
        for d, name in enumerate(names):
            row = {**base, "notes": reads[name]["lines"], "coverage": reads[name]["coverage"]}
            if d in world.holders[q.fact_id]:
                fuser_rows[devices[name]].append(row)
            else:
                keep_rows[devices[name]].append({**row, "keep": True})
    paths = {}
    for model, rows in fuser_rows.items():
        room = int(len(rows) * keep_share / (1 - keep_share)) if keep_share < 1 else len(keep_rows[model])
        picked = rng.sample(keep_rows[model], min(room, len(keep_rows[model])))
        mixed = rows + picked
        rng.shuffle(mixed)
        paths[f"fuser-{model}"] = _write_rows(root / "train" / f"fuser-{model}.jsonl", mixed)
    paths["gate"] = _write_rows(root / "train" / "gate.jsonl", gate_rows)
    return paths


def _write_rows(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_test(world: NotesWorld, root: Path) -> Path:
    """The held-out questions file."""
    path = root / "questions" / "test.jsonl"
    save_jsonl(path, test_questions(world))
    return path


# Prose both models read when a translator is fitted, besides the notes: paragraphs of the Python standard
# library's own docstrings (English sentences about anything, on every machine, nothing downloaded).
GENERIC_MODULES = (
    "argparse asyncio calendar collections csv dataclasses datetime decimal email fractions heapq http.client "
    "inspect json logging os pathlib random re shutil socket sqlite3 ssl statistics string subprocess tarfile "
    "textwrap threading typing unittest urllib.parse zipfile"
).split()


def generic_paragraphs(count: int, seed: int = 0) -> list[str]:
    """Up to ``count`` prose paragraphs (80-260 characters, ASCII, no code) from standard-library docstrings, in a
    seeded order."""
    import importlib
    import re
    import warnings

    found = set()
    for name in GENERIC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():  # a deprecated attribute warns when touched (typing.io)
            warnings.simplefilter("ignore")
            objects = [module, *(getattr(module, a, None) for a in dir(module) if not a.startswith("_"))]
            docs = [getattr(obj, "__doc__", None) for obj in objects]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                if 80 <= len(para) <= 260 and para.isascii() and not para.startswith((">>>", "..")):
                    found.add(para)
    out = sorted(found)
    random.Random(f"generic/{seed}").shuffle(out)
    return out[:count]


def translator_blocks(world: NotesWorld, notes_blocks: int, generic: int, seed: int = 0) -> list[list[str]]:
    """What a kit's translators are fitted on: blocks of three sentences of the training entities' facts (never a
    test entity's) and single generic paragraphs (``generic_paragraphs``)."""
    rng = random.Random(f"translator-blocks/{seed}")
    sentences = [f.sentence for f in world.split("train")]
    blocks = [rng.sample(sentences, min(3, len(sentences))) for _ in range(notes_blocks)]
    return blocks + [[p] for p in generic_paragraphs(generic, seed)]


def translator_tune_items(world: NotesWorld, count: int, generic: int, seed: int = 0, sentences: float = 0.0) -> list:
    """What a kit's translators are tuned on (``fusion.translate.tune_translator``): ``count`` questions about one of
    three training facts read as notes, answered by the value (by the fact's sentence for a share ``sentences`` of
    them: the receiver then learns to answer in sentences, which exact match counts wrong; docs/TRANSFER.md), and
    ``generic`` standard-library paragraphs written back word for word."""
    from fusion.translate import TuneItem, repeat_item
    from ops.real.world import ALL_ATTRIBUTES

    rng = random.Random(f"translator-tune/{seed}")
    facts = world.split("train")
    items = []
    for _ in range(count):
        picked = rng.sample(facts, min(3, len(facts)))
        fact = rng.choice(picked)
        stem = rng.choice(ALL_ATTRIBUTES[fact.attribute].questions).format(entity=fact.entity)
        answer = fact.sentence if rng.random() < sentences else fact.value  # the same draws whatever the share
        items.append(TuneItem(tuple(f.sentence for f in picked), stem, answer))
    return items + [repeat_item([p]) for p in generic_paragraphs(generic, seed + 1)]
