"""The toy world: deterministic per seed, disjoint splits, well-formed questions; tokenizers."""

from __future__ import annotations

import random

import pytest

from bus.errors import ModelError
from fusion.prompts import LETTERS, NONE_ANSWER, answer_texts
from ops.zoo.tokenizers import check_answer_tokens, train_tokenizer
from ops.zoo.world import (
    PHRASINGS,
    WorldSpec,
    assign_knowledge,
    generate_world,
    load_questions,
    make_question,
    question_set,
    save_questions,
)

SPEC = WorldSpec(seed=7, num_entities=40, values_per_attribute=4)


@pytest.fixture(scope="module")
def world():
    return generate_world(SPEC)


def test_deterministic_per_seed(world):
    again = generate_world(SPEC)
    assert again == world
    assert question_set(again, "test") == question_set(world, "test")
    other = generate_world(SPEC.model_copy(update={"seed": 8}))
    assert other.entities != world.entities
    assert question_set(other, "test") != question_set(world, "test")


def test_world_shape(world):
    assert len(world.entities) == len(set(world.entities)) == 40
    assert len(world.attributes) >= 4 and all(len(v) >= 4 for v in world.attributes.values())
    assert len(world.facts) == 40 * len(world.attributes)
    assert len({f.id for f in world.facts}) == len(world.facts)
    # Balanced values: every value of an attribute used equally often.
    for attribute, values in world.attributes.items():
        counts = [sum(1 for f in world.facts if f.attribute == attribute and f.value == v) for v in values]
        assert max(counts) - min(counts) <= 1


def test_splits_disjoint_and_complete(world):
    train, test = set(world.train_fact_ids), set(world.test_fact_ids)
    assert not train & test
    assert train | test == {f.id for f in world.facts}
    assert abs(len(test) / len(world.facts) - SPEC.test_fraction) < 0.02
    assert {q.fact_id for q in question_set(world, "test")} == test
    assert {q.fact_id for q in question_set(world, "train")} == train


def test_questions_well_formed(world):
    qs = question_set(world, "test")
    assert len(qs) == len(world.test_fact_ids) * SPEC.questions_per_fact
    assert len({q.id for q in qs}) == len(qs)
    keys = [q.answer for q in qs]
    assert max(keys.count(i) for i in range(4)) - min(keys.count(i) for i in range(4)) <= 1  # balanced letters
    for q in qs:
        fact = world.fact(q.fact_id)
        assert q.options[q.answer] == fact.value
        assert all(o in world.attributes[fact.attribute] for o in q.options)
        assert fact.entity in q.stem and fact.attribute in q.stem
        assert all(p in q.stem for p in q.pii)
        assert q.prompt().endswith("\nAnswer:") and "A) " in q.prompt()
    with_pii = sum(1 for q in qs if q.pii)
    assert 0.25 < with_pii / len(qs) < 0.75


def test_every_phrasing_renders(world):
    rng = random.Random(0)
    for phrasing in PHRASINGS:
        q = make_question(world, world.facts[0], rng, "x", phrasing=phrasing)
        assert q.phrasing == phrasing
        assert bool(q.pii) == ("g" in phrasing)


def test_questions_roundtrip_jsonl(world, tmp_path):
    qs = question_set(world, "train")[:10]
    save_questions(tmp_path / "q.jsonl", qs)
    assert load_questions(tmp_path / "q.jsonl") == qs


def test_assign_knowledge(world):
    shares = {"@r": 0.15, "a": 0.3, "b": 0.3, "c": 0.3}
    know = assign_knowledge(world, shares, overlap=0.05, seed=0)
    assert know == assign_knowledge(world, shares, overlap=0.05, seed=0)
    n = len(world.facts)
    assert len(know["r"]) == round(0.15 * n)
    covered = set(know["a"]) | set(know["b"]) | set(know["c"])
    assert len(covered) >= 0.9 * n
    for name in "abc":
        assert round(0.3 * n) <= len(know[name]) <= round(0.35 * n)


@pytest.mark.parametrize("vocab", [512, 640, 768, 1024])
def test_tokenizers_single_token_answers(world, vocab):
    tok = train_tokenizer(world, vocab)
    ids = check_answer_tokens(tok)
    assert len(ids) == len(LETTERS) + 1 and f" {NONE_ANSWER}" in ids
    for text in answer_texts(with_none=True):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_tokenizers_differ_and_are_deterministic(world):
    a, b = train_tokenizer(world, 512), train_tokenizer(world, 1024)
    assert train_tokenizer(world, 512).backend_tokenizer.to_str() == a.backend_tokenizer.to_str()
    name = " " + world.entities[0]
    assert len(a(name)["input_ids"]) > len(b(name)["input_ids"])


def test_tiny_vocab_is_refused(world):
    with pytest.raises(ModelError):
        train_tokenizer(world, 100)
