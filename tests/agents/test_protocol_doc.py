"""docs/PROTOCOL.md stays complete: every message field, subject kind and omission reason is described."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from bus import schemas
from bus.subjects import KINDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
MODELS = [
    schemas.Ask,
    schemas.Query,
    schemas.Offer,
    schemas.Plan,
    schemas.PlanEntry,
    schemas.FuserSpec,
    schemas.KVChunkHeader,
    schemas.Presence,
    schemas.Goodbye,
    schemas.Answer,
    schemas.TransmitterUse,
    schemas.Omission,
    schemas.ErrorReply,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented(model) -> None:
    text = DOC.read_text()
    missing = [name for name in model.model_fields if f"`{name}`" not in text]
    assert not missing, f"{model.__name__} fields not in PROTOCOL.md: {missing}"


def test_every_subject_kind_reason_and_error_code_is_documented() -> None:
    text = DOC.read_text()
    assert all(f"`fr.{kind}" in text for kind in KINDS)
    assert all(f"`{reason}`" in text for reason in get_args(schemas.OmissionReason))
    codes = get_args(schemas.ErrorReply.model_fields["code"].annotation)
    assert all(f"`{code}`" in text for code in codes)


def test_the_permission_table_in_the_doc_is_the_one_in_the_code() -> None:
    from privacy.permissions import table_markdown

    assert table_markdown("fr") in DOC.read_text()
