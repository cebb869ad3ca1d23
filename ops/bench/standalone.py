"""Each zoo model alone on the held-out test questions.

``python -m ops.bench standalone [--quick] [--seed N] [--json F]``: per model its accuracy on facts it
was trained on (``acc_known``), on facts it was not (``acc_unknown``; chance is 0.25), overall, with the
correct fact given in context (``acc_with_hint``), and its mean P(none) on known and unknown facts.
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT_THREADS = 2  # torch threads for evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of this benchmark."""
    parser.add_argument("--quick", action="store_true", help="use the quick zoo (built if missing)")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="question set (default test)")


def run(args: argparse.Namespace) -> dict:
    """Evaluate every model of the zoo alone; returns ``{"models": [...]}``."""
    from ops.zoo import load_zoo
    from ops.zoo.evaluate import evaluate_questions

    torch.set_num_threads(DEFAULT_THREADS)
    start = time.perf_counter()
    zoo = load_zoo(quick=args.quick, seed=args.seed)
    questions = zoo.questions(args.split)
    rows = []
    for name in zoo.names:
        entry = zoo.entry(name)
        lm = zoo.model(name, device="cpu")
        r = evaluate_questions(lm, questions, set(entry.known), zoo.world)
        rows.append(
            {
                "name": name,
                "role": entry.role,
                "arch": entry.arch,
                "params": entry.params,
                "tokenizer_vocab": entry.tokenizer_vocab,
                "num_layers": entry.num_layers,
                "acc_known": r["acc_known"],
                "acc_unknown": r["acc_unknown"],
                "acc_all": r["acc_all"],
                "acc_with_hint": r["acc_with_hint"],
                "acc_with_hint_unknown": r["acc_with_hint_unknown"],
                "p_none_known": r["p_none_known"],
                "p_none_unknown": r["p_none_unknown"],
                "n": r["n"],
                "n_known": r["n_known"],
            }
        )
    return {
        "zoo": zoo.manifest.spec.name,
        "key": zoo.manifest.key,
        "split": args.split,
        "chance": 0.25,
        "seconds": round(time.perf_counter() - start, 1),
        "models": rows,
    }
