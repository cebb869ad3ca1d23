"""Reading an answer from a (fused) receiver cache, and scoring it.

After the receiver's prefix (fused or not) it reads its view's continuation, then:

- a letter-style model (the toy zoo) gives the probabilities of the four answer letters;
- a text-style model scores each option by the summed log-likelihood of its tokens (a choice question), or
  writes a greedy answer (a free-text question) cut at a newline, its end-of-turn token or ``max_new_tokens``.

Free-text answers are scored by exact match after ``normalize_answer`` (lower case, no punctuation, no leading
article, single spaces), as in SQuAD-style evaluation, and by containment (``contains_answer``): an instruct model
answers in sentences ("The color of Zorbin is teal."), which exact match never accepts.

Every reading carries the model's ``confidence`` in it: the chosen option's probability (choice), the mean
probability of the greedy answer's tokens (free text). The receiver's self-check (``fusion.refine``) reads it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fusion.kvcache import KVCache
from fusion.models import LanguageModel
from fusion.prompts import exact_match, normalize_answer

__all__ = ["Reading", "read_answer", "is_correct", "contains_answer", "exact_match", "normalize_answer"]

DEFAULT_MAX_ANSWER_TOKENS = 16  # longest free-text answer a receiver writes
ANSWER_STOP = "\n"  # a free-text answer ends at the first newline


@dataclass(frozen=True)
class Reading:
    """An answer read from a cache: an option index and its distribution (choice) or a text (free text)."""

    choice: int | None  # index of the chosen option (None for free text)
    probs: tuple[float, ...] = ()  # over the options (softmax of their log-likelihoods or letter logits)
    text: str = ""  # the chosen option's text, or the generated answer
    scores: tuple[float, ...] = field(default=(), repr=False)  # raw option log-likelihoods (text style)
    confidence: float | None = None  # the chosen option's probability, or the free text's mean token probability


@torch.no_grad()
def read_answer(
    receiver: LanguageModel,
    cache: KVCache,
    continuation: Sequence[int],
    options: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    live: Sequence = (),
) -> Reading:
    """The receiver's answer after reading ``continuation`` from ``cache`` (which is not modified); ``live``: the
    ``fusion.live.LiveTerm``s that fuse the continuation's first token as it is computed."""
    if receiver.style == "letter":
        from fusion.c2c import letter_ids

        logits = receiver.forward_from(cache, list(continuation), live)[-1]  # (vocab,)
        probs = torch.softmax(logits[letter_ids(receiver)].float().cpu(), -1)
        choice = int(probs.argmax())
        return Reading(choice, _rounded(probs), options[choice] if options else "", confidence=float(probs.max()))
    after = receiver.extend(cache, list(continuation), live)
    if options:
        scores = receiver.score_ids(after, [receiver.answer_ids(o) for o in options])
        probs = torch.softmax(scores, -1)
        choice = int(scores.argmax())
        raw = tuple(round(float(x), 4) for x in scores)
        return Reading(choice, _rounded(probs), options[choice], raw, confidence=float(probs.max()))
    text, token_probs = receiver.generate_scored(after, max_new_tokens=max_new_tokens, stop=ANSWER_STOP)
    return Reading(None, (), text.strip(), confidence=sum(token_probs) / len(token_probs) if token_probs else 0.0)


def is_correct(reading: Reading, answer: int | str) -> bool:
    """Whether a reading answers right: the option index, or an exact match of the free text."""
    if isinstance(answer, int):
        return reading.choice == answer
    return exact_match(reading.text, answer)


def contains_answer(prediction: str, answer: str, candidates: Sequence[str] = ()) -> bool:
    """Whether a free-text answer contains the gold answer: the normalised gold occurs as whole words (a contiguous
    run of them) in the normalised prediction, and no other candidate value does.

    Accents are folded away first. ``candidates`` are the values the question could have (its options, or its
    attribute's values): an answer that names the gold and another candidate ("red or teal") does not count, so
    listing values never scores. A candidate whose words lie inside the gold's ("blue" in "dark blue") is not
    another value.
    """
    said = _folded(prediction).split()
    gold = _folded(answer).split()
    if not gold or not _has_run(said, gold):
        return False
    for other in {_folded(c) for c in candidates}:
        words = other.split()
        if words and words != gold and not _has_run(gold, words) and _has_run(said, words):
            return False
    return True


def _folded(text: str) -> str:
    """``normalize_answer`` without accents ("Brontë" says "Bronte")."""
    plain = unicodedata.normalize("NFKD", text)
    return normalize_answer("".join(ch for ch in plain if not unicodedata.combining(ch)))


def _has_run(words: Sequence[str], run: Sequence[str]) -> bool:
    """Whether ``run`` occurs as a contiguous sub-sequence of ``words``."""
    n = len(run)
    return any(list(words[i : i + n]) == list(run) for i in range(len(words) - n + 1))


def _rounded(probs: torch.Tensor) -> tuple[float, ...]:
    return tuple(round(float(p), 6) for p in probs)
