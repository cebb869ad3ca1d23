"""Link rate x bandwidth policy through the agents over NATS, plus text-to-text at the same rates.

    python -m ops.bench bandwidth [--quick | --tiny | --real [--kit DIR]] [--questions N] [--deadline-s S]
        [--rates R,...] [--traces FILE_OR_NAME,...] [--policies P,...] [--json F]

For every link (a rate in MB/s = 1e6 bytes/s, ``unshaped`` = loopback, or a replayed trace: ``--traces``, shipped
names from ``ops/traces`` or files, ``bus.linktrace`` formats) and policy (a ``bus.policy`` name or a user's
``module:Class``, docs/POLICIES.md), a fresh federation of in-process agents (receiver, gate running that policy,
every transmitter on that link, re-planning its streams mid-way with the same policy) answers the same questions
one at a time on its own embedded nats-server (authorization and TLS on, one identity per agent; the CA and
certificate are made once); the models are loaded once. ``deadline_met`` is the share of
questions answered by the deadline with every planned layer arrived, or, where a transmitter's steer cut its stream
short (the stream-cut notice), every layer it sent (a stream cut by the deadline, no plan, or a device whose offer
missed the gate's window, ``offers_late``, is a miss);
``accuracy`` counts the answer whatever arrived. ``bytes_per_query`` is the KV the receiver got and
used, ``bytes_per_token`` that over the tokens of the transmitters' caches used. Text-to-text (``policy``
``t2t``) runs ``fusion.refine``'s hint pieces in process once per question; each transmitter writes its hint
in parallel with the others, so its latency is the slowest (generation + hint bytes / rate) plus the
receiver's read; a question whose hints miss the deadline is answered by the receiver alone (rates only).

Every policy row has ``link`` (the rate, ``"unshaped"`` or the trace's name), ``precision_mix`` (share of the
streamed layers sent at each precision, mid-stream re-plans included) and ``layers_sent`` (mean layers the
receiver used per planned transmitter). ``--real`` runs the real kit (``ops.real``; ``--kit DIR``, the receiver
``--receiver-model``; free-text questions scored by exact match; a 12 s deadline and 2 s heartbeats, since four
real prefills share this one process), at 0.002-1 MB/s by default, without
text-to-text rows (``ops.bench reallat`` has them); ``receiver_alone_accuracy`` is then measured in process.
``--real --mode translate`` asks every question in translate mode: each device with notes for q' streams every
layer of its notes' cache (~0.7 MB a device at fp16, docs/PROTOCOL.md 3.2), so the links bind at 0.05-1 MB/s and a
dropped layer stands at its mean in the translator; ``--format choice|text`` keeps one kind of question.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.errors import AgentError, ConfigError
from ops.bench import write_json

log = logging.getLogger(__name__)

POLICIES = ("keep-all", "drop-by-importance", "precision-ladder", "deadline-aware")
# MB/s. The 0.25-16 plus slower ones: with window-1 fusers a transmitter sends one token per layer, ~1-2 KB
# per query, not the ~88 KB per token of Qwen3-0.6B, so the link only binds at a few KB/s here; the steps are
# finer where keep-all starts to miss the 1 s deadline.
DEFAULT_RATES = "0.001,0.0015,0.002,0.0025,0.003,0.004,0.008,0.016,0.06,0.25,1,4,16,unshaped"
# A real transmitter's whole fp16 cache of a 60-token q' is ~1.4 MB (SmolLM2-135M: 23 KB a token), 5.6 s at
# 0.25 MB/s; but the real kit's window-1 fusers read only the last token(s) of each layer, ~20-50 KB a stream,
# so the link binds only below ~0.1 MB/s: the default sweep adds those rates to the 0.25-50.
# The deadline leaves the streams ~6 s after the offers (their window is 30% of it: four real prefills in one process
# on two cores), so ~25 KB a transmitter binds below ~0.004 MB/s.
REAL_RATES = "0.002,0.004,0.008,0.02,0.25,1"
REAL_QUESTIONS = 12  # per cell with --real
REAL_DEADLINE_S = 12.0  # per question with --real (four prefills with notes, then a generated answer, on a CPU)
REAL_HEARTBEAT_S = 2.0  # with --real: model work holds the one process's GIL for long; beats every 0.5 s would expire
DEFAULT_QUESTIONS = 48  # per cell (full zoo)
QUICK_QUESTIONS = 8  # per cell with --quick / --tiny
DEFAULT_DEADLINE_S = 1.0  # per question
BURST_SECONDS = 0.01  # shaper bucket: 10 ms of traffic (at least MIN_BURST_BYTES), so small caches are paced
MIN_BURST_BYTES = 1024
ROSTER_TIMEOUT_S = 30.0  # seconds for a cell's agents to see each other
DRAIN_S = 2.0  # seconds an agent of a finished cell waits for its in-flight work


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench bandwidth``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    which.add_argument("--real", action="store_true", help="the real kit (ops.real): megabyte caches")
    parser.add_argument("--quick", action="store_true", help="the quick zoo (or quick real kit) and fewer questions")
    parser.add_argument("--kit", type=Path, default=None, help="--real: a built real kit directory")
    parser.add_argument("--receiver-model", default="smollm2", help="--real: the receiver model of the kit")
    parser.add_argument("--questions", type=int, default=None, help="questions per cell")
    parser.add_argument("--deadline-s", type=float, default=None, help="per-question deadline (default 1; real 3)")
    parser.add_argument("--rates", default=None, help="comma-separated MB/s, 'unshaped' for loopback ('' for none)")
    parser.add_argument("--traces", default="", help="comma-separated link traces: files or shipped names")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated bus.policy names or module:Class specs"
    )
    parser.add_argument("--no-t2t", action="store_true", help="skip the text-to-text rows")
    parser.add_argument(
        "--mode",
        choices=["c2c", "translate"],
        default=None,
        help="--real: translate (each device's notes' cache, translated: megabytes; the default) or c2c (fusers on "
        "q' caches: `python -m ops.real build --c2c`)",
    )
    parser.add_argument(
        "--format", choices=["both", "choice", "text"], default="both", help="--real: which questions to ask"
    )


def parse_rates(text: str) -> list[float | None]:
    """``"0.25,1,unshaped"`` -> ``[0.25, 1.0, None]``; ConfigError on anything else."""
    rates: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() in ("unshaped", "none", "inf"):
            rates.append(None)
            continue
        try:
            value = float(part)
        except ValueError as exc:
            raise ConfigError(f"--rates: {part!r} is not a number of MB/s or 'unshaped'") from exc
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--rates: {part!r} must be a positive number of MB/s")
        rates.append(value)
    return rates


@dataclass(frozen=True)
class Link:
    """One link of the sweep: a fixed rate (None: unshaped) or a replayed trace."""

    name: str  # what rows show as ``link``
    mbps: float | None = None
    trace: Path | None = None

    @property
    def label(self) -> float | str:
        """The row's ``link``: the rate, ``"unshaped"``, or the trace's name."""
        return self.name if self.trace is not None or self.mbps is None else self.mbps

    def transmitter_flags(self) -> dict[str, Any]:
        """The transmitter config fields that put it on this link."""
        if self.trace is not None:
            return {"link_trace": str(self.trace)}
        if self.mbps is None:
            return {}
        return {"link_mbps": self.mbps, "link_burst_bytes": max(MIN_BURST_BYTES, int(self.mbps * 1e6 * BURST_SECONDS))}


def parse_links(rates: str, traces: str) -> list[Link]:
    """Rates (``parse_rates``) then traces (files or shipped names, each loaded once to check it)."""
    from bus.linktrace import load_trace
    from ops.traces import resolve_trace

    links = [Link("unshaped" if r is None else str(r), r) for r in parse_rates(rates)]
    for spec in (t.strip() for t in traces.split(",") if t.strip()):
        path = resolve_trace(spec)
        links.append(Link(load_trace(path).name, None, path))
    if not links:
        raise ConfigError("give at least one link: --rates or --traces")
    return links


def as_link(link: Link | float | None) -> Link:
    """A :class:`Link` from a rate in MB/s (None: unshaped) or a link."""
    if isinstance(link, Link):
        return link
    return Link("unshaped" if link is None else str(link), link)


def parse_policies(text: str) -> list[tuple[str, str]]:
    """``(spec, name)`` of each comma-separated policy (built-in or ``module:Class``), each built once to check it."""
    from bus.policy import make_policy

    policies = [(p.strip(), make_policy(p.strip(), ignore_unused=True).name) for p in text.split(",") if p.strip()]
    if not policies:
        raise ConfigError("--policies: give at least one policy")
    return policies


@dataclass
class World:
    """The setup's models, loaded once and shared by every cell's agents."""

    setup: Any  # ops.demo.Setup
    receiver: Any  # LanguageModel
    transmitters: dict[str, Any]  # agent id -> LanguageModel
    questions: list[Any]  # fusion.prompts.Question
    real: bool = False  # the real kit: answers by generation, free text scored by exact match
    mode: str = "c2c"  # how every question is asked (``Ask.mode``): "translate" sends the notes' caches


def load_world(args: argparse.Namespace) -> World:
    """The tiny setup or the zoo (quick / full) with its questions."""
    from fusion.models import LanguageModel
    from ops.demo import asked_mode, tiny_setup, zoo_setup

    n = args.questions or (
        REAL_QUESTIONS if args.real else QUICK_QUESTIONS if args.quick or args.tiny else DEFAULT_QUESTIONS
    )
    if n < 1:
        raise ConfigError("--questions must be at least 1")
    mode = asked_mode(getattr(args, "mode", None), args.real)
    fmt = getattr(args, "format", "both")
    if (mode != "c2c" or fmt != "both") and not args.real:
        raise ConfigError("--mode and --format need --real (translators are for pretrained models)")
    if args.real:
        from ops.demo import real_setup
        from ops.real.kit import kit_from_args

        kit = kit_from_args(args)
        setup = real_setup(args.receiver_model, n if fmt == "both" else 10**6, kit=kit, mode=mode)
        if fmt != "both":
            setup.questions = [q for q in setup.questions if q.format == fmt][:n]
    elif args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-bw-")), n)
    else:
        setup = zoo_setup(False if args.quick else None, n)
    cache: dict[str, LanguageModel] = {}
    for model in {setup.receiver, *setup.transmitters.values()}:
        cache[model] = LanguageModel.load(model)
    transmitters = {tid: cache[setup.transmitters[tid]] for tid in sorted(setup.transmitters)}
    questions = list(setup.questions)[:n]
    return World(setup, cache[setup.receiver], transmitters, questions, real=bool(args.real), mode=mode)


# ---- one cell: a rate and a policy through the agents ----------------------------------------------------------


async def _start_agents(url: str, store: Any, world: World, policy: str, link: Link) -> list:
    from agents.config import GateAgentConfig, ReceiverConfig, TransmitterConfig, make_config
    from agents.gate import GateAgent
    from agents.receiver import ReceiverAgent
    from agents.transmitter import TransmitterAgent

    beat = REAL_HEARTBEAT_S if world.real else 0.5
    base = {"nats": url, "prefix": store.prefix, "heartbeat_s": beat, "drain_s": DRAIN_S, "log_level": "warning"}
    base["tls_ca"] = str(store.ca_file)

    def creds(agent_id: str) -> dict[str, Any]:
        return {**base, "id": agent_id, "creds": str(store.creds_path(agent_id))}

    setup = world.setup
    agents: list = []
    rx = {**creds("rx"), "model": setup.receiver, "fusers": setup.fusers, "self_check": setup.self_check}
    rx_cfg = make_config(ReceiverConfig, {**rx, "gates": "gate"}, "receiver")
    agents.append(ReceiverAgent(rx_cfg, model=world.receiver))
    gate_cfg = make_config(GateAgentConfig, {**creds("gate"), "gate": setup.gate, "policy": policy}, "gate")
    agents.append(GateAgent(gate_cfg))
    for tid, model in world.transmitters.items():
        notes = {"notes": setup.notes[tid]} if tid in setup.notes else {}
        values = {**creds(tid), "model": setup.transmitters[tid], "policy": policy, **notes, **link.transmitter_flags()}
        agents.append(TransmitterAgent(make_config(TransmitterConfig, values, "transmitter"), model=model))
    started = []
    try:
        for agent in agents:
            await agent.start()
            started.append(agent)
        gate = agents[1]
        end = time.monotonic() + ROSTER_TIMEOUT_S
        while not (set(world.transmitters) <= set(gate.roster.live("transmitter")) and gate.roster.live("receiver")):
            if time.monotonic() > end:
                raise AgentError(f"the gate did not see every agent within {ROSTER_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)
    except BaseException:
        await _stop(started)
        raise
    return started


async def _stop(agents: list) -> None:
    for agent in reversed(agents):
        try:
            await agent.stop()
        except Exception:  # a cell's teardown must not hide its result
            log.exception("stopping %s failed", agent.id)


async def run_cell(
    world: World, policy: str, link: Link | float | None, deadline_s: float, *, tls_from: Any = None
) -> dict:
    """One row: every question through a fresh federation running ``policy`` on ``link`` (a :class:`Link`, or a
    rate in MB/s), on a fresh secure server (``tls_from``: a ``CredentialStore`` whose CA and certificate to
    reuse)."""
    from privacy.credentials import CredentialStore

    root = Path(tempfile.mkdtemp(prefix="fedrefine-bw-creds-"))
    store = CredentialStore(root, f"bw{uuid.uuid4().hex[:10]}")
    if tls_from is not None:
        store.copy_tls_from(tls_from)
    ids = [("receiver", "rx", None), ("gate", "gate", None), ("admin", "bench", None)]
    store.ensure(ids + [("transmitter", tid, None) for tid in world.transmitters])
    server = store.server().start()
    try:
        return await _cell(server.url, store, world, policy, as_link(link), deadline_s)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _cell(url: str, store: Any, world: World, policy: str, link: Link, deadline_s: float) -> dict:
    from bus.connect import close, connect
    from bus.schemas import Answer, Offer, Plan
    from bus.subjects import Subjects
    from ops.ask import Item, ask_once

    subjects = Subjects(store.prefix)
    from agents.transmitter import TransmitterAgent

    agents = await _start_agents(url, store, world, policy, link)
    plans: dict[str, Plan] = {}
    tokens: dict[tuple[str, str], int] = {}

    async def on_plan(msg: Any) -> None:
        plan = Plan.from_bytes(msg.data)
        plans[plan.query_id] = plan

    async def on_offer(msg: Any) -> None:
        offer = Offer.from_bytes(msg.data)
        tokens[(offer.query_id, offer.transmitter_id)] = offer.n_tokens

    nc = await connect(url, name="bench-bandwidth", security=store.client_security("bench"))  # an operator's view
    rows = []
    try:
        await nc.subscribe(subjects.plans_all(), cb=on_plan)
        await nc.subscribe(subjects.offers_all(), cb=on_offer)
        await nc.flush()
        for q in world.questions:
            t0 = time.perf_counter()
            item = Item(q.stem, q.options, False, q.answer, q.id, mode=world.mode)
            reply = await ask_once(nc, subjects, item, deadline_s)
            rows.append((q, reply, time.perf_counter() - t0))
        await asyncio.sleep(0.05)  # the spy's last callbacks
    finally:
        await close(nc)
        await _stop(agents)
    sent: dict[str, int] = {}
    for agent in agents:
        if isinstance(agent, TransmitterAgent):
            for precision, n in agent.layers_sent.items():
                sent[precision] = sent.get(precision, 0) + n
    replans = sum(a.replans for a in agents if isinstance(a, TransmitterAgent))
    row = _summarize(rows, plans, tokens, parse_policies(policy)[0][1], link, deadline_s, Answer)
    total = sum(sent.values())
    row["precision_mix"] = {p: round(n / total, 4) for p, n in sorted(sent.items())} if total else {}
    row["replans"] = replans
    return row


def _right(q: Any, reply: Any) -> bool:
    """The option the receiver chose, or (free text) an exact match of its answer."""
    from fusion.prompts import exact_match

    if isinstance(q.answer, str):
        return exact_match(reply.text or "", q.answer)
    return reply.choice == q.answer_letter


def _summarize(rows, plans, tokens, policy, link, deadline_s, answer_cls) -> dict:
    link = as_link(link)
    right = met = alone = offers_late = 0
    got_bytes, got_tokens, planned, seconds, precisions, layers = [], 0, [], [], [], []
    for q, reply, secs in rows:
        seconds.append(secs)
        if not isinstance(reply, answer_cls):
            continue
        right += _right(q, reply)
        if reply.alone:  # the receiver's self-check: it knew, asked no one, so there was nothing to wait for
            alone += 1
            met += reply.latency_s <= deadline_s
            continue
        plan = plans.get(reply.query_id)
        used = {u.transmitter_id: set(u.layers) for u in reply.used}
        late = any(o.reason == "late" and "no offer" in (o.detail or "") for o in reply.omitted)
        offers_late += late
        if plan is not None and reply.latency_s <= deadline_s and not late:  # a device whose offer came late missed
            # every planned layer arrived, or every layer a transmitter said it sent when its steer cut the stream
            sent = {u.transmitter_id: set(u.sent) for u in reply.used if u.sent is not None}
            met += all(
                set(e.layers) <= used.get(e.transmitter_id, set())
                or (e.transmitter_id in sent and sent[e.transmitter_id] <= used[e.transmitter_id])
                for e in plan.entries
            )
        if plan is not None:
            planned.append(sum(e.byte_budget for e in plan.entries))
            precisions += [e.precision for e in plan.entries]
            layers += [len(used.get(e.transmitter_id, ())) for e in plan.entries]
        got_bytes.append(reply.bytes_received)
        got_tokens += sum(tokens.get((reply.query_id, u.transmitter_id), 0) for u in reply.used)
    n = len(rows)
    return {
        "link": link.label,
        "link_mbps": link.mbps,
        **({"trace": link.name} if link.trace is not None else {}),
        "policy": policy,
        "accuracy": round(right / n, 4),
        "deadline_met": round(met / n, 4),
        "bytes_per_query": round(statistics.fmean(got_bytes)) if got_bytes else 0,
        "bytes_per_token": round(sum(got_bytes) / got_tokens, 1) if got_tokens else None,
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "planned_bytes_per_query": round(statistics.fmean(planned)) if planned else 0,
        "precisions": {p: precisions.count(p) for p in sorted(set(precisions))},
        "layers_sent": round(statistics.fmean(layers), 2) if layers else 0.0,
        "answered": sum(isinstance(r, answer_cls) for _, r, _ in rows),
        "answered_alone": alone,
        "offers_late": round(offers_late / n, 4),  # questions where some device's offer missed the gate's window
        "n": n,
    }


# ---- text-to-text --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HintRun:
    """One question's text-to-text pieces, timed: per transmitter (seconds, bytes, tokens) and the receiver."""

    hints: dict[str, tuple[float, int, int]]
    read_s: float
    right_with: bool
    right_alone: bool


