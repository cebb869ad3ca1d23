"""``python -m ops.bench accuracy --real``: every mode on the real pair's held-out questions (the device-notes task).

The receiver (``--receiver-model``) has no notes; four transmitter devices (two per model) hold different notes.
Rows, all over the same questions and split by ``format`` (``choice``: four options scored by likelihood;
``text``: exact match of the normalised answer): the receiver alone; each device alone (with its notes); the
note ceiling (the holder's retrieved notes in the receiver's own prompt); text-to-text (each device writes its
own answer, the receiver reads them); C2C with the first 1..4 devices and with each alone; C2C with uniform
weights; the shuffled-cache control (each device sends its cache of another question); the oracle (C2C with only
the devices whose notes hold the fact); private C2C (q' only leaves); C2C at int8 and int4. Partial results are
written to ``--json`` as the run goes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fusion.answers import contains_answer, exact_match
from fusion.prompts import Question
from fusion.refine import (
    answer_alone,
    calibrate_self_check,
    confident_alone,
    receiver_prefix,
    refine,
    shared_prompt,
    transmitter_prefill,
)
from ops.bench import write_json
from privacy.rephrase import rephrase

DEFAULT_PER_FORMAT = 300  # held-out questions per format (choice, text)
PARTIAL_EVERY = 20  # questions between partial JSON writes
ROW_KEYS = ("label", "mode", "transmitters", "private", "precision")


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy ``p`` over ``n`` questions."""
    return round(1.96 * (max(p * (1 - p), 0.0) / n) ** 0.5, 4) if n else float("nan")


SELF_CHECK = "self-check"  # the label suffix of the row where the receiver's own confidence keeps fusion out
DEFAULT_CALIBRATE = 40  # calibration (training-side) questions per format that set the self-check threshold


def row_specs(devices: list[str], precision: str, task: str = "notes") -> list[dict]:
    """Every row's label, mode, devices, private flag and precision, in report order (``task``: without notes, no
    ceiling and no oracle of holders; the either-right oracle of the models alone instead)."""
    notes = task != "knowledge"
    everyone = f"c2c+{len(devices)}"
    rows = [{"label": "receiver", "mode": "receiver", "transmitters": [], "private": False, "precision": None}]
    rows += [{"label": f"alone:{d}", "mode": "transmitter", "transmitters": [d]} for d in devices]
    if notes:
        rows += [{"label": "ceiling", "mode": "ceiling", "transmitters": []}]
    else:  # derived: right when the receiver alone or any device alone is right
        rows += [{"label": "either-right", "mode": "either", "transmitters": devices}]
    rows += [{"label": "t2t", "mode": "t2t", "transmitters": devices}]
    rows += [{"label": f"c2c+{k}", "mode": "c2c", "transmitters": devices[:k]} for k in range(1, len(devices) + 1)]
    rows += [{"label": f"c2c:{d}", "mode": "c2c", "transmitters": [d]} for d in devices[1:]]
    rows += [{"label": "c2c-uniform", "mode": "c2c-uniform", "transmitters": devices}]
    rows += [{"label": "c2c-shuffled", "mode": "c2c-shuffled", "transmitters": devices}]
    if notes:
        rows += [{"label": "oracle", "mode": "oracle", "transmitters": []}]
    rows += [{"label": "private", "mode": "c2c", "transmitters": devices, "private": True}]
    rows += [{"label": p, "mode": "c2c", "transmitters": devices, "precision": p} for p in ("int8", "int4")]
    # derived: the receiver alone where its own confidence reaches the calibrated threshold, else everyone's C2C
    rows += [{"label": f"{everyone} {SELF_CHECK}", "mode": SELF_CHECK, "transmitters": devices}]
    if notes:  # cache translation (fusion.translate): each device sends its notes' cache, translated
        every = f"translate+{len(devices)}"
        rows += [
            {"label": f"translate+{k}", "mode": "translate", "transmitters": devices[:k]}
            for k in range(1, len(devices) + 1)
        ]
        rows += [{"label": f"translate:{d}", "mode": "translate", "transmitters": [d]} for d in devices[1:]]
        rows += [{"label": "translate-shuffled", "mode": "translate-shuffled", "transmitters": devices}]
        # every device sends what it retrieved, specific to q' or not (translate+N: only notes that name its subject)
        rows += [{"label": "translate-every", "mode": "translate-every", "transmitters": devices}]
        rows += [{"label": "translate-oracle", "mode": "translate-oracle", "transmitters": []}]
        rows += [{"label": "translate-private", "mode": "translate", "transmitters": devices, "private": True}]
        rows += [
            {"label": f"translate-{p}", "mode": "translate", "transmitters": devices, "precision": p}
            for p in ("int8", "int4")
        ]
        # the translators' own weights stored at int8 (fusion.translate.pack_weights), everything else as translate+N
        rows += [{"label": "translate-w8", "mode": "translate", "transmitters": devices, "weights": "int8"}]
        rows += [{"label": f"{every} {SELF_CHECK}", "mode": SELF_CHECK, "transmitters": devices}]
    for row in rows:
        row.setdefault("private", False)
        sends = row["mode"].startswith(("c2c", "translate")) or row["mode"] == "oracle"
        row.setdefault("precision", precision if sends else None)
    return rows


