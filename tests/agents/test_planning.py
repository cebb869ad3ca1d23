"""The gate's pure decision and the roster, without a bus."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from agents.planning import build_plan, build_policy, offer_summary
from agents.roster import Roster
from bus.errors import PolicyError, SchemaError
from bus.schemas import Goodbye, Offer, Presence, Query, digest_of

NOW = 1_000_000.0


def _offer(tid: str, fp: str = "aa", p_none: float = 0.1, rate: float | None = None, layers: int = 3) -> Offer:
    return Offer(
        query_id="q",
        transmitter_id=tid,
        model_fingerprint=fp,
        n_tokens=4,
        n_layers=layers,
        kv_heads=2,
        head_dim=8,
        summary=(0.5,) * 8,
        confidence=1 - p_none,
        p_none=p_none,
        p_top=0.7,
        entropy=0.9,
        offsets=((0, 1), (1, 2), (2, 3), (3, 4)),
        link_rate_bps=rate,
        query_digest=digest_of(_query()),
    )


def _query(left_s: float = 5.0) -> Query:
    return Query(query_id="q", receiver_id="rx", text="x?", options=("a", "b", "c", "d"), deadline_unix=NOW + left_s)


def _plan(offers, policy="deadline-aware", **kw):
    pol = build_policy(policy, precision="fp16", reserve_s=0.25, assumed_rate_bps=1.25e8)
    kw.setdefault("assumed_rate_bps", 1.25e8)
    return build_plan(
        _query(kw.pop("left_s", 5.0)),
        {o.transmitter_id: o for o in offers},
        gate=None,
        policy=pol,
        precision="fp16",
        now_unix=NOW,
        **kw,
    )


def test_offer_summary_round_trips_the_gate_features_exactly() -> None:
    s = offer_summary(_offer("t1", p_none=0.123456789))
    assert (s.p_none, s.p_top, s.entropy, s.num_tokens, s.num_layers) == (0.123456789, 0.7, 0.9, 4, 3)


def test_uniform_plan_sends_every_layer_at_fp16_when_the_link_is_ample() -> None:
    plan = _plan([_offer("t2"), _offer("t1")])
    assert [e.transmitter_id for e in plan.entries] == ["t1", "t2"]
    assert all(e.layers == (0, 1, 2) and e.precision == "fp16" and e.weight == 1.0 for e in plan.entries)
    assert plan.omitted == ()


def test_reasons_for_leaving_transmitters_out() -> None:
    offers = [_offer("t1"), _offer("t2", fp="bb"), _offer("t3", rate=10.0)]
    plan = _plan(offers, expected={"t1", "t2", "t3", "t4"}, fusable=lambda o: o.model_fingerprint != "bb", window_s=1.5)
    reasons = {o.transmitter_id: (o.reason, o.detail) for o in plan.omitted}
    assert [e.transmitter_id for e in plan.entries] == ["t1"]
    assert reasons["t2"][0] == "no_fuser" and "bb" in reasons["t2"][1]
    assert reasons["t3"][0] == "not_chosen" and "nothing fits" in reasons["t3"][1]
    assert reasons["t4"] == ("late", "no offer within 1.50 s")


def test_a_slow_link_gets_a_cheaper_precision_not_a_stall() -> None:
    plan = _plan([_offer("t1", rate=1500.0)], left_s=1.0)  # fp16 needs 1248 bytes; 900 fit
    (entry,) = plan.entries
    assert entry.precision in ("int8", "int4") and entry.byte_budget > 0


def test_a_cache_read_only_whole_is_planned_whole_or_left_out() -> None:
    """A receiver reads its own model's notes' cache only with every layer (translate mode): where the link thins
    another device's plan to one or two int4 layers, that device's is left out, and says why."""
    whole = lambda offer: offer.model_fingerprint == "aa"  # noqa: E731
    thinned = _plan([_offer("t1", rate=1000.0), _offer("t2", fp="bb", rate=1000.0)], left_s=1.0, whole=whole)
    (entry,) = thinned.entries
    assert entry.transmitter_id == "t2" and entry.layers == (0, 1) and entry.precision == "int4"
    (out,) = thinned.omitted
    assert out.transmitter_id == "t1" and out.reason == "not_chosen" and "read only whole" in out.detail
    (kept,) = _plan([_offer("t1", rate=1500.0)], left_s=1.0, whole=whole).entries
    assert kept.layers == (0, 1, 2) and kept.precision == "int4"


def test_a_translate_receiver_lists_its_own_model_as_read_only_whole() -> None:
    from types import SimpleNamespace

    from agents.fuserbook import TranslatorBook, whole_models

    own, other = "a" * 16, "b" * 16
    book = TranslatorBook(
        own,
        fusers={
            own: SimpleNamespace(cfg=SimpleNamespace(identity=True)),
            other: SimpleNamespace(cfg=SimpleNamespace()),
        },
    )
    specs = book.specs()
    assert [(s.transmitter_fingerprint, s.whole) for s in specs] == [(own, True), (other, False)]
    assert whole_models(specs) == {own} and whole_models(None) == set()
    assert "whole" not in specs[1].model_dump_json() and '"whole":true' in specs[0].model_dump_json()


def test_unknown_policy_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="unknown policy"):
        build_policy("yolo", precision="fp16", reserve_s=0.1, assumed_rate_bps=1.0)


def test_roster_joins_leaves_and_expires() -> None:
    clock = [0.0]
    roster = Roster(expiry_beats=3, clock=lambda: clock[0])
    changes: list[tuple[str, str]] = []
    roster.listen(lambda change, m: changes.append((change, m.agent_id)))
    beat = {"role": "transmitter", "interval_s": 1.0, "sent_unix": time.time()}
    assert roster.update(Presence(agent_id="a", **beat)) == "joined"
    assert roster.update(Presence(agent_id="b", **beat)) == "joined"
    assert roster.update(Presence(agent_id="a", **{**beat, "sent_unix": beat["sent_unix"] + 0.5})) == "seen"
    assert roster.update(Goodbye(role="transmitter", agent_id="a")) == "left"
    clock[0] = 2.9
    assert roster.expire() == []
    clock[0] = 3.1
    assert [m.agent_id for m in roster.expire()] == ["b"]
    assert changes == [("joined", "a"), ("joined", "b"), ("left", "a"), ("expired", "b")]
    assert roster.live("transmitter") == {}


def test_the_roster_refuses_replayed_and_future_heartbeats() -> None:
    roster = Roster()
    now = time.time()
    first = Presence(role="transmitter", agent_id="a", sent_unix=now, link_rate_bps=1e6)
    assert roster.update(first) == "joined"
    for stale in (first, first.model_copy(update={"link_rate_bps": 1.0})):  # a copy, or an altered copy
        with pytest.raises(SchemaError, match="not newer"):
            roster.update(stale)
    with pytest.raises(SchemaError, match="future"):
        roster.update(first.model_copy(update={"sent_unix": now + 60}))
    assert roster.get("transmitter", "a").presence.link_rate_bps == 1e6  # type: ignore[union-attr]
    assert roster.update(first.model_copy(update={"sent_unix": now + 1})) == "seen"


def test_the_round_trip_counts_against_the_time_to_send() -> None:
    slow = _offer("t1", rate=550.0)  # one int4 layer (272 bytes) fits 0.8 x 550 B/s x 0.75 s, not x 0.55 s
    assert len(_plan([slow], left_s=1.0).entries) == 1
    late = _plan([slow], left_s=1.0, rtts={"t1": 0.2})  # rtt from the transmitter's heartbeats
    assert late.entries == () and "nothing fits" in late.omitted[0].detail
    own = _plan([slow.model_copy(update={"rtt_s": 0.2})], left_s=1.0, rtts={"t1": 0.0})  # the offer's own wins
    assert own.entries == () and own.omitted[0].reason == "not_chosen"


def test_a_fuser_that_reads_a_tail_gets_only_that_tail_planned() -> None:
    whole = _plan([_offer("t1")]).entries[0]
    tail = _plan([_offer("t1")], tail=lambda offer: 1).entries[0]
    assert whole.tokens is None and tail.tokens == 1
    assert tail.layers == whole.layers and tail.byte_budget < whole.byte_budget  # 1 of 4 tokens (+ frame headers)
    assert _plan([_offer("t1")], tail=lambda offer: 99).entries[0].tokens == 4  # never more than the prompt


def test_a_receiver_fuser_list_says_which_read_a_tail() -> None:
    from agents.fuserbook import listed_fusers
    from bus.schemas import FuserSpec

    assert listed_fusers(None) is None
    assert listed_fusers(()) == {}
    specs = (FuserSpec(transmitter_fingerprint="aa"), FuserSpec(transmitter_fingerprint="bb", tail_tokens=1))
    query = Query(query_id="q", receiver_id="rx", text="x?", deadline_unix=1e9, fusers=specs)
    assert listed_fusers(Query.from_bytes(query.to_bytes()).fusers) == {"aa": None, "bb": 1}
    with pytest.raises(ValidationError):
        FuserSpec(transmitter_fingerprint="cc", tail_tokens=0)


def test_a_tail_that_came_inside_the_offer_is_planned_inline_whatever_the_link() -> None:
    from bus.inline import encode_inline

    tails = {m: (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)) for m in range(3)}
    offer = _offer("t1").model_copy(update={"inline": encode_inline(tails, "fp16")})
    entry = _plan([offer], tail=lambda o: 1).entries[0]
    assert entry.inline and entry.precision == "fp16" and entry.tokens == 1 and entry.byte_budget == 0
    assert not _plan([offer]).entries[0].inline  # the fuser reads the whole prompt: the 1-token tail is not enough
    slow = offer.model_copy(update={"link_rate_bps": 550.0})  # a stream would be int4 here ...
    assert (
        _plan([slow.model_copy(update={"inline": None})], tail=lambda o: 1, left_s=1.0).entries[0].precision == "int4"
    )
    kept = _plan([slow], tail=lambda o: 1, left_s=1.0).entries[0]  # ... but the fp16 tail already travelled
    assert kept.inline and kept.precision == "fp16" and kept.layers == entry.layers and kept.byte_budget == 0
    assert not _plan([_offer("t2")], tail=lambda o: 1).entries[0].inline  # no inline cache, nothing to take


def test_a_declined_offer_is_never_planned_and_never_waited_for() -> None:
    declined = _offer("t2").model_copy(update={"n_tokens": 0, "offsets": (), "declined": True})
    Offer.model_validate(declined.model_dump())  # a valid message
    plan = _plan([_offer("t1"), declined], expected=("t1", "t2"))
    assert [e.transmitter_id for e in plan.entries] == ["t1"]
    assert [(o.transmitter_id, o.reason, o.detail) for o in plan.omitted] == [
        ("t2", "not_chosen", "declined: nothing to send")
    ]
    for bad in ({"declined": True}, {"n_tokens": 0, "offsets": ()}, {**declined.model_dump(), "hint": ""}):
        with pytest.raises(ValidationError, match="declined"):
            Offer.model_validate({**_offer("t3").model_dump(), **bad})
