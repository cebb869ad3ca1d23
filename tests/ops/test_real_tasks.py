"""The held-out tasks of ``accuracy --real --task``: unseen entities and values, pretrained knowledge, and the
benchmark's rows on a tiny real-style kit (containment beside exact match, either-right, the self-check row)."""

from __future__ import annotations

import argparse

import pytest

from bus.errors import ConfigError
from fusion.notes import DeviceNotes
from ops.real.kit import KIT_ATTRIBUTES
from ops.real.knowledge import KNOWLEDGE_CATEGORIES, knowledge_questions, known_facts, split_facts
from ops.real.tasks import UNSEEN_ATTRIBUTES, unseen_pools, unseen_world
from ops.real.world import ALL_ATTRIBUTES, NotesSpec, generate_notes_world, make_questions


def test_unseen_entities_and_values_never_occur_in_the_kit_world_and_spread_over_devices() -> None:
    world = generate_notes_world(NotesSpec(num_entities=120, attributes=KIT_ATTRIBUTES))
    unseen = unseen_world(world, seed=3, num_entities=300)
    assert unseen == unseen_world(world, seed=3, num_entities=300)  # a pure function of the world and the seed
    seen_words = {w.lower() for a in KIT_ATTRIBUTES for v in ALL_ATTRIBUTES[a].all_values() for w in v.split()}
    assert not {f.entity for f in unseen.facts} & {f.entity for f in world.facts}
    assert all(not {w.lower() for w in f.value.split()} & seen_words for f in unseen.facts)
    assert {f.attribute for f in unseen.facts} == set(UNSEEN_ATTRIBUTES)
    assert max(len(f.value.split()) for f in unseen.facts) >= 2  # one to several words
    held_by = [sum(d in unseen.holders[f.id] for f in unseen.facts) / len(unseen.facts) for d in range(4)]
    assert all(abs(got - want) < 0.12 for got, want in zip(held_by, world.spec.device_shares, strict=True))
    assert any(not unseen.holders[f.id] for f in unseen.facts)  # some facts are on no device
    test, calibration = unseen.split("test"), unseen.split("train")
    assert test and calibration and not {f.entity for f in test} & {f.entity for f in calibration}
    pools = unseen_pools(world)
    questions = make_questions(unseen, test, "u", pools, task="notes-unseen")
    assert all(q.task == "notes-unseen" for q in questions)
    assert all(set(q.options) <= set(pools[q.attribute]) for q in questions if q.options)
    fact = next(f for f in test if 0 in unseen.holders[f.id])
    notes = DeviceNotes(world.device_notes(0) + unseen.device_notes(0))
    stem = next(q.stem for q in questions if q.fact_id == fact.id and q.format == "text")
    assert notes.retrieve(stem).lines[0] == fact.sentence


def test_knowledge_facts_split_by_subject_and_ask_both_formats() -> None:
    facts = known_facts()
    assert set(KNOWLEDGE_CATEGORIES) <= {f.category for f in facts} and len(facts) > 500
    assert any(f.id == "state.Ohio" and f.answer == "OH" for f in facts)  # the state codes line up
    assert any(f.id == "symbol.iron" and f.answer == "Fe" for f in facts)
    calibration, test = split_facts(facts)
    assert not {f.id for f in calibration} & {f.id for f in test} and len(calibration) < len(test)
    questions, candidates = knowledge_questions(test[:10], "k")
    assert len(questions) == 20 and {q.format for q in questions} == {"choice", "text"}
    for q in questions:
        assert q.task == "knowledge" and len(candidates[q.id]) == 4
        answer = q.options[q.answer] if q.options else q.answer
        assert answer in candidates[q.id]


def _args(root, **kw) -> argparse.Namespace:
    base = dict(quick=False, kit=root, receiver_model="m1", questions=None, limit=2, precision="fp16", threads=1)
    return argparse.Namespace(**(base | {"json": None, "calibrate": 2} | kw))


