"""The toy world: a seeded book of invented facts and an OpenBookQA-style question set.

Entities have invented names (from syllables); each has one value for every attribute ("the color of
Zorbin is red"). Facts are split once, by fact, into a *train* pool (fusers and the gate may train on
its questions) and a *test* pool (held out: its questions are only ever evaluated). Language models
may know any fact; which ones each model knows is decided by ``assign_knowledge``.

Everything is a pure function of the ``WorldSpec`` (including its seed): same spec, same world.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fusion.prompts import NUM_OPTIONS, Question

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "pink", "gray", "gold", "black", "white"),
    "pet": ("cat", "dog", "owl", "fox", "frog", "bee", "crab", "goat"),
    "food": ("rice", "fish", "bread", "plums", "cheese", "honey", "beans", "soup"),
    "metal": ("iron", "tin", "copper", "silver", "zinc", "lead", "nickel", "brass"),
}

# Sentences a fact is written in; the first is the canonical one a transmitter gives as a hint.
# The entity always follows a space, so it is the same tokens in facts, questions and hints.
FACT_TEMPLATES: tuple[str, ...] = (
    "The {attribute} of {entity} is {value}.",
    "We know that {entity} has the {attribute} {value}.",
    "It is said that {entity}'s {attribute} is {value}.",
    "For {entity}, the {attribute} is {value}.",
)

# Plain question cores; a stem is a core, optionally after a greeting that carries personal details.
CORES: tuple[str, ...] = (
    "What is the {attribute} of {entity}?",
    "Which {attribute} does {entity} have?",
    "Do you know the {attribute} of {entity}?",
    "Tell me the {attribute} of {entity}.",
)
# The paraphrase of core k (what the receiver's rephraser is taught to write): always a different core.
PARAPHRASE_CORE: tuple[int, ...] = (1, 0, 0, 1)

# Greetings that plant personal details; each field is one planted detail.
GREETINGS: tuple[str, ...] = (
    "Hi, I'm {name} (account {account}).",
    "This is {name}, email {email}.",
    "My name is {name} and my phone is {phone}.",
    "I am {name}, account number {account}, phone {phone}.",
    "Hello, my name is {name}. My email is {email}.",
)

PHRASINGS: tuple[str, ...] = tuple(f"c{k}" for k in range(len(CORES))) + tuple(
    f"c{k}g{g}" for g in range(len(GREETINGS)) for k in range(len(CORES))
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "gl")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "k", "s", "m", "x")
_FIRST = ("Mara", "Jon", "Elin", "Tovi", "Rasa", "Ivo", "Nell", "Omar", "Kaia", "Leif", "Suri", "Bram", "Dina", "Per")
_LAST_ONSETS = ("V", "H", "W", "Qu", "Ch", "Sh", "J", "Y")
_LAST_ENDS = ("elt", "ossa", "arden", "inski", "oway", "ubert", "andry", "etti", "olm")
_DOMAINS = ("mailo.net", "postbox.org", "quillmail.com", "letterly.io")


class WorldSpec(BaseModel):
    """What world to generate; its JSON is part of the zoo's cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    num_entities: int = Field(default=160, ge=8)
    values_per_attribute: int = Field(default=8, ge=NUM_OPTIONS, le=8)
    test_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)  # facts held out for testing, split by fact
    questions_per_fact: int = Field(default=2, ge=1)  # in train.jsonl and test.jsonl
    pii_fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # share of stems that carry personal details
    # "canonical": options listed in the attribute's fixed value order (tiny models learn the letter in a few
    # hundred steps); "shuffled": reshuffled every time (pointing at the option needs ~1000+ steps of a
    # 4-layer Qwen3 and was not learned by 3-layer Llamas in 2000 steps on this machine).
    option_order: Literal["canonical", "shuffled"] = "shuffled"


