"""The held-out tasks ``accuracy --real --task`` runs on a built kit (no retraining):

- ``notes``: the kit's own test questions (held-out entities; values seen in training);
- ``notes-unseen``: new entities AND values that never occur in the kit's world (``UNSEEN_ATTRIBUTES``: faker
  colours, towns, jobs, names and words of one to several tokens, minus every word of the kit's values), made at
  bench time from the kit's world spec and a seed; their facts join the devices' notes in memory, spread by the
  kit's own ``device_shares`` (some facts on no device);
- ``knowledge``: real-world facts the models partly know (``ops.real.knowledge``), no notes, one transmitter
  device per model.

Each task also has *calibration* questions on the training side (kit train entities; unseen entities kept out of
the test; knowledge facts kept out of the test) that set the receiver's self-check threshold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from fusion.notes import DeviceNotes
from fusion.prompts import Question
from ops.real.world import ALL_ATTRIBUTES, NotesWorld, held_fact, make_questions

TASKS: tuple[str, ...] = ("notes", "notes-unseen", "knowledge")
UNSEEN_ATTRIBUTES = {"color": "color", "city": "city", "job": "job", "owner": "name", "code": "word"}  # -> pool
UNSEEN_ENTITIES = 520  # one fact each; a quarter calibrates, the rest (~390 per format) is the test
UNSEEN_CALIBRATION_SHARE = 0.25


@dataclass
class BenchTask:
    """What one task runs: its test and calibration questions, the devices asked and what they read."""

    name: str
    test: list[Question]
    calibration: list[Question]
    devices: list[str]  # the transmitter devices rows use, in order
    notes: dict[str, DeviceNotes] = field(default_factory=dict)  # device -> notes it reads (empty: no notes)
    holders: dict[str, list[str]] = field(default_factory=dict)  # fact id -> the devices whose notes hold it
    candidates: dict[str, tuple[str, ...]] = field(default_factory=dict)  # question id -> its candidate values

    def holding(self, q: Question) -> list[str]:
        """The devices whose notes hold ``q``'s fact (unknown facts: those whose notes cover ``q`` fully)."""
        if q.fact_id in self.holders:
            return list(self.holders[q.fact_id])
        return [d for d in self.devices if d in self.notes and self.notes[d].retrieve(q.stem).coverage >= 0.999]

    def values_of(self, q: Question) -> tuple[str, ...]:
        """The values ``q`` could have (the ``contains`` grade's other candidates)."""
        if q.id in self.candidates:
            return self.candidates[q.id]
        if q.options:
            return q.options
        return ALL_ATTRIBUTES[q.attribute].all_values() if q.attribute in ALL_ATTRIBUTES else ()


def bench_task(name: str, kit, fed, seed: int = 0, questions: list[Question] | None = None) -> BenchTask:
    """The task ``name`` on a kit and its federation (``questions``: a user's file instead of the task's test)."""
    if name == "notes":
        task = _notes(kit, fed)
    elif name == "notes-unseen":
        task = unseen_task(kit, fed, seed)
    elif name == "knowledge":
        task = knowledge_task(kit, seed)
    else:
        from bus.errors import ConfigError

        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}", task=name)
    if questions is not None:
        task.test = questions
    return task


def _world_holders(world: NotesWorld, devices: list[str]) -> dict[str, list[str]]:
    return {fid: [devices[i] for i in held if i < len(devices)] for fid, held in world.holders.items()}


def _notes(kit, fed) -> BenchTask:
    devices = list(fed.transmitters)
    train = list(kit.world.split("train"))
    random.Random(f"calibration/{kit.spec.seed}").shuffle(train)
    calibration = make_questions(kit.world, train[:200], "calib")
    return BenchTask(
        "notes", kit.test_questions(), calibration, devices, dict(fed.notes), _world_holders(kit.world, devices)
    )


def unseen_pools(world: NotesWorld) -> dict[str, tuple[str, ...]]:
    """Per unseen attribute, its values that share no word with any value or entity of ``world``."""
    from ops.real.values import value_pool

    seen = {w.lower() for a in world.spec.attributes for v in ALL_ATTRIBUTES[a].all_values() for w in v.split()}
    seen |= {f.entity.lower() for f in world.facts}
    return {
        a: tuple(v for v in value_pool(kind) if not {w.lower() for w in v.split()} & seen)
        for a, kind in UNSEEN_ATTRIBUTES.items()
    }


def unseen_world(world: NotesWorld, seed: int = 0, num_entities: int = UNSEEN_ENTITIES) -> NotesWorld:
    """New entities (none of ``world``'s), one fact each with an unseen value, held by devices as ``world`` holds
    facts (its spec's ``device_shares``); its ``test_entities`` are the test side, the rest calibrates."""
    from ops.zoo.world import entity_names

    rng = random.Random(f"unseen-world/{world.spec.seed}/{seed}")
    pools = unseen_pools(world)
    exclude = {f.entity for f in world.facts} | {w for vals in pools.values() for v in vals for w in v.split()}
    entities = entity_names(rng, num_entities, exclude)
    names = list(UNSEEN_ATTRIBUTES)
    facts, holders = [], {}
    for i, entity in enumerate(entities):
        attribute = ALL_ATTRIBUTES[names[i % len(names)]]
        fact, held = held_fact(rng, entity, attribute, rng.choice(pools[attribute.name]), world.spec.device_shares)
        facts.append(fact)
        holders[fact.id] = held
    order = list(entities)
    rng.shuffle(order)
    test = tuple(sorted(order[round(len(order) * UNSEEN_CALIBRATION_SHARE) :]))
    return NotesWorld(spec=world.spec, facts=tuple(facts), test_entities=test, holders=holders)


def unseen_task(kit, fed, seed: int = 0) -> BenchTask:
    """``notes-unseen``: the unseen world's facts added to every device's notes (in memory), its questions."""
    devices = list(fed.transmitters)
    world = unseen_world(kit.world, seed)
    notes = {}
    for d, name in enumerate(devices):
        lines = list(fed.notes[name].lines) + world.device_notes(d)
        random.Random(f"unseen-notes/{seed}/{name}").shuffle(lines)
        notes[name] = DeviceNotes(lines)
    pools = unseen_pools(kit.world)
    test = make_questions(world, world.split("test"), "unseen", pools, task="notes-unseen")
    calibration = make_questions(world, world.split("train"), "unseen-calib", pools, task="notes-unseen")
    candidates = {q.id: q.options or pools[q.attribute] for q in test + calibration}
    return BenchTask("notes-unseen", test, calibration, devices, notes, _world_holders(world, devices), candidates)


def knowledge_task(kit, seed: int = 0) -> BenchTask:
    """``knowledge``: real-world facts of ``KNOWLEDGE_CATEGORIES``, no notes, the first device of each model."""
    from ops.real.knowledge import KNOWLEDGE_CATEGORIES, knowledge_questions, known_facts, split_facts

    facts = tuple(f for f in known_facts() if f.category in KNOWLEDGE_CATEGORIES)
    calibration_facts, test_facts = split_facts(facts, seed)
    test, candidates = knowledge_questions(test_facts, "knowledge", seed)
    calibration, more = knowledge_questions(calibration_facts, "knowledge-calib", seed)
    first: dict[str, str] = {}
    for device, model in kit.spec.devices.items():
        first.setdefault(model, device)
    return BenchTask("knowledge", test, calibration, list(first.values()), candidates=candidates | more)
