"""The agents over NATS against ``fusion.refine()`` in process: same questions, same settings, one run.

    python -m ops.bench e2e [--quick | --tiny | --real [--kit DIR] [--receiver-model M]] [--questions N]
        [--tls | --insecure] [--t2t] [--translate] [--json F]

Both paths answer every question with the gating network, fp16 caches and private mode for questions that
carry personal details; questions alternate between the two paths so both see the same machine load. The bus
path is the demo's: an embedded nats-server (authorization and TLS on, an identity per agent) and every agent
(receiver, rephraser, gate, transmitters) as its own process, one question at a time (latency, not throughput).
Parity is the share of answered questions whose letter equals the in-process letter.

``--tls``: the cost of security. A second federation runs on a server without authorization or TLS, and every
question goes through both (in turn, the order alternating) and in process: ``overhead_ratio_secure`` is the
secure bus p50 over the plain bus p50 of the same run. ``--insecure`` runs only the plain federation.

``--real``: the real kit (``ops.real``; ``--kit DIR``, receiver ``--receiver-model``): the demo's real federation
(four devices with their notes, a rules-only rephraser) against ``refine()`` with the same notes and the same
rules rephrasing; free-text questions compare the generated text (normalised) for parity and score by exact match.
Every run reports ``p50_ms`` and ``p50_ms_in_process`` (the same figures as ``bus_p50_ms`` and ``inproc_p50_ms``).
With ``--real`` every question is asked in translate mode (the notes' caches, translated) unless ``--mode c2c``
(the kit's C2C fusers); the JSON's ``mode`` says which.

``--t2t``: Fig. 3c over the bus. Every question is also asked in text-to-text mode (``Ask.mode="t2t"``: each
transmitter writes its short answer, the receiver reads the hints) through the same federation, the two modes in
alternating order: ``t2t_p50_ms`` and ``t2t_over_c2c_p50`` (text-to-text p50 over C2C p50, same run;
``t2t_over_translate_p50`` in translate mode), with
``accuracy_t2t`` and ``t2t_bytes_per_query``.

``--translate``: every question is also asked in translate mode (``Ask.mode="translate"``: each transmitter sends
its retrieved notes' cache, the receiver's translators read it; ``fusion.translate``) and answered in process by
``refine(mode="translate")``: ``translate_parity``, ``translate_p50_ms``, ``accuracy_translate``,
``translate_bytes_per_query``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agents.launch import Federation
from bus.connect import close, connect
from bus.errors import ConfigError
from bus.schemas import Answer
from bus.subjects import Subjects
from fusion.notes import DeviceNotes
from ops.ask import ask_once
from ops.demo import ASKER_ID, Setup, asked_mode, items_of, real_setup, secure_server, tiny_setup, zoo_setup

DEFAULT_QUESTIONS = 40  # questions through each path
DEFAULT_WARMUP = 2  # questions through each path before measuring
DEFAULT_DEADLINE_S = 10.0  # generous: parity is measured where nothing is cut by the deadline
PRECISION = "fp16"  # what the gate's policy picks on an ample link; refine() is told the same


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench e2e``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick zoo (default: the full one if built)")
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    which.add_argument("--real", action="store_true", help="the real kit (ops.real)")
    parser.add_argument("--kit", type=Path, default=None, help="--real: a built real kit directory")
    parser.add_argument("--receiver-model", default="smollm2", help="--real: the receiver model of the kit")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS, help="questions through each path")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured questions first")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per-question deadline")
    parser.add_argument("--t2t", action="store_true", help="also text-to-text over the bus (Fig. 3c): t2t_over_c2c_p50")
    parser.add_argument(
        "--mode",
        choices=("c2c", "translate"),
        default=None,
        help="--real: the mode every question is asked and compared in (translate, the default, or c2c: the kit's "
        "C2C fusers, `python -m ops.real build --c2c`)",
    )
    parser.add_argument(
        "--translate",
        action="store_true",
        help="c2c mode: also translate mode over the bus (the notes' caches translated): its parity with refine() and "
        "p50",
    )
    secure = parser.add_mutually_exclusive_group()
    secure.add_argument("--tls", action="store_true", help="also a plain federation: overhead_ratio_secure")
    secure.add_argument("--insecure", action="store_true", help="the bus without authorization or TLS")


class InProcess:
    """The same models, fusers and gate as the agents, loaded here for ``refine()``."""

    def __init__(self, setup: Setup) -> None:
        from fusion.gate import load_gate
        from fusion.models import LanguageModel
        from fusion.registry import FuserRegistry

        self.receiver = LanguageModel.load(setup.receiver)
        cache: dict[str, LanguageModel] = {}
        for model in setup.transmitters.values():
            cache.setdefault(model, LanguageModel.load(model))
        # sorted by agent id: the receiver fuses in that order, so floating-point sums match
        self.transmitters = {tid: cache[setup.transmitters[tid]] for tid in sorted(setup.transmitters)}
        registry = FuserRegistry(setup.fusers)
        self.fusers = {  # a real kit built without --c2c has translators only
            m.fingerprint: registry.load(m.fingerprint, self.receiver.fingerprint)
            for m in self.transmitters.values()
            if setup.mode == "c2c" or registry.has(m.fingerprint, self.receiver.fingerprint)
        }
        self.gate = load_gate(setup.gate) if setup.gate else None
        self.translators = {
            m.fingerprint: registry.load_translator(m.fingerprint, self.receiver.fingerprint)
            for m in self.transmitters.values()
            if registry.translator_path(m.fingerprint, self.receiver.fingerprint).exists()
        }
        self.self_check = setup.self_check
        self.notes = {tid: DeviceNotes.load(path) for tid, path in setup.notes.items()} or None
        self.rules_only = setup.rules_only  # the rephraser agent redacts by rules: so does the private stem here

    def answer(self, question, private: bool, mode: str = "c2c"):
        """``refine()`` in ``mode`` (c2c, or translate) with the settings the agents use; returns (result, seconds)."""
        from fusion.refine import refine
        from privacy.rephrase import rephrase

        t0 = time.perf_counter()
        private_stem = rephrase(question.stem).text if private and self.rules_only else None
        result = refine(
            question,
            self.receiver,
            self.transmitters,
            mode=mode,
            translators=self.translators,
            fusers=self.fusers,
            gate=self.gate,
            private=private,
            private_stem=private_stem,
            precision=PRECISION,
            self_check=self.self_check,
            notes=self.notes,
        )
        return result, time.perf_counter() - t0


def same_answer(reply: Answer, ref) -> bool:
    """The bus and ``refine()`` agree: the same option, or (free text) the same normalised text."""
    from fusion.prompts import exact_match

    if ref.choice is None:
        return exact_match(reply.text, ref.answer)
    return reply.choice == ref.answer


def right(reply: Answer, question) -> bool:
    """The bus answer is right: the option, or (free text) an exact match of the normalised answer."""
    from fusion.prompts import exact_match

    if isinstance(question.answer, str):
        return exact_match(reply.text, question.answer)
    return reply.choice == question.answer_letter


async def _compare(
    feds: dict[str, Federation],
    setup: Setup,
    local: InProcess,
    warmup: int,
    deadline_s: float,
    t2t: bool = False,
    translate: bool = False,
) -> dict:
    """Every question through each federation (the first is the one compared with ``refine()``) and in process."""
    from tqdm import tqdm

    for fed in feds.values():
        await fed.wait_ready()
    conns = {}
    for name, fed in feds.items():
        security = fed.store.client_security(ASKER_ID) if fed.store is not None else None
        conns[name] = await connect(fed.url, name=f"bench-e2e-{name}", security=security)
    main = next(iter(feds))
    subjects = Subjects(feds[main].prefix)
    items = items_of(setup.questions, setup.mode)
    nbytes, local_bytes = [], []
    timed: list[tuple[str, float | None, float]] = []  # (kind, bus seconds or None, in-process seconds)
    paths: dict[str, list[float | None]] = {name: [] for name in feds}  # bus seconds per federation
    agree = 0  # questions where every federation gave the same letter
    answered = same = right_bus = right_local = 0
    t2t_times: list[float] = []
    t2t_bytes: list[int] = []
    t2t_right = 0
    tr_times: list[float] = []
    tr_bytes: list[int] = []
    tr_same = tr_right = tr_asked = 0
    try:
        for i, (question, item) in enumerate(tqdm(list(zip(setup.questions, items, strict=True)), desc="e2e")):
            order = list(feds) if i % 2 == 0 else list(feds)[::-1]  # neither federation always goes first
            replies, times = {}, {}
            text_first = t2t and i % 2 == 1  # C2C and text-to-text take turns going first
            if text_first:
                t2t_reply, t2t_time = await _ask_t2t(conns[main], subjects, item, deadline_s)
            for name in order:
                t0 = time.perf_counter()
                replies[name] = await ask_once(conns[name], subjects, item, deadline_s)
                times[name] = time.perf_counter() - t0
            if t2t and not text_first:
                t2t_reply, t2t_time = await _ask_t2t(conns[main], subjects, item, deadline_s)
            reply, bus_time = replies[main], times[main]
            ref, local_time = local.answer(question, item.private, mode=setup.mode)
            if translate:
                t0 = time.perf_counter()
                tr_reply = await ask_once(
                    conns[main], subjects, dataclasses.replace(item, mode="translate"), deadline_s
                )
                tr_time = time.perf_counter() - t0
                tr_ref, _ = local.answer(question, item.private, mode="translate")
            if i < warmup:
                continue
            if translate:
                tr_asked += 1
                if isinstance(tr_reply, Answer):
                    tr_times.append(tr_time)
                    tr_bytes.append(tr_reply.bytes_received)
                    tr_same += same_answer(tr_reply, tr_ref)
                    tr_right += right(tr_reply, question)
            if t2t and isinstance(t2t_reply, Answer):
                t2t_times.append(t2t_time)
                t2t_bytes.append(t2t_reply.bytes_received)
                t2t_right += right(t2t_reply, question)
            for name in feds:
                paths[name].append(times[name] if isinstance(replies[name], Answer) else None)
            letters = {(r.choice, r.text) if isinstance(r, Answer) else None for r in replies.values()}
            agree += len(letters) == 1 and None not in letters
            local_bytes.append(ref.bytes_sent)
            right_local += ref.correct(question)
            kind = "alone" if ref.alone else "private" if item.private else "plain"
            timed.append((kind, bus_time if isinstance(reply, Answer) else None, local_time))
            if not isinstance(reply, Answer):
                continue
            answered += 1
            nbytes.append(reply.bytes_received)
            same += same_answer(reply, ref)
            right_bus += right(reply, question)
    finally:
        for conn in conns.values():
            await close(conn)
    overall = p50s(timed)
    n = overall["n"]
    out = {
        "queries": n,
        "answered": answered,
        "parity": round(same / answered, 4) if answered else None,
        "p50_ms": overall["bus_p50_ms"],
        "p50_ms_in_process": overall["inproc_p50_ms"],
        "overhead_ratio": overall["overhead_ratio"],
        "bus_p50_ms": overall["bus_p50_ms"],
        "inproc_p50_ms": overall["inproc_p50_ms"],
        "bytes_per_query": round(statistics.fmean(nbytes)) if nbytes else 0,
        "inproc_bytes_per_query": round(statistics.fmean(local_bytes)) if local_bytes else 0,
        "accuracy_bus": round(right_bus / answered, 4) if answered else None,
        "accuracy_inproc": round(right_local / n, 4) if n else None,
        "private_queries": sum(it.private for it in items[warmup:]),
        "by_kind": by_kind(timed),
        "setup": setup.name,
        "transmitters": len(setup.transmitters),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # this machine's load at the end (others' jobs slow the bus most)
        "cpus": os.cpu_count(),
        "secure": feds[main].store is not None,  # authorization and TLS on the compared federation
    }
    if len(feds) > 1:
        out.update(secure_vs_plain(paths, agree, n))
    if t2t:
        t2t_p50 = statistics.median(t2t_times) if t2t_times else None
        out |= {
            "t2t_answered": len(t2t_times),
            "t2t_p50_ms": round(1000 * t2t_p50, 1) if t2t_p50 is not None else None,
            f"t2t_over_{setup.mode}_p50": round(1000 * t2t_p50 / out["p50_ms"], 3)
            if t2t_p50 and out["p50_ms"]
            else None,
            "accuracy_t2t": round(t2t_right / len(t2t_times), 4) if t2t_times else None,
            "t2t_bytes_per_query": round(statistics.fmean(t2t_bytes)) if t2t_bytes else 0,
        }
    if translate:
        tr_p50 = statistics.median(tr_times) if tr_times else None
        out |= {
            "translate_queries": tr_asked,
            "translate_answered": len(tr_times),
            "translate_parity": round(tr_same / len(tr_times), 4) if tr_times else None,
            "translate_p50_ms": round(1000 * tr_p50, 1) if tr_p50 is not None else None,
            "accuracy_translate": round(tr_right / len(tr_times), 4) if tr_times else None,
            "translate_bytes_per_query": round(statistics.fmean(tr_bytes)) if tr_bytes else 0,
        }
    return out


async def _ask_t2t(conn, subjects: Subjects, item, deadline_s: float):
    """One question in text-to-text mode through the federation: the reply and its round trip in seconds."""
    t0 = time.perf_counter()
    reply = await ask_once(conn, subjects, dataclasses.replace(item, mode="t2t"), deadline_s)
    return reply, time.perf_counter() - t0


def secure_vs_plain(paths: dict[str, list[float | None]], agree: int, n: int) -> dict:
    """The secure and the plain federation's p50 over the same questions, and their ratio (``--tls``)."""

    def p50(values: list[float | None]) -> float | None:
        done = [v for v in values if v is not None]
        return statistics.median(done) if done else None

    secure, plain = p50(paths["secure"]), p50(paths["plain"])
    paired = [s / p for s, p in zip(paths["secure"], paths["plain"], strict=True) if s and p]
    return {
        "secure_p50_ms": round(1000 * secure, 1) if secure is not None else None,
        "plain_p50_ms": round(1000 * plain, 1) if plain is not None else None,
        "overhead_ratio_secure": round(secure / plain, 3) if secure and plain else None,
        # the median of each question's own ratio: the two federations answered it back to back, so the machine's
        # load, which moves both, cancels more than between the two medians
        "overhead_ratio_secure_paired": round(statistics.median(paired), 3) if paired else None,
        "secure_plain_same_answer": round(agree / n, 4) if n else None,
    }


