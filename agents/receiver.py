"""Receiver agent: owns the user's question, gathers the planned caches, fuses them, answers by the deadline.

``python -m agents.receiver --model NAME_OR_PATH --fusers DIR --nats URL [--id ID]``

Per ask on ``fr.ask`` (a queue group shared by receivers) :meth:`ReceiverAgent._answer` reads as it runs: answer
alone when the self-check says it knows, or when a busy receiver has too little time left -> q' from the
rephraser when private -> the Query -> the gate's plan -> the planned KV streams (an ``inline`` entry: from its
offer) -> fuse what arrived complete -> the Answer with provenance, as the reply and, when not private, on
``fr.answer.<id>.<query_id>``. One query's state is an ``agents.openquery.OpenQuery``.

An offer counts only with this query's digest; a plan only from the gate the query names (``agents.gatepick``),
with its digest, receiver and deadline; an ask beyond ``--max-deadline-s`` is refused with ``limit``.
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
from typing import Any

import nats
from nats.aio.msg import Msg

from agents import cli, tracing
from agents.askqueue import AskQueue
from agents.base import Agent, decode
from agents.config import ReceiverConfig
from agents.fuserbook import FuserBook, TranslatorBook
from agents.gatepick import GatePicker
from agents.kvintake import GuardedKVReceiver
from agents.openquery import OpenQuery, Rejected
from agents.roster import Member
from bus.errors import FedRefineError, LimitError, SchemaError
from bus.frames import StreamCut
from bus.schemas import (
    Answer,
    Ask,
    ErrorReply,
    FuserSpec,
    Offer,
    Omission,
    Plan,
    Query,
    TransmitterUse,
    decode_message,
    digest_of,
)
from bus.transport import LayerDone
from fusion.answers import Reading
from fusion.c2c import prefix_cache, receiver_view
from fusion.fuse import Received, fuse, transmitter_deltas
from fusion.fuser import PairFuser
from fusion.models import LanguageModel
from fusion.prompts import LETTERS, option_letter
from fusion.refine import (
    answer_after,
    answer_alone,
    confident_alone,
    knows_alone,
    read_with_hints,
    receiver_self_check,
    shared_prompt,
)
from fusion.translate import read_translated
from privacy.rephrase import rephrase

log = logging.getLogger(__name__)

DEFAULT_KV_GRACE_S = 2.0  # seconds past the deadline the reassembler keeps a query's partial state
DEFAULT_CLOSED_MEMORY = 4096  # answered query ids remembered (their late KV is ignored quietly)
DEFAULT_RESERVE_FACTOR = 1.5  # reserve = factor x mean answer time x (answers queued + 1), at least the floor
DEFAULT_FUSED_WINDOW = 32  # fused answers whose median time judges whether an ask is worth asking the others
DEFAULT_FUSED_MEMORY_S = 10.0  # ... those of the last seconds only: times from a fault long mended do not shed asks
DEFAULT_SHED_FACTOR = 2.0  # an ask answers alone when less than this x a fused answer (+ the reserve) is left
PLAN_SLACK = (1.25, 64 * 1024)  # a stream may exceed its plan's byte estimate by this share and these bytes
SHED_NOTE = "too little of its deadline was left to ask the others"


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
        self.translators = TranslatorBook(self.model_fingerprint, cfg.fusers)  # translate asks (same directory)
        self.fusers_checked = False
        self.open: dict[str, OpenQuery] = {}
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
        """It answers."""
        return ("answer",)

    def fusers(self) -> tuple[FuserSpec, ...] | None:
        """The transmitter models it can fuse (so the gate never plans the others)."""
        return self.book.specs()

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
            on_cut=self._on_layer,  # a stream cut short: its sent layers may be all the receiver waits for
            on_error=lambda exc, subject: self.reject(subject, str(exc)),
            guard=self._kv_guard,
            is_late=lambda qid: qid in self.closed,
            budget=self._planned_bytes,
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

    def _planned_bytes(self, query_id: str, sender: str) -> int | None:
        """What a stream may bring: its plan's bytes with PLAN_SLACK to spare (None before the plan: unbounded)."""
        q = self.open.get(query_id)
        if q is None or q.plan is None:
            return None
        planned = next((e.byte_budget for e in q.plan.entries if e.transmitter_id == sender), 0)
        return int(planned * PLAN_SLACK[0]) + PLAN_SLACK[1]

    def _on_layer(self, done: LayerDone | StreamCut) -> None:
        q = self.open.get(done.query_id)
        if q is not None:
            q.progress.set()

    def _on_roster(self, change: str, member: Member) -> None:
        if change not in ("left", "expired"):
            return
        for q in self.open.values():
            if member.role == "gate":
                q.gate_left(member.agent_id)
            elif member.role == "transmitter":
                q.transmitter_left(member.agent_id)

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
        q.take_offer(offer)

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
        q.take_plan(plan, msg.subject)

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
        """Open a query for the ask, answer it, reply (and publish the answer when it is not private)."""
        qid = uuid.uuid4().hex[:16]
        left = t0 + ask.deadline_s - time.monotonic()  # the deadline runs from receipt, queued or not
        assert self.kv is not None
        book = self.translators if ask.mode == "translate" else self.book
        if ask.mode == "c2c" and not self.fusers_checked:
            self.fusers_checked = True  # on the first c2c ask: one with no fuser to read is answered alone
            if not self.book.fingerprints():
                hint = "; ask with mode translate" if self.translators.fingerprints() else ""
                log.warning("receiver %s has no C2C fusers: c2c asks are answered alone%s", self.id, hint)
        q = OpenQuery(qid, ask, t0, t0 + ask.deadline_s, time.time() + left, self.kv, book)
        q.queued_s = time.monotonic() - t0 if queued else 0.0
        tracing.QUERY_ID.set(qid)  # every log line about this ask names it
        self.count["asks"] += 1
        await self.tracer.emit(qid, "ask", ms=1000 * q.queued_s, detail="queued" if queued else "")
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
            self._close(qid)
        self.answered += 1
        if answer.used:  # how long a fused answer takes (what an ask needs to be worth asking the others)
            self._fused.append((time.monotonic(), q.elapsed() - q.queued_s))
        await self.respond(msg, answer)
        if not ask.private:  # a private answer reaches the asker only
            await self.publish(self.subjects.answer(self.id, qid), answer)
        self.latency.add(1000 * answer.latency_s)
        self.count["fused" if answer.used else "alone"] += 1
        self.count["kv_bytes_in"] += answer.bytes_received
        await tracing.emit_answer(self.tracer, answer)

    async def _answer(self, q: OpenQuery) -> Answer:
        """Check alone -> rephrase -> query -> plan -> streams -> fuse -> reply."""
        alone = await self._answer_alone_if_known(q) or await self._answer_alone_if_late(q)
        if alone is not None:
            return alone
        text = await self._rephrase(q) if q.ask.private else q.ask.question
        if q.ask.mode == "t2t":
            return await self._text_to_text(q, text)
        await self._publish_query(q, text)
        await self._await_plan(q)
        if q.plan is not None:
            await self._await_streams(q)
        return await self._fuse_and_read(q)

    async def _text_to_text(self, q: OpenQuery, text: str) -> Answer:
        """The text-to-text baseline over the bus: q' goes out, every live transmitter writes a short hint into its
        offer (no gate plans, no KV travels); the receiver waits for the hints until the plan share of the deadline
        (or the answer reserve), then reads its question with them."""
        expected = set(self.roster.live("transmitter"))
        query = Query(
            query_id=q.query_id,
            receiver_id=self.id,
            text=text,
            options=q.ask.options,
            deadline_unix=q.deadline_unix,
            mode="t2t",
        )
        q.digest = digest_of(query)
        await self.publish(self.subjects.query(self.id), query)
        await self.tracer.emit(q.query_id, "query", detail="t2t")
        until = min(q.t0 + self.cfg.plan_share * q.ask.deadline_s, q.deadline - self._reserve())
        while not expected <= set(q.offers) and (left := until - time.monotonic()) > 0:
            if not await q.progressed(left):
                break
        hints = {tid: o.hint for tid, o in sorted(q.offers.items()) if o.hint}
        missing = sorted(expected - set(q.offers))
        if missing:
            q.notes.append(f"no hint in time from {', '.join(missing)}")
        if not hints:
            q.notes.append("no transmitter wrote a hint; answered alone")
        self._answering += 1
        try:
            reading = await self.compute(
                read_with_hints, self.model, q.ask.question, q.ask.options, list(hints.values())
            )
        finally:
            self._answering -= 1
        uses = {
            tid: TransmitterUse(transmitter_id=tid, layers=(), precision=None, bytes=len(h.encode()))
            for tid, h in hints.items()
        }
        return self._reply(q, reading, used={tid: [] for tid in hints}, uses=uses)

    async def _answer_alone_if_known(self, q: OpenQuery) -> Answer | None:
        """With ``--self-check``: the answer, alone, when the receiver knows it (else None): a letter-style model's
        P(none) is below the threshold, a text-style model's confidence in its own answer reaches it."""
        if self.cfg.self_check is None:
            return None
        if self.model.style != "letter":
            reading = await self.compute(answer_alone, self.model, q.ask.question, q.ask.options)
            if not confident_alone(reading.confidence, self.cfg.self_check):
                return None
            knows = f"its confidence {reading.confidence:.3f} >= {self.cfg.self_check}"
            q.notes.append(f"answered alone: the receiver knows this ({knows}); nobody was asked")
            return self._reply(q, reading, alone=True)
        probs, p_none = await self.compute(receiver_self_check, self.model, q.ask.question, q.ask.options)
        if not knows_alone(p_none, self.cfg.self_check):
            return None
        knows = f"its P(none) {p_none:.3f} < {self.cfg.self_check}"
        q.notes.append(f"answered alone: the receiver knows this ({knows}); nobody was asked")
        choice = int(probs.argmax())
        return self._reply(q, Reading(choice, tuple(float(p) for p in probs), q.ask.options[choice]), alone=True)

    async def _answer_alone_if_late(self, q: OpenQuery) -> Answer | None:
        """A busy receiver answers alone an ask with too little time left to ask the others (else None); an idle
        one always asks: that is how it learns it may."""
        busy = q.queued_s > 0 or len(self.open) > 1
        if not busy or q.deadline - time.monotonic() >= DEFAULT_SHED_FACTOR * self._fused_s() + self._reserve():
            return None
        self.shed += 1
        waited = f"the ask waited {q.queued_s:.2f} s in the receiver's queue, and " if q.queued_s else ""
        q.notes.append(f"answered alone: {waited}{SHED_NOTE} ({self._answering} answers being read)")
        return self._reply(q, await self.compute(answer_alone, self.model, q.ask.question, q.ask.options))

    async def _rephrase(self, q: OpenQuery) -> str:
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
        q.notes.append(f"rephraser unavailable ({why[:120]}); personal details removed by rules only")
        return (await self.compute(rephrase, q.ask.question, None)).text

    async def _publish_query(self, q: OpenQuery, text: str) -> None:
        """Publish q' to the transmitters and the gate it picked; prefill its own prefix while they work."""
        ask = q.ask
        shared, original = shared_prompt(ask.question, ask.options, text if ask.private else None, self.model.style)
        q.gates = self.gates.pick()
        query = Query(
            query_id=q.query_id,
            receiver_id=self.id,
            text=text,
            options=ask.options,
            deadline_unix=q.deadline_unix,
            fusers=q.book.specs(),
            gates=q.gates,
            mode=ask.mode,
        )
        q.digest = digest_of(query)
        await self.publish(self.subjects.query(self.id), query)
        await self.tracer.emit(q.query_id, "query", peer=q.gates[0] if len(q.gates) == 1 else None)
        # what the receiver needs of its own does not depend on what arrives: prefill it while transmitters work
        q.view = receiver_view(self.model, shared, original)
        q.prefix = asyncio.ensure_future(self.compute(prefix_cache, self.model, q.view))

    async def _await_plan(self, q: OpenQuery) -> None:
        """Wait for the gate's plan until the plan share of the deadline (or the reserve) is over; none: a note."""
        full_wait = q.t0 + self.cfg.plan_share * q.ask.deadline_s
        plan_until = min(full_wait, q.deadline - self._reserve())
        try:
            await asyncio.wait_for(q.plan_seen.wait(), timeout=max(0.0, plan_until - time.monotonic()))
            if q.plan is None:  # woken without one: its gate is gone
                raise TimeoutError
        except TimeoutError:
            if q.gate_gone or plan_until >= full_wait - 1e-3:
                self.gates.missed(q.gates)  # it had its full time: the gate is suspect (not when our reserve cut it)
            which = f"the gate ({', '.join(q.gates)})" if q.gates else "the gate"
            alive = "" if self.gates.live() else "; no gate is heartbeating"
            if plan_until <= q.t0 and not q.gate_gone:  # the reserve took the whole deadline: nothing to wait for
                q.notes.append(
                    f"the deadline ({q.ask.deadline_s:.3f} s) leaves no time to wait for a plan "
                    f"({self._reserve():.2f} s kept to answer); answered alone"
                )
            else:
                waited = q.elapsed() if q.gate_gone else plan_until - q.t0
                q.notes.append(f"no plan from {which} within {waited:.2f} s (gate down?){alive}; answered alone")
        if q.plan is not None:  # (also one that came as the wait ran out: it is still used)
            await self.tracer.emit(q.query_id, "plan", count=len(q.plan.entries), ms=1000 * q.elapsed())

    async def _await_streams(self, q: OpenQuery) -> None:
        """Until every planned layer arrived or its sender left, or the answer reserve is all that is left; each
        stream that is complete starts its deltas at once, while the others still travel."""
        rejected = self._inline_rejected(q)
        while True:
            for tid, got in q.complete_streams(rejected):
                q.early[tid] = (tuple(sorted(got.layers)), asyncio.ensure_future(self._deltas(q, got)))
            left = q.deadline - self._reserve() - time.monotonic()
            if not q.awaited(rejected) or left <= 0 or not await q.progressed(left):
                return

    async def _deltas(self, q: OpenQuery, got: Received) -> Any:
        """One transmitter's deltas on this receiver's prefix, or (translate) its notes translated (on the compute
        thread)."""
        if q.ask.mode == "translate":
            return await self.compute(q.book.get(got.fingerprint), got.layers)
        assert q.prefix is not None and q.view is not None
        prefix = await q.prefix
        return await self.compute(transmitter_deltas, q.view, prefix, got, self.book.get(got.fingerprint))

    async def _translate_and_read(self, q: OpenQuery) -> Answer:
        """Translate mode: every notes' cache that arrived complete, translated (most while others travelled), placed
        before the receiver's own question, then the answer read (alone when nothing arrived)."""
        received, uses, omitted = q.gather(self.model_fingerprint, self._inline_rejected(q))
        self._answering += 1
        try:
            ready = await q.ready_deltas(received)
            spans, used = [], {}
            for tid in sorted(received):
                got = received[tid]
                try:
                    early = ready.get(tid)
                    if early is not None and early[0] == tuple(sorted(got.layers)):
                        spans.append(early[1])
                    else:
                        spans.append(await self.compute(q.book.get(got.fingerprint), got.layers))
                except FedRefineError as exc:
                    q.notes.append(f"{tid}: translation failed ({exc}); left out")
                    omitted.append(Omission(transmitter_id=tid, reason="error", detail=str(exc)[:500]))
                    continue
                used[tid] = sorted(got.layers)
            reading = await self.compute(read_translated, self.model, q.ask.question, q.ask.options, spans)
        finally:
            self._answering -= 1
            q.cancel_early()
        return self._reply(q, reading, used, uses, omitted)

    async def _fuse_and_read(self, q: OpenQuery) -> Answer:
        """Fuse what arrived complete into its prefix, read the answer, and reply with what went in."""
        if q.ask.mode == "translate":
            return await self._translate_and_read(q)
        received, uses, omitted = q.gather(self.model_fingerprint, self._inline_rejected(q))
        assert q.prefix is not None
        self._answering += 1
        try:
            prefix = await q.prefix
            ready = await q.ready_deltas(received)
            fps = {got.fingerprint for got in received.values()}
            fusers = {fp: f for fp in fps if (f := self.book.get(fp)) is not None}
            fused = await self.compute(fuse, q.view, prefix, received, fusers, ready)
            for tid, why in fused.failed.items():
                q.notes.append(f"{tid}: fusion failed ({why}); left out")
                omitted.append(Omission(transmitter_id=tid, reason="error", detail=why[:500]))
            reading = await self.compute(answer_after, self.model, q.view, fused, q.ask.options)
        finally:
            self._answering -= 1
            # the compute time of fusing and reading (not the wait for the compute thread: the reserve multiplies
            # it by the answers being read, which is that wait)
            self._answer_s = self._compute_s.get("fuse", 0.0) + self._compute_s.get("answer_after", 0.0)
            q.cancel_early()
        return self._reply(q, reading, fused.used, uses, omitted)

    def _reply(
        self,
        q: OpenQuery,
        reading: Reading,
        used: Mapping[str, list[int]] | None = None,
        uses: Mapping[str, TransmitterUse] | None = None,
        omitted: list[Omission] | None = None,
        alone: bool = False,
    ) -> Answer:
        """The answer to ``q`` from the receiver's reading and what was used."""
        used, uses = used or {}, uses or {}
        choice = option_letter(reading.choice) if reading.choice is not None else None
        return Answer(
            query_id=q.query_id,
            receiver_id=self.id,
            text=f"{choice}) {q.ask.options[reading.choice]}" if choice is not None else reading.text[:2000],
            choice=choice,
            used=tuple(uses[t].model_copy(update={"layers": tuple(used[t])}) for t in sorted(used)),
            omitted=tuple(omitted or ()),
            latency_s=q.elapsed(),
            bytes_received=sum(q.bytes_from(tid) for tid in set(q.offers) | set(uses)),
            probs=tuple(min(1.0, max(0.0, round(float(p), 6))) for p in reading.probs),
            notes=tuple(n[:500] for n in q.notes[:16]),
            alone=alone,
        )

    def _close(self, qid: str) -> None:
        """Forget an answered query: its late KV is ignored quietly from now on."""
        assert self.kv is not None
        self.open.pop(qid, None)
        self.closed[qid] = None
        while len(self.closed) > DEFAULT_CLOSED_MEMORY:
            self.closed.popitem(last=False)
        self.kv.forget(qid)

    def _inline_rejected(self, q: OpenQuery) -> Rejected:
        """How a bad inline cache in an offer of ``q`` is reported: as a rejected offer."""
        return lambda tid, why: self.reject(self.subjects.offer(q.query_id, tid), why)

    # ---- timing -------------------------------------------------------------------------------------------

    def _fused_s(self) -> float:
        """The median time of the recent fused answers (0 before any): a slow one, waiting for a dead transmitter
        or gate, does not move it; a receiver that is overloaded does. Only the last DEFAULT_FUSED_MEMORY_S count:
        a receiver that shed every ask after a fault would otherwise never fuse again to learn it is mended."""
        since = time.monotonic() - DEFAULT_FUSED_MEMORY_S
        recent = [s for when, s in self._fused if when >= since]
        return statistics.median(recent) if recent else 0.0

    def _reserve(self) -> float:
        """Seconds kept free before the deadline to fuse and read: more while other answers are being read."""
        return max(self.cfg.answer_reserve_s, DEFAULT_RESERVE_FACTOR * self._answer_s * (self._answering + 1))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.receiver``."""
    return cli.main("receiver", argv)
