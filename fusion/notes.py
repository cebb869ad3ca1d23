"""A device's local notes: facts as sentences that never leave the device, and BM25 retrieval over them.

Pretrained weights are not retrained here, so devices differ in what they know by their notes. A transmitter
retrieves the few lines most relevant to q' (BM25; the lines returned include other entities' facts, as any
retriever's would) and prefills them before q'; only its cache of the q' positions is sent. ``coverage`` says
how much of the query's term weight the best line matched (0..1): the transmitter's own signal that its notes
cover the question, which travels in its offer for the gate. ``specific`` says whether the best line names what the
query asks about (a query term that few of the device's lines contain: a name, not a template word), and ``named``
which retrieved lines do; in translate mode a device sends the cache of its named lines only, and nothing when its
notes are not specific to q' (the other lines are other entities' facts: distractors).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bus.errors import ConfigError

DEFAULT_TOP_K = 3  # lines a transmitter retrieves per query
BM25_K1 = 1.2  # term-frequency saturation
BM25_B = 0.75  # length normalisation
# a query term in at most this many of a device's lines (or 1% of them, if more) is specific to what it asks: on the
# kit's held-out questions a holder's best line has one in 100% of cases, a non-holder's in 5% (unseen entities)
SPECIFIC_LINES = 3
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the of is was are in on at to for by with what which who whom whose where when how does do".split()
)


def terms(text: str) -> list[str]:
    """Lower-case word terms of a text, without stop words (what BM25 matches on)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass(frozen=True)
class Retrieved:
    """Lines retrieved for a query, best first, and how well the best one covers it."""

    lines: tuple[str, ...]
    coverage: float  # share of the query's IDF weight that the best line contains (0..1)
    specific: bool = False  # the best line contains a query term that few lines contain (it names the subject)
    named: tuple[str, ...] = ()  # the retrieved lines that contain such a term (best first)

    @property
    def translated(self) -> tuple[str, ...]:
        """What translate mode sends the cache of: the named lines when the notes are specific to the query, else
        nothing."""
        return self.named if self.specific else ()


class DeviceNotes:
    """One device's notes (one fact per line) with a BM25 index."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = tuple(" ".join(line.split()) for line in lines if line.strip())
        self._docs = [Counter(terms(line)) for line in self.lines]
        self._lengths = [sum(d.values()) for d in self._docs]
        self._avg = sum(self._lengths) / max(len(self._lengths), 1)
        df: Counter[str] = Counter()
        for doc in self._docs:
            df.update(doc.keys())
        n = len(self._docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self._df = df
        self._specific_df = max(SPECIFIC_LINES, n // 100)

    @classmethod
    def load(cls, path: str | Path) -> DeviceNotes:
        """Notes from a text file, one fact per line (``ConfigError`` if it cannot be read)."""
        try:
            return cls(Path(path).read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read notes file {str(path)!r}: {exc}", path=str(path)) from exc

    def __len__(self) -> int:
        return len(self.lines)

    def _score(self, query: list[str], i: int) -> float:
        doc, length = self._docs[i], self._lengths[i]
        total = 0.0
        for t in query:
            f = doc.get(t, 0)
            if f:
                norm = f + BM25_K1 * (1 - BM25_B + BM25_B * length / max(self._avg, 1e-9))
                total += self._idf.get(t, 0.0) * f * (BM25_K1 + 1) / norm
        return total

    def retrieve(self, query: str, k: int = DEFAULT_TOP_K) -> Retrieved:
        """The ``k`` best lines for ``query`` (ties in file order) and the best line's coverage of it."""
        q = terms(query)
        if not self.lines or not q or k < 1:
            return Retrieved((), 0.0)
        ranked = sorted(range(len(self.lines)), key=lambda i: (-self._score(q, i), i))[:k]
        weight = {t: self._idf.get(t, math.log(1 + (len(self.lines) + 0.5) / 0.5)) for t in set(q)}
        best = self._docs[ranked[0]]
        covered = sum(w for t, w in weight.items() if t in best) / max(sum(weight.values()), 1e-9)
        rare = {t for t in set(q) if 0 < self._df.get(t, 0) <= self._specific_df}
        named = tuple(self.lines[i] for i in ranked if rare & self._docs[i].keys())
        specific = bool(rare & best.keys())
        return Retrieved(tuple(self.lines[i] for i in ranked), round(covered, 4), specific, named)
