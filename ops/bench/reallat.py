"""``python -m ops.bench latency --real``: text-to-text vs translate and C2C with real generation on the real pair
(Fig. 3c).

Free-text held-out questions of the real kit; four devices with their notes. Text-to-text: each device writes
its own answer (greedy, up to ``DEFAULT_HINT_TOKENS``) and the receiver reads them before the question, then
writes its answer. Translate: each device whose notes name q''s subject prefills those lines, the caches go through
the bus codec at ``--precision``, the receiver translates them, reads its question on top and writes its answer.
C2C (a kit built with ``--c2c``): each device prefills its notes and q', the gate plans, the planned caches go
through the codec, the receiver fuses them and writes its answer. The private rows add the rephrasing.
``refine()`` end to end, in one process and thread (devices one after another; over the bus they run in
parallel), modes alternating per question, the first ``DEFAULT_WARMUP`` not timed.
"""

from __future__ import annotations

import argparse
import random
from functools import partial

import torch

from fusion.refine import refine
from ops.bench.latency import DEFAULT_WARMUP, time_modes

MODES = ("t2t", "translate", "translate-private", "c2c", "c2c-private")  # the C2C rows need the kit's fusers


def run_real(args: argparse.Namespace) -> dict:
    """Time text-to-text and C2C on the same free-text questions; return the latency JSON."""
    from ops.bench.questions import choose
    from ops.real.kit import kit_from_args

    torch.set_num_threads(args.threads)
    kit = kit_from_args(args)
    fed = kit.federation(args.receiver_model)
    modes = MODES if fed.fusers else tuple(m for m in MODES if not m.startswith("c2c"))
    pool = [q for q in kit.test_questions() if q.format == "text"]
    questions = choose(args.questions, pool, 40, random.Random("bench-latency-real"), DEFAULT_WARMUP)
    run = partial(
        refine,
        receiver=fed.receiver,
        transmitters=fed.transmitters,
        fusers=fed.fusers,
        gate=fed.gate,
        notes=fed.notes,
        translators=fed.translators,
        precision=args.precision,
    )
    rows = time_modes(questions, modes, run, lambda res, q: res.correct(q), "latency --real", 1)
    p50 = {r["mode"]: r["p50_ms"] for r in rows}
    return {
        "real": True,
        "receiver": args.receiver_model,
        "devices": dict(kit.spec.devices),
        "precision": args.precision,
        "rows": rows,
        **{f"t2t_over_{m}_p50": round(p50["t2t"] / p50[m], 3) if p50.get(m) else None for m in ("translate", "c2c")},
    }
