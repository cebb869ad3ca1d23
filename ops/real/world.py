"""The device-notes world for pretrained models: made-up facts, spread as notes over devices, and questions.

Pretrained weights are not retrained, so what a device knows is its *notes*: one fact per line ("The color of
Zorbin is teal."). Entities are invented names, so no model knows a fact unless a note says it. Facts are split
by entity: questions about *test* entities are held out (no fuser or gate ever trains on them). Each of the
``devices`` holds each fact with its own probability (some facts are on no device). Questions come in two
formats: four options (scored by likelihood) and free text (exact match); a share carries planted personal
details (private questions).

Everything is a pure function of the ``NotesSpec``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fusion.prompts import Question
from ops.zoo.world import GREETINGS, entity_names, person_details


class Attribute(BaseModel):
    """One kind of fact: how it is written, how it is asked, and its values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sentence: str  # "The color of {entity} is {value}."
    questions: tuple[str, ...]  # "What is the color of {entity}?", ...
    values: tuple[str, ...] = ()  # a small fixed set (the notes task) ...
    pool: str = ""  # ... or a large pool of ops.real.values (thousands of values, several forms)

    def all_values(self) -> tuple[str, ...]:
        """Every value this attribute takes."""
        if self.pool:
            from ops.real.values import value_pool

            return value_pool(self.pool)
        return self.values


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        name="color",
        sentence="The color of {entity} is {value}.",
        questions=("What is the color of {entity}?", "Which color is {entity}?"),
        values=tuple(
            "red blue green yellow purple orange pink brown black white gray silver gold teal maroon beige".split()
        ),
    ),
    Attribute(
        name="city",
        sentence="{entity} is located in {value}.",
        questions=("Where is {entity} located?", "In which city is {entity}?"),
        values=tuple(
            "Paris London Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Stockholm Helsinki Warsaw Athens "
            "Cairo Tokyo Seoul Lima Quito Toronto Chicago Sydney Nairobi Mumbai".split()
        ),
    ),
    Attribute(
        name="mascot",
        sentence="The mascot of {entity} is a {value}.",
        questions=("What is the mascot of {entity}?", "Which animal is the mascot of {entity}?"),
        values=tuple(
            "fox wolf bear owl eagle tiger lion horse rabbit dolphin otter falcon badger raven turtle goat camel "
            "panda beaver moose".split()
        ),
    ),
    Attribute(
        name="metal",
        sentence="{entity} is made of {value}.",
        questions=("What is {entity} made of?", "Which metal is {entity} made of?"),
        values=tuple("iron copper silver gold tin zinc lead nickel bronze brass steel aluminum".split()),
    ),
    Attribute(
        name="fruit",
        sentence="The favorite fruit of {entity} is the {value}.",
        questions=("What is the favorite fruit of {entity}?", "Which fruit does {entity} like best?"),
        values=tuple(
            "apple banana cherry mango peach pear plum grape lemon lime kiwi papaya apricot melon fig".split()
        ),
    ),
    Attribute(
        name="instrument",
        sentence="{entity} plays the {value}.",
        questions=("Which instrument does {entity} play?", "What instrument does {entity} play?"),
        values=tuple(
            "violin cello piano flute guitar harp trumpet drums clarinet oboe banjo saxophone trombone "
            "accordion".split()
        ),
    ),
    Attribute(
        name="sport",
        sentence="The sport of {entity} is {value}.",
        questions=("What is the sport of {entity}?", "Which sport does {entity} practice?"),
        values=tuple(
            "tennis chess rugby hockey golf rowing cricket fencing archery cycling boxing skiing sailing karate".split()
        ),
    ),
    Attribute(
        name="country",
        sentence="{entity} comes from {value}.",
        questions=("Which country does {entity} come from?", "Where does {entity} come from?"),
        values=tuple(
            "France Spain Italy Norway Sweden Poland Greece Egypt Japan Brazil Chile Peru Canada Mexico India "
            "Kenya Ghana Nepal Iceland Portugal".split()
        ),
    ),
    Attribute(
        name="job",
        sentence="{entity} works as a {value}.",
        questions=("What is the job of {entity}?", "What does {entity} work as?"),
        values=tuple(
            "baker doctor teacher pilot farmer lawyer nurse painter chef engineer plumber writer dentist sailor "
            "tailor miner".split()
        ),
    ),
    Attribute(
        name="year",
        sentence="{entity} was founded in {value}.",
        questions=("In which year was {entity} founded?", "When was {entity} founded?"),
        values=tuple(str(y) for y in range(1700, 2000)),
    ),
)


