"""The pretrained-knowledge task: real-world facts the two models partly know, asked without notes.

Where the facts come from (all offline, nothing downloaded):

| category | source | facts | asks |
|---|---|---|---|
| ``capital`` | faker ``date_time.Provider.countries`` (name, capital) | 191 | capital of a country |
| ``continent`` | the same list (name, continent) | 195 | a country's continent |
| ``currency`` | faker ``currency.Provider.currencies`` (ISO code led by a country's alpha-2) | 140 | currency |
| ``state`` | faker ``address.en_US.Provider`` ``states``, ``states_abbr`` | 50 | a US state's postal code |
| ``symbol`` | ``knowledge.tsv`` (element, symbol; the periodic table) | 40 | an element's chemical symbol |
| ``author`` | ``knowledge.tsv`` (book, author) | 40 | a book's author |

Each fact gives a four-option question (three distractors: other answers of its category) and a free-text one.
``probe`` runs both models alone on every category so a task can keep the categories where their own answers
differ (``KNOWLEDGE_CATEGORIES``; docs/TRANSFER.md has the probe's numbers). Facts split into a calibration side
(``CALIBRATION_SHARE``: the self-check threshold is set on it) and the test side, by subject.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fusion.prompts import Question

CURATED = Path(__file__).with_name("knowledge.tsv")
CALIBRATION_SHARE = 0.3  # of each category's facts, used to calibrate the self-check (never in the test)
QUESTIONS = {
    "capital": ("What is the capital of {subject}?", "Which city is the capital of {subject}?"),
    "continent": ("On which continent is {subject}?", "Which continent is {subject} in?"),
    "currency": ("What is the currency of {subject}?", "Which currency is used in {subject}?"),
    "state": ("What is the postal abbreviation of {subject}?", "What is the two-letter postal code of {subject}?"),
    "symbol": ("What is the chemical symbol of {subject}?", "Which chemical symbol does {subject} have?"),
    "author": ("Who wrote {subject}?", "Who is the author of {subject}?"),
}
# the categories the task asks: the probe's (40 four-option questions each, docs/results/knowledge_probe.json) where
# the two models disagree on at least 15% and the receiver alone is below 0.9 ("state" is left out: 0.925/0.975)
KNOWLEDGE_CATEGORIES: tuple[str, ...] = ("author", "capital", "continent", "currency", "symbol")


@dataclass(frozen=True)
class KnownFact:
    """One real-world fact: its category, what it is about, and the answer."""

    category: str
    subject: str
    answer: str

    @property
    def id(self) -> str:
        """A stable id ("capital.Peru")."""
        return f"{self.category}.{self.subject}"


@cache
def known_facts() -> tuple[KnownFact, ...]:
    """Every fact of every category (module table), deduplicated, in a fixed order."""
    from faker.providers.address.en_US import Provider as Address
    from faker.providers.currency import Provider as Currency
    from faker.providers.date_time import Provider as DateTime

    facts: list[KnownFact] = []
    countries = sorted(DateTime.countries, key=lambda c: c.name)
    facts += [KnownFact("capital", c.name, c.capital) for c in countries if c.capital and c.capital != c.name]
    facts += [KnownFact("continent", c.name, c.continent) for c in countries if c.continent]
    by_alpha2 = {c.alpha_2_code: c.name for c in countries}
    for code, name in sorted(Currency.currencies):
        country = by_alpha2.get(code[:2])
        if country and not code.startswith("X"):
            facts.append(KnownFact("currency", country, name))
    abbrs = [a for a in Address.states_abbr if a != "DC"]  # the list carries DC among the states' codes
    facts += [KnownFact("state", state, abbr) for state, abbr in zip(Address.states, abbrs, strict=True)]
    for line in CURATED.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            category, subject, answer = line.split("\t")
            facts.append(KnownFact(category, subject, answer))
    seen: set[str] = set()
    out = []
    for fact in facts:
        if fact.id not in seen:
            seen.add(fact.id)
            out.append(fact)
    return tuple(out)


def split_facts(
    facts: tuple[KnownFact, ...], seed: int = 0, share: float = CALIBRATION_SHARE
) -> tuple[list[KnownFact], list[KnownFact]]:
    """``(calibration, test)``: per category a seeded ``share`` of the facts to calibrate on, the rest to test."""
    by_category: dict[str, list[KnownFact]] = defaultdict(list)
    for fact in facts:
        by_category[fact.category].append(fact)
    calibration, test = [], []
    for category in sorted(by_category):
        group = list(by_category[category])
        random.Random(f"knowledge-split/{seed}/{category}").shuffle(group)
        n = round(len(group) * share)
        calibration += group[:n]
        test += group[n:]
    return calibration, test


def knowledge_questions(facts: list[KnownFact], salt: str, seed: int = 0) -> tuple[list[Question], dict[str, tuple]]:
    """Per fact a four-option and a free-text question; and per question id its candidate values (the four
    options: the free-text ``contains`` grade counts an answer naming two of them as wrong)."""
    rng = random.Random(f"knowledge-questions/{seed}/{salt}")
    answers: dict[str, list[str]] = defaultdict(list)
    for fact in known_facts():
        if fact.answer not in answers[fact.category]:
            answers[fact.category].append(fact.answer)
    out, candidates = [], {}
    for fact in facts:
        others = rng.sample([a for a in answers[fact.category] if a != fact.answer], 3)
        options = [fact.answer, *others]
        rng.shuffle(options)
        for fmt in ("choice", "text"):
            stem = rng.choice(QUESTIONS[fact.category]).format(subject=fact.subject)
            common = {"id": f"{salt}-{fact.id}-{fmt}", "stem": stem, "fact_id": fact.id, "entity": fact.subject}
            common |= {"attribute": fact.category, "task": "knowledge"}
            if fmt == "choice":
                out.append(Question(options=tuple(options), answer=options.index(fact.answer), **common))
            else:
                out.append(Question(answer=fact.answer, **common))
            candidates[common["id"]] = tuple(options)
    return out, candidates


def probe(models: dict, per_category: int = 40, seed: int = 0, progress: bool = True) -> dict:
    """Each model alone (no notes) on up to ``per_category`` four-option questions of every category: per category
    each model's accuracy, how often they agree, and the either-right oracle (the pool where they differ is where
    one can teach the other)."""
    from tqdm.auto import tqdm

    from fusion.refine import answer_alone

    rng = random.Random(f"knowledge-probe/{seed}")
    by_category: dict[str, list[KnownFact]] = defaultdict(list)
    for fact in known_facts():
        by_category[fact.category].append(fact)
    picked = [
        f for c in sorted(by_category) for f in rng.sample(by_category[c], min(per_category, len(by_category[c])))
    ]
    questions, _ = knowledge_questions(picked, "probe", seed)
    questions = [q for q in questions if q.format == "choice"]
    stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for q in tqdm(questions, desc="knowledge probe", unit="q", disable=not progress):
        picks = {name: answer_alone(m, q.stem, q.options).choice for name, m in models.items()}
        for name, choice in picks.items():
            stats[q.attribute][name].append(choice == q.answer)
        stats[q.attribute]["agree"].append(len(set(picks.values())) == 1)
        stats[q.attribute]["either"].append(any(c == q.answer for c in picks.values()))
    return {
        category: {key: round(sum(v) / len(v), 3) for key, v in got.items()} | {"n": len(got["agree"])}
        for category, got in stats.items()
    }
