"""The quick zoo: builds (or loads), its manifest is complete, its models know their facts."""

from __future__ import annotations

import json

import pytest

from bus.errors import ConfigError, ModelError
from fusion.prompts import format_hint_request, format_rephrase_request, is_none
from ops.zoo.evaluate import evaluate_questions
from ops.zoo.spec import quick_spec

pytestmark = pytest.mark.slow


def test_manifest_complete(quick_zoo):
    m = quick_zoo.manifest
    assert m.key == quick_spec(0).key()
    assert quick_zoo.receiver == "receiver" and len(quick_zoo.transmitters) == 4
    archs = {e.arch for e in m.models}
    assert {"qwen3", "llama", "qwen2"} <= archs
    assert quick_zoo.entry("receiver").arch == "qwen3"
    assert len({e.tokenizer_vocab for e in m.models}) >= 4  # different vocabularies
    assert len({e.fingerprint for e in m.models}) == len(m.models)
    assert not set(m.splits["train"]) & set(m.splits["test"])
    n_facts = len(quick_zoo.world.facts)
    receiver_known = len(quick_zoo.known("receiver"))
    assert receiver_known < 0.25 * n_facts
    covered = set().union(*(quick_zoo.known(t) for t in quick_zoo.transmitters))
    assert len(covered) >= 0.85 * n_facts
    sizes = sorted(len(quick_zoo.known(t)) for t in quick_zoo.transmitters)
    assert sizes[0] < sizes[-1]  # one transmitter deliberately weaker
    for e in m.models:
        assert quick_zoo.path(e.name).joinpath("config.json").is_file()


def test_questions_saved(quick_zoo):
    test, train = quick_zoo.questions("test"), quick_zoo.questions("train")
    assert {q.fact_id for q in test} == set(quick_zoo.manifest.splits["test"])
    assert {q.fact_id for q in train} == set(quick_zoo.manifest.splits["train"])
    with pytest.raises(ConfigError):
        quick_zoo.questions("dev")


def test_models_beat_chance_on_known_facts(quick_zoo):
    questions = quick_zoo.questions("train") + quick_zoo.questions("test")
    for name in quick_zoo.names:
        lm = quick_zoo.model(name, device="cpu")
        assert lm.fingerprint == quick_zoo.entry(name).fingerprint
        known = quick_zoo.known(name)
        own = [q for q in questions if q.fact_id in known]
        other = [q for q in questions if q.fact_id not in known][: len(own)]
        r = evaluate_questions(lm, own + other, set(known))
        assert r["acc_known"] > 0.45, (name, r)  # chance is 0.25
        if name in quick_zoo.transmitters:
            assert r["p_none_unknown"] > r["p_none_known"] + 0.3, (name, r)


def test_generation_formats(quick_zoo):
    q = next(q for q in quick_zoo.questions("train") if q.pii)
    receiver = quick_zoo.model("receiver", device="cpu")
    plain = receiver.generate(format_rephrase_request(q.stem), max_new_tokens=24)
    assert q.entity.lower()[:3] in plain.lower() or plain.strip(), plain
    t = quick_zoo.transmitters[0]
    lm = quick_zoo.model(t, device="cpu")
    unknown = [x for x in quick_zoo.questions("train") if x.fact_id not in quick_zoo.known(t)]
    answers = [lm.generate(format_hint_request(x.stem), max_new_tokens=16) for x in unknown[:10]]
    assert sum(is_none(a) for a in answers) >= 5, answers


def test_unknown_model_name(quick_zoo):
    with pytest.raises(ModelError):
        quick_zoo.model("nope")


def test_check_recorded(quick_zoo):
    assert set(quick_zoo.manifest.check) == set(quick_zoo.names)
    assert json.loads(quick_zoo.manifest.model_dump_json())["format_version"] >= 1


def test_standalone_benchmark(quick_zoo):
    import argparse

    from ops.bench import standalone

    parser = argparse.ArgumentParser()
    standalone.add_arguments(parser)
    result = standalone.run(parser.parse_args(["--quick"]))
    rows = {r["name"]: r for r in result["models"]}
    assert set(rows) == set(quick_zoo.names)
    for r in rows.values():
        for key in ("name", "role", "arch", "params", "tokenizer_vocab", "acc_known", "acc_unknown", "acc_all", "n"):
            assert key in r
        assert r["n"] == len(quick_zoo.questions("test"))
        assert 0.0 <= r["acc_all"] <= 1.0
    assert rows["receiver"]["role"] == "receiver" and rows["receiver"]["p_none_known"] is not None


def test_member_keys_change_only_with_what_trains_that_member(tmp_path) -> None:
    """A build reuses a model trained by an earlier one only when its member key (world, shares, own spec) is equal."""
    from ops.zoo.build import TRAIN_RECORD, _reusable, member_key

    spec = quick_spec(0)
    rx = spec.member("receiver")
    mix = {**rx.train.mixture, "none": 0.3}
    other_rx = rx.model_copy(update={"train": rx.train.model_copy(update={"mixture": mix})})
    changed = spec.model_copy(update={"members": (other_rx, *spec.members[1:])})
    assert member_key(changed, "receiver") != member_key(spec, "receiver")
    assert all(member_key(changed, m.name) == member_key(spec, m.name) for m in spec.members[1:])
    wider = spec.model_copy(update={"overlap": 0.1})  # who knows what changes for everyone
    assert all(member_key(wider, m.name) != member_key(spec, m.name) for m in spec.members)
    assert member_key(quick_spec(1), "t1-llama") != member_key(spec, "t1-llama")
    done = tmp_path / "aaaa" / "models" / "t1-llama"
    done.mkdir(parents=True)
    (done / TRAIN_RECORD).write_text(json.dumps({"seconds": 1.0, "member_key": member_key(spec, "t1-llama")}))
    found = _reusable(changed, "t1-llama", tmp_path)
    assert found is not None and found[0] == done and found[1]["seconds"] == 1.0
    assert _reusable(wider, "t1-llama", tmp_path) is None and _reusable(changed, "t2-qwen2", tmp_path) is None
    staging = tmp_path / "bbbb.building" / "models" / "t2-qwen2"  # a build in progress is never a source
    staging.mkdir(parents=True)
    (staging / TRAIN_RECORD).write_text(json.dumps({"member_key": member_key(spec, "t2-qwen2")}))
    assert _reusable(spec, "t2-qwen2", tmp_path) is None
