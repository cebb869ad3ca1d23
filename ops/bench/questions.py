"""``--questions FILE``: anyone's question set, one JSON object per line.

Each line: ``stem`` (the question), optional ``options`` (two or more), ``answer`` (an option index or the
option's text, or the free-text answer when there are no options), optional ``id`` (default ``q<line>``) and
any other field of ``fusion.prompts.Question`` (``pii``: planted personal details, ``task``: a task name). A bad
line is a ``ConfigError`` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from bus.errors import ConfigError
from fusion.prompts import Question


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read questions {str(path)!r}: {exc}", path=str(path)) from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("a line must be a JSON object")
            row.setdefault("id", f"q{n}")
            out.append(Question.model_validate(row))
        except (ValueError, ValidationError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"{path}:{n}: {first}", path=str(path), line=n) from exc
    if not out:
        raise ConfigError(f"{path} holds no questions", path=str(path))
    return out


def count_or_file(text: str) -> int | Path:
    """An argparse type: ``--questions 100`` (how many) or ``--questions FILE`` (which)."""
    try:
        value = int(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{text!r} is neither a number of questions nor a question file") from None
        return path
    if value < 1:
        raise ValueError("the number of questions must be at least 1")
    return value


def choose(arg: int | Path, pool: list[Question], default: int, rng, extra: int = 0) -> list[Question]:
    """The questions a ``count_or_file`` argument names: all of a file, or ``arg`` (else ``default``) plus ``extra``
    (warm-up questions) drawn from ``pool`` with ``rng``."""
    if isinstance(arg, Path):
        return read_questions(arg)
    return rng.sample(pool, min((arg or default) + extra, len(pool)))
