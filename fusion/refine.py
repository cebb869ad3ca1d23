"""FedRefine in process: one question, one receiver, any transmitters, every mode of the paper's comparison.

The work is split into the pieces the agents call over the bus, so both paths run the same code:

1. receiver side: ``shared_prompt`` (q' when private) -- what leaves the receiver;
2. transmitter: ``transmitter_prefill`` (its local notes first, for a pretrained model) -> its cache of the
   shared text, token offsets and an ``OfferSummary``;
3. gate: ``plan`` -> per transmitter a weight and the layers to send (from the offers alone);
4. transmitter: ``select_layers`` then ``fusion.wire.transmit`` at the plan's precision;
5. receiver: ``fusion.fuse.fuse`` adds what arrived to its own prefix, ``fusion.answers.read_answer`` reads the
   answer (a letter for the toy zoo; an option by likelihood or a generated text for a pretrained model).

Modes: ``receiver`` (alone), ``transmitter`` (the first transmitter alone, with its notes), ``t2t`` (each
transmitter writes a short text the receiver reads), ``c2c`` (fusers weighted by the gating network),
``c2c-uniform`` (every transmitter at weight 1), ``c2c-shuffled`` (each transmitter's cache of a different
question).

Self-check (``self_check=P``): before anything leaves, the receiver reads its own question and, when it knows
the answer, answers alone, asking no one (no rephrase, no query, no bytes). Fusion then only ever runs where the
receiver does not know, so it cannot overwrite what the receiver knows (a transmitter that guesses confidently
did, on the toy zoo; a fuser trained on notes did on real-world facts, REALWORLD.md). A letter-style receiver
trained to abstain knows when its P(" none") is below P; a text-style receiver (a pretrained model) when its own
answer's confidence is at least P (``Reading.confidence``: the chosen option's probability from its likelihood
scoring, or its greedy answer's mean token probability), P calibrated on training questions
(``calibrate_self_check``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bus.errors import FusionError
from fusion.answers import Reading, is_correct, read_answer
from fusion.c2c import (
    ReceiverView,
    letter_ids,
    prefix_cache,
    question_texts,
    receiver_view,
    tail_tokens,
    transmitter_tail,
)
from fusion.formats import notes_content
from fusion.fuse import Fused, Received, fuse, transmitter_deltas
from fusion.fuser import PairFuser
from fusion.gate import GateNetwork, GateScore, OfferSummary, answer_distribution, summarize_offer, uniform_scores
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel, Prefill
from fusion.notes import DEFAULT_TOP_K, DeviceNotes, Retrieved
from fusion.prompts import (
    HINT_PREFIX,
    LETTERS,
    Question,
    format_hint_request,
    format_question,
    is_none,
    option_letter,
    parse_completion,
)
from fusion.translate import CacheTranslator, note_span, read_translated
from fusion.wire import transmit

__all__ = ["Fused", "Received", "fuse", "transmitter_deltas"]  # the fusion loop, re-exported for callers of refine

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = (
    "receiver",
    "transmitter",
    "t2t",
    "c2c",
    "c2c-uniform",
    "c2c-shuffled",
    "translate",
    "translate-shuffled",
    "translate-every",
)
DEFAULT_HINT_TOKENS = 24  # longest hint a transmitter writes in text-to-text mode
HINTS_HEAD = "Hints from other devices:\n"  # text-to-text, text style: before the hints the receiver reads
DEFAULT_SELF_CHECK = 0.5  # P(none) below which a receiver trained to abstain answers alone (the gate prior's midpoint)


@dataclass(frozen=True)
class TransmitterPrefill:
    """A transmitter's prefill of the shared text: what it can send and what it offers."""

    name: str
    shared_text: str  # the text it read (must equal the receiver's shared text to align)
    cache: KVCache  # of the shared text's positions only (its notes and frame stay on the device)
    offsets: list[tuple[int, int]]  # character span of each of those tokens in the shared text (travels with it)
    offer: OfferSummary
    seconds: float
    notes: tuple[str, ...] = ()  # the note lines it read before the shared text (never sent)


