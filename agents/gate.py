"""Gate agent: hold the roster, collect offers per query, score them, publish the plan.

``python -m agents.gate --nats URL [--gate FILE] [--policy NAME] [--offer-share F]``

Per query (``fr.query.<receiver_id>``, unless the query names other gates): the transmitters live at that moment
are expected to offer on ``fr.offer.<query_id>.<transmitter_id>``; the gate plans as soon as all of them did, or
when ``offer_share`` of the time left has passed, whichever comes first (one that leaves meanwhile is no longer
waited for). Offers are scored by the gating network (``--gate``; uniform weights without one) through
``agents.planning.build_plan``, and the :class:`~bus.schemas.Plan` goes to ``fr.plan.<query_id>.<gate id>``. A
transmitter whose model has no fuser into the receiver's (the receiver lists its fusers in its heartbeat) is never
planned; the gate says so once per pair.

Claims are bounded: an offer must come from the transmitter its subject names and carry the query's digest; a
transmitter that heartbeats but missed ``DEFAULT_MAX_MISSES`` queries in a row is no longer waited for (it is
still planned when it offers), so a phantom presence stalls at most that many queries; a receiver has at most
``DEFAULT_MAX_OPEN_PER_RECEIVER`` queries collecting, and a query's deadline at most ``--max-deadline-s`` ahead.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags first: --help and a bad flag answer before torch is imported
    from agents.cli import main

    raise SystemExit(main("gate"))

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from agents import cli, tracing
from agents.base import Agent, decode
from agents.config import GateAgentConfig
from agents.fuserbook import listed_fusers, whole_models
from agents.planning import build_plan, build_policy
from agents.roster import DEFAULT_MAX_SKEW_S, Member
from bus.errors import SchemaError
from bus.linkest import MBPS
from bus.schemas import Offer, Query, digest_of
from fusion.gate import GateNetwork, load_gate

log = logging.getLogger(__name__)

DEFAULT_EARLY_OFFERS = 1024  # queries with offers kept that the gate has not seen yet
DEFAULT_EARLY_PER_SENDER = 8  # such early offers kept per transmitter
DEFAULT_EARLY_TTL_S = 10.0  # seconds such an offer is kept
DEFAULT_MAX_MISSES = 2  # queries in a row a live transmitter may not offer on before the gate stops waiting for it
DEFAULT_MAX_OPEN_PER_RECEIVER = 64  # queries of one receiver collecting offers at once
DEFAULT_PLANNED_MEMORY = 4096  # recently planned query ids remembered (late offers are recognised, not warned)
DEFAULT_WARMUP_BEATS = 2.0  # heartbeat intervals after its start a gate that knows no transmitter waits for offers


@dataclass
class _Collecting:
    """Offers for one query while the gate waits."""

    query: Query
    expected: set[str]
    window_s: float
    offers: dict[str, Offer] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = field(default_factory=time.monotonic)  # when the query reached the gate


class GateAgent(Agent):
    """The fusion gate."""

    role = "gate"
    tracks_presence = True
    # a gate that has not yet heard the transmitters' heartbeats would plan without them: it announces itself (and
    # so is picked by receivers) only after one heartbeat interval, and until then waits its offer window for
    # offers when it knows of no transmitter
    announce_at_start = False

    def __init__(self, cfg: GateAgentConfig, gate: GateNetwork | None = None) -> None:
        super().__init__(cfg)
        self.cfg: GateAgentConfig = cfg
        self.gate = gate if gate is not None else (load_gate(cfg.gate) if cfg.gate else None)
        self.policy = build_policy(
            cfg.policy,
            precision=cfg.precision,
            reserve_s=cfg.answer_reserve_s,
            assumed_rate_bps=cfg.assumed_rate_mbps * MBPS,
        )
        self.collecting: dict[str, _Collecting] = {}
        self.planned: OrderedDict[str, None] = OrderedDict()
        self.skipped: OrderedDict[str, None] = OrderedDict()  # queries another gate plans: their offers are not ours
        self.early: OrderedDict[str, tuple[float, list[Offer]]] = OrderedDict()
        self.warned_no_fuser: set[tuple[str, str, str]] = set()
        self.misses: dict[str, int] = {}  # transmitter -> queries in a row it was expected on and did not offer
        self.plans_published = 0
        self.roster.listen(self._on_roster)

    def counters(self) -> dict[str, int]:
        """Queries planned here, skipped (another gate's), offers taken, plans, transmitters not waited for."""
        not_waited = sum(1 for m in self.misses.values() if m >= DEFAULT_MAX_MISSES)
        return {
            **self.count,
            "plans": self.plans_published,
            "collecting": len(self.collecting),
            "not_waited": not_waited,
        }

    def capabilities(self) -> tuple[str, ...]:
        """Whether a trained gating network scores offers, and the policy."""
        return ("gate" if self.gate is not None else "uniform", f"policy:{self.policy.name}")

    async def setup(self) -> None:
        """Queries (intake) and offers."""
        await self.listen(self.subjects.queries_all(), self._on_query, intake=True)
        await self.listen(self.subjects.offers_all(), self._on_offer)

    # ---- collecting ---------------------------------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        query = decode(msg, Query)
        qid = query.query_id
        tracing.QUERY_ID.set(qid)
        if query.receiver_id != self.subjects.parse(msg.subject).receiver_id:
            raise SchemaError(f"query of receiver {query.receiver_id} on {msg.subject}")
        if query.mode == "t2t" or (query.gates and self.id not in query.gates):
            self.skipped[qid] = None  # another gate's query (or text-to-text: no plan): its offers are not ours
            while len(self.skipped) > DEFAULT_PLANNED_MEMORY:
                self.skipped.popitem(last=False)
            self.early.pop(qid, None)
            self.count["skipped"] += 1
            return
        if qid in self.collecting or qid in self.planned:
            raise SchemaError(f"duplicate query id {qid}")
        left = query.deadline_unix - time.time()
        if left <= 0:
            raise SchemaError(f"query {qid} arrived {-left:.2f} s after its deadline")
        if left > self.cfg.max_deadline_s + DEFAULT_MAX_SKEW_S:
            raise SchemaError(f"query {qid} has a deadline {left:.0f} s away (at most {self.cfg.max_deadline_s:g})")
        open_here = sum(1 for s in self.collecting.values() if s.query.receiver_id == query.receiver_id)
        if open_here >= DEFAULT_MAX_OPEN_PER_RECEIVER:
            raise SchemaError(f"receiver {query.receiver_id} already has {open_here} queries collecting offers")
        live = set(self.roster.live("transmitter"))
        expected = {tid for tid in live if self.misses.get(tid, 0) < DEFAULT_MAX_MISSES}
        warming = not live and time.monotonic() - self.started_at < DEFAULT_WARMUP_BEATS * self.cfg.heartbeat_s
        state = _Collecting(query, expected, window_s=self.cfg.offer_share * left)
        digest = digest_of(query)
        for offer in self.early.pop(qid, (0.0, []))[1]:
            if offer.query_digest != digest:
                self.reject(self.subjects.offer(qid, offer.transmitter_id), f"offer for another query under {qid}")
                continue
            state.offers.setdefault(offer.transmitter_id, offer)
        self.collecting[qid] = state
        self.count["queries"] += 1
        if not warming and (not expected or expected <= set(state.offers)):
            await self._finish(qid)
            return
        self.spawn(self._window(state), name=f"window-{qid}", query_id=qid)

    async def _window(self, state: _Collecting) -> None:
        try:
            await asyncio.wait_for(state.done.wait(), timeout=state.window_s)
        except TimeoutError:
            await self._finish(state.query.query_id)

    async def _on_offer(self, msg: Msg) -> None:
        parts = self.subjects.parse(msg.subject)
        qid, sender = parts.query_id or "", parts.sender or ""
        state = self.collecting.get(qid)
        if state is not None and sender in state.offers:  # before decoding: a flood of copies costs little
            raise SchemaError(f"second offer from {sender} for {qid}")
        offer = decode(msg, Offer)
        if (offer.query_id, offer.transmitter_id) != (qid, sender):
            raise SchemaError(f"offer of {offer.transmitter_id} for {offer.query_id} on {msg.subject}")
        if state is None:
            if qid in self.skipped:
                return  # another gate's query
            if qid in self.planned:
                self.misses[sender] = 0  # late, but alive
                log.info("late offer from %s for %s (already planned)", sender, qid)
            else:
                self._keep_early(offer)
            return
        if offer.query_digest != digest_of(state.query):
            raise SchemaError(f"offer from {sender} carries the digest of another query than {qid}")
        self.misses[sender] = 0
        state.offers[offer.transmitter_id] = offer
        self.count["offers"] += 1
        if state.expected and state.expected <= set(state.offers):
            await self._finish(qid)

    def _keep_early(self, offer: Offer) -> None:
        now = time.monotonic()
        while self.early and next(iter(self.early.values()))[0] < now - DEFAULT_EARLY_TTL_S:
            self.early.popitem(last=False)
        held = sum(1 for _, kept in self.early.values() for o in kept if o.transmitter_id == offer.transmitter_id)
        if held >= DEFAULT_EARLY_PER_SENDER:
            raise SchemaError(f"{held} offers from {offer.transmitter_id} for queries this gate has not seen")
        stamp, offers = self.early.setdefault(offer.query_id, (now, []))
        if len(offers) < 64 and all(o.transmitter_id != offer.transmitter_id for o in offers):
            offers.append(offer)
        while len(self.early) > DEFAULT_EARLY_OFFERS:
            self.early.popitem(last=False)

    def _on_roster(self, change: str, member: Member) -> None:
        if member.role != "transmitter" or change not in ("left", "expired"):
            return
        self.misses.pop(member.agent_id, None)
        for qid, state in list(self.collecting.items()):
            if member.agent_id in state.expected and member.agent_id not in state.offers:
                state.expected.discard(member.agent_id)
                if state.expected <= set(state.offers):
                    self.spawn(self._finish(qid), name=f"finish-{qid}")

    # ---- planning -----------------------------------------------------------------------------------------

    def _fusable(self, offer: Offer, receiver_id: str, listed: dict[str, int | None] | None) -> bool:
        """Whether the receiver (whose query or heartbeat lists the fusers ``listed``) can fuse this offer's model."""
        if listed is None:
            return True  # the receiver did not list its fusers: let it decide (it omits with "no_fuser")
        if offer.model_fingerprint in listed:
            return True
        key = (offer.transmitter_id, offer.model_fingerprint, receiver_id)
        if key not in self.warned_no_fuser:
            self.warned_no_fuser.add(key)
            log.warning(
                "transmitter %s (model %s) has no fuser into receiver %s: it will not be planned "
                "for this receiver until such a fuser is installed",
                offer.transmitter_id,
                offer.model_fingerprint,
                receiver_id,
            )
        return False

    async def _finish(self, qid: str) -> None:
        state = self.collecting.pop(qid, None)
        if state is None:
            return
        state.done.set()
        for tid in state.expected - set(state.offers):
            self.misses[tid] = self.misses.get(tid, 0) + 1
            if self.misses[tid] == DEFAULT_MAX_MISSES:
                log.warning(
                    "transmitter %s missed %d queries in a row; not waited for until it offers", tid, DEFAULT_MAX_MISSES
                )
        self.planned[qid] = None
        while len(self.planned) > DEFAULT_PLANNED_MEMORY:
            self.planned.popitem(last=False)
        rates = {
            tid: m.presence.link_rate_bps
            for tid, m in self.roster.live("transmitter").items()
            if m.presence.link_rate_bps is not None
        }
        rtts = {tid: m.presence.rtt_s for tid, m in self.roster.live("transmitter").items() if m.presence.rtt_s}
        # fp -> tail tokens: from the query itself, else from the receiver's last heartbeat
        listed = listed_fusers(state.query.fusers)
        receiver = self.roster.get("receiver", state.query.receiver_id)
        if listed is None and receiver is not None:
            listed = listed_fusers(receiver.presence.fusers)
        whole = whole_models(state.query.fusers)  # caches the receiver reads only with every layer
        plan = build_plan(
            state.query,
            state.offers,
            gate=self.gate,
            policy=self.policy,
            precision=self.cfg.precision,
            expected=state.expected,
            fusable=lambda offer: self._fusable(offer, state.query.receiver_id, listed),
            tail=lambda offer: (listed or {}).get(offer.model_fingerprint),
            whole=lambda offer: offer.model_fingerprint in whole,
            rates=rates,
            rtts=rtts,
            assumed_rate_bps=self.cfg.assumed_rate_mbps * MBPS,
            window_s=state.window_s,
            reserve_s=self.cfg.answer_reserve_s,
        )
        await self.publish(self.subjects.plan(qid, self.id), plan)
        self.plans_published += 1
        took_ms = 1000 * (time.monotonic() - state.t0)
        self.latency.add(took_ms)
        await self.tracer.emit(qid, "plan", count=len(plan.entries), ms=took_ms, peer=state.query.receiver_id)
        log.debug(
            "plan %s: %s; omitted %s",
            qid,
            [(e.transmitter_id, len(e.layers), e.precision, round(e.weight, 3)) for e in plan.entries],
            [(o.transmitter_id, o.reason) for o in plan.omitted],
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.gate``."""
    return cli.main("gate", argv)
