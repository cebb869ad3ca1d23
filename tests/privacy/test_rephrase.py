"""Receiver-side rephrasing: rules always, the model only when its paraphrase is safe."""

from __future__ import annotations

import pytest

from bus.errors import PrivacyError
from privacy.rephrase import ngram_overlap, passthrough, rephrase

STEM = "Hi, I'm Mara Velt (account ACC-448120, mara.velt@example.org). What is the color of Zorbin?"
PLANTED = ["Mara Velt", "ACC-448120", "mara.velt@example.org"]


class ScriptedModel:
    """Stands in for the receiver model: returns a fixed completion and records its prompt."""

    def __init__(self, completion: str | Exception) -> None:
        self.completion = completion
        self.prompts: list[str] = []

    def generate(self, prompt: str, max_new_tokens: int = 32, stop: str | None = "\n") -> str:
        self.prompts.append(prompt)
        if isinstance(self.completion, Exception):
            raise self.completion
        return self.completion


def test_rules_remove_every_planted_detail() -> None:
    out = rephrase(STEM)
    assert out.method == "rules"
    assert all(p not in out.text for p in PLANTED)
    assert "Zorbin" in out.text and "color" in out.text
    assert set(PLANTED) <= {v for v in out.removed_values}


def test_model_paraphrase_used_when_safe_and_never_sees_details() -> None:
    model = ScriptedModel(" Which color does Zorbin have?\nextra")
    out = rephrase(STEM, model)
    assert out.method == "model" and out.text == "Which color does Zorbin have?"
    assert all(p not in model.prompts[0] for p in PLANTED)  # the model reads the redacted stem


@pytest.mark.parametrize(
    "completion",
    [
        " Which color does Mara Velt's Zorbin have?",
        " ",
        " write to bob@example.com about Zorbin",
        RuntimeError("boom"),
        " ::::::::::::",  # a random model's output: no word at all (it used to pass: no *new* word either)
    ],
)
def test_unsafe_or_broken_paraphrase_falls_back_to_rules(completion) -> None:
    out = rephrase(STEM, ScriptedModel(completion))
    assert out.method == "rules"
    assert all(p not in out.text for p in PLANTED)


@pytest.mark.parametrize(
    "completion",
    [" What is the color of Zorbrin?", " What is the pet of Zorbin?", " Which color does Zorbin's cat have?"],
)
def test_a_paraphrase_that_asks_something_else_falls_back_to_rules(completion) -> None:
    """A garbled entity or another attribute would send transmitters another question: the rules' stem goes."""
    out = rephrase(STEM, ScriptedModel(completion))
    assert out.method == "rules" and "Zorbin" in out.text and "color" in out.text


@pytest.mark.parametrize("completion", [" Do you know the color of Zorbin?", " Tell me Zorbin's color, please."])
def test_a_reworded_question_is_kept(completion) -> None:
    assert rephrase(STEM, ScriptedModel(completion)).method == "model"


def test_passthrough_and_empty() -> None:
    assert passthrough("  What is  it? ").text == "What is it?"
    with pytest.raises(PrivacyError):
        rephrase("   ")
    with pytest.raises(PrivacyError):
        passthrough("")


def test_overlap_metric() -> None:
    assert ngram_overlap("a b c d", "a b c d", 2) == 1.0
    assert ngram_overlap("a b c d", "x y z", 2) == 0.0
