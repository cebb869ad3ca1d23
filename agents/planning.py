"""The gate's decision for one query, as a pure function of the query, the offers and the roster's facts.

Scoring is ``fusion.refine.plan`` (the gating network, or uniform weights without one: the same call
``refine()`` makes in process); what to send under the link and the deadline is a ``bus.policy`` policy. A
transmitter appears in the plan's ``entries`` (layers most important first, precision, weight, byte budget, and
``tokens`` when the receiver's fuser reads only the transmitter's last tokens) or in its ``omitted`` with a
reason: ``no_fuser``, ``not_chosen`` (weight 0, no useful layer, nothing fits the deadline), ``late`` (no offer
in the window) or ``error``. An entry is ``inline`` when the offer carried the tokens the receiver's fuser reads
(its inline cache): the receiver takes the gate's layers from the offer at the cache's precision and nothing
streams. The bandwidth policy is not asked then: those bytes already travelled, and a cheaper precision or fewer
layers would save nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from bus.errors import FusionError, PolicyError
from bus.frames import frame_overhead
from bus.policy import (
    DEFAULT_SAFETY,
    LADDER,
    BandwidthPolicy,
    PolicyRequest,
    layer_costs,
    link_budget,
    make_policy,
    plan_whole,
)
from bus.schemas import PRECISIONS, Offer, Omission, Plan, PlanEntry, Query, digest_of
from fusion.gate import GateNetwork, OfferSummary
from fusion.refine import plan as score_offers

log = logging.getLogger(__name__)


def offer_summary(offer: Offer) -> OfferSummary:
    """The gate's view of an offer, exactly as ``fusion.gate.summarize_offer`` made it on the transmitter."""
    p_none = offer.p_none if offer.p_none is not None else 1.0 - offer.confidence
    return OfferSummary(
        fingerprint=offer.model_fingerprint,
        num_layers=offer.n_layers,
        num_tokens=offer.n_tokens,
        p_none=p_none,
        p_top=offer.p_top if offer.p_top is not None else 0.0,
        entropy=offer.entropy if offer.entropy is not None else 0.0,
        summary=offer.summary,
        coverage=offer.coverage,
    )


def build_policy(name: str, *, precision: str, reserve_s: float, assumed_rate_bps: float) -> BandwidthPolicy:
    """The configured policy with the parameters it takes (PolicyError on an unknown name)."""
    return make_policy(
        name, ignore_unused=True, precision=precision, reserve_s=reserve_s, assumed_rate_bps=assumed_rate_bps
    )


def _entry(
    tid: str,
    offer: Offer,
    weight: float,
    importance: tuple[float, ...],
    layers: list[int],
    policy: BandwidthPolicy,
    rate_bps: float,
    time_left_s: float,
    precision: str,
    reserve_s: float = 0.0,
    rtt_s: float = 0.0,
    tail: int | None = None,
    whole: bool = False,
) -> PlanEntry | Omission:
    tokens = min(tail, offer.n_tokens) if tail else offer.n_tokens  # what travels per layer
    if offer.inline is not None and offer.inline.tokens == tokens:
        return PlanEntry(
            transmitter_id=tid,
            layers=tuple(layers),
            precision=offer.inline.precision,
            weight=weight,
            byte_budget=0,
            tokens=tokens if tail else None,
            inline=True,
        )
    shape = (1, offer.kv_heads, tokens, offer.head_dim)
    offered = [p for p in PRECISIONS if p in offer.precisions]
    wanted = tuple(dict.fromkeys((precision, *LADDER)))
    precisions = tuple(p for p in wanted if p in offered) or tuple(offered)
    overhead = frame_overhead(offer.query_id, tid)  # the exact header size of this stream's frames
    costs = layer_costs(
        [importance[m] for m in layers], shape, layers=layers, precisions=precisions, frame_overhead=overhead
    )
    try:
        # The byte budget the link allows by the deadline: what drop-by-importance and the ladder work to
        # (deadline-aware derives the same from the rate itself; keep-all ignores it).
        budget = link_budget(rate_bps, time_left_s, safety=DEFAULT_SAFETY, reserve_s=reserve_s, rtt_s=rtt_s)
        req = PolicyRequest(
            layers=costs,
            budget_bytes=budget,
            link_rate_bps=rate_bps,
            time_left_s=time_left_s,
            precisions=precisions,
            rtt_s=rtt_s,
            whole=whole,
        )
        sent = plan_whole(policy, req)
    except PolicyError as exc:
        return Omission(transmitter_id=tid, reason="not_chosen", detail=f"policy {policy.name}: {exc}"[:500])
    if not sent.items or sent.precision is None:
        what = "its cache (read only whole) does not fit" if whole else "nothing fits"
        detail = f"{what} the deadline at {rate_bps / 1e6:.2f} MB/s with {time_left_s:.2f} s left"
        return Omission(transmitter_id=tid, reason="not_chosen", detail=detail)
    return PlanEntry(
        transmitter_id=tid,
        layers=sent.layers,
        precision=sent.precision,  # type: ignore[arg-type]
        weight=weight,
        byte_budget=sent.expected_bytes,
        tokens=tokens if tail else None,
    )


