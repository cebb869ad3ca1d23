"""FedRefine in process: one question, one receiver, any transmitters, every mode of the paper's comparison.

The work is split into the pieces the agents call over the bus, so both paths run the same code:

1. receiver side: ``shared_prompt`` (q' when private) -- what leaves the receiver;
2. transmitter: ``transmitter_prefill`` -> its cache, token offsets and an ``OfferSummary``;
3. gate: ``plan`` -> per transmitter a weight and the layers to send (from the offers alone);
4. transmitter: ``select_layers`` then ``fusion.wire.transmit`` at the plan's precision;
5. receiver: ``receiver_answer`` fuses what arrived into its own prefix and reads the answer letter.

Modes: ``receiver`` (alone), ``transmitter`` (the first transmitter alone), ``t2t`` (each transmitter writes a
one-sentence hint the receiver reads), ``c2c`` (fusers weighted by the gating network), ``c2c-uniform``
(every transmitter at weight 1), ``c2c-shuffled`` (each transmitter's cache of a different question).

Self-check (``self_check=P``, for a receiver trained to abstain): before anything leaves, the receiver reads
its own question; when its P(" none") is below P it knows the answer and answers alone, asking no one (no
rephrase, no query, no bytes). Fusion then only ever runs where the receiver does not know, so it cannot
overwrite what the receiver knows (a transmitter that guesses confidently did, on the toy zoo).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from bus.errors import FusionError
from fusion.align import gather_tokens
from fusion.c2c import (
    ANCHOR_LAST,
    ReceiverView,
    letter_ids,
    letter_logits,
    prefix_alignment,
    prefix_cache,
    question_texts,
    receiver_view,
    tail_alignment,
    tail_tokens,
    transmitter_tail,
)
from fusion.fuser import PairFuser, apply_deltas
from fusion.gate import GateNetwork, GateScore, OfferSummary, answer_distribution, summarize_offer, uniform_scores
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel
from fusion.prompts import (
    HINT_PREFIX,
    LETTERS,
    Question,
    format_hint_request,
    format_question,
    is_none,
    parse_completion,
)
from fusion.wire import transmit

log = logging.getLogger(__name__)

Mode = Literal["receiver", "transmitter", "t2t", "c2c", "c2c-uniform", "c2c-shuffled"]
MODES: tuple[str, ...] = ("receiver", "transmitter", "t2t", "c2c", "c2c-uniform", "c2c-shuffled")
DEFAULT_HINT_TOKENS = 24  # longest hint a transmitter writes in text-to-text mode
DEFAULT_SELF_CHECK = 0.5  # P(none) below which a receiver trained to abstain answers alone (the gate prior's midpoint)


@dataclass(frozen=True)
class TransmitterPrefill:
    """A transmitter's prefill of the shared prompt: what it can send and what it offers."""

    name: str
    shared_text: str  # the prompt it prefilled (must equal the receiver's shared prompt to align)
    cache: KVCache
    offsets: list[tuple[int, int]]  # character span of each of its tokens (travels with the cache)
    offer: OfferSummary
    seconds: float


@dataclass(frozen=True)
class Received:
    """What arrived from one transmitter: some of its layers (already decoded) and its token offsets."""

    fingerprint: str
    layers: dict[int, KV]
    offsets: list[tuple[int, int]]
    weight: float = 1.0


@dataclass
class RefineResult:
    """The answer and how it came about."""

    answer: str  # "A" .. "D"
    probs: list[float]  # over the four letters
    mode: str
    shared_text: str  # what left the receiver (the prompt of q or q')
    used: dict[str, list[int]] = field(default_factory=dict)  # transmitter name -> layers used
    weights: dict[str, float] = field(default_factory=dict)  # transmitter name -> gate weight
    hints: dict[str, str] = field(default_factory=dict)  # t2t: transmitter name -> hint text
    bytes_sent: int = 0  # cache bytes (c2c) or hint text bytes (t2t) that travelled
    tokens_sent: int = 0  # cache tokens x transmitters (c2c) or hint tokens (t2t)
    alone: bool = False  # the self-check found that the receiver knows: answered alone, nobody asked
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def index(self) -> int:
        """The answer as an option index."""
        return LETTERS.index(self.answer)


# ---- the pieces ---------------------------------------------------------------------------------


def shared_prompt(stem: str, options: Sequence[str], private_stem: str | None = None) -> tuple[str, str | None]:
    """``(P, original)``: the prompt that leaves the receiver (of q' when private) and, when private, q's prompt."""
    return question_texts(stem, options, private_stem)