def measure_t2t(world: World) -> tuple[list[HintRun], float]:
    """Hints and reads in process (``fusion.refine``'s pieces); also the receiver-alone accuracy."""
    from tqdm import tqdm

    from fusion.refine import knows_alone, letter_probs, receiver_self_check, with_hints, write_hint

    runs = []
    for q in tqdm(world.questions, desc="t2t", leave=False):
        t0 = time.perf_counter()
        probs, p_none = receiver_self_check(world.receiver, q.stem, q.options)  # the receiver alone
        alone = int(probs.argmax()) == q.answer
        if knows_alone(p_none, world.setup.self_check):  # as the receiver agent does: a question it knows asks no one
            runs.append(HintRun({}, time.perf_counter() - t0, alone, alone))
            continue
        hints, texts = {}, []
        for tid, model in world.transmitters.items():
            t0 = time.perf_counter()
            hint = write_hint(model, q.stem)
            gen = time.perf_counter() - t0
            texts.append(hint)
            tokens = len(model.encode(" " + hint).ids) if hint else 0
            hints[tid] = (gen, len(hint.encode()), tokens)
        t0 = time.perf_counter()
        with_answer = int(letter_probs(world.receiver, with_hints(texts, q.stem, q.options)).argmax()) == q.answer
        read_s = time.perf_counter() - t0
        runs.append(HintRun(hints, read_s, with_answer, alone))
    alone_acc = sum(r.right_alone for r in runs) / len(runs)
    return runs, alone_acc


