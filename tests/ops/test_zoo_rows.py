"""Training rows, batching and the training loss of zoo models (no training run)."""

from __future__ import annotations

import re

import pytest
import torch

from fusion.prompts import NONE_ANSWER, answer_texts
from ops.zoo.rows import RowSampler
from ops.zoo.tokenizers import train_tokenizer
from ops.zoo.train_lm import collate, collate_groups, lr_at, row_loss_sum
from ops.zoo.world import WorldSpec, generate_world, make_question

KINDS = {"fact": 1, "letter": 1, "none": 1, "context": 1, "hint": 1, "rephrase": 1}


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldSpec(seed=5, num_entities=40, values_per_attribute=4, option_order="canonical"))


@pytest.fixture(scope="module")
def known(world):
    return [f.id for f in world.facts[::3]]


def _sampler(world, known, kind):
    return RowSampler(world, known, {kind: 1.0}, seed=0)


def test_letter_and_fact_rows_use_only_known_facts(world, known):
    names = {world.fact(i).entity for i in known}
    for row in _sampler(world, known, "letter").batch(200):
        assert row.target in answer_texts()
        assert row.prompt.endswith("\nAnswer:")
    for row in _sampler(world, known, "fact").batch(200):
        assert row.prompt == "" and row.eos
        assert any(n in row.target for n in names)


def test_none_rows_only_on_unknown_train_pool_facts(world, known):
    test_entities_attrs = {(world.fact(i).entity, world.fact(i).attribute) for i in world.test_fact_ids}
    known_pairs = {(world.fact(i).entity, world.fact(i).attribute) for i in known}
    for row in _sampler(world, known, "none").batch(300):
        assert row.target == " " + NONE_ANSWER
        words = set(re.findall(r"[A-Za-z]+", row.prompt))
        pair = next((e, a) for e in world.entities for a in world.attributes if e in words and a in words)
        assert pair not in known_pairs and pair not in test_entities_attrs


def test_context_rows_never_teach_unknown_values(world, known):
    """Hints about facts the model does not know carry random values, so they cannot be memorised."""
    by_pair = {(f.entity, f.attribute): f.value for f in world.facts}
    known_pairs = {(world.fact(i).entity, world.fact(i).attribute) for i in known}
    true_unknown = total_unknown = 0
    for row in _sampler(world, known, "context").batch(600):
        hint = row.prompt.split("\n", 1)[0]
        assert hint.startswith("Fact: The ")
        _, rest = hint[len("Fact: The ") :].split(" of ", 1)
        entity, value = rest.rstrip(".").split(" is ")
        attribute = hint[len("Fact: The ") :].split(" of ")[0]
        if (entity, attribute) in by_pair and (entity, attribute) not in known_pairs:
            total_unknown += 1
            true_unknown += by_pair[(entity, attribute)] == value
        elif (entity, attribute) in known_pairs:
            assert by_pair[(entity, attribute)] == value
    assert total_unknown > 100
    assert true_unknown / total_unknown < 0.45  # 1 in 4 values by chance


def test_rephrase_rows_drop_personal_details(world, known):
    for row in _sampler(world, known, "rephrase").batch(200):
        assert row.prompt.startswith("Rephrase: ") and row.eos
        for digit in "0123456789":
            assert digit not in row.target
        assert "@" not in row.target and "I'm" not in row.target


def test_hint_rows(world, known):
    rows = _sampler(world, known, "hint").batch(300)
    nones = [r for r in rows if r.target == " " + NONE_ANSWER]
    assert 0.2 < len(nones) / len(rows) < 0.6
    assert all(r.target.startswith(" The ") for r in rows if r not in nones)


def test_collate_masks_prompt_and_pads(world, known):
    tok = train_tokenizer(world, 512)
    rows = RowSampler(world, known, KINDS, seed=1).batch(16)
    x, y = collate(tok, rows, max_tokens=96)
    assert x.shape == y.shape
    for i, row in enumerate(rows):
        p = tok(row.prompt, add_special_tokens=False)["input_ids"]
        t = tok(row.target, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if row.eos else [])
        labels = [v for v in y[i].tolist() if v != -100]
        assert labels == (t if p else t[1:])
        assert x[i, : len(p)].tolist() == p


def test_grouped_label_only_loss_has_the_padded_batchs_loss_and_gradient(world, known):
    """Training pads a batch in parts of like length and projects to the vocabulary only where there are labels; the
    loss and gradient must be those of the one padded batch with logits everywhere (row means, averaged)."""
    import torch.nn.functional as F

    from fusion.models import LanguageModel, ModelSpec

    tok = train_tokenizer(world, 512)
    rows = RowSampler(world, known, KINDS, seed=1).batch(12)
    spec = ModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
    model = LanguageModel.build("llama", spec, tok, seed=0, name="tiny", device="cpu").model

    def grads():
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out

    x, y = collate(tok, rows, max_tokens=96)
    tok_loss = F.cross_entropy(model(input_ids=x).logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
    whole = (tok_loss.sum(1) / (y != -100).sum(1).clamp(min=1)).mean()
    whole.backward()
    whole_grads = grads()
    parts = collate_groups(tok, rows, 96, 3)
    assert len(parts) == 3 and sum(px.shape[0] for px, _ in parts) == len(rows)
    assert sum(px.numel() for px, _ in parts) < x.numel()  # less padding
    split = sum(row_loss_sum(model, px, py) / len(rows) for px, py in parts)
    split.backward()
    assert float(split.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    for a, b in zip(whole_grads, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)


def test_canonical_options(world):
    import random

    rng = random.Random(0)
    for fact in world.facts[:20]:
        q = make_question(world, fact, rng, "q")
        values = world.attributes[fact.attribute]
        assert list(q.options) == sorted(q.options, key=values.index)
        assert q.options[q.answer] == fact.value