def build_plan(
    query: Query,
    offers: Mapping[str, Offer],
    *,
    gate: GateNetwork | None,
    policy: BandwidthPolicy,
    precision: str,
    expected: Iterable[str] = (),
    fusable: Callable[[Offer], bool] = lambda offer: True,
    tail: Callable[[Offer], int | None] = lambda offer: None,
    whole: Callable[[Offer], bool] = lambda offer: False,
    rates: Mapping[str, float] | None = None,
    rtts: Mapping[str, float] | None = None,
    assumed_rate_bps: float,
    window_s: float = 0.0,
    now_unix: float | None = None,
    reserve_s: float = 0.0,
) -> Plan:
    """The plan for ``query`` from the offers that arrived (by transmitter id); see the module docstring."""
    now = time.time() if now_unix is None else now_unix
    usable, omitted = _fusable_offers(query, offers, fusable)
    scores = _scores(query, usable, gate)
    entries: list[PlanEntry] = []
    time_left = query.deadline_unix - now
    for tid, offer in usable.items():
        score = scores[tid]
        layers = score.layers()
        if score.weight <= 0 or not layers:
            detail = f"gate weight {score.weight:.3f}" + ("" if layers else ", no useful layer")
            omitted.append(Omission(transmitter_id=tid, reason="not_chosen", detail=detail))
            continue
        if time_left <= 0:
            omitted.append(Omission(transmitter_id=tid, reason="late", detail="no time left to send"))
            continue
        rate = offer.link_rate_bps or (rates or {}).get(tid) or assumed_rate_bps
        rtt = offer.rtt_s if offer.rtt_s is not None else (rtts or {}).get(tid, 0.0)
        args = (score.weight, score.layer_importance, layers, policy, rate, time_left, precision, reserve_s, rtt)
        item = _entry(tid, offer, *args, tail(offer), whole(offer))
        (entries if isinstance(item, PlanEntry) else omitted).append(item)  # type: ignore[arg-type]
    for tid in sorted(set(expected) - set(offers)):
        detail = f"no offer within {window_s:.2f} s" if math.isfinite(window_s) else "no offer"
        omitted.append(Omission(transmitter_id=tid, reason="late", detail=detail))
    return Plan(
        query_id=query.query_id,
        receiver_id=query.receiver_id,
        query_digest=digest_of(query),
        deadline_unix=query.deadline_unix,
        entries=tuple(entries),
        omitted=tuple(omitted[:256]),
    )


def _fusable_offers(
    query: Query, offers: Mapping[str, Offer], fusable: Callable[[Offer], bool]
) -> tuple[dict[str, Offer], list[Omission]]:
    """The offers the receiver has a fuser for (by transmitter id, sorted), and the others as ``no_fuser``."""
    usable: dict[str, Offer] = {}
    omitted: list[Omission] = []
    for tid in sorted(offers):
        offer = offers[tid]
        if offer.declined:
            omitted.append(Omission(transmitter_id=tid, reason="not_chosen", detail="declined: nothing to send"))
        elif fusable(offer):
            usable[tid] = offer
        else:
            detail = f"receiver {query.receiver_id} has no fuser for model {offer.model_fingerprint}"
            omitted.append(Omission(transmitter_id=tid, reason="no_fuser", detail=detail))
    return usable, omitted


def _scores(query: Query, usable: Mapping[str, Offer], gate: GateNetwork | None) -> dict:
    """The gating network's weight and layer importance per offer (uniform when it cannot score them)."""
    if not usable:
        return {}
    summaries = {tid: offer_summary(o) for tid, o in usable.items()}
    if query.mode == "translate":  # a translator reads every layer of every notes' cache: no gate weights them
        return score_offers(summaries, None)
    try:
        return score_offers(summaries, gate)
    except FusionError as exc:
        log.warning("gate network cannot score query %s (%s); using uniform weights", query.query_id, exc)
        return score_offers(summaries, None)