@torch.no_grad()
def transmitter_prefill(name: str, model: LanguageModel, shared_text: str) -> TransmitterPrefill:
    """Prefill the shared prompt and summarise it into an offer (the transmitter agent's first step)."""
    t0 = time.perf_counter()
    pre = model.prefill(shared_text)
    offer = summarize_offer(model, pre)
    return TransmitterPrefill(name, shared_text, pre.cache, list(pre.offsets), offer, time.perf_counter() - t0)


def plan(
    offers: Mapping[str, OfferSummary], gate: GateNetwork | None, profiles: Mapping[str, Sequence[float]] | None = None
) -> dict[str, GateScore]:
    """Per transmitter: the gate's weight and layer importance (``gate=None``: uniform weights, all used layers)."""
    names = list(offers)
    listed = [offers[n] for n in names]
    scores = gate.score(listed) if gate is not None else uniform_scores(listed, profiles)
    return dict(zip(names, scores, strict=True))


def select_layers(prefill: TransmitterPrefill, layers: Sequence[int]) -> dict[int, KV]:
    """The planned layers of a transmitter's cache (what it streams)."""
    bad = [m for m in layers if not 0 <= m < prefill.cache.num_layers]
    if bad:
        raise FusionError(f"plan asks {prefill.name} for layers {bad}; it has {prefill.cache.num_layers}")
    return {m: prefill.cache.layers[m] for m in sorted(layers)}


@torch.no_grad()
def receiver_prefix(receiver: LanguageModel, shared_text: str) -> KVCache:
    """The receiver's own cache of the shared prompt's prefix (what ``receiver_answer`` fuses into)."""
    return prefix_cache(receiver, receiver_view(receiver, shared_text))


@torch.no_grad()
def receiver_answer(
    receiver: LanguageModel,
    shared_text: str,
    original_text: str | None,
    received: Mapping[str, Received],
    fusers: Mapping[str, PairFuser],
    prefix: KVCache | None = None,
) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Letter probabilities ``(4,)`` after fusing what arrived into the receiver's prefix, and the layers used.

    ``fusers`` maps a transmitter fingerprint to its fuser for this receiver. ``prefix``: the receiver's own
    cache of the prefix when already made (``receiver_prefix``; the agent prefills it while caches travel).
    """
    view = receiver_view(receiver, shared_text, original_text)
    if prefix is None:
        prefix = prefix_cache(receiver, view)
    contributions, used = [], {}
    for name, got in received.items():
        if got.weight <= 0 or not got.layers:
            continue
        if got.fingerprint not in fusers:
            raise FusionError(f"no fuser for transmitter {name} ({got.fingerprint}) into {receiver.name}")
        contributions.append(transmitter_deltas(view, prefix, got, fusers[got.fingerprint]))
        used[name] = sorted(got.layers)
    return answer_from_deltas(receiver, view, prefix, contributions), used


@torch.no_grad()
def transmitter_deltas(view: ReceiverView, prefix: KVCache, got: Received, fuser: PairFuser) -> dict[int, KV]:
    """One transmitter's weighted deltas on the receiver's prefix (``receiver_answer`` sums them in its order).

    The receiver agent computes them as each stream completes, while the others still travel. A window-1 fuser
    reads only the receiver's last prefix token, which (anchored) reads the transmitter's final token: every
    position then points at that token, and the other tokens are not aligned (nobody reads them).
    """
    arrived = next(iter(got.layers.values()))[0].shape[2] if got.layers else len(got.offsets)  # a tail, or all
    if ANCHOR_LAST and fuser.cfg.window == 1 and got.offsets:
        if arrived > len(got.offsets):
            raise FusionError(f"{arrived} transmitter tokens arrived but its offer has {len(got.offsets)}")
        index = torch.full((len(view.prefix_ids),), arrived - 1, dtype=torch.long)
    else:
        alignment = prefix_alignment(view, got.offsets)
        if arrived != len(got.offsets):
            alignment = tail_alignment(alignment, len(got.offsets), arrived, fuser.cfg.window)
        index = alignment.index
    aligned = gather_tokens(got.layers, index)
    if fuser.training:  # (eval() walks every submodule: not on every question)
        fuser.eval()
    return fuser.deltas(prefix, aligned, got.weight)


@torch.no_grad()
def answer_from_deltas(
    receiver: LanguageModel, view: ReceiverView, prefix: KVCache, contributions: Sequence[Mapping[int, KV]]
) -> torch.Tensor:
    """Letter probabilities ``(4,)`` from the prefix plus the deltas (in the given order), read after ``view``."""
    cache = apply_deltas(prefix, contributions) if contributions else prefix
    return torch.softmax(letter_logits(receiver, cache, view), -1)


@torch.no_grad()
def receiver_self_check(
    receiver: LanguageModel, stem: str, options: Sequence[str]
) -> tuple[torch.Tensor, float | None]:
    """The receiver alone on its own question: letter probabilities ``(4,)`` and its P(" none") (None when its
    vocabulary has no one-token " none", so it cannot say it does not know)."""
    logits = receiver.prefill(format_question(stem, options)).logits
    dist = answer_distribution(receiver, logits)
    return _letter_distribution(receiver, logits), (float(dist[4]) if dist is not None else None)


def knows_alone(p_none: float | None, threshold: float | None) -> bool:
    """Whether a self-check with this P(none) answers alone (``threshold`` None: the check is off)."""
    return threshold is not None and p_none is not None and p_none < threshold


@torch.no_grad()
def letter_probs(model: LanguageModel, prompt: str) -> torch.Tensor:
    """A model's probabilities ``(4,)`` over the letters after a prompt."""
    return _letter_distribution(model, model.prefill(prompt).logits)


