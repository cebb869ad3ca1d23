"""Receiver-side rephrasing: q -> q' with personal details removed, reworded by the receiver model.

Order of work: rules redact first (names, emails, phones, account ids, long numbers), then the receiver
model rewords the redacted stem (it was trained to in the zoo). The model's output is accepted only if it
is a sensible one-line question that reintroduces none of the removed details and says nothing the
question did not (every word of it is a word of the redacted question or a common function word: a model
that garbles an entity or swaps the attribute would send the transmitters another question); otherwise
the rule-redacted stem is used. Nothing here sends anything: the caller decides what leaves the receiver side.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bus.errors import PrivacyError
from fusion.prompts import format_rephrase_request, parse_completion
from privacy.redact import Detail, leak_rate, ngram_overlap, redact

__all__ = ["Rephrased", "rephrase", "passthrough", "ngram_overlap", "leak_rate", "detail_removal"]

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 40  # tokens of paraphrase the receiver may generate
MAX_LENGTH_RATIO = 2.0  # a paraphrase longer than this times the redacted stem is rejected
# Words a paraphrase may add: English function words that reword a question without changing what it asks.
FUNCTION_WORDS = frozenset(
    "a about an and any are as at be can could did do does for from give have has i in is it its know let "
    "me my of on or please s say share should tell that the this to us was what when where which who whom "
    "whose why will with would you your".split()
)
_WORD = re.compile(r"[a-z0-9]+")  # "Zorbin's" -> "zorbin", "s"


def new_words(candidate: str, source: str) -> set[str]:
    """Words of ``candidate`` that are neither in ``source`` nor function words (lower-cased)."""
    return set(_WORD.findall(candidate.lower())) - set(_WORD.findall(source.lower())) - FUNCTION_WORDS


REPHRASE_INSTRUCTION = "Rewrite this question in other words, keeping every name it asks about:\n"  # text style


class Generator(Protocol):
    """What the rephraser needs from a model (``fusion.models.LanguageModel``): its answer style, greedy
    generation (a zoo model trained on ``format_rephrase_request``) or a reply in its own frame (text style)."""

    style: str

    def generate(self, prompt: str, max_new_tokens: int = ..., stop: str | None = ...) -> str: ...

    def respond(self, content: str, max_new_tokens: int = ..., stop: str | None = ...) -> str: ...


@dataclass(frozen=True)
class Rephrased:
    """A rephrased question, what was removed from it, and how it was made."""

    text: str  # q': the only form of the question that may leave the receiver side
    original: str  # q
    removed: list[Detail] = field(default_factory=list)
    method: Literal["model", "rules", "none"] = "rules"

    @property
    def removed_values(self) -> list[str]:
        """The removed personal details, verbatim."""
        return [d.value for d in self.removed]


def _acceptable(candidate: str, redacted: str, removed: list[Detail]) -> bool:
    if not candidate or "\n" in candidate or not _WORD.search(candidate.lower()):
        return False  # empty, several lines, or no word at all (a random model's "::::")
    if len(candidate) > MAX_LENGTH_RATIO * max(len(redacted), 1):
        return False
    if any(d.value.lower() in candidate.lower() for d in removed):
        return False
    if new_words(candidate, redacted):  # it asks something else (a garbled name, another attribute)
        return False
    # The paraphrase must not smuggle in a detail the rules would remove.
    return not redact(candidate).removed


def rephrase(
    question: str, model: Generator | None = None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> Rephrased:
    """q -> q': redact personal details by rules, then reword with ``model`` when given (rules as fallback)."""
    if not question or not question.strip():
        raise PrivacyError("cannot rephrase an empty question")
    redaction = redact(question)
    redacted = " ".join(redaction.text.split())
    if model is None:
        return Rephrased(redacted, question, list(redaction.removed), "rules")
    try:
        if getattr(model, "style", "letter") == "text":
            reply = model.respond(REPHRASE_INSTRUCTION + redacted, max_new_tokens, "\n")
        else:
            reply = model.generate(format_rephrase_request(redacted), max_new_tokens, "\n")
        candidate = parse_completion(reply)
    except Exception as exc:  # a broken model must never leak the raw question: fall back to rules
        log.warning("rephrasing model failed (%s); using rule redaction", exc)
        return Rephrased(redacted, question, list(redaction.removed), "rules")
    if _acceptable(candidate, redacted, list(redaction.removed)):
        return Rephrased(candidate, question, list(redaction.removed), "model")
    log.debug("model paraphrase %r rejected; using rule redaction", candidate)
    return Rephrased(redacted, question, list(redaction.removed), "rules")


def passthrough(question: str) -> Rephrased:
    """q' = q, for queries not marked private."""
    if not question or not question.strip():
        raise PrivacyError("cannot send an empty question")
    return Rephrased(" ".join(question.split()), question, [], "none")


def detail_removal(text: str, planted: list[str] | tuple[str, ...]) -> float:
    """Share of planted personal details absent from ``text`` (1.0 when none were planted)."""
    return 1.0 - leak_rate(text, planted)