@pytest.mark.parametrize("task", ["notes-unseen", "knowledge"])
def test_accuracy_real_runs_a_task_with_containment_and_the_self_check(tiny_real_kit, monkeypatch, task) -> None:
    from ops.bench.realacc import run_real

    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    devices = 2 if task == "knowledge" else 4
    wanted = f"receiver,c2c-shuffled,c2c+{devices} self-check" + (",either-right" if task == "knowledge" else "")
    result = run_real(_args(root, task=task, rows=wanted))
    assert result["task"] == task and set(result["self_check"]) == {f"c2c+{devices} self-check"}
    assert set(result["self_check"][f"c2c+{devices} self-check"]) == {"choice", "text"}
    rows = {(r["label"], r["format"]): r for r in result["rows"]}
    labels = {label for label, _ in rows}
    assert f"c2c+{devices}" in labels and "receiver" in labels  # the rows a derived row reads run too
    assert ("ceiling" in labels) is False and all(r["task"] == task and r["n"] == 2 for r in rows.values())
    for (_, fmt), row in rows.items():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["contains"] <= 1
        if fmt == "choice":
            assert row["contains"] == row["accuracy"]
        else:
            assert row["contains"] >= row["accuracy"]  # an exact match always contains the answer
    for (label, fmt), row in rows.items():  # every row against the receiver alone, question by question
        assert set(row["paired"]) == (set() if label == "receiver" else {"receiver"})
        if label != "receiver":
            p = row["paired"]["receiver"]
            assert p["diff"] == pytest.approx(row["accuracy"] - rows[("receiver", fmt)]["accuracy"], abs=1e-3)
    if task == "knowledge":
        assert result["devices_used"] == ["a1", "b1"]  # one device per model: no notes, so two would be twins
        for fmt in ("choice", "text"):
            parts = [rows[(label, fmt)]["contains"] for label in ("receiver", "alone:a1", "alone:b1")]
            assert rows[("either-right", fmt)]["contains"] >= max(parts)
    with pytest.raises(ConfigError, match="unknown rows"):
        run_real(_args(root, task=task, rows="receiver,nonsense"))


def test_paired_difference_counts_the_questions_that_changed() -> None:
    from ops.bench.realacc import paired

    same = [True, False] * 50
    assert paired(same, same) == {"diff": 0.0, "ci95": 0.0, "better": 0, "worse": 0}
    one_worse = list(same)
    one_worse[0] = False  # one question of 100 lost
    got = paired(one_worse, same)
    assert got["diff"] == -0.01 and got["worse"] == 1 and got["better"] == 0
    assert got["ci95"] < 0.03 < 1.96 * (0.25 / 100) ** 0.5  # far tighter than an unpaired interval (~0.1)


def test_a_precision_or_private_row_is_also_paired_with_the_fp16_row_of_its_devices() -> None:
    from ops.bench.realacc import _paired_bases

    labels = {"receiver", "c2c+4", "int4", "private", "c2c-shuffled"}
    spec = {"label": "int4", "mode": "c2c", "transmitters": ["a", "b", "c", "d"], "private": False}
    assert _paired_bases(spec, labels) == ["receiver", "c2c+4"]
    assert _paired_bases(spec | {"label": "private", "private": True}, labels) == ["receiver", "c2c+4"]
    assert _paired_bases(spec | {"label": "c2c-shuffled", "mode": "c2c-shuffled"}, labels) == ["receiver"]
    assert _paired_bases(spec | {"label": "c2c+4"}, labels) == ["receiver"]
    translate = {"receiver", "translate+4", "translate-int4", "translate-private", "translate-shuffled"}
    t_spec = spec | {"label": "translate-int4", "mode": "translate", "precision": "int4"}
    assert _paired_bases(t_spec, translate) == ["receiver", "translate+4"]
    assert _paired_bases(t_spec | {"label": "translate-private", "private": True}, translate) == [
        "receiver",
        "translate+4",
    ]
    assert _paired_bases(t_spec | {"label": "translate+4"}, translate) == ["receiver"]


