"""The shared prompt formats."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bus.errors import SchemaError
from fusion.prompts import (
    LETTERS,
    NONE_ANSWER,
    Question,
    answer_texts,
    answer_token_text,
    format_hint_request,
    format_question,
    format_rephrase_request,
    format_with_hint,
    is_none,
    parse_completion,
)

OPTS = ("red", "blue", "green", "pink")


def test_question_format():
    p = format_question("What is the color of Zorbin?", OPTS)
    assert p == "Q: What is the color of Zorbin? A) red B) blue C) green D) pink\nAnswer:"
    assert format_question("  What is\nthe color? ", OPTS) == format_question("What is the color?", OPTS)


def test_hint_and_requests():
    hinted = format_with_hint("The color of Zorbin is green.", "What is the color of Zorbin?", OPTS)
    assert hinted.startswith("Fact: The color of Zorbin is green.\nQ: ") and hinted.endswith("\nAnswer:")
    assert format_with_hint("", "Q?", OPTS) == format_question("Q?", OPTS)
    assert format_hint_request("Which pet does Zu have?") == "Q: Which pet does Zu have?\nFact:"
    assert format_rephrase_request("Hi, I'm Ivo. What?") == "Rephrase: Hi, I'm Ivo. What?\nPlain:"


def test_answer_tokens():
    assert [answer_token_text(x) for x in LETTERS] == [" A", " B", " C", " D"]
    assert answer_token_text(NONE_ANSWER) == " none"
    assert answer_texts(with_none=True)[-1] == " none" and len(answer_texts()) == 4
    with pytest.raises(SchemaError):
        answer_token_text("E")


def test_completion_parsing():
    assert parse_completion(" The color of Zu is red.\nQ: more") == "The color of Zu is red."
    assert is_none(" none\n") and is_none(" None.") and not is_none(" The none of Zu is red.")


@pytest.mark.parametrize("bad", [("a", "b", "c"), ("a", "b", "c", " ")])
def test_bad_options(bad):
    with pytest.raises(SchemaError):
        format_question("Q?", bad)


def test_question_model():
    q = Question(id="q1", stem="Hi, I'm Ivo. What is the color of Zu?", options=OPTS, answer=2, pii=("Ivo",))
    assert q.answer_letter == "C" and q.answer_text == "green"
    assert q.prompt() == format_question(q.stem, q.options)
    assert Question.model_validate_json(q.model_dump_json()) == q
    with pytest.raises(ValidationError):
        Question(id="q", stem="s", options=("a", "a", "b", "c"), answer=0)
    with pytest.raises(ValidationError):
        Question(id="q", stem="s", options=OPTS, answer=4)
    with pytest.raises(ValidationError):
        Question(id="q", stem="s", options=OPTS, answer=0, pii=("not there",))
    with pytest.raises(ValidationError):
        Question(id="q", stem="s", options=OPTS, answer=0, extra=1)
