"""``python -m fusion.train``: a fuser for any pair, and a gate, from a JSONL file, on tiny GGUF models."""

from __future__ import annotations

import json

import pytest

from fusion.models import LanguageModel
from fusion.registry import FuserRegistry, load_fuser
from fusion.train_cli import main
from tests.fusion.tiny_gguf import write_tiny_gguf

ROWS = [
    {
        "stem": "What is the color of Zorbin?",
        "answer": "teal",
        "notes": ["The color of Zorbin is teal."],
        "coverage": 1,
    },
    {"stem": "Where is Kalu located?", "answer": "Oslo", "notes": ["Kalu is located in Oslo."], "coverage": 1.0},
    {"stem": "Which metal is Brenna made of?", "answer": "tin", "notes": ["Brenna is made of tin."], "coverage": 1.0},
    {"stem": "What is the color of Glorp?", "answer": "red", "notes": ["The color of Zorbin is teal."], "keep": True},
    {
        "stem": "I'm Ann Velt. What is the color of Vex?",
        "shared_stem": "What is the color of Vex?",
        "answer": 2,
        "options": ["red", "blue", "gold"],
        "notes": ["The color of Vex is gold."],
        "coverage": 1.0,
    },
    {
        "stem": "What is the mascot of Tib?",
        "answer": "fox",
        "notes": ["The mascot of Tib is a fox."],
        "split": "held-out",
    },
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    receiver = write_tiny_gguf(LanguageModel.load("tiny-llama"), root / "receiver.gguf")
    tiny = LanguageModel.load("tiny-llama")
    with_notes = LanguageModel(tiny.model, tiny.tokenizer, "t")
    with_notes.model.model.norm.weight.data.mul_(1.5)  # another model than the receiver (another fingerprint)
    transmitter = write_tiny_gguf(with_notes, root / "transmitter.gguf")
    return str(receiver), str(transmitter)


def _data(tmp_path, rows=ROWS):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_fuser_for_a_pair_is_trained_saved_and_measured(models, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    receiver, transmitter = models
    args = ["--receiver", receiver, "--transmitter", transmitter, "--data", str(_data(tmp_path)), "--out"]
    assert main([*args, str(tmp_path / "fusers"), "--steps", "3", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    r, t = LanguageModel.load(receiver), LanguageModel.load(transmitter)
    registry = FuserRegistry(tmp_path / "fusers")
    assert registry.pairs() == [(t.fingerprint, r.fingerprint)]
    path = registry.path_for(t.fingerprint, r.fingerprint)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    fuser, meta = load_fuser(path, t.fingerprint, r.fingerprint)
    assert fuser.cfg.window == 1 and fuser.cfg.fuse_last and fuser.cfg.rms_scale  # a text-style receiver
    assert meta["steps"] == 3 and meta["held_out"]["n"] == 1 and result["params"] == meta["params"]
    assert result["bytes_fp16"] == 2 * result["params"]
    # the gate over two named transmitters, once the fusers are there
    gate_rows = [
        {"stem": r["stem"], "answer": "x", "notes": {"d1": {"lines": r["notes"], "coverage": 1.0}, "d2": {"lines": []}}}
        for r in ROWS[:3]
    ]
    names = ["--transmitter", f"d1={transmitter}", "--transmitter", f"d2={transmitter}"]
    code = main(["--gate", "--receiver", receiver, *names, "--data", str(_data(tmp_path, gate_rows))])
    assert code == 2  # --out is required
    out = ["--out", str(tmp_path / "fusers")]
    assert main(["--gate", "--receiver", receiver, *names, "--data", str(_data(tmp_path, gate_rows)), *out]) == 0
    assert registry.has_gate(r.fingerprint)


def test_bad_data_and_flags_are_one_line_errors(models, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    receiver, transmitter = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stem": "x", "answer": "y"}\n{"stem": "", "answer": "y"}\n')
    base = ["--receiver", receiver, "--transmitter", transmitter, "--out", str(tmp_path / "f")]
    assert main([*base, "--data", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main([*base, "--data", str(_data(tmp_path)), "--window", "zero"]) == 2
    assert "--window" in capsys.readouterr().err
    assert (
        main(
            [
                "--receiver",
                "no-such-model",
                "--transmitter",
                transmitter,
                "--data",
                str(_data(tmp_path)),
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 2
    )
    assert "no model at" in capsys.readouterr().err


def test_a_translator_for_a_pair_from_plain_text_and_the_identity_for_a_model_into_itself(
    models, tmp_path, monkeypatch, capsys
) -> None:
    from fusion.translate import load_translator

    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    receiver, transmitter = models
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"The color of Zorbin{i} is teal.\nKalu{i} is located in Oslo.\n" for i in range(6)))
    base = ["--translator", "--receiver", receiver, "--data", str(text), "--out", str(tmp_path / "reg")]
    assert (
        main([*base, "--transmitter", transmitter, "--rank", "4", "--lines-per-block", "2", "--tune-steps", "3"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    r, t = LanguageModel.load(receiver), LanguageModel.load(transmitter)
    path = FuserRegistry(tmp_path / "reg").translator_path(t.fingerprint, r.fingerprint)
    translator, meta = load_translator(path, t.fingerprint, r.fingerprint)
    assert meta["blocks"] == 6 and translator.cfg.rank == 4 and result["params"] == meta["params"] > 0
    assert meta["tune_steps"] == 3 and meta["tune_items"] == 6 and meta["tune_loss_last"] > 0  # each block repeated
    assert meta["weights"] == result["weights"] == "int8" and result["bytes"] < result["bytes_fp16"]
    assert not (tmp_path / "reg" / f"rows-{t.fingerprint}-to-{r.fingerprint}.pt").exists()  # checkpoint removed
    assert main([*base, "--transmitter", receiver]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == 0 and FuserRegistry(tmp_path / "reg").load_translator(r.fingerprint, r.fingerprint)
    assert main([*base, "--transmitter", transmitter, "--gate"]) == 2
    assert "two different jobs" in capsys.readouterr().err
    assert main([*base, "--transmitter", transmitter, "--lines-per-block", "0"]) == 2
    assert main([*base, "--transmitter", transmitter, "--tune-steps", "-1"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = ["--translator", "--receiver", receiver, "--transmitter", transmitter, "--data", str(empty), "--out", "x"]
    assert main(args) == 2
    assert "no text lines" in capsys.readouterr().err
