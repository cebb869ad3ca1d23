"""Protocol messages and subjects: round trips, id validation (no subject injection), versioning."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bus.errors import SchemaError
from bus.schemas import (
    Answer,
    Ask,
    ErrorReply,
    Goodbye,
    KVChunkHeader,
    Offer,
    Omission,
    Plan,
    PlanEntry,
    Presence,
    Query,
    TransmitterUse,
    decode_message,
    digest_of,
    query_digest,
    validate_id,
)
from bus.subjects import Subjects

BAD_IDS = ["", "a.b", "a*", "a>", ">", "a b", "tab\there", "new\nline", "x" * 65, "ümlaut", "a/b", "$SYS", "a:b"]

SAMPLES = [
    Ask(question="Which metal is liquid at room temperature?", options=("iron", "mercury"), private=True),
    Query(query_id="q-1", receiver_id="rx", text="Which metal is liquid?", deadline_unix=1.7e9),
    Offer(
        query_id="q-1",
        transmitter_id="tx_a",
        model_fingerprint="qwen3-0.6b:abc123",
        n_tokens=12,
        n_layers=28,
        kv_heads=8,
        head_dim=128,
        summary=(0.1, -0.2),
        confidence=0.8,
        query_digest=query_digest("q-1", "rx", "Which metal is liquid?", ()),
    ),
    Plan(
        query_id="q-1",
        receiver_id="rx",
        query_digest=query_digest("q-1", "rx", "Which metal is liquid?", ()),
        deadline_unix=1.7e9,
        entries=(PlanEntry(transmitter_id="tx_a", layers=(27, 26), precision="int8", weight=0.7, byte_budget=10**6),),
    ),
    Presence(role="transmitter", agent_id="tx_a", load=1.0, link_rate_bps=1e6, sent_unix=1.7e9),
    Goodbye(role="gate", agent_id="gate-1", reason="shutdown"),
    Answer(
        query_id="q-1",
        receiver_id="rx",
        text="B",
        choice="B",
        latency_s=0.4,
        bytes_received=123,
        used=(TransmitterUse(transmitter_id="tx_a", layers=(27,), precision="int8", bytes=100),),
        omitted=(Omission(transmitter_id="tx_b", reason="late"), Omission(transmitter_id="tx_c", reason="no_fuser")),
    ),
    ErrorReply(code="timeout", message="no answer in time", query_id="q-1"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_and_discriminated_decode(msg) -> None:
    data = msg.to_bytes()
    assert type(msg).from_bytes(data) == msg
    assert decode_message(data) == msg
    assert json.loads(data)["schema_version"] == 3


def test_messages_are_frozen_and_strict() -> None:
    ask = SAMPLES[0]
    with pytest.raises(ValidationError):
        ask.question = "changed"  # type: ignore[misc]
    payload = json.loads(ask.to_bytes())
    payload["surprise"] = 1
    with pytest.raises(SchemaError, match="surprise"):
        Ask.from_bytes(json.dumps(payload))


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_rejected_everywhere(bad: str) -> None:
    with pytest.raises(SchemaError):
        validate_id(bad)
    with pytest.raises(SchemaError):
        Query.from_bytes(json.dumps({"query_id": bad, "receiver_id": "rx", "text": "t", "deadline_unix": 1.0}))
    with pytest.raises(SchemaError):
        Subjects().kv("rx", bad, "tx")
    with pytest.raises(SchemaError):
        Subjects().presence("transmitter", bad)


def test_version_and_garbage() -> None:
    data = json.loads(SAMPLES[1].to_bytes())
    data["schema_version"] = 2  # the protocol before typed fuser lists
    with pytest.raises(SchemaError, match="schema_version"):
        decode_message(json.dumps(data))
    for junk in (b"\xff\xfe", b"[1,2]", b"{", b'{"kind": "nope"}'):
        with pytest.raises(SchemaError):
            decode_message(junk)


def test_digest_binds_offers_and_plans_to_one_query() -> None:
    query = SAMPLES[1]
    assert digest_of(query) == SAMPLES[2].query_digest == SAMPLES[3].query_digest
    for other in (
        query.model_copy(update={"query_id": "q-2"}),
        query.model_copy(update={"receiver_id": "rx2"}),
        query.model_copy(update={"text": "Which metal is liquid!"}),
        query.model_copy(update={"options": ("a",)}),
    ):
        assert digest_of(other) != digest_of(query)
    assert query_digest("a", "b", "c", ()) != query_digest("a", "bc", "", ())  # the separator keeps fields apart


def test_claims_are_bounded() -> None:
    with pytest.raises(ValidationError):  # a forged heartbeat that says "wait for me for eleven days"
        Presence(role="transmitter", agent_id="t", sent_unix=1.7e9, interval_s=1e6)
    with pytest.raises(ValidationError):  # a plan weight above the gating network's range
        PlanEntry(transmitter_id="a", layers=(1,), precision="fp16", weight=50.0, byte_budget=0)
    with pytest.raises(ValidationError):
        Query(query_id="q", receiver_id="rx", text="t", deadline_unix=1.0, gates=("a.b",))


def test_semantic_checks() -> None:
    with pytest.raises(ValidationError):
        PlanEntry(transmitter_id="a", layers=(1, 1), precision="fp16", weight=1.0, byte_budget=0)
    entry = PlanEntry(transmitter_id="a", layers=(1,), precision="fp16", weight=1.0, byte_budget=0)
    with pytest.raises(ValidationError):
        Plan(query_id="q", receiver_id="r", deadline_unix=1.0, entries=(entry, entry))
    with pytest.raises(ValidationError):
        Offer(**{**SAMPLES[2].model_dump(), "summary": (float("nan"),)})
    with pytest.raises(ValidationError):
        Omission(transmitter_id="a", reason="bored")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PlanEntry(transmitter_id="a", layers=(1,), precision="int3", weight=1.0, byte_budget=0)  # type: ignore[arg-type]


def _header(**over) -> dict:
    base = dict(
        query_id="q",
        sender="s",
        layer=0,
        tensor="k",
        chunk=0,
        n_chunks=2,
        chunk_size=100,
        dtype="float16",
        shape=(1, 2, 3, 40),
        precision="fp16",
        shuffle=False,
        compression="none",
        scale_axis="none",
        scale_dtype=None,
        raw_bytes=480,
        blob_bytes=480,
        layers_total=1,
        chunk_hash=0,
        blob_hash=0,
    )
    base.update(over)
    return base


def test_kv_header_consistency() -> None:
    h = KVChunkHeader(**_header(n_chunks=5))
    assert h.payload_len == 100 and KVChunkHeader(**_header(n_chunks=5, chunk=4)).payload_len == 80
    for bad in (
        _header(chunk=2),  # n_chunks says 2 but blob needs 5
        _header(n_chunks=5, chunk=5),  # out of range
        _header(n_chunks=5, raw_bytes=481, blob_bytes=481),  # wrong size for the shape
        _header(n_chunks=5, precision="int8"),  # int needs scales
        _header(n_chunks=5, scale_axis="channel", scale_dtype="float16"),  # float carries none
        _header(n_chunks=5, shape=(1, 2, 3, 0)),
        _header(n_chunks=5, tensor="q"),
        _header(n_chunks=5, layer=5000),
        _header(n_chunks=5, chunk_hash=2**32),
    ):
        with pytest.raises(ValidationError):
            KVChunkHeader(**bad)


def test_subjects_build_and_parse() -> None:
    subj = Subjects()
    assert subj.kv("rx", "q1", "tx_a") == "fr.kv.rx.q1.tx_a"
    parts = subj.parse("fr.kv.rx.q1.tx_a")
    assert (parts.kind, parts.receiver_id, parts.query_id, parts.sender) == ("kv", "rx", "q1", "tx_a")
    assert subj.parse(subj.presence("gate", "g1")).role == "gate"
    parts = subj.parse(subj.plan("q9", "g1"))
    assert (parts.query_id, parts.sender) == ("q9", "g1")
    assert subj.parse(subj.query("rx")).receiver_id == "rx"
    parts = subj.parse(subj.answer("rx", "q1"))
    assert (parts.receiver_id, parts.query_id) == ("rx", "q1")
    assert subj.parse(subj.ask()).kind == "ask"
    custom = Subjects("lab.fr")
    assert custom.offer("q", "t1") == "lab.fr.offer.q.t1"
    assert custom.parse("lab.fr.offer.q.t1").sender == "t1"
    for bad in (
        "fr.kv.rx.q1",
        "fr.kv.rx.q1.a.b",
        "xx.ask",
        "fr.nope.q",
        "fr.offer.q*.t",
        "fr.offer.q",
        "fr.query",
        "fr.plan.q",
        "fr.presence.king.a",
        "fr",
    ):
        with pytest.raises(SchemaError):
            subj.parse(bad)
    for prefix in ("", "a..b", "a.*", "a b", "a.>"):
        with pytest.raises(SchemaError):
            Subjects(prefix)
    with pytest.raises(SchemaError):
        subj.presence("king", "a")
