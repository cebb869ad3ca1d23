"""Rule-based removal of personal details from a question, and leakage metrics.

``redact(text)`` finds emails, phone numbers, account ids, long digit runs and person names introduced by
"I'm / I am / my name is / this is / call me" and removes them, together with the greeting clause that
carried them when that clause says nothing else ("Hi, I'm Mara Velt (account 4471-2290)." disappears
whole). ``pii_recall(removed, planted)`` is the share of planted details that were removed, ``leak_rate(text,
planted)`` the share still in a text;
``ngram_overlap(a, b, n)`` measures how much of a paraphrase is copied from the original.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from bus.errors import PrivacyError

DEFAULT_NGRAM = 2  # words per n-gram for ngram_overlap
MAX_TEXT_CHARS = 100_000  # longer input is refused (regexes on unbounded text are a denial-of-service risk)

Kind = Literal["email", "phone", "account", "number", "name"]

_NAME_WORD = r"[A-Z][a-z'\-]+"
_INTRODUCERS = r"I'm|I am|[Mm]y name is|[Tt]his is|[Cc]all me|[Nn]ame:"
_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    ("email", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")),
    ("account", re.compile(r"\b(?:ACC|AC|ACCT|ID)[-\s#:]?\d{4,}\b", re.IGNORECASE)),
    ("phone", re.compile(r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.\-])\d{3}[\s.\-]\d{4}\b")),
    ("account", re.compile(r"\b\d{4}[\s\-]\d{4}(?:[\s\-]\d{4}){0,2}\b")),
    ("number", re.compile(r"\b\d{5,}\b")),
    (
        "name",
        re.compile(rf"(?:\b(?:{_INTRODUCERS})\s+)({_NAME_WORD}(?:\s+{_NAME_WORD}){{0,2}})"),
    ),
)
# A leading greeting clause that is only about the asker: removed whole once its details are gone.
_GREETING = re.compile(
    r"^\s*(?:(?:hi|hello|hey|dear \w+)[,!]?\s*)?"
    r"(?:(?:i'm|i am|my name is|this is|call me)\b[^.?!]*[.!]\s*)"
    r"(?:(?:my|and my) (?:email|phone|account|number)[^.?!]*[.!]\s*)*",
    re.IGNORECASE,
)
_PLACEHOLDER = "\x00"
# An introducer left dangling by a removed name elsewhere in the text (", I am <name>.").
_DANGLING = re.compile(rf"(?:,\s*|\b)(?:{_INTRODUCERS})\s*{_PLACEHOLDER}")


class Detail(BaseModel):
    """One personal detail found in the text: its kind, the text, and its ``(start, end)`` span."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    value: str
    span: tuple[int, int]


class Redaction(BaseModel):
    """The text with personal details removed, and what was removed (spans refer to the original)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    removed: tuple[Detail, ...]


def find_details(text: str) -> list[Detail]:
    """Every personal detail in ``text``, left to right, without overlaps (earlier patterns win)."""
    if len(text) > MAX_TEXT_CHARS:
        raise PrivacyError(f"text of {len(text)} characters is too long to redact (max {MAX_TEXT_CHARS})")
    found: list[Detail] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            group = 1 if pattern.groups else 0
            start, end = m.span(group)
            if any(start < b and a < end for a, b in taken):
                continue
            taken.append((start, end))
            found.append(Detail(kind=kind, value=text[start:end], span=(start, end)))
    return sorted(found, key=lambda d: d.span)


def _tidy(text: str) -> str:
    text = re.sub(r"\(\s*(?:account|acct|id|phone|email|number)?[\s:#]*\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.?!)])", r"\1", text)
    text = re.sub(r"([,(])\s*[,.]", r"\1", text)
    return " ".join(text.split())


def redact(text: str) -> Redaction:
    """``text`` with every personal detail removed (and an asker-only greeting dropped whole)."""
    details = find_details(text)
    out = text
    for d in reversed(details):
        out = out[: d.span[0]] + _PLACEHOLDER + out[d.span[1] :]
    if details:
        greeting = _GREETING.match(out)
        if greeting and _PLACEHOLDER in greeting.group(0) and greeting.end() < len(out):
            out = out[greeting.end() :]
    out = _tidy(_DANGLING.sub("", out).replace(_PLACEHOLDER, ""))
    return Redaction(text=out, removed=tuple(details))


def pii_recall(removed: Sequence[Detail | str], planted: Sequence[str]) -> float:
    """Share of the planted details covered by a removed detail (1.0 when nothing was planted)."""
    if not planted:
        return 1.0
    values = [(d.value if isinstance(d, Detail) else str(d)).lower() for d in removed]
    hit = sum(1 for p in planted if any(p.lower() in v or (v and v in p.lower()) for v in values))
    return hit / len(planted)


def leak_rate(text: str, planted: Sequence[str]) -> float:
    """Share of the planted details that still occur verbatim in ``text`` (0.0 when nothing was planted)."""
    if not planted:
        return 0.0
    return sum(1 for p in planted if p.lower() in text.lower()) / len(planted)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngram_overlap(a: str, b: str, n: int = DEFAULT_NGRAM) -> float:
    """Share of ``b``'s word n-grams that also occur in ``a`` (multiset, 0..1; 0.0 when ``b`` has none)."""
    if n < 1:
        raise PrivacyError(f"n-gram size must be >= 1, got {n}")
    wa, wb = _words(a), _words(b)
    ga = Counter(tuple(wa[i : i + n]) for i in range(len(wa) - n + 1))
    gb = Counter(tuple(wb[i : i + n]) for i in range(len(wb) - n + 1))
    total = sum(gb.values())
    if total == 0:
        return 0.0
    return sum(min(c, ga[g]) for g, c in gb.items()) / total
