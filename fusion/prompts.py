"""Prompt formats shared by the zoo, fusion, the text-to-text baseline and privacy.

Every model of the toy world is trained on exactly these strings, so every part of the system that
talks to a model builds its prompts here. The formats follow OpenBookQA: the four options are listed
in the prompt and the answer is one letter token (``" A"`` .. ``" D"``), or ``" none"`` when a
transmitter does not know the fact (see TOYWORLD.md, lesson 3).

- ``format_question(stem, options)`` -> ``"Q: <stem> A) x B) y C) z D) w\\nAnswer:"`` -> ``" C"``
- ``format_with_hint(hint, stem, options)`` -> ``"Fact: <hint>\\n" + format_question(...)``
- ``format_hint_request(stem)`` -> ``"Q: <stem>\\nFact:"`` -> ``" The color of Zorbin is red."``
- ``format_rephrase_request(stem)`` -> ``"Rephrase: <stem>\\nPlain:"`` -> ``" Which color does Zorbin have?"``
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bus.errors import SchemaError

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
NONE_ANSWER = "none"  # what a transmitter answers (and hints) when it does not know the fact
NUM_OPTIONS = len(LETTERS)
ANSWER_PREFIX = "Answer:"  # the last characters of every question prompt
HINT_PREFIX = "Fact:"  # the last characters of a hint request
REPHRASE_PREFIX = "Plain:"  # the last characters of a rephrase request
STOP = "\n"  # generated hints and paraphrases end at the first newline
_ARTICLES = re.compile(r"^(a|an|the)\s+")
_PUNCT = str.maketrans("", "", string.punctuation)


class Question(BaseModel):
    """One question: with options (answered by choice: a letter in the toy zoo, by likelihood for pretrained models)
    or without (free text, answered by generation and scored by exact match)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    stem: str = Field(min_length=1)  # the question as the asker wrote it (may carry personal details)
    options: tuple[str, ...] = ()  # none (free text) or at least two distinct options
    answer: int | str  # index into options, or the answer text of a free-text question
    fact_id: str = ""  # the fact the question is about ("" outside the generated worlds)
    entity: str = ""
    attribute: str = ""
    phrasing: str = ""  # id of the stem template
    pii: tuple[str, ...] = ()  # personal details planted in the stem, verbatim
    task: str = ""  # the benchmark task it belongs to ("notes", ...)

    @field_validator("options")
    @classmethod
    def _distinct_options(cls, options: tuple[str, ...]) -> tuple[str, ...]:
        if len(options) == 1 or len(set(options)) != len(options) or any(not o.strip() for o in options):
            raise ValueError(f"options must be none or at least two distinct non-empty strings, got {options!r}")
        return options

    @model_validator(mode="after")
    def _consistent(self) -> Question:
        missing = [p for p in self.pii if p not in self.stem]
        if missing:
            raise ValueError(f"planted details {missing!r} do not occur in the stem")
        if self.options:
            if isinstance(self.answer, str):  # an option's text names its index
                if self.answer not in self.options:
                    raise ValueError(f"answer {self.answer!r} is not one of the options {self.options!r}")
                object.__setattr__(self, "answer", self.options.index(self.answer))
            elif not 0 <= self.answer < len(self.options):
                raise ValueError(f"answer index {self.answer} is out of range for {len(self.options)} options")
        elif not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError("a question without options needs its answer as non-empty text")
        return self

    @property
    def format(self) -> str:
        """``"choice"`` (options) or ``"text"`` (free text)."""
        return "choice" if self.options else "text"

    @property
    def answer_letter(self) -> str:
        """The answer as a letter (``"A"`` .. ``"D"``)."""
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        """The correct option's text, or the free-text answer."""
        return self.options[self.answer] if self.options else str(self.answer)

    def prompt(self) -> str:
        """This question formatted for a zoo model (``format_question``)."""
        return format_question(self.stem, self.options)


def normalize_answer(text: str) -> str:
    """A free-text answer as exact match compares it: lower case, first line only, punctuation and a leading
    article removed, whitespace collapsed (SQuAD-style)."""
    line = text.strip().split("\n", 1)[0].lower().translate(_PUNCT)
    return _ARTICLES.sub("", " ".join(line.split()))


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a free-text answer equals the expected one after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


def option_letter(index: int) -> str:
    """The letter of option ``index`` (0 -> ``"A"``); questions have at most 26 options."""
    if not 0 <= index < 26:
        raise SchemaError(f"option index {index} has no letter")
    return chr(ord("A") + index)


def _check_stem(stem: str) -> str:
    stem = " ".join(stem.split())
    if not stem:
        raise SchemaError("question stem is empty")
    return stem


def _check_options(options: Sequence[str]) -> list[str]:
    opts = [" ".join(str(o).split()) for o in options]
    if len(opts) != NUM_OPTIONS or any(not o for o in opts):
        raise SchemaError(f"a question needs {NUM_OPTIONS} non-empty options, got {len(opts)}: {list(options)!r}")
    return opts


def format_options(options: Sequence[str]) -> str:
    """``"A) x B) y C) z D) w"``: the options on one line, each letter preceded by a space in context."""
    opts = _check_options(options)
    return " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, opts, strict=True))


def format_question(stem: str, options: Sequence[str]) -> str:
    """The multiple-choice prompt; the model's next token is the answer letter (``" A"`` .. ``" D"``)."""
    return f"Q: {_check_stem(stem)} {format_options(options)}\n{ANSWER_PREFIX}"


def hint_lead(hint: str) -> str:
    """The text before the question in :func:`format_with_hint` (empty for an empty hint)."""
    hint = " ".join(hint.split())
    return f"{HINT_PREFIX} {hint}\n" if hint else ""


def format_with_hint(hint: str, stem: str, options: Sequence[str]) -> str:
    """A question preceded by a one-sentence fact in context (the text-to-text baseline's message)."""
    return hint_lead(hint) + format_question(stem, options)


def format_hint_request(stem: str) -> str:
    """The prompt a transmitter completes with one fact sentence (or ``" none"``), ending at a newline."""
    return f"Q: {_check_stem(stem)}\n{HINT_PREFIX}"


def format_rephrase_request(stem: str) -> str:
    """The prompt the receiver completes with the question reworded and without personal details."""
    return f"Rephrase: {_check_stem(stem)}\n{REPHRASE_PREFIX}"


def answer_token_text(letter: str) -> str:
    """The exact text of an answer token: ``"A"`` -> ``" A"``, ``"none"`` -> ``" none"``."""
    if letter not in LETTERS and letter != NONE_ANSWER:
        raise SchemaError(f"unknown answer {letter!r}; expected one of {LETTERS + (NONE_ANSWER,)}")
    return f" {letter}"


def answer_texts(with_none: bool = False) -> tuple[str, ...]:
    """The answer token texts in letter order, optionally followed by ``" none"``."""
    texts = tuple(answer_token_text(letter) for letter in LETTERS)
    return texts + ((answer_token_text(NONE_ANSWER),) if with_none else ())


def parse_completion(text: str) -> str:
    """The first line of a generated completion, stripped (a hint, a paraphrase or ``"none"``)."""
    return text.split(STOP, 1)[0].strip()


def is_none(text: str) -> bool:
    """Whether a generated hint or answer says "I don't know"."""
    return parse_completion(text).rstrip(".").lower() == NONE_ANSWER