# Attributes whose values come from large pools (issue 16: transfer, not answers). Their sentences and questions
# name the attribute plainly, so the question says what kind of value it wants but not which.
BROAD_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        name="owner",
        sentence="The owner of {entity} is {value}.",
        questions=("Who is the owner of {entity}?", "Who owns {entity}?"),
        pool="name",
    ),
    Attribute(
        name="code",
        sentence="The code word of {entity} is {value}.",
        questions=("What is the code word of {entity}?", "Which code word does {entity} use?"),
        pool="word",
    ),
    Attribute(
        name="occupation",
        sentence="The occupation of {entity} is {value}.",
        questions=("What is the occupation of {entity}?", "What does {entity} do for a living?"),
        pool="job",
    ),
    Attribute(
        name="shade",
        sentence="The shade of {entity} is {value}.",
        questions=("What is the shade of {entity}?", "Which shade does {entity} have?"),
        pool="color",
    ),
    Attribute(
        name="hometown",
        sentence="The hometown of {entity} is {value}.",
        questions=("What is the hometown of {entity}?", "Which town is the hometown of {entity}?"),
        pool="city",
    ),
    Attribute(
        name="number",
        sentence="The number of {entity} is {value}.",
        questions=("What is the number of {entity}?", "Which number does {entity} have?"),
        pool="number",
    ),
    Attribute(
        name="motto",
        sentence="The motto of {entity} is {value}.",
        questions=("What is the motto of {entity}?", "Which motto does {entity} have?"),
        pool="phrase",
    ),
)
ALL_ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES + BROAD_ATTRIBUTES}


class Fact(BaseModel):
    """One made-up fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str  # "<entity>.<attribute>"
    entity: str
    attribute: str
    value: str
    sentence: str  # the fact as a note line


class NotesSpec(BaseModel):
    """What notes world to generate (its JSON is part of the real kit's cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    num_entities: int = Field(default=900, ge=8)
    facts_per_entity: int = Field(default=2, ge=1, le=len(ATTRIBUTES))
    attributes: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)  # names in ALL_ATTRIBUTES
    value_test_share: float = Field(default=0.0, ge=0.0, lt=1.0)  # >0: test entities' values never occur in training
    test_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)  # entities held out (their questions are the test)
    device_shares: tuple[float, ...] = (0.45, 0.35, 0.45, 0.35)  # each device holds each fact with this chance
    pii_fraction: float = Field(default=0.3, ge=0.0, le=1.0)  # share of questions that carry personal details


