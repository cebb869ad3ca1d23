"""Load: many questions in flight from several receivers' users at once, and a soak for memory growth.

    python -m ops.bench load [--quick | --tiny | --real [--kit DIR] [--receiver-model M]] [--receivers 3]
                             [--levels 20,50,200,1000] [--deadline-s 10]
                             [--soak-questions 5000] [--soak-minutes 10] [--no-soak]

A federation of processes on one secure server: ``--receivers`` receivers (users' devices; asks are shared among
them by their queue group), two rephrasers, two gates and the zoo's transmitters, unshaped links. For each level
L of ``--levels``, L questions are kept outstanding at once, from one asker connection per receiver, until
``max(2 L, 200)`` were asked. A receiver works on 64 at a time and queues the rest (``--max-queued``, 1024 each:
``agents.askqueue``), answering a queued question alone when too little of its deadline is left, so nothing is
refused until the queues are full. Per level: queries, answered, errors (by code), p50 / p95 / p99 of the round
trip, answered by the deadline, fused or alone.

The soak then keeps ``--soak-in-flight`` questions outstanding until ``--soak-questions`` were asked (or
``--soak-minutes`` passed) and reads every agent's resident memory (``/proc/<pid>/status``) after a warm-up (the
first ``--warmup-share`` of the questions) and at the end: ``rss_growth`` is the largest end / warm-up - 1 over the
agents (the issue's target: at most 0.05).

``--real``: the real kit's federation (the demo's: four transmitter devices with notes; ``--kit DIR``, receiver
``--receiver-model``), e.g. the soak alone over 500 real questions:
``python -m ops.bench load --real --kit KIT --levels '' --receivers 1 --soak-questions 500 --soak-in-flight 4
--soak-minutes 60 --deadline-s 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from agents.launch import AgentSpec, Federation, identities_for
from agents.tracing import answer_detail
from bus.connect import close, connect
from bus.schemas import Answer
from bus.subjects import Subjects
from ops.ask import ReconnectWatch
from ops.bench import write_json
from ops.bench.loadkit import Pump, Shot, latency_row
from ops.demo import ASKER_ID, Setup, asked_mode, items_of, real_setup, tiny_setup, zoo_setup
from privacy.credentials import CredentialStore

DEFAULT_LEVELS = "20,50,200,1000"
DEFAULT_RECEIVERS = 3
DEFAULT_DEADLINE_S = 10.0
DEFAULT_MIN_PER_LEVEL = 200  # questions asked at least per level
DEFAULT_SOAK_QUESTIONS = 5000
DEFAULT_SOAK_MINUTES = 10.0
DEFAULT_SOAK_IN_FLIGHT = 20
DEFAULT_WARMUP_SHARE = 0.1  # of the soak's questions, before the first memory reading
DEFAULT_SAMPLE_S = 15.0  # seconds between memory readings during the soak


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench load``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick zoo (default: the full one if built)")
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    which.add_argument("--real", action="store_true", help="the real kit (ops.real): megabyte models, device notes")
    parser.add_argument("--kit", type=Path, default=None, help="--real: a built real kit directory")
    parser.add_argument("--receiver-model", default="smollm2", help="--real: the receiver model of the kit")
    parser.add_argument("--receivers", type=int, default=DEFAULT_RECEIVERS, help="receivers (users' devices)")
    parser.add_argument(
        "--levels", default=DEFAULT_LEVELS, help="questions in flight, comma-separated ('': the soak only)"
    )
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per-question deadline")
    parser.add_argument("--questions", type=int, default=60, help="distinct questions cycled through")
    parser.add_argument("--soak-questions", type=int, default=DEFAULT_SOAK_QUESTIONS, help="questions in the soak")
    parser.add_argument("--soak-minutes", type=float, default=DEFAULT_SOAK_MINUTES, help="the soak's time cap")
    parser.add_argument("--soak-in-flight", type=int, default=DEFAULT_SOAK_IN_FLIGHT, help="outstanding in the soak")
    parser.add_argument("--warmup-share", type=float, default=DEFAULT_WARMUP_SHARE, help="soak share before reading")
    parser.add_argument("--no-soak", action="store_true", help="the levels only")
    parser.add_argument(
        "--mode",
        choices=["c2c", "translate"],
        default=None,
        help="--real: how every question is asked (translate, the default: each device streams its notes' cache, "
        "megabytes; c2c: the kit's C2C fusers, `python -m ops.real build --c2c`)",
    )


def load_specs(setup: Setup, receivers: int) -> list[AgentSpec]:
    """``receivers`` receivers, two rephrasers serving all of them, two gates, the setup's transmitters."""
    base = setup.specs(redundant=True)
    rx = next(s for s in base if s.role == "receiver")
    specs = [AgentSpec("receiver", "receiver" if i == 0 else f"receiver-{i + 1}", rx.args) for i in range(receivers)]
    for s in base:
        if s.role == "rephraser":  # one queue group serving every receiver
            specs.append(
                AgentSpec("rephraser", s.agent_id, tuple(a for a in s.args if a not in ("--receiver-id", "receiver")))
            )
        elif s.role != "receiver":
            specs.append(s)
    return specs