def _fuses(spec: dict) -> bool:
    """Whether a row reads the kit's C2C fusers (c2c modes, the oracle, a self-check over a c2c row)."""
    mode, label = spec["mode"], spec["label"]
    return mode.startswith("c2c") or mode == "oracle" or (mode == SELF_CHECK and label.startswith("c2c"))


def select_rows(specs: list[dict], wanted: str | None) -> list[dict]:
    """The rows ``--rows`` names (comma-separated labels; None: all), with the rows a derived row reads."""
    if not wanted:
        return specs
    labels = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {s["label"] for s in specs}
    unknown = [w for w in labels if w not in known]
    if unknown:
        from bus.errors import ConfigError

        raise ConfigError(f"unknown rows {unknown}; this task has {sorted(known)}", rows=unknown)
    keep = set(labels)
    for spec in specs:
        if spec["label"] in keep and spec["mode"] == "either":
            keep |= {"receiver", *(f"alone:{d}" for d in spec["transmitters"])}
        if spec["label"] in keep and spec["mode"] == SELF_CHECK:
            keep |= {"receiver", spec["label"].split()[0]}
    return [s for s in specs if s["label"] in keep]


def pick_questions(questions: list[Question], per_format: int | None, seed: int) -> list[Question]:
    """Up to ``per_format`` questions of each format (seeded), interleaved."""
    rng = random.Random(f"bench-real/{seed}")
    by_format: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_format[q.format].append(q)
    picked = []
    for fmt in sorted(by_format):
        pool = by_format[fmt]
        picked += rng.sample(pool, min(per_format, len(pool))) if per_format else pool
    rng.shuffle(picked)
    return picked


def paired(a: list[bool], b: list[bool]) -> dict:
    """``a`` minus ``b`` on the same questions: the accuracy difference, the half-width of its 95% interval (normal
    approximation of the paired differences), and how many questions went each way. Far tighter than two separate
    intervals where the rows mostly agree (a precision against fp16, a private question against a plain one)."""
    n = len(a)
    better = sum(x and not y for x, y in zip(a, b, strict=True))
    worse = sum(y and not x for x, y in zip(a, b, strict=True))
    diff = (better - worse) / n if n else float("nan")
    var = max((better + worse) / n - diff * diff, 0.0) / n if n else float("nan")
    return {"diff": round(diff, 4), "ci95": round(1.96 * var**0.5, 4), "better": better, "worse": worse}


def _paired_bases(spec: dict, labels: set[str]) -> list[str]:
    """Rows a row is compared with question by question: the receiver alone, and for a precision or private row
    the plain fp16 row of the same devices."""
    bases = ["receiver"] if spec["label"] != "receiver" else []
    kind = "translate" if spec["mode"].startswith("translate") else "c2c"
    same = f"{kind}+{len(spec['transmitters'])}"
    variant = spec["private"] or spec["label"].endswith(("int8", "int4")) or bool(spec.get("weights"))
    if spec["label"] != same and (variant or spec["mode"] == "translate-every"):
        bases.append(same)
    return [b for b in bases if b in labels]


def _summary(specs, hits, contained, sent, meta) -> dict:
    rows = []
    labels = {s["label"] for s in specs}
    for spec in specs:
        for fmt in ("choice", "text"):
            got = hits[(spec["label"], fmt)]
            if not got:
                continue
            acc = sum(got) / len(got)
            within = contained[(spec["label"], fmt)]
            contains = sum(within) / len(within)
            nbytes = sent[(spec["label"], fmt)]
            rows.append(
                {
                    **{k: spec[k] for k in ROW_KEYS},
                    "format": fmt,
                    "task": meta["task"],
                    "accuracy": round(acc, 4),
                    "ci95": ci95(acc, len(got)),
                    "contains": round(contains, 4),
                    "contains_ci95": ci95(contains, len(within)),
                    "n": len(got),
                    "bytes_per_question": round(sum(nbytes) / len(nbytes), 1) if nbytes else 0.0,
                    "paired": {base: paired(got, hits[(base, fmt)]) for base in _paired_bases(spec, labels)},
                }
            )
    return {**meta, "rows": rows}


@dataclass(frozen=True)
class Graded:
    """One row's answer to one question: right (option, or exact match), contains (free text), bytes sent, and the
    answering model's confidence."""

    right: bool
    contains: bool
    nbytes: int = 0
    confidence: float | None = None


