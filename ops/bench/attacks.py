"""The attack matrix against a whole federation of processes: ``python -m ops.bench attacks [--quick | --tiny]``.

The demo's federation (receiver, rephraser, gate, transmitters as separate processes, on an embedded server with
authorization and TLS; the receiver takes plans from its gate only) answers ``--questions`` held-out questions
(those with personal details private) once cleanly, then again during each attempt of ``ops.redteam.attempts``:
no credentials; a stolen transmitter's (``t-stolen``), a gate's (``gate-stolen``) and a user's (``mallory``)
credentials, issued by the federation but not part of the honest run. JSON: ``rows`` (attacker, attempt, blocked),
``legit_queries``, ``legit_answered``, ``legit_changed`` (answers whose letter, fused transmitters or
probabilities differ from the clean round), and each attempt's evidence in ``details``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from agents.launch import Federation
from ops.demo import items_of, secure_server, tiny_setup, zoo_setup
from ops.redteam.attacks import Matrix, Target, attacker_identities
from ops.redteam.attempts import ATTEMPTS

DEFAULT_QUESTIONS = 6  # legitimate questions asked during each attempt
DEFAULT_DEADLINE_S = 5.0  # per legitimate question


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench attacks``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick zoo (default: the full one if built)")
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS, help="legitimate questions per attempt")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per legitimate question")


def run(args: argparse.Namespace) -> dict:
    """Start the federation, run every attempt, stop everything."""
    import logging

    t0 = time.perf_counter()
    if args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-attacks-")), args.questions)
    else:
        setup = zoo_setup(False if args.quick else None, 200)
        private = [q for q in setup.questions if q.pii][: (args.questions + 1) // 2]
        plain = [q for q in setup.questions if not q.pii][: args.questions - len(private)]
        setup.questions = private + plain
    setup.links_mbps = {}
    specs = setup.specs()
    server, store = secure_server(specs, extra=attacker_identities())
    assert store is not None
    fed = Federation(server.url, specs, store=store)
    logging.getLogger("ops.redteam.attacks").setLevel(logging.INFO)
    try:
        fed.start()
        target = Target(
            url=server.url,
            store=store,
            items=items_of(setup.questions),
            secrets=[s for q in setup.questions if q.pii for s in (q.stem, *q.pii)],
            receiver_id="receiver",
            gate_id="gate",
            transmitters=tuple(setup.transmitters),
            deadline_s=args.deadline_s,
        )
        report = asyncio.run(_run(fed, target))
    finally:
        fed.stop()
        server.stop()
        shutil.rmtree(store.root, ignore_errors=True)
    report.update(
        setup=setup.name,
        private_questions=sum(bool(q.pii) for q in setup.questions),
        seconds=round(time.perf_counter() - t0, 1),
        cpus=os.cpu_count(),
        load_avg_1m=round(os.getloadavg()[0], 2),
    )
    return report


async def _run(fed: Federation, target: Target) -> dict:
    await fed.wait_ready()
    async with Matrix(target) as matrix:
        await matrix.run(ATTEMPTS)
    return matrix.report()