def t2t_row(runs: list[HintRun], rate: float | None, deadline_s: float) -> dict:
    """The text-to-text row at one link rate (hint transfer time = bytes / rate; parallel transmitters)."""
    lat, right, met, nbytes, ntokens = [], 0, 0, 0, 0
    for run in runs:
        slowest = max((g + (b / (rate * 1e6) if rate else 0.0) for g, b, _ in run.hints.values()), default=0.0)
        total = slowest + run.read_s
        ok = total <= deadline_s
        lat.append(total)
        met += ok
        right += run.right_with if ok else run.right_alone
        nbytes += sum(b for _, b, _ in run.hints.values())
        ntokens += sum(t for _, _, t in run.hints.values())
    n = len(runs)
    return {
        "link": "unshaped" if rate is None else rate,
        "link_mbps": rate,
        "policy": "t2t",
        "accuracy": round(right / n, 4),
        "deadline_met": round(met / n, 4),
        "bytes_per_query": round(nbytes / n, 1),
        "bytes_per_token": round(nbytes / ntokens, 2) if ntokens else None,
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "n": n,
    }


# ---- the sweep -----------------------------------------------------------------------------------------------


def receiver_alone(world: World) -> float:
    """The receiver's accuracy alone, in process (the real kit: its own generated or scored answer, no notes)."""
    from fusion.answers import is_correct
    from fusion.refine import answer_alone

    hits = [is_correct(answer_alone(world.receiver, q.stem, q.options), q.answer) for q in world.questions]
    return sum(hits) / len(hits)