def _letter_distribution(model: LanguageModel, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities ``(4,)`` over the answer letters from next-token logits ``(vocab,)``."""
    return torch.softmax(logits[letter_ids(model)].float().cpu(), -1)


@torch.no_grad()
def write_hint(model: LanguageModel, stem: str, max_new_tokens: int = DEFAULT_HINT_TOKENS) -> str:
    """A transmitter's one-sentence hint for a question, or "" when it says it does not know."""
    hint = parse_completion(model.generate(format_hint_request(stem), max_new_tokens=max_new_tokens, stop="\n"))
    return "" if not hint or is_none(hint) else hint


def with_hints(hints: Sequence[str], stem: str, options: Sequence[str]) -> str:
    """The receiver's text-to-text prompt: one ``Fact:`` line per hint, then the question."""
    lines = "".join(f"{HINT_PREFIX} {' '.join(h.split())}\n" for h in hints if h.strip())
    return lines + format_question(stem, options)


# ---- the whole thing ----------------------------------------------------------------------------


def _result(probs: torch.Tensor, mode: str, shared: str, **kw) -> RefineResult:
    return RefineResult(LETTERS[int(probs.argmax())], [round(float(p), 6) for p in probs], mode, shared, **kw)


@dataclass
class _Request:
    """One refine() call's inputs after validation (internal)."""

    question: Question
    receiver: LanguageModel
    transmitters: Mapping[str, LanguageModel]
    mode: str
    shared: str  # the prompt that leaves the receiver
    original: str | None  # private mode: the original prompt, read after the fused prefix
    hint_stem: str  # the stem transmitters see in text-to-text mode
    fusers: Mapping[str, PairFuser]
    gate: GateNetwork | None
    precision: str
    donors: Mapping[str, Question]
    profiles: Mapping[str, Sequence[float]] | None
    prefilled: Mapping[str, TransmitterPrefill]
    timings: dict[str, float]
    t_start: float


def refine(
    question: Question,
    receiver: LanguageModel,
    transmitters: Mapping[str, LanguageModel],
    *,
    mode: str = "c2c",
    fusers: Mapping[str, PairFuser] | None = None,
    gate: GateNetwork | None = None,
    private: bool = False,
    private_stem: str | None = None,
    precision: str = "fp32",
    donors: Mapping[str, Question] | None = None,
    profiles: Mapping[str, Sequence[float]] | None = None,
    prefilled: Mapping[str, TransmitterPrefill] | None = None,
    self_check: float | None = None,
) -> RefineResult:
    """Answer ``question`` with the receiver helped by ``transmitters`` (name -> model) in ``mode``.

    ``fusers``: transmitter fingerprint -> pair fuser into this receiver. ``private``: only q' (``private_stem``,
    else the receiver's rephraser output) reaches the transmitters. ``donors`` (c2c-shuffled): per transmitter,
    the other question whose cache it sends. ``precision``: the bus codec precision of transmitted caches.
    ``profiles``: per transmitter fingerprint, the layers worth sending when no gate scores them (default: the
    gate's). ``prefilled``: transmitter prefills already made (reused when their prompt is the one needed).
    ``self_check``: P(none) below which the receiver answers alone (module docstring; None: off).
    """
    if mode not in MODES:
        raise FusionError(f"unknown mode {mode!r}; choose one of {MODES}", mode=mode)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if self_check is not None and mode not in ("receiver", "transmitter"):
        probs, p_none = receiver_self_check(receiver, question.stem, question.options)
        timings["self_check"] = time.perf_counter() - t_start
        if knows_alone(p_none, self_check):
            timings["total"] = time.perf_counter() - t_start
            return _result(probs, mode, "", alone=True, timings=timings)
    if private and private_stem is None:
        from privacy.rephrase import rephrase

        private_stem = rephrase(question.stem, receiver).text
        timings["rephrase"] = time.perf_counter() - t_start
    q_private = private_stem if private else None
    shared, original = shared_prompt(question.stem, question.options, q_private)
    if mode == "receiver":
        probs = letter_probs(receiver, format_question(question.stem, question.options))
        timings["total"] = time.perf_counter() - t_start
        return _result(probs, mode, "", timings=timings)
    if not transmitters:
        raise FusionError(f"mode {mode!r} needs at least one transmitter")
    if mode == "transmitter":
        name, model = next(iter(transmitters.items()))
        probs = letter_probs(model, shared)
        timings["total"] = time.perf_counter() - t_start
        return _result(probs, mode, shared, used={name: []}, timings=timings)
    req = _Request(
        question=question,
        receiver=receiver,
        transmitters=transmitters,
        mode=mode,
        shared=shared,
        original=original,
        hint_stem=q_private or question.stem,
        fusers=fusers or {},
        gate=gate,
        precision=precision,
        donors=donors or {},
        profiles=profiles if profiles is not None else (gate.profiles if gate is not None else None),
        prefilled=prefilled or {},
        timings=timings,
        t_start=t_start,
    )
    return _text_to_text(req) if mode == "t2t" else _cache_to_cache(req)


def _text_to_text(req: _Request) -> RefineResult:
    t0 = time.perf_counter()
    hints = {name: write_hint(model, req.hint_stem) for name, model in req.transmitters.items()}
    req.timings["transmitters"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    prompt = with_hints(list(hints.values()), req.question.stem, req.question.options)
    probs = letter_probs(req.receiver, prompt)
    req.timings["receiver"] = time.perf_counter() - t1
    req.timings["total"] = time.perf_counter() - req.t_start
    sent = {n: h for n, h in hints.items() if h}
    return _result(
        probs,
        "t2t",
        req.shared,
        hints=hints,
        used={n: [] for n in sent},
        bytes_sent=sum(len(h.encode()) for h in sent.values()),
        tokens_sent=sum(len(req.transmitters[n].encode(" " + h).ids) for n, h in sent.items()),
        timings=req.timings,
    )


def _transmitter_text(req: _Request, name: str) -> str:
    if req.mode != "c2c-shuffled":
        return req.shared
    if name not in req.donors:
        raise FusionError(f"c2c-shuffled needs a donor question for transmitter {name}")
    donor = req.donors[name]
    return format_question(donor.stem, donor.options)


def _cache_to_cache(req: _Request) -> RefineResult:
    t0 = time.perf_counter()
    prefills: dict[str, TransmitterPrefill] = {}
    for name, model in req.transmitters.items():
        text = _transmitter_text(req, name)
        ready = req.prefilled.get(name)
        prefills[name] = (
            ready if ready is not None and ready.shared_text == text else transmitter_prefill(name, model, text)
        )
    req.timings["transmitters"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    gate = req.gate if req.mode in ("c2c", "c2c-shuffled") else None
    scores = plan({n: p.offer for n, p in prefills.items()}, gate, req.profiles)
    req.timings["gate"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    received: dict[str, Received] = {}
    nbytes = ntokens = 0
    for name, pre in prefills.items():
        score = scores[name]
        layers = score.layers()
        if score.weight <= 0 or not layers:
            continue
        tail = transmitter_tail(req.fusers[pre.offer.fingerprint]) if pre.offer.fingerprint in req.fusers else None
        decoded, size = transmit(tail_tokens(select_layers(pre, layers), tail), req.precision)
        nbytes += size
        ntokens += min(tail or pre.cache.num_tokens, pre.cache.num_tokens)
        received[name] = Received(pre.offer.fingerprint, decoded, pre.offsets, score.weight)
    req.timings["transfer"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    probs, used = receiver_answer(req.receiver, req.shared, req.original, received, req.fusers)
    req.timings["receiver"] = time.perf_counter() - t3
    req.timings["total"] = time.perf_counter() - req.t_start
    return _result(
        probs,
        req.mode,
        req.shared,
        used=used,
        weights={n: round(s.weight, 4) for n, s in scores.items()},
        bytes_sent=nbytes,
        tokens_sent=ntokens,
        timings=req.timings,
    )