def test_accuracy_real_translate_rows_send_the_notes_cache_translated(tiny_real_kit, monkeypatch) -> None:
    from ops.bench.realacc import run_real
    from ops.real.kit import open_kit

    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    kit = open_kit(root)
    assert set(kit.manifest["done"]["translators"]) == {"m1->m1", "m2->m1", "m1->m2", "m2->m2"}
    fed = kit.federation("m1")
    assert len(fed.translators) == 2  # one per transmitter model: the identity into itself and m2's
    wanted = "receiver,translate-shuffled,translate-oracle,translate-int4,translate-every,translate-w8"
    wanted += ",translate+4 self-check"
    result = run_real(_args(root, task="notes", rows=wanted))
    rows = {(r["label"], r["format"]): r for r in result["rows"]}
    assert {label for label, _ in rows} == set(wanted.split(",")) | {"translate+4"}
    assert set(result["self_check"]) == {"translate+4 self-check"}
    for fmt in ("choice", "text"):
        assert rows[("translate+4", fmt)]["bytes_per_question"] > rows[("translate-int4", fmt)]["bytes_per_question"]
        assert (
            rows[("translate+4", fmt)]["bytes_per_question"] > 0 and rows[("receiver", fmt)]["bytes_per_question"] == 0
        )
        assert set(rows[("translate-int4", fmt)]["paired"]) == {"receiver", "translate+4"}
        assert set(rows[("translate-every", fmt)]["paired"]) == {"receiver", "translate+4"}
        assert rows[("translate-every", fmt)]["bytes_per_question"] >= rows[("translate+4", fmt)]["bytes_per_question"]
        assert set(rows[("translate-w8", fmt)]["paired"]) == {"receiver", "translate+4"}
    assert {t["weights"] for t in result["translators"] if t["params"]} == {"int8"}


def test_a_translator_reads_training_facts_and_generic_prose_never_a_test_entity() -> None:
    from ops.real.data import generic_paragraphs, translator_blocks, translator_tune_items

    world = generate_notes_world(NotesSpec(num_entities=120, attributes=KIT_ATTRIBUTES))
    prose = generic_paragraphs(50, seed=1)
    assert prose == generic_paragraphs(50, seed=1) and len(prose) == 50 and len(set(prose)) == 50
    assert all(80 <= len(p) <= 260 and p.isascii() for p in prose)
    blocks = translator_blocks(world, 40, 10, seed=1)
    assert len(blocks) == 50 and all(len(b) == 3 for b in blocks[:40]) and all(len(b) == 1 for b in blocks[40:])
    test = set(world.test_entities)
    text = " ".join(line for b in blocks for line in b)
    assert not any(f" {e} " in f" {text} " or f" {e}." in text for e in test)
    items = translator_tune_items(world, 30, 5, seed=1)
    assert len(items) == 35 and not any(e in " ".join(i.lines) + i.stem for i in items for e in test)
    facts = {f.sentence: f for f in world.facts}
    sentences = translator_tune_items(world, 30, 5, seed=1, sentences=1.0)
    for item, said in zip(items[:30], sentences[:30], strict=True):  # a question about one of its three lines
        about = [facts[line] for line in item.lines if facts[line].entity in item.stem]
        assert about and item.answer == about[0].value  # the kit's: the bare value
        assert (said.lines, said.stem, said.answer) == (item.lines, item.stem, about[0].sentence)  # same draws
    assert all(i.answer == i.lines[0] for i in items[30:])  # generic prose: written back


def test_held_by_keeps_the_questions_those_devices_hold_and_their_notes_only(tiny_real_kit, monkeypatch) -> None:
    from ops.bench.realacc import run_real

    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    result = run_real(_args(root, task="notes", rows="receiver,ceiling,translate-oracle", held_by="b1,b2", limit=3))
    assert result["held_by"] == ["b1", "b2"]
    assert {r["label"] for r in result["rows"]} == {"receiver", "ceiling", "translate-oracle"}
    assert all(r["n"] > 0 for r in result["rows"])
    with pytest.raises(ConfigError, match="unknown devices"):
        run_real(_args(root, task="notes", rows="receiver", held_by="nobody"))