class NotesWorld(BaseModel):
    """A generated notes world: facts, the entity split, and which device holds which fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: NotesSpec
    facts: tuple[Fact, ...]
    test_entities: tuple[str, ...]
    holders: dict[str, tuple[int, ...]]  # fact id -> the devices whose notes hold it

    def split(self, split: str) -> list[Fact]:
        """The facts of ``"train"`` or ``"test"`` entities."""
        test = set(self.test_entities)
        return [f for f in self.facts if (f.entity in test) == (split == "test")]

    def device_notes(self, device: int, split: str | None = None) -> list[str]:
        """The note lines of one device (only of ``split``'s entities when given), in a fixed shuffled order."""
        facts = self.split(split) if split is not None else list(self.facts)
        lines = [f.sentence for f in facts if device in self.holders[f.id]]
        random.Random(f"notes/{self.spec.seed}/{device}").shuffle(lines)
        return lines


def _attribute(name: str) -> Attribute:
    if name not in ALL_ATTRIBUTES:
        raise KeyError(f"unknown attribute {name!r}; choose from {sorted(ALL_ATTRIBUTES)}")
    return ALL_ATTRIBUTES[name]


def generate_notes_world(spec: NotesSpec) -> NotesWorld:
    """The notes world of this spec."""
    from ops.real.values import split_pool

    rng = random.Random(f"notes-world/{spec.seed}")
    attributes = [_attribute(a) for a in spec.attributes]
    exclude = {w.lower() for a in attributes for v in a.all_values() for w in v.split()}
    entities = entity_names(rng, spec.num_entities, exclude)
    order = list(entities)
    rng.shuffle(order)
    test = tuple(sorted(order[: max(1, round(len(order) * spec.test_fraction))]))
    test_set = set(test)
    pools = {a.name: split_pool(a.all_values(), spec.value_test_share, spec.seed) for a in attributes}
    facts: list[Fact] = []
    holders: dict[str, tuple[int, ...]] = {}
    for entity in entities:
        for attribute in rng.sample(attributes, min(spec.facts_per_entity, len(attributes))):
            train_values, test_values = pools[attribute.name]
            values = test_values if entity in test_set and spec.value_test_share > 0 else train_values
            fact, held = held_fact(rng, entity, attribute, rng.choice(values), spec.device_shares)
            facts.append(fact)
            holders[fact.id] = held
    return NotesWorld(spec=spec, facts=tuple(facts), test_entities=test, holders=holders)


def held_fact(
    rng: random.Random, entity: str, attribute: Attribute, value: str, device_shares: Sequence[float]
) -> tuple[Fact, tuple[int, ...]]:
    """One fact and the devices that hold it (each device with its share's chance, drawn from ``rng``)."""
    fact = Fact(
        id=f"{entity}.{attribute.name}",
        entity=entity,
        attribute=attribute.name,
        value=value,
        sentence=attribute.sentence.format(entity=entity, value=value),
    )
    return fact, tuple(d for d, share in enumerate(device_shares) if rng.random() < share)


def _option_pool(world: NotesWorld, attribute: Attribute) -> tuple[str, ...]:
    """Distractor options: the attribute's values on the fact's own side of the value split."""
    return attribute.all_values()


def make_questions(
    world: NotesWorld,
    facts: Iterable[Fact],
    salt: str,
    option_pools: Mapping[str, Sequence[str]] | None = None,
    task: str = "notes",
) -> list[Question]:
    """Per fact, one four-option question and one free-text question (each maybe with personal details);
    ``option_pools``: per attribute, the values distractors come from (default: the attribute's own)."""
    rng = random.Random(f"notes-questions/{world.spec.seed}/{salt}")
    out = []
    for fact in facts:
        attribute = _attribute(fact.attribute)
        for fmt in ("choice", "text"):
            stem = rng.choice(attribute.questions).format(entity=fact.entity)
            pii: tuple[str, ...] = ()
            if rng.random() < world.spec.pii_fraction:
                template = rng.choice(GREETINGS)
                details = person_details(rng)
                greeting = template.format(**details)
                pii = tuple(sorted((v for k, v in details.items() if "{" + k + "}" in template), key=greeting.index))
                stem = f"{greeting} {stem}"
            common = {"id": f"{salt}-{fact.id}-{fmt}", "stem": stem, "fact_id": fact.id, "entity": fact.entity}
            common |= {"attribute": fact.attribute, "pii": pii, "task": task}
            if fmt == "choice":
                pool = option_pools[fact.attribute] if option_pools else _option_pool(world, attribute)
                others = rng.sample([v for v in pool if v != fact.value], 3)
                options = [fact.value, *others]
                rng.shuffle(options)
                out.append(Question(options=tuple(options), answer=options.index(fact.value), **common))
            else:
                out.append(Question(answer=fact.value, **common))
    return out


def save_jsonl(path: Path, rows: Iterable[BaseModel]) -> None:
    """One JSON object per line (pydantic models)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(row.model_dump_json() + "\n" for row in rows))