class Fact(BaseModel):
    """One (entity, attribute, value) fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    entity: str
    attribute: str
    value: str

    def sentence(self, template: int = 0) -> str:
        """The fact written in sentence template ``template`` (0 is the canonical hint sentence)."""
        return FACT_TEMPLATES[template].format(entity=self.entity, attribute=self.attribute, value=self.value)


class World(BaseModel):
    """The generated world: attribute values, entities, facts and the train/test split by fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: WorldSpec
    attributes: dict[str, tuple[str, ...]]
    entities: tuple[str, ...]
    facts: tuple[Fact, ...]
    train_fact_ids: tuple[str, ...]
    test_fact_ids: tuple[str, ...]

    def fact(self, fact_id: str) -> Fact:
        """The fact with this id (KeyError if none)."""
        return self._by_id()[fact_id]

    def _by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}

    def facts_of(self, ids: Iterable[str]) -> list[Fact]:
        """The facts with these ids, in the given order."""
        by_id = self._by_id()
        return [by_id[i] for i in ids]

    def corpus(self) -> list[str]:
        """Every fact in every template: the text tokenizers are trained on (with the prompt formats)."""
        return [f.sentence(t) for f in self.facts for t in range(len(FACT_TEMPLATES))]


def entity_names(rng: random.Random, count: int, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct invented names of 2-3 syllables, none in ``exclude`` or a value word."""
    taken = {e.lower() for e in exclude} | {v for vals in ATTRIBUTE_VALUES.values() for v in vals}
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1))
        name = (name + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)).capitalize()
        if name.lower() not in taken and 4 <= len(name) <= 10:
            taken.add(name.lower())
            names.append(name)
    return names


def generate_world(spec: WorldSpec) -> World:
    """The world of this spec: balanced random values per attribute, facts shuffled and split by fact."""
    rng = random.Random(f"world/{spec.seed}")
    attributes = {a: vals[: spec.values_per_attribute] for a, vals in ATTRIBUTE_VALUES.items()}
    entities = tuple(entity_names(rng, spec.num_entities))
    facts: list[Fact] = []
    for attribute, values in attributes.items():
        # Balanced: every value used equally often, so no value prior beats chance.
        pool = [values[i % len(values)] for i in range(len(entities))]
        rng.shuffle(pool)
        for entity, value in zip(entities, pool, strict=True):
            facts.append(Fact(id=f"{entity}.{attribute}", entity=entity, attribute=attribute, value=value))
    facts.sort(key=lambda f: (f.entity, f.attribute))
    order = [f.id for f in facts]
    rng.shuffle(order)
    n_test = max(1, round(len(order) * spec.test_fraction))
    return World(
        spec=spec,
        attributes=attributes,
        entities=entities,
        facts=tuple(facts),
        train_fact_ids=tuple(sorted(order[n_test:])),
        test_fact_ids=tuple(sorted(order[:n_test])),
    )


def person_details(rng: random.Random) -> dict[str, str]:
    """Made-up personal details of an asker: name, account number, email, phone."""
    first = rng.choice(_FIRST)
    last = rng.choice(_LAST_ONSETS) + rng.choice(_LAST_ENDS)
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    account = rng.choice((f"ACC-{digits(6)}", f"{digits(4)}-{digits(4)}", f"AC{digits(8)}"))
    user = f"{first.lower()}{rng.choice(('.', '_', ''))}{last.lower()}{rng.choice(('', digits(2)))}"
    email = f"{user}@{rng.choice(_DOMAINS)}"
    mid, end = digits(3), digits(4)
    phone = rng.choice((f"555-{mid}-{end}", f"+1 555 {mid} {end}", f"(555) {mid}-{end}"))
    return {"name": f"{first} {last}", "account": account, "email": email, "phone": phone}


def make_stem(entity: str, attribute: str, phrasing: str, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A question stem in this phrasing and the personal details planted in it (verbatim)."""
    if phrasing not in PHRASINGS:
        raise KeyError(f"unknown phrasing {phrasing!r}")
    core_idx, _, greet = phrasing[1:].partition("g")
    core = CORES[int(core_idx)].format(entity=entity, attribute=attribute)
    if not greet:
        return core, ()
    template = GREETINGS[int(greet)]
    details = person_details(rng)
    used = tuple(details[k] for k in ("name", "account", "email", "phone") if "{" + k + "}" in template)
    used = tuple(sorted(used, key=lambda d: template.format(**details).index(d)))
    return f"{template.format(**details)} {core}", used


def paraphrase(entity: str, attribute: str, phrasing: str) -> str:
    """The receiver's rephrasing target for a stem: a different plain core, no personal details."""
    core_idx = int(phrasing[1:].partition("g")[0])
    return CORES[PARAPHRASE_CORE[core_idx]].format(entity=entity, attribute=attribute)


def random_phrasing(rng: random.Random, pii_fraction: float) -> str:
    """A phrasing id; with probability ``pii_fraction`` one that carries personal details."""
    core = rng.randrange(len(CORES))
    if rng.random() < pii_fraction:
        return f"c{core}g{rng.randrange(len(GREETINGS))}"
    return f"c{core}"


def make_options(
    fact: Fact, values: tuple[str, ...], rng: random.Random, answer: int | None = None, canonical: bool = False
) -> tuple[tuple[str, ...], int]:
    """Four options (the true value and three other values of the attribute) and the answer index.

    Shuffled (``answer`` fixes the key's position if given), or in the attribute's value order.
    """
    others = rng.sample([v for v in values if v != fact.value], NUM_OPTIONS - 1)
    if canonical:
        options = sorted([*others, fact.value], key=values.index)
        return tuple(options), options.index(fact.value)
    answer = rng.randrange(NUM_OPTIONS) if answer is None else answer
    others.insert(answer, fact.value)
    return tuple(others), answer


def make_question(
    world: World, fact: Fact, rng: random.Random, qid: str, phrasing: str | None = None, answer: int | None = None
) -> Question:
    """One question about ``fact``: a random (or given) phrasing, options reshuffled, an answer key."""
    phrasing = phrasing or random_phrasing(rng, world.spec.pii_fraction)
    stem, pii = make_stem(fact.entity, fact.attribute, phrasing, rng)
    canonical = world.spec.option_order == "canonical"
    options, answer = make_options(fact, world.attributes[fact.attribute], rng, answer, canonical=canonical)
    return Question(
        id=qid,
        stem=stem,
        options=options,
        answer=answer,
        fact_id=fact.id,
        entity=fact.entity,
        attribute=fact.attribute,
        phrasing=phrasing,
        pii=pii,
    )


def question_set(world: World, split: str) -> list[Question]:
    """The saved questions of a split (``"train"`` or ``"test"``): answer keys balanced over letters."""
    ids = {"train": world.train_fact_ids, "test": world.test_fact_ids}[split]
    rng = random.Random(f"questions/{world.spec.seed}/{split}")
    out: list[Question] = []
    for fact in world.facts_of(ids):
        for j in range(world.spec.questions_per_fact):
            # Balanced keys (shuffled order): a model stuck on one letter scores exactly chance.
            answer = len(out) % NUM_OPTIONS
            out.append(make_question(world, fact, rng, f"{split}-{fact.id}-{j}", answer=answer))
    rng.shuffle(out)
    return out


def assign_knowledge(world: World, shares: dict[str, float], overlap: float, seed: int) -> dict[str, tuple[str, ...]]:
    """Which facts each model knows: disjoint shares of a shuffled fact list, plus ``overlap`` of others.

    ``shares`` maps model name to its fraction of all facts; names starting with ``"@"`` draw independently
    (e.g. the receiver), the others partition the facts in order and then each adds ``overlap`` of the
    facts outside its own share.
    """
    rng = random.Random(f"knowledge/{world.spec.seed}/{seed}")
    all_ids = [f.id for f in world.facts]
    order = list(all_ids)
    rng.shuffle(order)
    out: dict[str, tuple[str, ...]] = {}
    start = 0
    for name, frac in shares.items():
        n = round(frac * len(all_ids))
        if name.startswith("@"):
            out[name[1:]] = tuple(sorted(rng.sample(all_ids, n)))
            continue
        own = order[start : start + n]
        start += n
        rest = [i for i in all_ids if i not in set(own)]
        extra = rng.sample(rest, round(overlap * len(all_ids))) if overlap > 0 else []
        out[name] = tuple(sorted(set(own) | set(extra)))
    if start > len(all_ids):
        raise ValueError(f"shares sum to more than 1: {shares}")
    return out


def save_questions(path: Path, questions: Iterable[Question]) -> None:
    """Write questions as JSONL, one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for q in questions:
            fh.write(q.model_dump_json() + "\n")


def load_questions(path: Path) -> list[Question]:
    """Read questions written by ``save_questions``."""
    with path.open() as fh:
        return [Question.model_validate(json.loads(line)) for line in fh if line.strip()]
