"""PII redaction: every detail the toy world plants is removed, in every phrasing; metrics behave."""

from __future__ import annotations

import random

import pytest

from bus.errors import PrivacyError
from ops.zoo.world import CORES, GREETINGS, PHRASINGS, WorldSpec, generate_world, make_question, question_set
from privacy.redact import Detail, find_details, leak_rate, ngram_overlap, pii_recall, redact


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldSpec(seed=3, num_entities=40, values_per_attribute=4))


def test_every_phrasing_loses_all_planted_details(world):
    rng = random.Random(0)
    for phrasing in PHRASINGS:
        for _ in range(40):
            fact = rng.choice(world.facts)
            q = make_question(world, fact, rng, "q", phrasing=phrasing)
            red = redact(q.stem)
            assert leak_rate(red.text, q.pii) == 0.0, (q.stem, red.text)
            assert pii_recall(red.removed, q.pii) == 1.0, (q.stem, red.removed)
            # The question itself survives: entity and attribute still there, greeting gone.
            assert fact.entity in red.text and fact.attribute in red.text
            if q.pii:
                assert red.text in {c.format(entity=fact.entity, attribute=fact.attribute) for c in CORES}, red.text


def test_plain_stems_are_untouched(world):
    for q in question_set(world, "test"):
        if not q.pii:
            red = redact(q.stem)
            assert red.text == q.stem and red.removed == ()


def test_kinds_and_spans():
    text = "Hi, I'm Mara Velt (account ACC-483920). Mail mara.velt@mailo.net or call +1 555 013 2291."
    details = find_details(text)
    kinds = {d.kind: d.value for d in details}
    assert kinds == {
        "name": "Mara Velt",
        "account": "ACC-483920",
        "email": "mara.velt@mailo.net",
        "phone": "+1 555 013 2291",
    }
    for d in details:
        assert text[d.span[0] : d.span[1]] == d.value


@pytest.mark.parametrize(
    "text,value",
    [
        ("my name is Ivo Howay, what is 2+2?", "Ivo Howay"),
        ("Call me Suri. Which pet does Zorbin have?", "Suri"),
        ("card 4471-2290-1234-5678 please", "4471-2290-1234-5678"),
        ("ref 123456789", "123456789"),
        ("phone (555) 123-4567", "(555) 123-4567"),
    ],
)
def test_other_forms(text, value):
    red = redact(text)
    assert value not in red.text
    assert any(d.value == value for d in red.removed)


def test_greetings_cover_every_detail_field():
    fields = {f for g in GREETINGS for f in ("name", "account", "email", "phone") if "{" + f + "}" in g}
    assert fields == {"name", "account", "email", "phone"}


def test_metrics():
    assert pii_recall([], []) == 1.0
    assert pii_recall([Detail(kind="name", value="Mara Velt", span=(0, 9))], ["Mara Velt", "ACC-1"]) == 0.5
    assert leak_rate("hello Mara Velt", ["Mara Velt"]) == 1.0
    assert ngram_overlap("what is the color of Zorbin", "what is the color of Zorbin") == 1.0
    assert ngram_overlap("what is the color of Zorbin", "which color does Zorbin have") == 0.0
    assert ngram_overlap("a b c", "", 2) == 0.0
    with pytest.raises(PrivacyError):
        ngram_overlap("a", "b", 0)


def test_too_long_is_refused():
    with pytest.raises(PrivacyError):
        redact("x" * 200_000)
