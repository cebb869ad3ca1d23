"""Text-to-text vs cache-to-cache: wall time per question and bytes per token, in one run (Fig. 3c without the bus).

Text-to-text, C2C and private C2C (rephrasing included) use all transmitters of the zoo on the same held-out
questions, alternating the order of the modes, in one process and one thread. Wall time is ``refine()`` end
to end (transmitters run one after another here; over the bus they run in parallel). Bytes per token:
text-to-text sends hint text (UTF-8 bytes per hint token); C2C sends cache frames through the bus codec at
``--precision`` (bytes per cache token, over all transmitters that sent).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion.refine import refine
from ops.bench.questions import choose, count_or_file

DEFAULT_QUESTIONS = 100
DEFAULT_WARMUP = 5  # questions run first and not timed


def time_modes(questions, modes, run, correct, desc: str, digits: int) -> list[dict]:
    """Every question through every mode (``run(q, mode=..., private=...)``), the order alternating per question;
    after the first DEFAULT_WARMUP questions, each mode's wall time, bytes and tokens sent and hits are recorded.
    One row per mode: p50 / p95 (ms, rounded to ``digits``), bytes per token and per question, accuracy."""
    times: dict[str, list[float]] = {m: [] for m in modes}
    sent: dict[str, list[int]] = {m: [0, 0] for m in modes}  # bytes, tokens
    hits: dict[str, int] = {m: 0 for m in modes}
    for i, q in enumerate(tqdm(questions, desc=desc, unit="q", leave=False)):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            t0 = time.perf_counter()
            res = run(q, mode=mode.removesuffix("-private"), private=mode.endswith("-private"))
            elapsed = time.perf_counter() - t0
            if i < DEFAULT_WARMUP:
                continue
            times[mode].append(elapsed * 1000)
            sent[mode][0] += res.bytes_sent
            sent[mode][1] += res.tokens_sent
            hits[mode] += correct(res, q)
    rows = []
    for mode in modes:
        n = len(times[mode])
        rows.append(
            {
                "mode": mode,
                "p50_ms": round(statistics.median(times[mode]), digits),
                "p95_ms": round(percentile(times[mode], 0.95), digits),
                "bytes_per_token": round(sent[mode][0] / sent[mode][1], 2) if sent[mode][1] else 0.0,
                "bytes_per_question": round(sent[mode][0] / n, 1),
                "accuracy": round(hits[mode] / n, 4),
                "n": n,
            }
        )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench latency``."""
    parser.add_argument("--quick", action="store_true", help="use the quick zoo; default: the full zoo")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed")
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo directory (overrides --quick/--seed)")
    parser.add_argument(
        "--questions", type=count_or_file, default=DEFAULT_QUESTIONS, help="timed questions: a number, or a JSONL file"
    )
    parser.add_argument("--precision", default="fp16", help="precision of transmitted caches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--real", action="store_true", help="the real pretrained pair (ops.real's kit; --quick: its small one)"
    )
    parser.add_argument("--receiver-model", default="smollm2", help="--real: which model is the receiver")
    parser.add_argument("--kit", type=Path, default=None, help="--real: a built real kit directory")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run(args: argparse.Namespace) -> dict:
    """Time both modes on the same questions; return the issue's JSON."""
    if args.real:
        from ops.bench.reallat import run_real

        return run_real(args)
    from ops.zoo import load_zoo
    from ops.zoo.fusers import load_zoo_fusion, open_zoo

    torch.set_num_threads(args.threads)
    zoo = open_zoo(args.zoo) if args.zoo is not None else load_zoo(quick=args.quick, seed=args.seed)
    kit = load_zoo_fusion(zoo)
    rng = random.Random(f"bench-latency/{args.seed}")
    questions = choose(args.questions, list(zoo.questions("test")), DEFAULT_QUESTIONS, rng, DEFAULT_WARMUP)
    modes = ("t2t", "c2c", "c2c-private")  # c2c-private includes rephrasing q on the receiver
    run = partial(
        refine,
        receiver=kit.receiver,
        transmitters=kit.transmitters,
        fusers=kit.fusers,
        gate=kit.gate,
        precision=args.precision,
        self_check=zoo.self_check,
    )
    rows = time_modes(questions, modes, run, lambda res, q: res.index == q.answer, "latency", 2)
    return {"zoo": zoo.manifest.spec.name, "precision": args.precision, "rows": rows}