def run(args: argparse.Namespace) -> dict:
    """The sweep; returns the issue's JSON (plus per-row extras and the settings)."""
    import torch
    from tqdm import tqdm

    from privacy.credentials import CredentialStore

    real = bool(getattr(args, "real", False))
    rates = args.rates if args.rates is not None else (REAL_RATES if real else DEFAULT_RATES)
    links = parse_links(rates, getattr(args, "traces", "") or "")
    policies = parse_policies(args.policies)
    deadline_s = args.deadline_s if args.deadline_s is not None else (REAL_DEADLINE_S if real else DEFAULT_DEADLINE_S)
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ConfigError("--deadline-s must be a positive number of seconds")
    if args.kit is not None and not real:
        raise ConfigError("--kit needs --real")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    world = load_world(args)
    no_t2t = args.no_t2t or real
    if real:
        runs, alone = [], receiver_alone(world)
    else:
        runs, alone = measure_t2t(world)
    rows: list[dict] = []
    pki_dir = Path(tempfile.mkdtemp(prefix="fedrefine-bw-pki-"))
    pki = CredentialStore(pki_dir)
    pki.ensure_tls()
    try:
        cells = [(link, spec) for link in links for spec, _ in policies]
        for link, spec in tqdm(cells, desc="bandwidth cells"):
            rows.append(asyncio.run(run_cell(world, spec, link, deadline_s, tls_from=pki)))
            # the rows so far, as the run goes (a real sweep takes many minutes)
            write_json(
                getattr(args, "json", None), {"partial": len(rows), "cells": len(cells), "rows": rows, "real": real}
            )
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)
    if not no_t2t:
        rows += [t2t_row(runs, link.mbps, deadline_s) for link in links if link.trace is None]
    fp16_bytes = [r["bytes_per_query"] for r in rows if r["policy"] == "keep-all" and r["link"] == "unshaped"]
    return {
        "receiver_alone_accuracy": round(alone, 4),
        "rows": rows,
        "setup": world.setup.name,
        "real": real,
        "mode": world.mode,
        "transmitters": len(world.transmitters),
        "questions": len(world.questions),
        "deadline_s": deadline_s,
        "traces": {link.name: str(link.trace) for link in links if link.trace is not None},
        "keep_all_unshaped_bytes_per_query": fp16_bytes[0] if fp16_bytes else None,
        "notes": (
            "link in MB/s (1e6 bytes/s), 'unshaped', or a trace name (replayed from agent start, looping); each "
            f"transmitter on its own shaped uplink (token bucket, burst {BURST_SECONDS * 1000:.0f} ms of traffic, "
            f"min {MIN_BURST_BYTES} B), re-planning its streams mid-way with the row's policy; agents in one "
            "process, one question at a time; deadline_met = answered by the deadline with every planned layer in "
            "(or by the receiver's self-check, alone); bytes_per_query and bytes_per_token average over the "
            "questions that were asked (answered_alone counts the others); offers_late = share of questions where a "
            "device's offer missed the gate's window (counted as deadline misses); precision_mix = share of streamed "
            "layers per precision; t2t in process with hint transfer time = bytes / rate"
        ),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