def grade(task, q: Question, choice: int | None, text: str, nbytes: int = 0, confidence=None) -> Graded:
    """A reading graded both ways (a choice question: ``contains`` is ``right``)."""
    if q.options:
        right = choice == q.answer
        return Graded(right, right, nbytes, confidence)
    return Graded(exact_match(text, q.answer), contains_answer(text, q.answer, task.values_of(q)), nbytes, confidence)


def _ask(
    task,
    fed,
    q: Question,
    spec: dict,
    prefilled,
    prefixes,
    q_private: str,
    donor: Question,
    spans=None,
    held_by: set[str] | None = None,
    translators: dict | None = None,
) -> Graded:
    """One computed row's answer to ``q`` (not the derived rows); ``translators`` replace the federation's."""
    rx, mode, used = fed.receiver, spec["mode"], spec["transmitters"]
    holding = [d for d in task.holding(q) if held_by is None or d in held_by]
    if mode == "ceiling":
        lines = task.notes[holding[0]].retrieve(q.stem).lines if holding else ()
        reading = answer_alone(rx, q.stem, q.options, lines)
        return grade(task, q, reading.choice, reading.text, 0, reading.confidence)
    if mode in ("oracle", "translate-oracle"):
        kind = "c2c" if mode == "oracle" else "translate"
        mode, used = (kind, holding) if holding else ("receiver", [])
    res = refine(
        q,
        rx,
        {d: fed.transmitters[d] for d in used},
        mode=mode,
        private=spec["private"],
        private_stem=q_private if spec["private"] else None,
        precision=spec["precision"] or "fp16",
        donors={d: donor for d in used},
        prefilled=prefilled[spec["private"]],
        prefixes=prefixes,
        fusers=fed.fusers,
        gate=fed.gate,
        notes=task.notes,
        translators=fed.translators if translators is None else translators,
        spans=spans,
    )
    return grade(task, q, res.choice, res.text, res.bytes_sent, res.confidence)


def _derived(spec: dict, got: dict[str, Graded], threshold: float) -> Graded:
    """A derived row from the rows it reads: either-right, or the self-check (alone when confident enough)."""
    if spec["mode"] == "either":
        parts = [got["receiver"], *(got[f"alone:{d}"] for d in spec["transmitters"])]
        return Graded(any(p.right for p in parts), any(p.contains for p in parts))
    alone = got["receiver"]
    if confident_alone(alone.confidence, threshold):
        return alone
    return got[spec["label"].split()[0]]