def rss_mb(pid: int) -> float | None:
    """A process's resident memory in MB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def level_row(level: int, shots: list[Shot], deadline_s: float, seconds: float) -> dict:
    """The issue's row for one level, and a few more facts."""
    answers = [s.reply for s in shots if isinstance(s.reply, Answer)]
    errors = Counter(s.reply.code for s in shots if not isinstance(s.reply, Answer))
    queued_alone = sum(any("too little of its deadline" in n for n in a.notes) for a in answers)
    how = Counter(answer_detail(a).split(" ")[0].rstrip(":") if a.used else answer_detail(a) for a in answers)
    return {
        "in_flight": level,
        "queries": len(shots),
        "answered": len(answers),
        "errors": sum(errors.values()),
        **{k: v for k, v in latency_row(shots).items() if k != "mean_ms"},
        "answered_by_deadline": sum(s.in_time(deadline_s) for s in shots),
        "errors_by_code": dict(errors),
        "fused": sum(bool(a.used) for a in answers),
        "alone_for_time": queued_alone,
        "how": dict(how),
        "throughput_qps": round(len(shots) / seconds, 1) if seconds else None,
    }


class LoadBench:
    """The federation's askers and the runs over them."""

    def __init__(self, fed: Federation, store: CredentialStore, setup: Setup, args: argparse.Namespace) -> None:
        self.fed, self.store, self.setup, self.args = fed, store, setup, args
        self.items = items_of(setup.questions, setup.mode)
        self.askers: list[tuple] = []

    async def open(self, n: int) -> None:
        """One asker connection per receiver (each user asks from their own device)."""
        for i in range(n):
            watch = ReconnectWatch()
            nc = await connect(
                self.fed.url,
                name=f"bench-load-{i}",
                security=self.store.client_security(ASKER_ID),
                pending_size=64 * 1024 * 1024,
                reconnected_cb=watch.on_reconnect,
            )
            self.askers.append((nc, watch))

    async def close(self) -> None:
        for nc, _ in self.askers:
            await close(nc)

    async def level(self, level: int) -> dict:
        """``level`` questions outstanding until ``max(2 level, 200)`` were asked."""
        total = max(2 * level, DEFAULT_MIN_PER_LEVEL)
        pump = Pump(
            self.askers,
            Subjects(self.fed.prefix),
            self.items,
            in_flight=level,
            deadline_s=self.args.deadline_s,
            limit=total,
        )
        t0 = time.monotonic()
        shots = await pump.run()
        return level_row(level, shots, self.args.deadline_s, time.monotonic() - t0)

    async def soak(self) -> dict:
        """Many questions at a steady load; every agent's memory after the warm-up and at the end."""
        a = self.args
        pump = Pump(
            self.askers,
            Subjects(self.fed.prefix),
            self.items,
            in_flight=a.soak_in_flight,
            deadline_s=a.deadline_s,
            limit=a.soak_questions,
        )
        task = asyncio.ensure_future(pump.run())
        t0 = time.monotonic()
        end = t0 + 60 * a.soak_minutes
        warm = int(a.warmup_share * a.soak_questions)
        while len(pump.shots) < warm and not task.done() and time.monotonic() < end:
            await asyncio.sleep(0.2)
        before = self.memory()
        samples = [(round(time.monotonic() - t0, 1), before)]
        while not task.done() and time.monotonic() < end:
            await asyncio.wait({task}, timeout=DEFAULT_SAMPLE_S)
            samples.append((round(time.monotonic() - t0, 1), self.memory()))
            self._partial({"soak_questions_so_far": len(pump.shots), "rss_mb_after_warmup": before, "samples": samples})
        pump.stop()
        shots = await task
        after = self.memory()
        growth = {aid: round(after[aid] / before[aid] - 1, 4) for aid in before if before[aid] and after.get(aid)}
        worst = max(growth, key=growth.get) if growth else None
        return {
            "questions": len(shots),
            "seconds": round(time.monotonic() - t0, 1),
            "rss_growth": growth[worst] if worst else None,
            "worst_agent": worst,
            "warmup_questions": warm,
            "answered": sum(s.answered for s in shots),
            "answered_by_deadline": sum(s.in_time(a.deadline_s) for s in shots),
            "rss_mb_after_warmup": before,
            "rss_mb_end": after,
            "rss_growth_by_agent": growth,
            "rss_samples": [
                {"t_s": t, "max_mb": max(m.values()) if m else None, "sum_mb": round(sum(m.values()), 1)}
                for t, m in samples
            ],
        }

    def _partial(self, soak: dict) -> None:
        """The soak so far, written to ``--json`` as it goes (a real soak runs for many minutes)."""
        write_json(getattr(self.args, "json", None), {"partial": True, "soak": soak})

    def memory(self) -> dict[str, float]:
        """Every live agent's resident memory, MB."""
        out = {}
        for aid, proc in self.fed.procs.items():
            mb = rss_mb(proc.proc.pid)
            if mb is not None:
                out[aid] = mb
        return out


