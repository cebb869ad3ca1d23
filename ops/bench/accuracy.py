"""Accuracy of every FedRefine mode on held-out test questions of the zoo (the paper's Fig. 3a/3b and ablations).

Rows: receiver alone; each transmitter alone; text-to-text with all transmitters (plain and private); C2C
with the first 1..N transmitters in zoo order (strongest first, the weak one last) and with each single one;
C2C with uniform weights; the shuffled-cache control (each transmitter sends its cache of another question);
C2C at int8 / int4 besides the default fp16; private C2C. ``receiver_known_after_fusion`` is C2C accuracy on
the test facts the receiver knows (the damage fusion does). Only test-pool facts are used: no fuser or gate
ever trained on them. Every row comes from one run over the same questions.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.prompts import Question
from fusion.refine import refine, shared_prompt, transmitter_prefill
from privacy.rephrase import detail_removal, rephrase

log = logging.getLogger(__name__)

DEFAULT_PRECISION = "fp16"  # what C2C rows send unless the row says otherwise
DEFAULT_EXTRA_PER_FACT = 1  # extra held-out questions per test fact (full zoo: 192 facts x 3 = 576 questions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench accuracy``."""
    parser.add_argument("--quick", action="store_true", help="use the quick zoo (tests); default: the full zoo")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed")
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo directory (overrides --quick/--seed)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many test questions")
    parser.add_argument(
        "--extra-per-fact",
        type=int,
        default=DEFAULT_EXTRA_PER_FACT,
        help="extra held-out questions generated per test fact (fresh phrasing and option order)",
    )
    parser.add_argument("--precision", default=DEFAULT_PRECISION, help="precision of transmitted caches in C2C rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--real", action="store_true", help="the real pretrained pair (ops.real's kit; --quick: its small one)"
    )
    parser.add_argument("--receiver-model", default="smollm2", help="--real: which model is the receiver")
    parser.add_argument("--kit", type=Path, default=None, help="--real: a built real kit directory")
    parser.add_argument(
        "--questions", type=Path, default=None, help="a JSONL question file instead of the held-out set"
    )
    parser.add_argument(
        "--task",
        default="notes",
        choices=("notes", "notes-unseen", "knowledge"),
        help="--real: the held-out task (ops.real.tasks): the kit's notes, unseen entities and values, or "
        "pretrained knowledge without notes",
    )
    parser.add_argument("--rows", default=None, help="--real: only these rows (comma-separated labels)")
    parser.add_argument(
        "--held-by",
        default=None,
        help="--real: only questions whose fact these devices hold (comma-separated); the ceiling and the oracles "
        "then read those devices' notes only (e.g. gemma-a,gemma-b: transfer across models alone)",
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=None,
        help="--real: training-side questions per format that calibrate the self-check row (default 40)",
    )


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy ``p`` over ``n`` questions."""
    return round(1.96 * math.sqrt(max(p * (1 - p), 0.0) / n), 4) if n else float("nan")


def test_questions(zoo, extra_per_fact: int, limit: int | None) -> list[Question]:
    """The zoo's held-out test questions plus ``extra_per_fact`` fresh ones per test fact (deterministic)."""
    from ops.zoo.world import make_question

    questions = list(zoo.questions("test"))
    rng = random.Random(f"bench-accuracy/{zoo.manifest.spec.seed}")
    for fact in zoo.world.facts_of(zoo.world.test_fact_ids):
        for j in range(extra_per_fact):
            questions.append(make_question(zoo.world, fact, rng, f"bench-{fact.id}-{j}"))
    if limit is not None:
        questions = random.Random(f"bench-limit/{zoo.manifest.spec.seed}").sample(questions, min(limit, len(questions)))
    return questions


def row_specs(names: list[str], precision: str) -> list[tuple[str, list[str], bool, str]]:
    """``(mode, transmitters, private, precision)`` of every row, in report order."""
    rows = [("receiver", [], False, "")]
    rows += [("transmitter", [t], False, "") for t in names]
    rows += [("t2t", names, False, ""), ("t2t", names, True, "")]
    rows += [("c2c", names[:k], False, precision) for k in range(1, len(names) + 1)]
    rows += [("c2c", [t], False, precision) for t in names[1:]]
    rows += [("c2c-uniform", names, False, precision), ("c2c-shuffled", names, False, precision)]
    rows += [("c2c", names, False, p) for p in ("fp32", "fp16", "int8", "int4") if p != precision]
    rows += [("c2c", names, True, precision)]
    return rows