def calibrate(
    task, fed, specs: list[dict], per_format: int, seed: int, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Per self-check row and format, its threshold (``fusion.refine.calibrate_self_check``) on the task's
    calibration questions: the receiver alone vs the row it falls back to, graded by ``contains`` (exact match for
    choice)."""
    checks = [s for s in specs if s["mode"] == SELF_CHECK]
    fused = {c["label"]: next(s for s in specs if s["label"] == c["label"].split()[0]) for c in checks}
    receiver = next(s for s in specs if s["label"] == "receiver")
    questions = pick_questions(task.calibration, per_format, seed)
    seen: dict[str, dict[str, list[tuple[float, bool, bool]]]] = defaultdict(lambda: defaultdict(list))
    for q in tqdm(questions, desc="self-check calibration", unit="q", disable=not progress):
        texts = shared_prompt(q.stem, q.options, None, "text")
        prefilled = {False: _prefills(task, fed, texts[0])}
        prefixes = {texts: receiver_prefix(fed.receiver, *texts)}
        alone = _ask(task, fed, q, receiver, prefilled, prefixes, q.stem, q)
        for label, spec in fused.items():
            helped = _ask(task, fed, q, spec, prefilled, prefixes, q.stem, q)
            seen[label][q.format].append((alone.confidence or 0.0, alone.contains, helped.contains))
    return {
        label: {fmt: calibrate_self_check(*zip(*rows, strict=True)) for fmt, rows in per.items()}
        for label, per in seen.items()
    }


def _prefills(task, fed, text: str) -> dict:
    return {d: transmitter_prefill(d, fed.transmitters[d], text, task.notes.get(d)) for d in task.devices}


def run_real(args: argparse.Namespace) -> dict:
    """Every row of the task over the same held-out questions of the real kit (or ``--questions``)."""
    from ops.bench.questions import read_questions
    from ops.real.kit import kit_from_args
    from ops.real.tasks import bench_task

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    kit = kit_from_args(args)
    fed = kit.federation(args.receiver_model)
    user = read_questions(args.questions) if args.questions else None
    task = bench_task(getattr(args, "task", None) or "notes", kit, fed, kit.spec.seed, user)
    held_by = {d.strip() for d in args.held_by.split(",") if d.strip()} if getattr(args, "held_by", None) else None
    if held_by is not None:
        from bus.errors import ConfigError

        if held_by - set(task.devices):
            raise ConfigError(f"--held-by: unknown devices {sorted(held_by - set(task.devices))}; {task.devices}")
        task.test = [q for q in task.test if set(task.holding(q)) & held_by]
    questions = pick_questions(task.test, args.limit or DEFAULT_PER_FORMAT, kit.spec.seed)
    specs = select_rows(row_specs(task.devices, args.precision, task.name), getattr(args, "rows", None))
    fusing = [s["label"] for s in specs if _fuses(s)]
    if fusing and not fed.fusers and not getattr(args, "rows", None):
        # every row by default: a kit built without `--c2c` has no C2C fusers, so its rows are those of the other modes
        note = f"this kit has no C2C fusers (`python -m ops.real build --c2c`); leaving out rows {fusing}"
        print(f"accuracy --real: {note}", file=sys.stderr)
        specs = [s for s in specs if not _fuses(s)]
    elif fusing:
        fed.need_fusers(f"rows {fusing}")
    computed = [s for s in specs if s["mode"] not in ("either", SELF_CHECK)]
    derived = [s for s in specs if s["mode"] in ("either", SELF_CHECK)]
    thresholds: dict[str, dict[str, float]] = {}
    if any(s["mode"] == SELF_CHECK for s in specs):
        n = getattr(args, "calibrate", None)
        thresholds = calibrate(task, fed, specs, DEFAULT_CALIBRATE if n is None else n, kit.spec.seed)
    hits: dict[tuple, list[bool]] = defaultdict(list)
    contained: dict[tuple, list[bool]] = defaultdict(list)
    sent: dict[tuple, list[int]] = defaultdict(list)
    meta = {
        "real": True,
        "task": task.name if user is None else ((questions[0].task or "questions") if questions else ""),
        "receiver": args.receiver_model,
        "devices_used": task.devices,
        "self_check": {
            label: {f: (None if t == float("inf") else round(t, 4)) for f, t in per.items()}
            for label, per in thresholds.items()
        },
        "models": kit.manifest.get("models", []),
        "fusers": [
            {"pair": f["pair"], "params": f["params"], "bytes": f["bytes_fp16"], "train_s": f.get("train_s")}
            for f in kit.manifest.get("done", {}).get("fusers", {}).values()
        ],
        "translators": [
            {"pair": t["pair"], "params": t["params"], "bytes": t.get("bytes", t["bytes_fp16"])}
            | {"weights": t.get("weights", "fp16")}
            for t in kit.manifest.get("done", {}).get("translators", {}).values()
        ],
        "devices": dict(kit.spec.devices),
        "questions_file": str(args.questions) if args.questions else None,
        "held_by": sorted(held_by) if held_by is not None else None,
    }
    alone_or_text = ("receiver", "transmitter", "ceiling", "t2t")
    sending = {s["private"] for s in computed if s["mode"] not in alone_or_text and "translate" not in s["mode"]}
    from fusion.translate import stored_copy

    stored = {  # the translators as another precision of their weights reads them (rows with "weights")
        w: {fp: stored_copy(t, w) for fp, t in fed.translators.items()}
        for w in {s.get("weights") for s in computed} - {None}
    }
    for i, q in enumerate(tqdm(questions, desc=f"accuracy --real --task {task.name}", unit="q")):
        q_private = rephrase(q.stem).text
        texts = {p: shared_prompt(q.stem, q.options, q_private if p else None, "text") for p in (False, True)}
        prefilled = {p: _prefills(task, fed, texts[p][0]) if p in sending else {} for p in (False, True)}
        prefixes = {texts[p]: receiver_prefix(fed.receiver, *texts[p]) for p in sending}
        donor = questions[(i + 1) % len(questions)]
        spans: dict = {}  # note-span caches, shared by this question's translate rows
        got = {
            s["label"]: _ask(
                task, fed, q, s, prefilled, prefixes, q_private, donor, spans, held_by, stored.get(s.get("weights"))
            )
            for s in computed
        }
        for spec in derived:
            limit = thresholds.get(spec["label"], {}).get(q.format, float("inf"))
            got[spec["label"]] = _derived(spec, got, limit)
        for label, g in got.items():
            hits[(label, q.format)].append(g.right)
            contained[(label, q.format)].append(g.contains)
            sent[(label, q.format)].append(g.nbytes)
        if args.json is not None and (i + 1) % PARTIAL_EVERY == 0:
            seconds = round(time.perf_counter() - t_start)
            write_json(args.json, _summary(specs, hits, contained, sent, meta | {"partial": i + 1, "seconds": seconds}))
    return _summary(specs, hits, contained, sent, meta | {"seconds": round(time.perf_counter() - t_start, 1)})
