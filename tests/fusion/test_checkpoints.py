"""--model takes a .gguf file (converted once, cached by content), a Hugging Face directory or a tiny name."""

from __future__ import annotations

import json

import pytest
import torch

from bus.errors import ModelError
from fusion.checkpoints import SOURCE_FILE, converted_dir
from fusion.models import LanguageModel
from tests.fusion.tiny_gguf import same_logits, write_tiny_gguf

CHAT = (
    "{% for m in messages %}<|im|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im|>assistant\n{% endif %}"
)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREFINE_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def tiny():
    return LanguageModel.load("tiny-llama")


def test_a_gguf_file_is_converted_once_and_equals_the_model_it_was_written_from(home, tiny) -> None:
    gguf = write_tiny_gguf(tiny, home / "tiny.gguf")
    first = LanguageModel.load(gguf)
    out = converted_dir(gguf)
    assert (out / SOURCE_FILE).is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / SOURCE_FILE).read_text())["gguf"] == str(gguf.resolve())
    assert same_logits(tiny, first, "What is the color of Zorbin?")
    assert first.style == "text" and first.format is not None and first.format.kind == "plain"
    assert first.name == "tiny.gguf"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = LanguageModel.load(gguf)  # reads the converted copy: nothing is written
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.fingerprint == first.fingerprint
    # The converted directory is itself a checkpoint directory.
    assert LanguageModel.load(out).fingerprint == first.fingerprint


def test_a_chat_template_frames_the_question_and_tells_where_it_is(home, tiny) -> None:
    model = LanguageModel.load(write_tiny_gguf(tiny, home / "chat.gguf", chat_template=CHAT))
    fmt = model.format
    assert fmt is not None and fmt.kind == "chat" and fmt.answer_lead == ""
    framed = fmt.frame("What is the color of Zorbin?")
    assert framed.text[framed.start : framed.end] == "What is the color of Zorbin?"
    assert framed.text.endswith("<|im|>assistant\n") and "<|im|>system\n" in framed.text


def test_dtype_and_device_as_transformers_and_torch_name_them(home, tiny) -> None:
    gguf = write_tiny_gguf(tiny, home / "tiny.gguf")
    half = LanguageModel.load(gguf, dtype="bfloat16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert LanguageModel.load("tiny-qwen3", dtype="float16").model.dtype == torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        LanguageModel.load(gguf, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            LanguageModel.load(gguf, device="cuda")
    with pytest.raises(ModelError, match="unknown device"):
        LanguageModel.load(gguf, device="toaster")


def test_bad_model_arguments_are_one_clear_error(home, tiny) -> None:
    fake = home / "fake.gguf"
    fake.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a GGUF file"):
        LanguageModel.load(fake)
    with pytest.raises(ModelError, match="no model at"):
        LanguageModel.load(home / "missing.gguf")
    with pytest.raises(ModelError, match="no model at"):
        LanguageModel.load("no-such-model")
    other = home / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelError, match="not a .gguf model"):
        LanguageModel.load(other)
    with pytest.raises(ModelError, match="no config.json"):
        LanguageModel.load(home)
    weird = home / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="architecture 'bert'"):
        LanguageModel.load(weird)


def test_a_saved_zoo_style_model_keeps_answering_by_letter(tmp_path, tiny) -> None:
    tiny.save(tmp_path / "zoo-model")
    assert LanguageModel.load(tmp_path / "zoo-model").style == "letter"
    text = LanguageModel(tiny.model, tiny.tokenizer, "t", style="text")
    text.save(tmp_path / "text-model")
    assert LanguageModel.load(tmp_path / "text-model").style == "text"
