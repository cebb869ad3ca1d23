"""Receiver agent: owns the user's question, gathers the planned caches, fuses them, answers by the deadline.

``python -m agents.receiver --model NAME_OR_PATH --fusers DIR --nats URL [--id ID]``

Per ask (request/reply on ``fr.ask``, a queue group shared by receivers): with ``--self-check P``, the
receiver first reads the question itself and answers alone when its P(none) is below P (nothing is sent).
Otherwise: q' from the rephraser when private
(``fr.rephrase.<id>``; rules-only redaction here if it does not answer) -> :class:`~bus.schemas.Query` on
``fr.query.<id>`` -> the plan on ``fr.plan.<query_id>.<gate>`` (none in time: the gate is down, answer alone) ->
the planned KV streams on ``fr.kv.<id>.<query_id>.*`` (a plan entry marked ``inline``: from the cache that came
inside its offer, no stream) until every planned layer arrived, its sender left, or only
the answer reserve is left before the deadline -> ``fusion.refine.receiver_answer`` on whatever arrived
complete -> :class:`~bus.schemas.Answer` with provenance (used: transmitters and layers; omitted: left, late,
not chosen, no fuser, error) as the reply, and on ``fr.answer.<id>.<query_id>`` when the question is not private
(a private answer goes to the asker's inbox only).

Identity checks: an offer counts only from the transmitter its subject names and with this query's digest; a plan
only from the gate the query names (one live gate of ``--gates``, any gate identity when none is given, taken in
turn: ``agents.gatepick``; so two gates never plan one query), with this query's digest, receiver
and deadline; an ask whose deadline is beyond ``--max-deadline-s`` is refused with ``limit``.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags first: --help and a bad flag answer before torch is imported
    from agents.cli import main

    raise SystemExit(main("receiver"))

import asyncio
import logging
import statistics
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.msg import Msg

from agents import cli, tracing
from agents.askqueue import AskQueue
from agents.base import Agent, decode
from agents.config import ReceiverConfig
from agents.fuserbook import FuserBook
from agents.gatepick import GatePicker
from agents.kvintake import GuardedKVReceiver
from agents.roster import Member
from bus.errors import ChunkError, FedRefineError, FusionError, LimitError, SchemaError
from bus.inline import decode_inline
from bus.schemas import (
    Answer,
    Ask,
    ErrorReply,
    Offer,
    Omission,
    Plan,
    PlanEntry,
    Query,
    TransmitterUse,
    decode_message,
    digest_of,
)
from bus.transport import LayerDone
from fusion.answers import Reading
from fusion.c2c import ReceiverView, prefix_cache, receiver_view
from fusion.fuse import Received, fuse, transmitter_deltas
from fusion.fuser import PairFuser
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel
from fusion.prompts import LETTERS, option_letter
from fusion.refine import answer_after, answer_alone, knows_alone, receiver_self_check, shared_prompt
from privacy.rephrase import rephrase

log = logging.getLogger(__name__)

DEFAULT_KV_GRACE_S = 2.0  # seconds past the deadline the reassembler keeps a query's partial state
DEFAULT_CLOSED_MEMORY = 4096  # answered query ids remembered (their late KV is ignored quietly)
DEFAULT_RESERVE_FACTOR = 1.5  # reserve = factor x mean answer time x (answers queued + 1), at least the floor
DEFAULT_FUSED_WINDOW = 32  # fused answers whose median time judges whether an ask is worth asking the others
DEFAULT_FUSED_MEMORY_S = 10.0  # ... those of the last seconds only: times from a fault long mended do not shed asks
DEFAULT_SHED_FACTOR = 2.0  # an ask answers alone when less than this x a fused answer (+ the reserve) is left
SHED_NOTE = "too little of its deadline was left to ask the others"


@dataclass
class _Open:
    """One ask in progress."""

    query_id: str
    ask: Ask
    t0: float  # monotonic
    deadline: float  # monotonic
    deadline_unix: float
    offers: dict[str, Offer] = field(default_factory=dict)
    plan: Plan | None = None
    plan_seen: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    left: set[str] = field(default_factory=set)
    view: ReceiverView | None = None  # how the receiver reads the shared prompt (and q, when private)
    prefix: asyncio.Future[KVCache] | None = None  # its own cache of the prefix, prefilled while caches travel
    early: dict[str, tuple[tuple[int, ...], asyncio.Future[Any]]] = field(default_factory=dict)  # deltas so far
    inline: dict[str, dict[int, KV]] = field(default_factory=dict)  # planned layers that came inside offers
    inline_errors: dict[str, str] = field(default_factory=dict)  # why an inline cache could not be used
    digest: int | None = None  # digest_of(the Query it published): offers and plans must carry it
    gates: tuple[str, ...] = ()  # the gate(s) its Query named: only their plan counts (agents.gatepick)
    queued_s: float = 0.0  # seconds it waited in the receiver's queue before its turn
    gate_gone: bool = False  # the one gate it asked left or stopped heartbeating before planning it


class ReceiverAgent(Agent):
    """Answers asks with its model, fused with what the planned transmitters sent."""

    role = "receiver"
    tracks_presence = True

    def __init__(
        self,
        cfg: ReceiverConfig,
        model: LanguageModel | None = None,
        fusers: Mapping[str, PairFuser] | None = None,
    ) -> None:
        super().__init__(cfg)
        self.cfg: ReceiverConfig = cfg
        self.model = model if model is not None else cfg.load_model()
        self.model_fingerprint = self.model.fingerprint
        self.book = FuserBook(self.model_fingerprint, cfg.fusers, fusers)
        self.open: dict[str, _Open] = {}
        self.closed: OrderedDict[str, None] = OrderedDict()
        self.kv: GuardedKVReceiver | None = None
        self.answered = 0
        self._answer_s = cfg.answer_reserve_s / 4  # running mean of fuse + read time
        self._answering = 0
        self._fused: deque[tuple[float, float]] = deque(maxlen=DEFAULT_FUSED_WINDOW)  # (when, turn-to-reply seconds)
        self.queue = AskQueue(self, self._serve, cfg.max_queued)  # asks beyond max_inflight wait their turn
        self.shed = 0  # asks answered alone for lack of time (queued, or too many being read)
        self.gates = GatePicker(cfg.trusted_gates, self.roster)  # one live gate plans each query
        self.roster.listen(self._on_roster)

    def capabilities(self) -> tuple[str, ...]:
        """``answer``, and the transmitter models it can fuse (so the gate never plans the others)."""
        return ("answer", *self.book.capabilities())

    def counters(self) -> dict[str, Any]:
        """Asks, how they were answered, and the queue (``agents.service``)."""
        waiting = {"queued_now": len(self.queue), "open": len(self.open), "shed": self.shed, "answered": self.answered}
        return {**self.count, **self.queue.counts, **waiting, "gates_live": len(self.gates.live())}

    # ---- subscriptions ------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """KV intake first (nothing may arrive unheard), then offers, plans, and asks last (intake)."""
        assert self.sub is not None
        self.kv = GuardedKVReceiver(
            self.sub,
            self.subjects.kv_for_receiver(self.id),
            subjects=self.subjects,
            on_layer=self._on_layer,
            on_error=lambda exc, subject: self.reject(subject, str(exc)),
            guard=self._kv_guard,
            is_late=lambda qid: qid in self.closed,
        )
        await self.kv.start()
        await self.listen(self.subjects.offers_all(), self._on_offer)
        await self.listen(self.subjects.plans_all(), self._on_plan)
        await self.listen(self.subjects.ask(), self._on_ask, queue=f"{self.cfg.prefix}-receivers", intake=True)

    async def teardown(self) -> None:
        """Stop the KV intake."""
        if self.kv is not None:
            await self.kv.stop()

    def _kv_guard(self, query_id: str, sender: str) -> str | None:
        q = self.open.get(query_id)
        if q is None:
            return f"KV for query {query_id}, which this receiver has not opened"
        if q.plan is not None and all(e.transmitter_id != sender for e in q.plan.entries):
            return f"KV from {sender}, which the plan of {query_id} does not name"
        return None

    def _on_layer(self, done: LayerDone) -> None:
        q = self.open.get(done.query_id)
        if q is not None:
            q.progress.set()

    def _on_roster(self, change: str, member: Member) -> None:
        if member.role == "gate" and change in ("left", "expired"):
            for q in self.open.values():  # a query that asked only that gate will get no plan: stop waiting for one
                if q.plan is None and q.gates == (member.agent_id,):
                    q.gate_gone = True
                    q.plan_seen.set()
            return
        if member.role != "transmitter" or change not in ("left", "expired"):
            return
        for q in self.open.values():
            q.left.add(member.agent_id)
            q.progress.set()

    async def _on_offer(self, msg: Msg) -> None:
        parts = self.subjects.parse(msg.subject)
        q = self.open.get(parts.query_id or "")
        if q is None:
            return  # another receiver's query (or one already answered)
        if parts.sender in q.offers:  # before decoding: a flood of copies costs little
            raise SchemaError(f"second offer from {parts.sender} for {parts.query_id}")
        offer = decode(msg, Offer)
        if (offer.query_id, offer.transmitter_id) != (parts.query_id, parts.sender):
            raise SchemaError(f"offer of {offer.transmitter_id} for {offer.query_id} on {msg.subject}")
        if offer.query_digest != q.digest:
            raise SchemaError(f"offer from {parts.sender} carries the digest of another query than {parts.query_id}")
        q.offers[offer.transmitter_id] = offer
        q.progress.set()  # a plan may be waiting for the cache inside this offer

    async def _on_plan(self, msg: Msg) -> None:
        parts = self.subjects.parse(msg.subject)
        q = self.open.get(parts.query_id or "")
        if q is None:
            return
        gates = self.cfg.trusted_gates
        if gates and parts.sender not in gates:
            raise SchemaError(f"plan from gate {parts.sender}, which this receiver does not take plans from")
        if q.gates and parts.sender not in q.gates:
            raise SchemaError(f"plan from gate {parts.sender}; query {parts.query_id} asked {', '.join(q.gates)}")
        if q.plan is not None:
            raise SchemaError(f"second plan for {parts.query_id}")
        plan = decode(msg, Plan)
        if plan.query_id != parts.query_id or plan.receiver_id != self.id:
            raise SchemaError(f"plan for {plan.query_id}/{plan.receiver_id} on {msg.subject}")
        if plan.query_digest != q.digest or abs(plan.deadline_unix - q.deadline_unix) > 1e-3:
            raise SchemaError(f"plan on {msg.subject} is for another query (digest or deadline differ)")
        q.plan = plan
        q.plan_seen.set()

    async def _on_ask(self, msg: Msg) -> None:
        try:
            ask = decode(msg, Ask)
            if self.model.style == "letter" and len(ask.options) != len(LETTERS):
                raise SchemaError(f"this receiver answers {len(LETTERS)}-option questions; got {len(ask.options)}")
            if self.model.style == "text" and len(ask.options) == 1:
                raise SchemaError("a question needs no options (free text) or at least two")
            shared_prompt(ask.question, ask.options, style=self.model.style)  # blank stem/options: SchemaError now
        except SchemaError as exc:
            await self.respond(msg, ErrorReply(code="bad_request", message=str(exc)[:500]))
            raise
        if ask.deadline_s > self.cfg.max_deadline_s:
            why = f"deadline {ask.deadline_s:g} s exceeds this receiver's {self.cfg.max_deadline_s:g} s"
            await self.respond(msg, ErrorReply(code="limit", message=why))
            raise SchemaError(why)
        if self.draining:
            await self.respond(msg, ErrorReply(code="unavailable", message=f"receiver {self.id} is stopping"))
            return
        refused = self.queue.admit(msg, ask)  # now, or in line for a slot (backpressure), or refused past the line
        if refused is not None:
            await self.respond(msg, refused)

    async def drain_wait(self, until: float) -> None:
        """Stopping: serve the queue until ``until`` (agents.askqueue)."""
        await self.queue.drain(until)

    # ---- one ask ------------------------------------------------------------------------------------------

    async def _serve(self, msg: Msg, ask: Ask, t0: float, queued: bool = False) -> None:
        qid = uuid.uuid4().hex[:16]
        left = t0 + ask.deadline_s - time.monotonic()  # the deadline runs from receipt, queued or not
        q = _Open(qid, ask, t0, t0 + ask.deadline_s, time.time() + left)
        q.queued_s = time.monotonic() - t0 if queued else 0.0
        tracing.QUERY_ID.set(qid)  # every log line about this ask names it
        self.count["asks"] += 1
        await self.tracer.emit(qid, "ask", ms=1000 * q.queued_s, detail="queued" if queued else "")
        assert self.kv is not None
        try:
            self.kv.set_deadline(qid, ask.deadline_s + DEFAULT_KV_GRACE_S)
        except LimitError as exc:
            await self.respond(msg, ErrorReply(code="limit", message=str(exc)[:500]))
            return
        self.open[qid] = q
        try:
            answer = await self._answer(q)
        except FedRefineError as exc:
            log.warning("receiver %s: query %s failed: %s", self.id, qid, exc)
            self.count["errors"] += 1
            await self.respond(msg, ErrorReply(code="internal", message=str(exc)[:500], query_id=qid))
            await self.tracer.emit(qid, "error", detail="internal")
            return
        finally:
            self.open.pop(qid, None)
            self.closed[qid] = None
            while len(self.closed) > DEFAULT_CLOSED_MEMORY:
                self.closed.popitem(last=False)
            self.kv.forget(qid)
        self.answered += 1
        if answer.used:  # how long a fused answer takes (what an ask needs to be worth asking the others)
            now = time.monotonic()
            self._fused.append((now, now - t0 - q.queued_s))
        await self.respond(msg, answer)
        if not ask.private:  # a private answer reaches the asker only
            await self.publish(self.subjects.answer(self.id, qid), answer)
        self.latency.add(1000 * answer.latency_s)
        self.count["fused" if answer.used else "alone"] += 1
        self.count["kv_bytes_in"] += answer.bytes_received
        await tracing.emit_answer(self.tracer, answer)

    def _fused_s(self) -> float:
        """The median time of the recent fused answers (0 before any): a slow one, waiting for a dead transmitter
        or gate, does not move it; a receiver that is overloaded does. Only the last DEFAULT_FUSED_MEMORY_S count:
        a receiver that shed every ask after a fault would otherwise never fuse again to learn it is mended."""
        since = time.monotonic() - DEFAULT_FUSED_MEMORY_S
        recent = [s for when, s in self._fused if when >= since]
        return statistics.median(recent) if recent else 0.0

    def _reserve(self) -> float:
        return max(self.cfg.answer_reserve_s, DEFAULT_RESERVE_FACTOR * self._answer_s * (self._answering + 1))

    async def _rephrase(self, q: _Open, notes: list[str]) -> str:
        """q' from this receiver's rephraser; rules-only redaction here when it does not answer in time."""
        wait = self.cfg.rephrase_share * q.ask.deadline_s
        request = Ask(question=q.ask.question, options=q.ask.options, private=True, deadline_s=wait, ask_id=q.query_id)
        assert self.pub is not None
        try:
            reply = await self.pub.request(self.subjects.rephrase(self.id), request.to_bytes(), timeout=wait)
            got = decode_message(reply.data)
            if isinstance(got, Query) and got.query_id == q.query_id:
                return got.text
            why = got.message if isinstance(got, ErrorReply) else f"unexpected {got.kind} reply"
        except (TimeoutError, nats.errors.Error) as exc:
            why = f"{type(exc).__name__}" if not str(exc) else str(exc)
        except SchemaError as exc:
            why = str(exc)
        notes.append(f"rephraser unavailable ({why[:120]}); personal details removed by rules only")
        return (await self.compute(rephrase, q.ask.question, None)).text

    async def _answer(self, q: _Open) -> Answer:
        notes: list[str] = []
        ask = q.ask
        if self.cfg.self_check is not None and self.model.style == "letter":
            probs, p_none = await self.compute(receiver_self_check, self.model, ask.question, ask.options)
            if knows_alone(p_none, self.cfg.self_check):
                notes.append(
                    f"answered alone: the receiver knows this (its P(none) {p_none:.3f} < {self.cfg.self_check}); "
                    "nobody was asked"
                )
                choice = int(probs.argmax())
                reading = Reading(choice, tuple(float(p) for p in probs), ask.options[choice])
                return self._reply(q, reading, {}, {}, [], notes, alone=True)
        busy = q.queued_s > 0 or len(self.open) > 1  # an idle receiver always asks: that is how it learns it may
        if busy and q.deadline - time.monotonic() < DEFAULT_SHED_FACTOR * self._fused_s() + self._reserve():
            self.shed += 1
            waited = f"the ask waited {q.queued_s:.2f} s in the receiver's queue, and " if q.queued_s else ""
            notes.append(f"answered alone: {waited}{SHED_NOTE} ({self._answering} answers being read)")
            reading = await self.compute(answer_alone, self.model, ask.question, ask.options)
            return self._reply(q, reading, {}, {}, [], notes)
        text = await self._rephrase(q, notes) if ask.private else ask.question
        style = self.model.style
        shared, original = shared_prompt(ask.question, ask.options, text if ask.private else None, style)
        q.gates = self.gates.pick()
        query = Query(
            query_id=q.query_id,
            receiver_id=self.id,
            text=text,
            options=ask.options,
            deadline_unix=q.deadline_unix,
            fusers=self.book.capabilities(),
            gates=q.gates,
        )
        q.digest = digest_of(query)
        await self.publish(self.subjects.query(self.id), query)
        t_query = time.monotonic()
        await self.tracer.emit(q.query_id, "query", peer=q.gates[0] if len(q.gates) == 1 else None)
        # what the receiver needs of its own does not depend on what arrives: prefill it while transmitters work
        q.view = receiver_view(self.model, shared, original)
        q.prefix = asyncio.ensure_future(self.compute(prefix_cache, self.model, q.view))
        plan_until = min(q.t0 + self.cfg.plan_share * ask.deadline_s, q.deadline - self._reserve())
        try:
            await asyncio.wait_for(q.plan_seen.wait(), timeout=max(0.0, plan_until - time.monotonic()))
            if q.plan is None:  # woken without one: its gate is gone
                raise TimeoutError
        except TimeoutError:
            if q.gate_gone or plan_until >= q.t0 + self.cfg.plan_share * ask.deadline_s - 1e-3:
                self.gates.missed(q.gates)  # it had its full time: the gate is suspect (not when our reserve cut it)
            which = f"the gate ({', '.join(q.gates)})" if q.gates else "the gate"
            alive = "" if self.gates.live() else "; no gate is heartbeating"
            if plan_until <= q.t0 and not q.gate_gone:  # the reserve took the whole deadline: nothing to wait for
                notes.append(
                    f"the deadline ({ask.deadline_s:.3f} s) leaves no time to wait for a plan ({self._reserve():.2f} s "
                    "kept to answer); answered alone"
                )
            else:
                waited = time.monotonic() - q.t0 if q.gate_gone else plan_until - q.t0
                notes.append(f"no plan from {which} within {waited:.2f} s (gate down?){alive}; answered alone")
        t_plan = time.monotonic()
        if q.plan is not None:
            await self.tracer.emit(q.query_id, "plan", count=len(q.plan.entries), ms=1000 * (t_plan - q.t0))
            await self._await_streams(q, q.plan)
        received, uses, omitted = self._gather(q, notes)
        self._answering += 1
        started = time.monotonic()
        try:
            prefix = await q.prefix
            ready = {}
            for tid, (layers, fut) in q.early.items():
                if tid in received and not fut.cancelled():
                    try:
                        ready[tid] = (layers, await fut)
                    except FusionError:
                        pass  # fuse() computes them again and reports why they cannot be used
            fps = {got.fingerprint for got in received.values()}
            fusers = {fp: f for fp in fps if (f := self.book.get(fp)) is not None}
            fused = await self.compute(fuse, q.view, prefix, received, fusers, ready)
            for tid, why in fused.failed.items():
                notes.append(f"{tid}: fusion failed ({why}); left out")
                omitted.append(Omission(transmitter_id=tid, reason="error", detail=why[:500]))
            reading = await self.compute(answer_after, self.model, q.view, fused, ask.options)
        finally:
            self._answering -= 1
            # the compute time of fusing and reading (not the wait for the compute thread: the reserve multiplies
            # it by the answers being read, which is that wait)
            self._answer_s = self._compute_s.get("fuse", 0.0) + self._compute_s.get("answer_after", 0.0)
            for _, fut in q.early.values():
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved, so a failure left unused is not reported as never retrieved
        log.debug(
            "query %s: query out %.1f ms, plan %.1f ms, streams %.1f ms, answer %.1f ms",
            q.query_id,
            1000 * (t_query - q.t0),
            1000 * (t_plan - q.t0),
            1000 * (started - q.t0),
            1000 * (time.monotonic() - q.t0),
        )
        return self._reply(q, reading, fused.used, uses, omitted, notes)

    def _reply(
        self,
        q: _Open,
        reading: Reading,
        used: Mapping[str, list[int]],
        uses: Mapping[str, TransmitterUse],
        omitted: list[Omission],
        notes: list[str],
        alone: bool = False,
    ) -> Answer:
        """The answer to ``q`` from the receiver's reading and what was used."""
        ask = q.ask
        choice = option_letter(reading.choice) if reading.choice is not None else None
        return Answer(
            query_id=q.query_id,
            receiver_id=self.id,
            text=f"{choice}) {ask.options[reading.choice]}" if choice is not None else reading.text[:2000],
            choice=choice,
            used=tuple(uses[t].model_copy(update={"layers": tuple(used[t])}) for t in sorted(used)),
            omitted=tuple(omitted),
            latency_s=time.monotonic() - q.t0,
            bytes_received=sum(self._bytes_from(q, tid) for tid in set(q.offers) | set(uses)),
            probs=tuple(min(1.0, max(0.0, round(float(p), 6))) for p in reading.probs),
            notes=tuple(n[:500] for n in notes[:16]),
            alone=alone,
        )

    async def _deltas(self, q: _Open, got: Received) -> Any:
        """One transmitter's deltas on this receiver's prefix (on the compute thread)."""
        assert q.prefix is not None and q.view is not None
        prefix = await q.prefix
        return await self.compute(transmitter_deltas, q.view, prefix, got, self.book.get(got.fingerprint))

    def _bytes_from(self, q: _Open, tid: str) -> int:
        """KV bytes that reached this receiver from one transmitter for ``q``: its stream and its offer's tail."""
        assert self.kv is not None
        offer = q.offers.get(tid)
        carried = 0
        if offer is not None and offer.inline is not None:
            carried = len(offer.inline.data)  # what it took on the wire: the base64 text
        return self.kv.stream_bytes.get((q.query_id, tid), 0) + carried

    def _inline_layers(self, q: _Open, entry: PlanEntry) -> dict[int, KV]:
        """The planned layers of an entry marked inline, from the cache inside its offer (decoded once; nothing
        while the offer has not been seen: offers and plans arrive on different subscriptions)."""
        tid = entry.transmitter_id
        offer = q.offers.get(tid)
        if tid not in q.inline and tid not in q.inline_errors and offer is not None:
            try:
                q.inline[tid] = decode_inline(offer, list(entry.layers))
            except ChunkError as exc:
                q.inline_errors[tid] = str(exc)
                self.reject(self.subjects.offer(q.query_id, tid), f"inline cache of {tid}: {exc}")
        return q.inline.get(tid, {})

    def _arrived(self, q: _Open, entry: PlanEntry) -> dict[int, Any]:
        """The complete layers of one planned transmitter so far (from its offer when the entry is inline)."""
        assert self.kv is not None
        if entry.inline:
            return self._inline_layers(q, entry)
        return self.kv.completed(q.query_id, entry.transmitter_id)

    def _start_complete_streams(self, q: _Open, plan: Plan) -> None:
        """Fuse each stream as soon as all its planned layers are in, while the others still travel."""
        for entry in plan.entries:
            tid = entry.transmitter_id
            if tid in q.early:
                continue
            done = self._arrived(q, entry)
            if not set(entry.layers) <= set(done):
                continue
            got = self._received(q, entry, done, sorted(entry.layers))
            if got is not None:
                q.early[tid] = (tuple(sorted(entry.layers)), asyncio.ensure_future(self._deltas(q, got)))

    def _received(self, q: _Open, entry: PlanEntry, done: Mapping[int, Any], layers: list[int]) -> Received | None:
        offer = q.offers.get(entry.transmitter_id)
        if offer is None or len(offer.offsets) != offer.n_tokens or self.book.get(offer.model_fingerprint) is None:
            return None
        return Received(offer.model_fingerprint, {m: done[m] for m in layers}, list(offer.offsets), entry.weight)

    async def _await_streams(self, q: _Open, plan: Plan) -> None:
        """Until every planned layer arrived or its sender left, or the answer reserve is all that is left."""
        while True:
            self._start_complete_streams(q, plan)
            waiting = [
                e
                for e in plan.entries
                if e.transmitter_id not in q.left
                and e.transmitter_id not in q.inline_errors
                and not set(e.layers) <= set(self._arrived(q, e))
            ]
            left = q.deadline - self._reserve() - time.monotonic()
            if not waiting or left <= 0:
                return
            q.progress.clear()
            try:
                await asyncio.wait_for(q.progress.wait(), timeout=left)
            except TimeoutError:
                return

    def _gather(self, q: _Open, notes: list[str]) -> tuple[dict[str, Received], dict[str, TransmitterUse], list]:
        """What arrived complete, per planned transmitter, and why the others are not used."""
        assert self.kv is not None
        received: dict[str, Received] = {}
        uses: dict[str, TransmitterUse] = {}
        omitted: list[Omission] = []
        plan = q.plan
        for entry in plan.entries if plan is not None else ():
            tid = entry.transmitter_id
            done = self._arrived(q, entry)
            got = sorted(set(entry.layers) & set(done))
            offer = q.offers.get(tid)
            why: tuple[str, str] | None = None
            if tid in q.inline_errors:
                why = ("error", q.inline_errors[tid][:500])
            elif not got:
                reason = "left" if tid in q.left else "late"
                why = (reason, f"0 of {len(entry.layers)} planned layers complete by the deadline")
            elif offer is None or len(offer.offsets) != offer.n_tokens:
                why = ("error", "no offer with token offsets seen for this query")
            elif self.book.get(offer.model_fingerprint) is None:
                why = ("no_fuser", f"no fuser for model {offer.model_fingerprint} into {self.model_fingerprint}")
            if why is not None:
                omitted.append(Omission(transmitter_id=tid, reason=why[0], detail=why[1]))  # type: ignore[arg-type]
                continue
            assert offer is not None
            if len(got) < len(entry.layers):
                notes.append(f"{tid}: {len(got)} of {len(entry.layers)} planned layers arrived by the deadline")
            received[tid] = self._received(q, entry, done, got)  # type: ignore[assignment]
            uses[tid] = TransmitterUse(
                transmitter_id=tid,
                layers=tuple(got),
                precision=entry.precision,
                bytes=self._bytes_from(q, tid),
                weight=entry.weight,
            )
        if plan is not None:
            omitted.extend(plan.omitted)
            if not plan.entries and not plan.omitted:
                notes.append("no live transmitter offered; answered alone")
            elif not received:
                notes.append("no transmitter's cache was usable; answered alone")
        return dict(sorted(received.items())), uses, omitted


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.receiver``."""
    return cli.main("receiver", argv)