@dataclass
class RefineResult:
    """The answer and how it came about."""

    answer: str  # a choice question: the option's letter ("A", "B", ...); free text: the answer text
    probs: list[float]  # over the options (empty for free text)
    mode: str
    shared_text: str  # what left the receiver (S: the prompt of q or q' in letter style, q or q' in text style)
    used: dict[str, list[int]] = field(default_factory=dict)  # transmitter name -> layers used
    weights: dict[str, float] = field(default_factory=dict)  # transmitter name -> gate weight
    hints: dict[str, str] = field(default_factory=dict)  # t2t: transmitter name -> hint text
    bytes_sent: int = 0  # cache bytes (c2c) or hint text bytes (t2t) that travelled
    tokens_sent: int = 0  # cache tokens x transmitters (c2c) or hint tokens (t2t)
    alone: bool = False  # the self-check found that the receiver knows: answered alone, nobody asked
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    choice: int | None = None  # the chosen option's index (None for free text)
    text: str = ""  # the chosen option's text, or the generated answer
    failed: dict[str, str] = field(default_factory=dict)  # transmitter name -> why its cache was not fused
    confidence: float | None = None  # the answering model's confidence in its answer (``Reading.confidence``)

    @property
    def index(self) -> int:
        """The answer as an option index (-1 for free text)."""
        return self.choice if self.choice is not None else -1

    def correct(self, question: Question) -> bool:
        """Whether this answers ``question`` right (option index, or exact match of the free text)."""
        return is_correct(Reading(self.choice, tuple(self.probs), self.text), question.answer)


# ---- the pieces ---------------------------------------------------------------------------------


def shared_prompt(
    stem: str, options: Sequence[str], private_stem: str | None = None, style: str = "letter"
) -> tuple[str, str | None]:
    """``(S, original)``: what leaves the receiver (from q' when private) and, when private, what the receiver reads
    after it (``fusion.c2c.question_texts``; ``style`` is the models' answer style)."""
    return question_texts(stem, options, private_stem, style)