async def _run(
    fed: Federation, store: CredentialStore, setup: Setup, args: argparse.Namespace, levels: list[int]
) -> dict:
    bench = LoadBench(fed, store, setup, args)
    await fed.wait_ready()
    await bench.open(args.receivers)
    try:
        rows = []
        for level in levels:
            rows.append(await bench.level(level))
            await asyncio.sleep(2.0)  # the queues empty, late streams end
        soak = None if args.no_soak else await bench.soak()
    finally:
        await bench.close()
    return {"rows": rows, "soak": soak}


def run(args: argparse.Namespace) -> dict:
    """The levels, then the soak, on one federation."""
    import torch

    from bus.errors import ConfigError

    torch.set_num_threads(1)
    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--levels takes numbers like 20,50,200: {exc}") from exc
    if (
        (not levels and args.no_soak)
        or min(levels, default=1) < 1
        or args.receivers < 1
        or args.deadline_s <= 0
        or args.soak_in_flight < 1
    ):
        raise ConfigError("--levels, --receivers, --deadline-s and --soak-in-flight must be positive")
    if args.kit is not None and not args.real:
        raise ConfigError("--kit needs --real")
    args.mode = asked_mode(getattr(args, "mode", None), args.real)
    if args.mode != "c2c" and not args.real:
        raise ConfigError("--mode translate needs --real (translators are for pretrained models)")
    if args.real:
        from ops.real.kit import kit_from_args

        setup = real_setup(args.receiver_model, args.questions, kit=kit_from_args(args), mode=args.mode)
    elif args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-load-")), args.questions)
    else:
        setup = zoo_setup(False if args.quick else None, args.questions)
    setup.links_mbps = {}
    specs = load_specs(setup, args.receivers)
    store = CredentialStore(tempfile.mkdtemp(prefix="fedrefine-load-creds-"))
    store.ensure([*identities_for(specs), ("client", ASKER_ID, None)])
    server = store.server().start()
    fed = Federation(server.url, specs, store=store)
    try:
        fed.start()
        result = asyncio.run(_run(fed, store, setup, args, levels))
    finally:
        fed.stop()
        server.stop()
        shutil.rmtree(store.root, ignore_errors=True)
    return {
        **result,
        "setup": setup.name,
        "mode": setup.mode,
        "receivers": args.receivers,
        "deadline_s": args.deadline_s,
        "max_inflight_per_receiver": 64,
        "max_queued_per_receiver": 1024,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
