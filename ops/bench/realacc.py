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
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.answers import is_correct
from fusion.prompts import Question
from fusion.refine import answer_alone, receiver_prefix, refine, shared_prompt, transmitter_prefill
from privacy.rephrase import rephrase

DEFAULT_PER_FORMAT = 300  # held-out questions per format (choice, text)
PARTIAL_EVERY = 20  # questions between partial JSON writes
ROW_KEYS = ("label", "mode", "transmitters", "private", "precision")


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy ``p`` over ``n`` questions."""
    return round(1.96 * (max(p * (1 - p), 0.0) / n) ** 0.5, 4) if n else float("nan")


def row_specs(devices: list[str], precision: str) -> list[dict]:
    """Every row's label, mode, devices, private flag and precision, in report order."""
    rows = [{"label": "receiver", "mode": "receiver", "transmitters": [], "private": False, "precision": None}]
    rows += [{"label": f"alone:{d}", "mode": "transmitter", "transmitters": [d]} for d in devices]
    rows += [{"label": "ceiling", "mode": "ceiling", "transmitters": []}]
    rows += [{"label": "t2t", "mode": "t2t", "transmitters": devices}]
    rows += [{"label": f"c2c+{k}", "mode": "c2c", "transmitters": devices[:k]} for k in range(1, len(devices) + 1)]
    rows += [{"label": f"c2c:{d}", "mode": "c2c", "transmitters": [d]} for d in devices[1:]]
    rows += [{"label": "c2c-uniform", "mode": "c2c-uniform", "transmitters": devices}]
    rows += [{"label": "c2c-shuffled", "mode": "c2c-shuffled", "transmitters": devices}]
    rows += [{"label": "oracle", "mode": "oracle", "transmitters": []}]
    rows += [{"label": "private", "mode": "c2c", "transmitters": devices, "private": True}]
    rows += [{"label": p, "mode": "c2c", "transmitters": devices, "precision": p} for p in ("int8", "int4")]
    for row in rows:
        row.setdefault("private", False)
        row.setdefault("precision", precision if row["mode"].startswith("c2c") or row["mode"] == "oracle" else None)
    return rows


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


def holders(kit, fed, q: Question) -> list[str]:
    """The devices whose notes hold the fact (the world's ground truth; else: those whose notes cover q fully)."""
    devices = list(fed.transmitters)
    if q.fact_id and q.fact_id in kit.world.holders:
        return [devices[i] for i in kit.world.holders[q.fact_id] if i < len(devices)]
    return [d for d in devices if fed.notes[d].retrieve(q.stem).coverage >= 0.999]


def _summary(specs, hits, sent, meta) -> dict:
    rows = []
    for spec in specs:
        for fmt in ("choice", "text"):
            got = hits[(spec["label"], fmt)]
            if not got:
                continue
            acc = sum(got) / len(got)
            nbytes = sent[(spec["label"], fmt)]
            rows.append(
                {
                    **{k: spec[k] for k in ROW_KEYS},
                    "format": fmt,
                    "task": meta["task"],
                    "accuracy": round(acc, 4),
                    "ci95": ci95(acc, len(got)),
                    "n": len(got),
                    "bytes_per_question": round(sum(nbytes) / len(nbytes), 1) if nbytes else 0.0,
                }
            )
    return {**meta, "rows": rows}


def run_real(args: argparse.Namespace) -> dict:
    """Every row over the same held-out questions of the real kit (or ``--questions``)."""
    from ops.bench.questions import read_questions
    from ops.real.kit import kit_from_args

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    kit = kit_from_args(args)
    fed = kit.federation(args.receiver_model)
    devices = list(fed.transmitters)
    pool = read_questions(args.questions) if args.questions else kit.test_questions()
    questions = pick_questions(pool, args.limit or DEFAULT_PER_FORMAT, kit.spec.seed)
    specs = row_specs(devices, args.precision)
    hits: dict[tuple, list[bool]] = defaultdict(list)
    sent: dict[tuple, list[int]] = defaultdict(list)
    meta = {
        "real": True,
        "task": (questions[0].task or "questions") if questions else "",
        "receiver": args.receiver_model,
        "models": kit.manifest.get("models", []),
        "fusers": [
            {"pair": f["pair"], "params": f["params"], "bytes": f["bytes_fp16"], "train_s": f.get("train_s")}
            for f in kit.manifest.get("done", {}).get("fusers", {}).values()
        ],
        "devices": dict(kit.spec.devices),
        "questions_file": str(args.questions) if args.questions else None,
    }
    common = {"fusers": fed.fusers, "gate": fed.gate, "notes": fed.notes}
    for i, q in enumerate(tqdm(questions, desc="accuracy --real", unit="q")):
        rx = fed.receiver
        q_private = rephrase(q.stem).text
        texts = {
            False: shared_prompt(q.stem, q.options, None, "text"),
            True: shared_prompt(q.stem, q.options, q_private, "text"),
        }
        prefilled = {
            private: {
                d: transmitter_prefill(d, m, texts[private][0], fed.notes[d]) for d, m in fed.transmitters.items()
            }
            for private in (False, True)
        }
        prefixes = {texts[p]: receiver_prefix(rx, *texts[p]) for p in (False, True)}
        donor = questions[(i + 1) % len(questions)]
        holding = holders(kit, fed, q)
        for spec in specs:
            mode, used = spec["mode"], spec["transmitters"]
            if mode == "ceiling":
                lines = fed.notes[holding[0]].retrieve(q.stem).lines if holding else ()
                right = is_correct(answer_alone(rx, q.stem, q.options, lines), q.answer)
                nbytes = 0
            else:
                if mode == "oracle":
                    mode, used = "c2c", holding
                    if not used:
                        mode = "receiver"
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
                    **common,
                )
                right, nbytes = res.correct(q), res.bytes_sent
            hits[(spec["label"], q.format)].append(right)
            sent[(spec["label"], q.format)].append(nbytes)
        if args.json is not None and (i + 1) % PARTIAL_EVERY == 0:
            partial = _summary(
                specs, hits, sent, meta | {"partial": i + 1, "seconds": round(time.perf_counter() - t_start)}
            )
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(partial, indent=2) + "\n")
    return _summary(specs, hits, sent, meta | {"seconds": round(time.perf_counter() - t_start, 1)})