@torch.no_grad()
def transmitter_prefill(
    name: str,
    model: LanguageModel,
    shared_text: str,
    notes: DeviceNotes | Retrieved | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> TransmitterPrefill:
    """Prefill the shared text (after the note lines retrieved for it) and summarise it into an offer.

    A letter-style model reads the shared prompt alone (``notes`` must be None). A text-style model reads its
    frame of ``notes + S`` (``notes``: its device's notes to retrieve from, or lines already retrieved); its cache
    and offsets cover the positions of S only.
    """
    t0 = time.perf_counter()
    if model.style == "letter":
        if notes is not None:
            raise FusionError(f"{model.name} answers by letter (a zoo model); it cannot read notes")
        pre = model.prefill(shared_text)
        offer = summarize_offer(model, pre)
        return TransmitterPrefill(name, shared_text, pre.cache, list(pre.offsets), offer, time.perf_counter() - t0)
    prompt = transmitter_prompt(model, shared_text, notes, top_k)
    return prompt.finish(name, model, model.prefill(prompt.ids), time.perf_counter() - t0)


@dataclass(frozen=True)
class TransmitterPrompt:
    """What a text-style transmitter runs for a shared text: its framed prompt and where S lies in its tokens."""

    shared_text: str
    ids: list[int]  # the whole framed prompt (notes, S, frame)
    positions: list[int]  # the token positions it sends: S's, then its prompt's final token
    offsets: list[tuple[int, int]]  # their spans within S (the final token: the empty span at S's end)
    retrieved: Retrieved  # the note lines it read before S

    def finish(self, name: str, model: LanguageModel, full: Prefill, seconds: float) -> TransmitterPrefill:
        """The prefill of the sent positions (and the offer) from a prefill of the whole prompt."""
        index = torch.tensor(self.positions)
        cache = KVCache([(k.index_select(2, index), v.index_select(2, index)) for k, v in full.cache.layers])
        pre = Prefill(cache, [self.ids[i] for i in self.positions], self.offsets, full.logits)
        offer = summarize_offer(model, pre, coverage=self.retrieved.coverage)
        return TransmitterPrefill(
            name, self.shared_text, cache, list(self.offsets), offer, seconds, notes=self.retrieved.lines
        )


def transmitter_prompt(
    model: LanguageModel, shared_text: str, notes: DeviceNotes | Retrieved | None = None, top_k: int = DEFAULT_TOP_K
) -> TransmitterPrompt:
    """A text-style transmitter's prompt for ``shared_text``: the retrieved note lines, then S, in its frame."""
    if isinstance(notes, Retrieved):
        retrieved = notes
    else:
        retrieved = notes.retrieve(shared_text, top_k) if notes is not None else Retrieved((), 0.0)
    content, q_start = notes_content(retrieved.lines, shared_text)
    framed = model.format.frame(content)  # type: ignore[union-attr]
    enc = model.encode_framed(framed)
    start, end = framed.span(q_start, len(shared_text))
    inside = [i for i, (s, e) in enumerate(enc.offsets) if e > start and s < end]
    if not inside:
        raise FusionError(f"{model.name} has no tokens for the shared text {shared_text!r}")
    offsets = [(max(enc.offsets[i][0] - start, 0), min(enc.offsets[i][1], end) - start) for i in inside]
    final = len(enc.ids) - 1
    if inside[-1] != final:  # its answer forms at its prompt's final token: that travels too
        inside.append(final)
        offsets.append((len(shared_text), len(shared_text)))
    return TransmitterPrompt(shared_text, enc.ids, inside, offsets, retrieved)


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
def receiver_prefix(receiver: LanguageModel, shared_text: str, original_text: str | None = None) -> KVCache:
    """The receiver's own cache of its prefix (what ``fuse`` adds to; the agent prefills it while caches travel)."""
    return prefix_cache(receiver, receiver_view(receiver, shared_text, original_text))


@torch.no_grad()
def receiver_answer(
    receiver: LanguageModel,
    shared_text: str,
    original_text: str | None,
    received: Mapping[str, Received],
    fusers: Mapping[str, PairFuser],
    options: Sequence[str] = (),
    prefix: KVCache | None = None,
) -> tuple[Reading, Fused]:
    """The receiver's reading after fusing what arrived into its prefix, and what was fused or left out.

    ``fusers`` maps a transmitter fingerprint to its fuser for this receiver; ``options`` are the question's
    options (none: free text; a letter-style receiver always answers by letter).
    """
    view = receiver_view(receiver, shared_text, original_text)
    if prefix is None:
        prefix = prefix_cache(receiver, view)
    fused = fuse(view, prefix, received, fusers)
    return answer_after(receiver, view, fused, options), fused


@torch.no_grad()
def answer_after(receiver: LanguageModel, view: ReceiverView, fused: Fused, options: Sequence[str]) -> Reading:
    """The receiver's reading of its view's continuation after a fused prefix (and its held-back token's terms)."""
    return read_answer(receiver, fused.cache, view.continuation_ids, options, live=fused.live)


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


def confident_alone(confidence: float | None, threshold: float | None) -> bool:
    """Whether a text-style receiver this confident in its own answer answers alone (``threshold`` None: off)."""
    return threshold is not None and confidence is not None and confidence >= threshold


def calibrate_self_check(
    confidence: Sequence[float], alone_right: Sequence[bool], fused_right: Sequence[bool]
) -> float:
    """The confidence threshold (answer alone at or above it) that answers the most calibration questions right,
    given each question's receiver confidence and whether alone and fused were right; ties go to the lower
    threshold (fewer questions leave). ``inf`` when fusing every question is strictly best."""
    rows = list(zip(confidence, alone_right, fused_right, strict=True))
    best, best_right = float("inf"), sum(f for _, _, f in rows)
    for t in sorted({c for c, _, _ in rows}, reverse=True):
        right = sum(a if c >= t else f for c, a, f in rows)
        if right >= best_right:
            best, best_right = t, right
    return best


@torch.no_grad()
def letter_probs(model: LanguageModel, prompt: str) -> torch.Tensor:
    """A model's probabilities ``(4,)`` over the letters after a prompt."""
    return _letter_distribution(model, model.prefill(prompt).logits)


def _letter_distribution(model: LanguageModel, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities ``(4,)`` over the answer letters from next-token logits ``(vocab,)``."""
    return torch.softmax(logits[letter_ids(model)].float().cpu(), -1)


@torch.no_grad()
def answer_alone(model: LanguageModel, stem: str, options: Sequence[str], notes: Sequence[str] = ()) -> Reading:
    """A model's own answer to a question, with ``notes`` read before it (text style; letter style: no notes)."""
    if model.style == "letter":
        if notes:
            raise FusionError(f"{model.name} answers by letter (a zoo model); it cannot read notes")
        probs = letter_probs(model, format_question(stem, options))
        choice = int(probs.argmax())
        return Reading(choice, tuple(round(float(p), 6) for p in probs), options[choice] if options else "")
    content, _ = notes_content(list(notes), " ".join(stem.split()))
    pre = model.prefill(model.encode_framed(model.format.frame(content)).ids)  # type: ignore[union-attr]
    return read_answer(model, pre.cache.truncate(pre.cache.num_tokens - 1), pre.ids[-1:], options)


@torch.no_grad()
def write_hint(
    model: LanguageModel, stem: str, max_new_tokens: int = DEFAULT_HINT_TOKENS, notes: Sequence[str] = ()
) -> str:
    """A transmitter's short hint for a question, or "" when it says it does not know.

    Letter style: a one-sentence fact (``format_hint_request``). Text style: its own answer to the question after
    its notes.
    """
    if model.style == "letter":
        hint = parse_completion(model.generate(format_hint_request(stem), max_new_tokens=max_new_tokens, stop="\n"))
        return "" if not hint or is_none(hint) else hint
    return answer_alone(model, stem, (), notes).text


@torch.no_grad()
def read_with_hints(receiver: LanguageModel, stem: str, options: Sequence[str], hints: Sequence[str]) -> Reading:
    """Text-to-text, the receiver's side: its answer to the question with the others' hints before it."""
    if receiver.style == "letter":
        probs = letter_probs(receiver, with_hints(hints, stem, options))
        choice = int(probs.argmax())
        return Reading(choice, tuple(round(float(p), 6) for p in probs), options[choice])
    content = with_hints(hints, stem, options, style="text")
    pre = receiver.prefill(receiver.encode_framed(receiver.format.frame(content)).ids)  # type: ignore[union-attr]
    return read_answer(receiver, pre.cache.truncate(pre.cache.num_tokens - 1), pre.ids[-1:], options)


def with_hints(hints: Sequence[str], stem: str, options: Sequence[str], style: str = "letter") -> str:
    """The receiver's text-to-text input: letter style, one ``Fact:`` line per hint then the lettered question;
    text style, the content (``Hints ...`` lines, then the question) that its frame wraps."""
    hints = [" ".join(h.split()) for h in hints if h.strip()]
    if style == "text":
        stem = " ".join(stem.split())
        return HINTS_HEAD + "".join(f"- {h}\n" for h in hints) + "Question: " + stem if hints else stem
    lines = "".join(f"{HINT_PREFIX} {h}\n" for h in hints)
    return lines + format_question(stem, options)


# ---- the whole thing ----------------------------------------------------------------------------


def _result(reading: Reading, mode: str, shared: str, **kw) -> RefineResult:
    answer = option_letter(reading.choice) if reading.choice is not None else reading.text
    return RefineResult(
        answer,
        list(reading.probs),
        mode,
        shared,
        choice=reading.choice,
        text=reading.text,
        confidence=reading.confidence,
        **kw,
    )


@dataclass
class _Request:
    """One refine() call's inputs after validation (internal)."""

    question: Question
    receiver: LanguageModel
    transmitters: Mapping[str, LanguageModel]
    mode: str
    shared: str  # what leaves the receiver
    original: str | None  # private mode: what the receiver reads after the fused prefix
    hint_stem: str  # the stem transmitters see in text-to-text mode
    fusers: Mapping[str, PairFuser]
    gate: GateNetwork | None
    precision: str
    donors: Mapping[str, Question]
    profiles: Mapping[str, Sequence[float]] | None
    prefilled: Mapping[str, TransmitterPrefill]
    prefixes: Mapping[tuple[str, str | None], KVCache]
    notes: Mapping[str, DeviceNotes]
    timings: dict[str, float]
    t_start: float
    translators: Mapping[str, CacheTranslator] = field(default_factory=dict)
    spans: dict | None = None


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
    prefixes: Mapping[tuple[str, str | None], KVCache] | None = None,
    self_check: float | None = None,
    notes: Mapping[str, DeviceNotes] | None = None,
    translators: Mapping[str, CacheTranslator] | None = None,
    spans: dict | None = None,
) -> RefineResult:
    """Answer ``question`` with the receiver helped by ``transmitters`` (name -> model) in ``mode``.

    ``fusers``: transmitter fingerprint -> pair fuser into this receiver. ``private``: only q' (``private_stem``,
    else the receiver's rephraser output) reaches the transmitters. ``donors`` (c2c-shuffled): per transmitter,
    the other question whose cache it sends. ``precision``: the bus codec precision of transmitted caches.
    ``profiles``: per transmitter fingerprint, the layers worth sending when no gate scores them (default: the
    gate's). ``prefilled``: transmitter prefills already made (reused when their text is the one needed).
    ``prefixes``: the receiver's own prefix caches already made, by ``(S, original)`` (``receiver_prefix``).
    ``self_check``: P(none) below which a letter-style receiver answers alone, or the confidence at or above which a
    text-style one does (module docstring; None: off). ``notes``: per
    transmitter name, its device's notes (text-style models; read before q'; in c2c modes never sent, in translate
    modes their cache is). ``translators``: transmitter fingerprint -> ``fusion.translate.CacheTranslator`` into
    this receiver (translate modes); ``spans``: a dict the translate modes keep note-span caches in, by model
    fingerprint and lines, to reuse across calls (a benchmark asking one question in several rows).
    """
    if mode not in MODES:
        raise FusionError(f"unknown mode {mode!r}; choose one of {MODES}", mode=mode)
    if receiver.style == "letter" and len(question.options) != len(LETTERS):
        raise FusionError(f"{receiver.name} answers {len(LETTERS)}-option questions by letter")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if self_check is not None and mode not in ("receiver", "transmitter"):
        check = _known_alone if receiver.style == "letter" else _confident_alone
        known = check(receiver, question, self_check, mode, timings, t_start)
        if known is not None:
            return known
    if private and private_stem is None:
        from privacy.rephrase import rephrase

        private_stem = rephrase(question.stem, receiver).text
        timings["rephrase"] = time.perf_counter() - t_start
    q_private = private_stem if private else None
    shared, original = shared_prompt(question.stem, question.options, q_private, receiver.style)
    if mode in ("receiver", "transmitter"):
        return _one_model(question, receiver, transmitters, mode, shared, q_private, notes or {}, timings, t_start)
    if not transmitters:
        raise FusionError(f"mode {mode!r} needs at least one transmitter")
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
        prefixes=prefixes or {},
        notes=notes or {},
        timings=timings,
        t_start=t_start,
        translators=translators or {},
        spans=spans,
    )
    if mode == "t2t":
        return _text_to_text(req)
    return _translated(req) if mode.startswith("translate") else _cache_to_cache(req)


