"""What leaves the receiver side, measured: ``python -m ops.bench leakage [--quick | --tiny] [--json F]``.

1. **Sniffers.** A federation of processes (the demo's, authorization and TLS on) answers the held-out questions
   (private when they carry planted personal details) one at a time, while one identity of each role outside the
   receiver side (``gate``: the most privileged, it reads queries, offers and presence; ``transmitter``;
   ``monitor``) subscribes to ``>``, to the receiver side (refused) and to everything its role may read.
   ``sniffer_hits``: raw private questions and planted details found in anything they read (target 0).
2. **n-gram overlap.** For each private question that left (not answered alone), the q' the gate's sniffer read
   against q, for word n-grams (n = 1, 2, 3): ``q_kept`` is the share of q's n-grams still in q' (how much of the
   question left), ``qprime_copied`` the share of q''s n-grams that are q's (how much of q' is copied, not reworded).
3. **KV inversion** (``privacy.inversion``), per transmitter model, in process: inverters trained on caches of the
   attacker's own texts (the training split's questions, personal details included, and recombinations of them)
   read the caches of each q' that left. ``qprime_token_recovery``: the share of q''s tokens read back, from the
   whole cache (``full_cache``: per position) and from what the reference transmitters send (``tail``: the last
   position of every layer, top-k of the text's tokens). ``planted_details_recovered``: the share of the removed
   personal details read back from those caches (expected 0: they are not in q'), and as a control the share read
   back from caches of q itself, had it been sent (``control_if_q_were_sent``).
4. ``notes_leak``: how much of a transmitter's private notes (prefilled before q', only q''s positions sent) leaks
   through its cache. The toy world's transmitters have no notes: null, with the reason, until real models with
   device notes are in; ``notes_leak(...)`` is the measure to run then.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agents.launch import Federation
from ops.demo import ASKER_ID, Setup, items_of, secure_server, tiny_setup, zoo_setup

SNIFFERS = {"gate": "sniff-gate", "transmitter": "sniff-tx", "monitor": "sniff-mon"}  # role -> identity
READABLE = {  # what each role may read, besides the refused ">" and receiver side
    "gate": ("{P}.query.*", "{P}.offer.*.*", "{P}.presence.*.*"),
    "transmitter": ("{P}.query.*", "{P}.plan.*.*"),
    "monitor": ("{P}.presence.*.*", "{P}.answer.*.*"),
}
RECEIVER_SIDE = ("{P}.ask", "{P}.rephrase.*", "_INBOX.>", ">")
DEFAULT_DEADLINE_S = 5.0
DEFAULT_AUGMENT = 1000  # recombined training texts the attacker adds to the training split's questions
NGRAMS = (1, 2, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m ops.bench leakage``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick zoo (default: the full one if built)")
    which.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions (default: all)")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps per inverter")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per question")


def run(args: argparse.Namespace) -> dict:
    """Sniff a federation, then attack the caches of what left."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train: list = []
    if args.tiny:
        setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-leak-")), args.questions or 12)
        train = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-leak-")), 60, seed=1).questions
    else:
        from ops.zoo import load_zoo

        setup = zoo_setup(False if args.quick else None, 10_000)
        zoo = load_zoo(quick=bool(args.quick)) if args.quick else None
        if zoo is None:
            from bus.errors import FedRefineError

            try:
                zoo = load_zoo(quick=False, build_if_missing=False)
            except FedRefineError:
                zoo = load_zoo(quick=True)
        train = zoo.questions("train")
        if args.questions:
            setup.questions = setup.questions[: args.questions]
    setup.links_mbps = {}
    sniffed = asyncio.run(_sniff(setup, args.deadline_s))
    pairs = sniffed.pop("pairs")
    overlap = {
        "q_kept": {f"n{n}": _mean([_overlap(qp, q.stem, n) for q, qp in pairs]) for n in NGRAMS},
        "qprime_copied": {f"n{n}": _mean([_overlap(q.stem, qp, n) for q, qp in pairs]) for n in NGRAMS},
    }
    inversion = invert(setup, pairs, train, args.steps)
    return {
        "sniffer_hits": sniffed["sniffer_hits"],
        "planted_details_recovered": inversion["planted_details_recovered"],
        "qprime_token_recovery": inversion["qprime_token_recovery"],
        "notes_leak": None,
        "notes_leak_reason": (
            "the toy world's transmitters hold no device notes; with real models and notes (issue 15) run "
            "ops.bench.leakage.notes_leak on (model, notes, q') triples"
        ),
        "ngram_overlap": overlap,
        "sniffer": sniffed,
        "inversion": inversion["per_model"],
        "private_questions_sent": len(pairs),
        "setup": setup.name,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---- 1. sniffers on a federation -------------------------------------------------------------------------------


async def _sniff(setup: Setup, deadline_s: float) -> dict:
    from bus.schemas import Query, decode_message
    from ops.ask import ask_once
    from ops.redteam.sniff import Sniffer, secret_hits

    specs = setup.specs()
    extra = [(role, agent_id, None) for role, agent_id in SNIFFERS.items()]
    server, store = secure_server(specs, extra=extra)
    assert store is not None
    fed = Federation(server.url, specs, store=store).start()
    try:
        await fed.wait_ready()
        prefix = store.prefix
        sniffers = {}
        for role, agent_id in SNIFFERS.items():
            patterns = [p.replace("{P}", prefix) for p in RECEIVER_SIDE + READABLE[role]]
            sniffers[role] = await Sniffer(server.url, store.client_security(agent_id), patterns, agent_id).start()
        from bus.connect import close, connect
        from bus.subjects import Subjects

        asker = await connect(server.url, name="leak-asker", security=store.client_security(ASKER_ID))
        pairs, answered = [], 0
        gate_seen = sniffers["gate"].messages
        try:
            for question, item in zip(setup.questions, items_of(setup.questions), strict=True):
                before = len(gate_seen)
                reply = await ask_once(asker, Subjects(prefix), item, deadline_s)
                answered += getattr(reply, "kind", "") == "answer"
                await asyncio.sleep(0.05)
                if item.private:
                    for _, data in gate_seen[before:]:
                        msg = decode_message(data) if data.startswith(b"{") else None
                        if isinstance(msg, Query):
                            pairs.append((question, msg.text))
        finally:
            await close(asker)
            for sniffer in sniffers.values():
                await sniffer.stop()
    finally:
        fed.stop()
        server.stop()
        shutil.rmtree(store.root, ignore_errors=True)
    private = [q for q in setup.questions if q.pii]
    stems = [q.stem for q in private]
    details = [d for q in private for d in q.pii]
    by_role = {}
    for role, sniffer in sniffers.items():
        hits = secret_hits(sniffer.messages, stems + details)
        by_role[role] = {
            "messages": len(sniffer.messages),
            "raw_questions": sum(s in hits for s in stems),
            "planted_details": sum(d in hits for d in details),
            "subscriptions_refused": sniffer.watch.violations("subscription"),
        }
    return {
        "sniffer_hits": sum(r["raw_questions"] + r["planted_details"] for r in by_role.values()),
        "by_role": by_role,
        "questions": len(setup.questions),
        "answered": answered,
        "private_questions": len(private),
        "planted_details": len(details),
        "pairs": pairs,
    }


def _overlap(a: str, b: str, n: int) -> float:
    """Share of ``b``'s word n-grams found in ``a`` (``privacy.redact.ngram_overlap``)."""
    from privacy.redact import ngram_overlap

    return ngram_overlap(a, b, n)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


# ---- 3. KV inversion --------------------------------------------------------------------------------------------


def attacker_texts(train: list, n_augment: int, seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """(stem, options) the attacker runs through the model: the training split's questions and recombinations
    (the personal-details sentence of one before the question of another)."""
    rng = random.Random(seed)
    texts = [(q.stem, tuple(q.options)) for q in train]
    leads = [q.stem[: q.stem.rfind(".") + 1] for q in train if q.pii and "." in q.stem]
    asks = [q for q in train if not q.pii]
    for _ in range(n_augment if leads and asks else 0):
        q = rng.choice(asks)
        texts.append((f"{rng.choice(leads)} {q.stem}", tuple(rng.sample(list(q.options), len(q.options)))))
    return texts


def invert(setup: Setup, pairs: list, train: list, steps: int) -> dict:
    """Train the two inverters per transmitter model and read back q' (and, as a control, q)."""
    from fusion.models import LanguageModel

    per_model: dict[str, dict] = {}
    seen: set[str] = set()
    texts = attacker_texts(train, DEFAULT_AUGMENT)
    for tid, path in sorted(setup.transmitters.items()):
        if path in seen:
            continue
        seen.add(path)
        per_model[tid] = attack_model(LanguageModel.load(path), texts, pairs, steps)
    fields = ("full_cache", "tail")

    def avg(key: str, sub: str) -> float | None:
        values = [m[key][sub] for m in per_model.values() if m[key][sub] is not None]
        return _mean(values)

    return {
        "qprime_token_recovery": {f: avg("qprime_token_recovery", f) for f in fields},
        "planted_details_recovered": {
            **{f: avg("planted_details_recovered", f) for f in fields},
            "control_if_q_were_sent": {f: avg("control_if_q_were_sent", f) for f in fields},
        },
        "per_model": per_model,
    }


def attack_model(model, texts: list, pairs: list, steps: int) -> dict:
    """One transmitter model: train on the attacker's texts, read back each q' (and q, the control)."""
    from fusion.refine import shared_prompt
    from privacy.inversion import (
        BagInverter,
        TokenInverter,
        detail_read,
        position_features,
        recall,
        span_positions,
        vocab_size,
    )

    def question_part(stem: str, options) -> tuple[list[int], list[int], object]:
        prompt = shared_prompt(stem, options)[0]
        pre = model.prefill(prompt)
        norm = " ".join(stem.split())
        start = prompt.index(norm)
        return span_positions(pre.offsets, start, start + len(norm)), pre.ids, pre

    token_samples, bag_samples = [], []
    for stem, options in texts:
        positions, ids, pre = question_part(stem, options)
        feats = position_features(pre.cache)
        token_samples.append((feats, ids))
        bag_samples.append((feats[-1], [ids[i] for i in positions]))
    vocab = vocab_size(model)
    t0 = time.perf_counter()
    tokens = TokenInverter.fit(token_samples, vocab, steps=steps)
    bag = BagInverter.fit(bag_samples, vocab, steps=steps)
    trained_s = time.perf_counter() - t0

    def read(stem: str, options, details, sent: list[int]) -> tuple[float, float, float | None, float | None]:
        """Read one text's cache; ``sent``: the tokens of q' (what a detail is judged against)."""
        positions, ids, pre = question_part(stem, options)
        feats = position_features(pre.cache)
        truth = [ids[i] for i in positions]
        read_tokens = tokens.read(feats[positions])
        full = sum(a == b for a, b in zip(read_tokens, truth, strict=True)) / max(1, len(truth))
        top = bag.read(feats[-1], k=len(truth))
        tail = recall(top, truth)
        if not details:
            return full, tail, None, None
        text = model.decode(read_tokens).lower()
        got_full = sum(d.lower() in text for d in details) / len(details)
        got_tail = sum(detail_read(top, model.encode(" " + d).ids, sent) for d in details)
        return full, tail, got_full, got_tail / len(details)

    qp_full, qp_tail, det_full, det_tail, ctl_full, ctl_tail = [], [], [], [], [], []
    for question, qprime in pairs:
        sent = model.encode(qprime).ids
        f, t, df, dt = read(qprime, question.options, question.pii, sent)
        qp_full.append(f)
        qp_tail.append(t)
        det_full.append(df)
        det_tail.append(dt)
        _, _, cf, ct = read(question.stem, question.options, question.pii, sent)
        ctl_full.append(cf)
        ctl_tail.append(ct)
    return {
        "qprime_token_recovery": {"full_cache": _mean(qp_full), "tail": _mean(qp_tail)},
        "planted_details_recovered": {"full_cache": _mean(det_full), "tail": _mean(det_tail)},
        "control_if_q_were_sent": {"full_cache": _mean(ctl_full), "tail": _mean(ctl_tail)},
        "train_texts": len(texts),
        "train_seconds": round(trained_s, 1),
        "model": getattr(model, "name", "?"),
    }


def notes_leak(model, triples: list[tuple[str, str, tuple[str, ...]]], train: list, steps: int = 1500) -> dict:
    """For real models with device notes: how much of the notes leaks through the cache of q''s positions only.

    ``triples``: (notes, q', options) as a transmitter prefills them (notes, then the shared prompt of q'); the
    attacker trains a :class:`~privacy.inversion.BagInverter` on its own (notes, q') texts, reading the notes' tokens
    from the last q' position, and is scored by the recall of each held-out triple's note tokens.
    """
    from fusion.refine import shared_prompt
    from privacy.inversion import BagInverter, position_features, recall, span_positions, vocab_size

    def sample(notes: str, qprime: str, options) -> tuple:
        prompt = shared_prompt(qprime, options)[0]
        text = f"{notes}\n{prompt}"
        pre = model.prefill(text)
        note_ids = [pre.ids[i] for i in span_positions(pre.offsets, 0, len(notes))]
        sent = span_positions(pre.offsets, len(notes) + 1, len(text))
        return position_features(pre.cache, sent)[-1], note_ids

    bag = BagInverter.fit([sample(*t) for t in train], vocab_size(model), steps=steps)
    scores = []
    for notes, qprime, options in triples:
        feat, truth = sample(notes, qprime, options)
        scores.append(recall(bag.read(feat, k=len(truth)), truth))
    return {"notes_token_recovery": _mean(scores), "triples": len(triples)}