def donors_for(questions: list[Question], i: int, names: list[str]) -> dict[str, Question]:
    """Per transmitter a different question about a different fact (the shuffled-cache control)."""
    out = {}
    for j, name in enumerate(names):
        k = (i + 1 + 7 * j) % len(questions)
        while questions[k].fact_id == questions[i].fact_id:
            k = (k + 1) % len(questions)
        out[name] = questions[k]
    return out


def run(args: argparse.Namespace) -> dict:
    """Run every row over the same held-out questions; return the issue's JSON."""
    from ops.zoo import load_zoo
    from ops.zoo.fusers import load_zoo_fusion, open_zoo

    if args.real:
        from ops.bench.realacc import run_real

        return run_real(args)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    zoo = open_zoo(args.zoo) if args.zoo is not None else load_zoo(quick=args.quick, seed=args.seed)
    kit = load_zoo_fusion(zoo)
    names = list(kit.transmitters)
    if args.questions is not None:
        from ops.bench.questions import read_questions

        questions = read_questions(args.questions)[: args.limit]
    else:
        questions = test_questions(zoo, args.extra_per_fact, args.limit)
    specs = row_specs(names, args.precision)
    check = zoo.self_check
    checks = [check] * len(specs)
    if check is not None:  # ablation: the same C2C row without the receiver's self-check
        specs.append(("c2c", names, False, args.precision))
        checks.append(None)
    correct: list[list[bool]] = [[] for _ in specs]
    alone: list[list[bool]] = [[] for _ in specs]
    known_r = set(zoo.known(kit.receiver_name))
    known_alone, known_fused, known_unchecked, removed = [], [], [], []
    fusion_kw = {"fusers": kit.fusers, "gate": kit.gate}
    for i, q in enumerate(tqdm(questions, desc="accuracy", leave=False)):
        q_private = rephrase(q.stem, kit.receiver)
        removed.append(detail_removal(q_private.text, list(q.pii)))
        plain_text = shared_prompt(q.stem, q.options)[0]
        private_text = shared_prompt(q.stem, q.options, q_private.text)[0]
        plain = {n: transmitter_prefill(n, m, plain_text) for n, m in kit.transmitters.items()}
        private = {n: transmitter_prefill(n, m, private_text) for n, m in kit.transmitters.items()}
        donors = donors_for(questions, i, names)
        for r, ((mode, used, is_private, precision), row_check) in enumerate(zip(specs, checks, strict=True)):
            res = refine(
                q,
                kit.receiver,
                {n: kit.transmitters[n] for n in used},
                mode=mode,
                private=is_private,
                private_stem=q_private.text if is_private else None,
                precision=precision or "fp32",
                donors=donors,
                prefilled=private if is_private else plain,
                self_check=row_check,
                **fusion_kw,
            )
            correct[r].append(res.index == q.answer)
            alone[r].append(res.alone)
            main_c2c = (mode, used, is_private, precision) == ("c2c", names, False, args.precision)
            if q.fact_id in known_r and main_c2c:
                (known_fused if row_check == check else known_unchecked).append(res.index == q.answer)
            if q.fact_id in known_r and mode == "receiver":
                known_alone.append(res.index == q.answer)
    rows = []
    for (mode, used, is_private, precision), row_check, hits, solo in zip(specs, checks, correct, alone, strict=True):
        acc = sum(hits) / len(hits)
        rows.append(
            {
                "mode": mode,
                "transmitters": used,
                "private": is_private,
                "precision": precision or None,
                "accuracy": round(acc, 4),
                "ci95": ci95(acc, len(hits)),
                "n": len(hits),
                "self_check": row_check if mode not in ("receiver", "transmitter") else None,
                "answered_alone": round(sum(solo) / len(solo), 4),
            }
        )
    rk = sum(known_fused) / max(len(known_fused), 1)
    return {
        "zoo": zoo.manifest.spec.name,
        "rows": rows,
        "self_check": check,
        "receiver_known_after_fusion": round(rk, 4),
        "receiver_known_after_fusion_without_self_check": (
            round(sum(known_unchecked) / len(known_unchecked), 4) if known_unchecked else None
        ),
        "receiver_known_alone": round(sum(known_alone) / max(len(known_alone), 1), 4),
        "receiver_known_n": len(known_fused),
        "private_pii_removed": round(sum(removed) / max(len(removed), 1), 4),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