def _known_alone(
    receiver: LanguageModel, question: Question, self_check: float, mode: str, timings: dict, t_start: float
) -> RefineResult | None:
    """The receiver's own answer when its P(none) is below ``self_check`` (it knows: no one is asked), else None."""
    probs, p_none = receiver_self_check(receiver, question.stem, question.options)
    timings["self_check"] = time.perf_counter() - t_start
    if not knows_alone(p_none, self_check):
        return None
    timings["total"] = time.perf_counter() - t_start
    choice = int(probs.argmax())
    reading = Reading(choice, tuple(round(float(p), 6) for p in probs), question.options[choice])
    return _result(reading, mode, "", alone=True, timings=timings)


def _confident_alone(
    receiver: LanguageModel, question: Question, self_check: float, mode: str, timings: dict, t_start: float
) -> RefineResult | None:
    """A text-style receiver's own answer when its confidence in it is at least ``self_check``, else None."""
    reading = answer_alone(receiver, question.stem, question.options)
    timings["self_check"] = time.perf_counter() - t_start
    if not confident_alone(reading.confidence, self_check):
        return None
    timings["total"] = time.perf_counter() - t_start
    return _result(reading, mode, "", alone=True, timings=timings)


def _one_model(
    question: Question,
    receiver: LanguageModel,
    transmitters: Mapping[str, LanguageModel],
    mode: str,
    shared: str,
    q_private: str | None,
    notes: Mapping[str, DeviceNotes],
    timings: dict,
    t_start: float,
) -> RefineResult:
    """Modes ``receiver`` (it alone) and ``transmitter`` (the first transmitter alone, with its notes, on q')."""
    if mode == "receiver":
        reading = answer_alone(receiver, question.stem, question.options)
        timings["total"] = time.perf_counter() - t_start
        return _result(reading, mode, "", timings=timings)
    if not transmitters:
        raise FusionError(f"mode {mode!r} needs at least one transmitter")
    name, model = next(iter(transmitters.items()))
    stem = q_private or question.stem
    lines = notes[name].retrieve(stem).lines if name in notes else ()
    reading = answer_alone(model, stem, question.options, lines)
    timings["total"] = time.perf_counter() - t_start
    return _result(reading, mode, shared, used={name: []}, timings=timings)