def p50s(rows: list[tuple[str, float | None, float]]) -> dict:
    """How many questions, the p50 of each path and their ratio. ``rows`` holds (kind, bus seconds or None when
    unanswered, in-process seconds)."""
    bus = [b for _, b, _ in rows if b is not None]
    local = [v for _, _, v in rows]
    bus_p50 = statistics.median(bus) if bus else None
    local_p50 = statistics.median(local) if local else None
    return {
        "n": len(local),
        "bus_p50_ms": round(1000 * bus_p50, 1) if bus_p50 is not None else None,
        "inproc_p50_ms": round(1000 * local_p50, 1) if local_p50 is not None else None,
        "overhead_ratio": round(bus_p50 / local_p50, 3) if bus_p50 and local_p50 else None,
    }


def by_kind(rows: list[tuple[str, float | None, float]]) -> dict[str, dict]:
    """:func:`p50s` per kind of question (``alone``: the receiver's self-check answered it, ``plain``,
    ``private``), kinds with no question left out. The overall p50 depends on the mix; these do not."""
    out: dict[str, dict] = {}
    for kind in ("alone", "plain", "private"):
        picked = [r for r in rows if r[0] == kind]
        if picked:
            out[kind] = p50s(picked)
    return out


def run(args: argparse.Namespace) -> dict:
    """One run of both paths over the same questions."""
    import torch

    torch.set_num_threads(1)  # each agent process uses one thread for model math; so does refine() here
    total = args.questions + args.warmup
    if args.kit is not None and not args.real:
        raise ConfigError("--kit needs --real")
    mode = asked_mode(getattr(args, "mode", None), args.real)
    if mode != "c2c" and not args.real:
        raise ConfigError("--mode translate needs --real (translators are for pretrained models)")
    if mode == "translate" and args.translate:
        raise ConfigError("--translate adds translate mode beside c2c mode (--mode c2c); here it is the mode already")
    if args.real:
        from ops.real.kit import kit_from_args

        setup = real_setup(args.receiver_model, total, kit=kit_from_args(args), mode=mode)
        if len(setup.questions) < total:
            raise ConfigError(
                f"the kit has {len(setup.questions)} held-out questions; --questions + --warmup = {total}"
            )
    elif args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-e2e-")), total)
    else:
        setup = zoo_setup(False if args.quick else None, total)
    setup.links_mbps = {}  # loopback, unshaped: parity is measured where the link cuts nothing
    local = InProcess(setup)
    kinds = ["plain"] if args.insecure else ["secure", "plain"] if args.tls else ["secure"]
    servers, feds = [], {}
    try:
        for kind in kinds:
            server, store = secure_server(setup.specs(), insecure=kind == "plain", warn=not args.tls)
            servers.append((server, store))
            feds[kind] = Federation(server.url, setup.specs(), store=store).start()
        compared = _compare(feds, setup, local, args.warmup, args.deadline_s, t2t=args.t2t, translate=args.translate)
        return {"mode": mode, **asyncio.run(compared)}
    finally:
        for fed in feds.values():
            fed.stop()
        for server, store in servers:
            server.stop()
            if store is not None:
                shutil.rmtree(store.root, ignore_errors=True)