def _text_to_text(req: _Request) -> RefineResult:
    t0 = time.perf_counter()
    hints = {}
    for name, model in req.transmitters.items():
        lines = req.notes[name].retrieve(req.hint_stem).lines if name in req.notes else ()
        hints[name] = write_hint(model, req.hint_stem, notes=lines)
    req.timings["transmitters"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    q = req.question
    reading = read_with_hints(req.receiver, q.stem, q.options, list(hints.values()))
    req.timings["receiver"] = time.perf_counter() - t1
    req.timings["total"] = time.perf_counter() - req.t_start
    sent = {n: h for n, h in hints.items() if h}
    return _result(
        reading,
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
    return shared_prompt(donor.stem, donor.options, style=req.transmitters[name].style)[0]


def _cache_to_cache(req: _Request) -> RefineResult:
    """Prefill every transmitter, let the gate score the offers, transmit the chosen layers, fuse and read."""
    t0 = time.perf_counter()
    prefills = {name: _transmitter_prefill(req, name, model) for name, model in req.transmitters.items()}
    req.timings["transmitters"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    gate = req.gate if req.mode in ("c2c", "c2c-shuffled") else None
    scores = plan({n: p.offer for n, p in prefills.items()}, gate, req.profiles)
    req.timings["gate"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    received, nbytes, ntokens = _transfer(req, prefills, scores)
    req.timings["transfer"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    missing = [n for n, got in received.items() if got.fingerprint not in req.fusers]
    if missing:
        raise FusionError(f"no fuser for transmitters {missing} into {req.receiver.name}")
    prefix = req.prefixes.get((req.shared, req.original))
    reading, fused = receiver_answer(
        req.receiver, req.shared, req.original, received, req.fusers, req.question.options, prefix=prefix
    )
    req.timings["receiver"] = time.perf_counter() - t3
    req.timings["total"] = time.perf_counter() - req.t_start
    return _result(
        reading,
        req.mode,
        req.shared,
        used=fused.used,
        weights={n: round(s.weight, 4) for n, s in scores.items()},
        bytes_sent=nbytes,
        tokens_sent=ntokens,
        timings=req.timings,
        failed=fused.failed,
    )


def _translated(req: _Request) -> RefineResult:
    """Translate modes: every transmitter whose notes are specific to q' (``Retrieved.specific``) sends its cache of
    the retrieved lines that name q''s subject (``Retrieved.named``; ``translate-every``: every device, every line
    it retrieved; ``translate-shuffled``: for another question), the receiver translates each, places them before
    its own question and reads the answer; nothing arrived (no notes, no translator): it answers alone."""
    q = req.question
    t0 = time.perf_counter()
    spans = {}
    for name, model in req.transmitters.items():
        stem = req.hint_stem
        if req.mode == "translate-shuffled":
            if name not in req.donors:
                raise FusionError(f"translate-shuffled needs a donor question for transmitter {name}")
            stem = req.donors[name].stem
        got = req.notes[name].retrieve(stem) if name in req.notes else None
        lines = () if got is None else got.lines if req.mode == "translate-every" else got.translated
        key = (model.fingerprint, lines)
        span = req.spans.get(key) if req.spans is not None else None
        if span is None:
            span = note_span(model, lines)
            if req.spans is not None:
                req.spans[key] = span
        if span is not None:
            spans[name] = (model.fingerprint, span)
    req.timings["transmitters"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    arrived, failed, used = [], {}, {}
    nbytes = ntokens = 0
    for name in sorted(spans):
        fingerprint, span = spans[name]
        translator = req.translators.get(fingerprint)
        if translator is None:
            failed[name] = f"no translator for transmitter model {fingerprint} into this receiver"
            continue
        decoded, size = transmit(span.layers, req.precision)
        try:
            arrived.append(translator(decoded))
        except FusionError as exc:
            failed[name] = str(exc)
            continue
        nbytes += size
        ntokens += span.num_tokens
        used[name] = sorted(decoded)
    req.timings["transfer"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    reading = read_translated(req.receiver, q.stem, q.options, arrived)
    req.timings["receiver"] = time.perf_counter() - t2
    req.timings["total"] = time.perf_counter() - req.t_start
    return _result(
        reading,
        req.mode,
        req.hint_stem,
        used=used,
        weights={n: 1.0 for n in used},
        bytes_sent=nbytes,
        tokens_sent=ntokens,
        timings=req.timings,
        failed=failed,
    )


def _transmitter_prefill(req: _Request, name: str, model: LanguageModel) -> TransmitterPrefill:
    """One transmitter's prefill of its text (reused from ``req.prefilled`` when it is of the same text)."""
    text = _transmitter_text(req, name)
    ready = req.prefilled.get(name)
    if ready is not None and ready.shared_text == text:
        return ready
    return transmitter_prefill(name, model, text, req.notes.get(name))


def _transfer(
    req: _Request, prefills: Mapping[str, TransmitterPrefill], scores: Mapping[str, GateScore]
) -> tuple[dict[str, Received], int, int]:
    """The chosen layers of every chosen transmitter through the bus codec: what arrives, bytes and tokens sent."""
    received: dict[str, Received] = {}
    nbytes = ntokens = 0
    for name, pre in prefills.items():
        score = scores[name]
        layers = score.layers()
        if score.weight <= 0 or not layers:
            continue
        fuser = req.fusers.get(pre.offer.fingerprint)
        tail = transmitter_tail(fuser) if fuser is not None else None
        decoded, size = transmit(tail_tokens(select_layers(pre, layers), tail), req.precision)
        nbytes += size
        ntokens += min(tail or pre.cache.num_tokens, pre.cache.num_tokens)
        received[name] = Received(pre.offer.fingerprint, decoded, pre.offsets, score.weight)
    return received, nbytes, ntokens
