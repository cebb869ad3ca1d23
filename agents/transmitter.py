"""Transmitter agent: prefill every query q' with its own model, offer, and stream the layers the gate plans.

``python -m agents.transmitter --model NAME_OR_PATH --nats URL [--id ID] [--link-mbps R | --link-trace FILE]
[--policy NAME_OR_MODULE:CLASS]``

Per query: ``fr.query.<receiver_id>`` -> ``fusion.refine.transmitter_prefill`` (same code as in process) -> an
:class:`~bus.schemas.Offer` on ``fr.offer.<query_id>.<id>`` -> wait for ``fr.plan.<query_id>.<gate>`` (from a gate
the query names, with the query's digest) -> if the plan names this transmitter, ``bus.transport.send_cache`` of
exactly the planned layers (cut to their last ``tokens`` when the plan says so), in the plan's order (most
important first), at the plan's precision, to ``fr.kv.<receiver_id>.<query_id>.<id>``; otherwise the prefill is
dropped. ``--link-mbps`` paces every KV publish with a :class:`~bus.shaper.LinkShaper`; ``--link-trace`` replays
a time-varying link instead (:class:`~bus.linktrace.TraceShaper`, the trace's clock starting with the agent).

Mid-stream, on a shaped link: between layers a :class:`~bus.steer.DeadlineSteer` projects the rest of the stream
at the link's rate now (with a trace: the trace's) behind the bytes still queued on it; when it would land after
the deadline less the receiver's answer reserve, ``--policy`` re-plans the remaining layers (the deadline-aware
policy: a cheaper precision, then fewer layers).

Translate queries (``Query.mode == "translate"``, docs/PROTOCOL.md section 3.2): the offer is summarised the same
way, but the cache it offers and streams is that of the note lines it retrieved for q' (keys position-free, no
offsets); with no notes for q' it makes no offer.

Inline caches: when the receiver's fuser for this model reads only its last token(s) (the query lists the tail)
and that tail of every layer is at most ``--inline-kv-bytes`` and the link carries it within ``--inline-kv-ms``,
the tail rides inside the offer at fp16 (:class:`~bus.schemas.InlineKV`). A plan entry marked ``inline`` then
needs no stream: the receiver already has those layers, which saves the plan -> stream round trip.

Link estimate (:class:`~bus.linkest.LinkEstimator`): every finished stream is a throughput sample, every
heartbeat times a flush round trip; a stream cut at its deadline, or a new stream starting while others are
still going (backlog growth), counts as load. Offers and heartbeats carry the usable rate; the gate plans
with it. On a shaped link the shaper's rate now caps the estimate (with a trace: the trace's rate now, as a
phone's modem reports its link rate), so the estimate follows the trace.

Bounds: a prefill waits for its plan at most ``DEFAULT_MAX_HOLD_S`` (whatever the query's deadline), at most
``DEFAULT_MAX_PENDING_PER_RECEIVER`` of one receiver and ``DEFAULT_MAX_PENDING`` in all wait at once, and a query
whose deadline is more than ``--max-deadline-s`` away is refused: no receiver can make a transmitter hold
memory for long.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags first: --help and a bad flag answer before torch is imported
    from agents.cli import main

    raise SystemExit(main("transmitter"))

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from agents import cli, tracing
from agents.base import Agent, decode
from agents.config import DEFAULT_ANSWER_RESERVE_S, TransmitterConfig
from agents.fuserbook import listed_fusers, whole_models
from agents.roster import DEFAULT_MAX_SKEW_S
from bus import connect as busconn
from bus.errors import CodecError, FedRefineError, SchemaError
from bus.inline import encode_inline, inline_bytes
from bus.linkest import MBPS, LinkEstimator
from bus.linktrace import TraceShaper, load_trace
from bus.policy import make_policy
from bus.schemas import MAX_HINT_CHARS, InlineKV, Offer, Plan, PlanEntry, Query, digest_of
from bus.shaper import LinkShaper
from bus.steer import DeadlineSteer
from bus.transport import SendReport, send_cache
from fusion.c2c import tail_tokens
from fusion.gate import OfferSummary
from fusion.kvcache import KVCache
from fusion.models import LanguageModel
from fusion.notes import DEFAULT_TOP_K, DeviceNotes
from fusion.refine import TransmitterPrefill, select_layers, shared_prompt, transmitter_prefill, write_hint
from fusion.translate import note_span

log = logging.getLogger(__name__)

DEFAULT_SEND_GRACE_S = 1.0  # seconds past the deadline a stream may still run before it is cut
DEFAULT_MAX_HOLD_S = 30.0  # seconds a prefill waits for its plan at most, whatever the deadline
DEFAULT_MAX_PENDING = 256  # prefills waiting for a plan at once
DEFAULT_MAX_PENDING_PER_RECEIVER = 64  # ... of which from one receiver
INLINE_PRECISION = "fp16"  # what a cache inside an offer is cast to (the gate's choice on an ample link)
MIN_TRACE_RATE_BPS = 1000.0  # bytes/s; a trace's outage is reported as this (a link rate must be positive)


@dataclass
class _Pending:
    """A prefill waiting for its plan."""

    query: Query
    prefill: TransmitterPrefill
    expires: float  # monotonic
    inline: InlineKV | None = None  # the tail that went out inside the offer


class TransmitterAgent(Agent):
    """Offers its cache of every query and streams the planned layers."""

    role = "transmitter"

    def __init__(self, cfg: TransmitterConfig, model: LanguageModel | None = None) -> None:
        super().__init__(cfg)
        self.cfg: TransmitterConfig = cfg
        self.model = model if model is not None else cfg.load_model()
        self.model_fingerprint = self.model.fingerprint
        self.notes = DeviceNotes.load(cfg.notes) if cfg.notes else None  # this device's knowledge; never sent
        self.link_rate_bps = cfg.link_mbps * MBPS if cfg.link_mbps else None
        self.shaper: LinkShaper | None = None
        if cfg.link_trace:
            self.shaper = TraceShaper(load_trace(cfg.link_trace), cfg.link_burst_bytes)
            self.link_rate_bps = max(MIN_TRACE_RATE_BPS, self.shaper.rate_bps)
        elif self.link_rate_bps:
            self.shaper = LinkShaper(self.link_rate_bps, cfg.link_burst_bytes)
        self.link = LinkEstimator(configured_rate_bps=self.link_rate_bps)
        self.policy = make_policy(cfg.policy, ignore_unused=True, reserve_s=0.0)  # re-plans streams mid-way
        self._inflight_bytes = 0  # planned bytes of streams still being sent
        self.pending: dict[str, _Pending] = {}
        self.sent = {"queries": 0, "offers": 0, "streams": 0, "inline": 0, "bytes": 0}
        self.replans = 0  # streams whose remaining layers were re-planned mid-way
        self.layers_sent: dict[str, int] = {}  # precision -> layers sent at it (streamed, or inline in an offer)

    def accepting(self) -> bool:
        """Queries from several receivers at once (each up to its 64): prefills run one at a time anyway, and the
        held ones are capped below (per receiver and in all), so take up to ``DEFAULT_MAX_PENDING``."""
        return not self.draining and len(self._tasks) < max(self.cfg.max_inflight, DEFAULT_MAX_PENDING)

    def capabilities(self) -> tuple[str, ...]:
        """Precisions it can send."""
        return ("kv", "fp32", "fp16", "bf16", "int8", "int4")

    def counters(self) -> dict[str, int]:
        """Queries, offers, streams, inline caches and bytes sent; prefills waiting for a plan."""
        return {**self.sent, **self.count, "pending": len(self.pending)}

    async def setup(self) -> None:
        """Queries (intake) and plans."""
        await self.listen(self.subjects.queries_all(), self._on_query, intake=True)
        await self.listen(self.subjects.plans_all(), self._on_plan)

    # ---- offers -------------------------------------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        query = decode(msg, Query)
        tracing.QUERY_ID.set(query.query_id)
        if query.receiver_id != self.subjects.parse(msg.subject).receiver_id:
            raise SchemaError(f"query of receiver {query.receiver_id} on {msg.subject}")
        left = query.deadline_unix - time.time()
        if left <= 0:
            raise SchemaError(f"query {query.query_id} arrived {-left:.2f} s after its deadline")
        if left > self.cfg.max_deadline_s + DEFAULT_MAX_SKEW_S:
            raise SchemaError(f"query {query.query_id} has a deadline {left:.0f} s away")
        if query.query_id in self.pending:
            raise SchemaError(f"duplicate query id {query.query_id}")
        self._forget_expired()
        mine = sum(1 for p in self.pending.values() if p.query.receiver_id == query.receiver_id)
        if len(self.pending) >= DEFAULT_MAX_PENDING or mine >= DEFAULT_MAX_PENDING_PER_RECEIVER:
            raise SchemaError(f"{len(self.pending)} prefills wait for plans ({mine} of {query.receiver_id}); skipped")
        if not self.accepting():
            log.info("transmitter %s skips query %s (busy or draining)", self.id, query.query_id)
            return
        shared, _ = shared_prompt(query.text, query.options, style=self.model.style)  # SchemaError for bad options
        self.sent["queries"] += 1
        if query.mode == "t2t":
            self.spawn(self._hint(query), name=f"hint-{query.query_id}", query_id=query.query_id)
            return
        self.spawn(self._offer(query, shared, left), name=f"offer-{query.query_id}", query_id=query.query_id)

    async def _hint(self, query: Query) -> None:
        """Text-to-text: write a short answer to q' (after this device's notes) and send it inside the offer; no
        cache is kept and no plan comes."""
        t0 = time.perf_counter()
        hint = await self.compute(device_hint, self.model, query.text, self.notes, self.cfg.top_k)
        ms = 1000 * (time.perf_counter() - t0)
        if time.time() >= query.deadline_unix:
            log.info("transmitter %s: hint for %s written after its deadline; not sent", self.id, query.query_id)
            return
        offer = self._cacheless_offer(query, n_tokens=1, confidence=1.0 if hint else 0.0, hint=hint[:MAX_HINT_CHARS])
        await self._send_offer(query, offer, len(hint.encode()), ms, detail="t2t")

    def _cacheless_offer(self, query: Query, **fields: Any) -> Offer:
        """An offer that carries no cache (a text hint, or a decline): this model's shape, this link's estimate."""
        return Offer(
            query_id=query.query_id,
            transmitter_id=self.id,
            query_digest=digest_of(query),
            model_fingerprint=self.model_fingerprint,
            n_layers=self.model.num_layers,
            kv_heads=self.model.kv_heads,
            head_dim=self.model.head_dim,
            link_rate_bps=self.link_now(),
            rtt_s=self.link.rtt_s,
            **fields,
        )

    def link_now(self) -> float | None:
        """The usable link rate now (bytes/s): with a trace, its rate now caps the estimate first."""
        if isinstance(self.shaper, TraceShaper):
            self.link.set_configured_rate(max(MIN_TRACE_RATE_BPS, self.shaper.rate_bps))
        self.link_rate_bps = self.link.usable_rate_bps
        return self.link_rate_bps

    def inline_budget(self) -> int:
        """Bytes of cache tail (before base64) this transmitter would send inside an offer now (0: none)."""
        self.link_now()
        rate = self.shaper.rate_bps if self.shaper is not None else self.link.usable_rate_bps
        if rate is None:  # nothing measured yet: the size cap alone
            return self.cfg.inline_kv_bytes
        on_wire = rate * self.cfg.inline_kv_ms / 1000  # base64 text: 4 characters per 3 bytes
        return min(self.cfg.inline_kv_bytes, int(on_wire * 3 / 4))

    async def _offer(self, query: Query, shared: str, left: float) -> None:
        budget = self.inline_budget()
        tail = (listed_fusers(query.fusers) or {}).get(self.model_fingerprint) if budget else None
        t0 = time.perf_counter()
        if query.mode == "translate":
            pre, inline = await self.compute(prefill_notes, self.id, self.model, shared, self.notes, self.cfg.top_k)
            if pre is None:
                log.info("transmitter %s: no notes specific to %s; declined", self.id, query.query_id)
                await self._decline(query, 1000 * (time.perf_counter() - t0))
                return
        else:
            pre, inline = await self.compute(
                prefill_with_inline, self.id, self.model, shared, tail, budget, self.notes, self.cfg.top_k
            )
        prefill_ms = 1000 * (time.perf_counter() - t0)
        if time.time() >= query.deadline_unix:
            log.info("transmitter %s: prefill of %s finished after its deadline; no offer", self.id, query.query_id)
            return
        hold = min(left + DEFAULT_SEND_GRACE_S, DEFAULT_MAX_HOLD_S)
        self.pending[query.query_id] = _Pending(query, pre, time.monotonic() + hold, inline)
        cache, summary = pre.cache, pre.offer
        measured = query.mode != "translate"  # a translate offer's model numbers were not measured (prefill_notes)
        offer = Offer(
            query_id=query.query_id,
            transmitter_id=self.id,
            query_digest=digest_of(query),
            model_fingerprint=summary.fingerprint,
            n_tokens=cache.num_tokens,
            n_layers=cache.num_layers,
            kv_heads=cache.kv_heads,
            head_dim=cache.head_dim,
            summary=summary.summary,
            confidence=min(1.0, max(0.0, 1.0 - summary.p_none)),
            link_rate_bps=self.link_now(),
            rtt_s=self.link.rtt_s,
            p_none=summary.p_none if measured else None,
            p_top=summary.p_top if measured else None,
            entropy=summary.entropy if measured else None,
            coverage=summary.coverage,
            offsets=tuple(pre.offsets),
            inline=inline,
        )
        if inline is not None:
            self.sent["inline"] += 1
        await self._send_offer(query, offer, len(inline.data) if inline is not None else 0, prefill_ms)
        self._forget_expired()

    async def _decline(self, query: Query, ms: float) -> None:
        """Tell the gate there is nothing to send for ``query`` (so that it does not wait out its window)."""
        offer = self._cacheless_offer(query, n_tokens=0, confidence=0.0, declined=True)
        await self._send_offer(query, offer, 0, ms, detail="declined")

    async def _send_offer(self, query: Query, offer: Offer, carried: int, ms: float, detail: str = "") -> None:
        """Publish an offer after the shaped link has passed the ``carried`` bytes it brings (an inline cache's
        base64 text, or a hint); count it and trace it with the ``ms`` its work took."""
        if carried:
            if self.shaper is not None:
                await self.shaper.acquire(carried)
            self.sent["bytes"] += carried
        nbytes = await self.publish(self.subjects.offer(query.query_id, self.id), offer)
        self.sent["offers"] += 1
        self.latency.add(ms)
        await self.tracer.emit(query.query_id, "offer", nbytes=nbytes, ms=ms, peer=query.receiver_id, detail=detail)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for qid in [q for q, p in self.pending.items() if p.expires <= now]:
            del self.pending[qid]

    # ---- plans and streams --------------------------------------------------------------------------------

    async def _on_plan(self, msg: Msg) -> None:
        parts = self.subjects.parse(msg.subject)
        pending = self.pending.get(parts.query_id or "")
        if pending is None:
            return  # a query this transmitter did not offer on (or already planned): not even decoded
        gates = pending.query.gates
        if gates and parts.sender not in gates:
            raise SchemaError(f"plan from gate {parts.sender}; the query of {parts.query_id} takes plans from {gates}")
        plan = decode(msg, Plan)
        if parts.query_id != plan.query_id:
            raise SchemaError(f"plan for {plan.query_id} on the subject of {parts.query_id}")
        if plan.query_digest != digest_of(pending.query):
            raise SchemaError(f"plan on {msg.subject} is for another query (digest differs)")
        if plan.receiver_id != pending.query.receiver_id:
            raise SchemaError(
                f"plan sends {plan.query_id} to {plan.receiver_id}; the query came from {pending.query.receiver_id}"
            )
        del self.pending[plan.query_id]
        entry = next((e for e in plan.entries if e.transmitter_id == self.id), None)
        if entry is None:
            return  # not chosen: the prefill is dropped
        if entry.inline:
            if pending.inline is None:
                raise SchemaError(f"plan of {plan.query_id} takes {self.id}'s cache from its offer, which had none")
            self.layers_sent[pending.inline.precision] = self.layers_sent.get(pending.inline.precision, 0) + len(
                entry.layers
            )
            return  # the receiver has these layers from the offer already
        self.spawn(self._stream(plan, entry, pending), name=f"stream-{plan.query_id}", query_id=plan.query_id)

    async def _stream(self, plan: Plan, entry: PlanEntry, pending: _Pending) -> None:
        layers = tail_tokens(ordered_layers(pending.prefill, entry.layers), entry.tokens)
        budget = plan.deadline_unix - time.time() + DEFAULT_SEND_GRACE_S
        if budget <= 0:
            log.info("transmitter %s: plan for %s arrived after its deadline", self.id, plan.query_id)
            return
        planned = entry.byte_budget
        self.link.observe_backlog(self._inflight_bytes)  # bytes of other streams ahead of this one
        self._inflight_bytes += planned
        steer = self._steer(plan, layers, self.model_fingerprint in whole_models(pending.query.fusers))
        try:
            report = await asyncio.wait_for(self._send(plan, entry, layers, steer), timeout=budget)
        except TimeoutError:
            self.link.observe_slow_consumer()  # the link could not carry what was planned in time
            log.warning("transmitter %s: stream of %s cut at its deadline", self.id, plan.query_id)
            return
        finally:
            self._inflight_bytes -= planned
            self.link_now()
            self.replans += steer is not None and steer.replans > 0
        await self._account(plan, report)

    def _steer(self, plan: Plan, layers: dict, whole: bool = False) -> DeadlineSteer | None:
        """Re-plans the rest of the stream with ``--policy`` when the shaped link would deliver it late (``whole``:
        the receiver reads this cache only with every layer, so the rest goes cheaper or the stream is cut).

        Only on a shaped link (``--link-mbps``, ``--link-trace``): there the link's rate now and the bytes still
        queued on it are known. Unshaped, publishes return before the bytes leave and the estimate comes from whole
        streams (slowed by whatever else the machine does), so a mid-stream projection would only guess.
        """
        shaper = self.shaper
        if shaper is None:
            return None
        self.link_now()  # the estimate follows the trace for the next offer and heartbeat
        deadline = time.monotonic() + (plan.deadline_unix - time.time())
        order = list(layers)
        return DeadlineSteer(
            self.policy,
            deadline=deadline,
            shapes={m: tuple(layers[m][0].shape) for m in order},
            importance={m: float(len(order) - i) for i, m in enumerate(order)},  # the plan's order: best first
            rate=lambda: shaper.rate_bps,
            backlog=shaper.backlog_bytes,
            reserve_s=DEFAULT_ANSWER_RESERVE_S,
            whole=whole,
        )

    async def _send(self, plan: Plan, entry: PlanEntry, layers: dict, steer: DeadlineSteer | None) -> SendReport:
        assert self.pub is not None
        return await send_cache(
            self.pub,
            self.subjects.kv(plan.receiver_id, plan.query_id, self.id),
            layers,
            precision=entry.precision,
            query_id=plan.query_id,
            sender=self.id,
            shaper=self.shaper,
            steer=steer,
            compress=self.cfg.compress,
        )

    async def _account(self, plan: Plan, report: SendReport) -> None:
        """A finished stream: a throughput sample, counters, and its trace event."""
        self.link.observe_send(report.wire_bytes, report.seconds)
        self.link_now()
        self.sent["streams"] += 1
        self.sent["bytes"] += report.wire_bytes
        for precision in report.precisions:
            self.layers_sent[precision] = self.layers_sent.get(precision, 0) + 1
        await self.tracer.emit(
            plan.query_id, "kv_out", nbytes=report.wire_bytes, ms=1000 * report.seconds, peer=plan.receiver_id
        )
        log.debug(
            "transmitter %s sent %s: layers %s at %s (dropped %s), %d bytes, %.3f s",
            self.id,
            plan.query_id,
            report.layers,
            report.precisions,
            report.dropped,
            report.wire_bytes,
            report.seconds,
        )

    async def publish_presence(self) -> None:
        """Time a flush round trip for the link estimate, then heartbeat with the usable rate."""
        if self.pub is not None and self.pub.is_connected and not self._stopped:
            t0 = time.perf_counter()
            try:
                await busconn.flush(self.pub, timeout=1.0)
                self.link.observe_rtt(time.perf_counter() - t0)
                self.rtt_s = self.link.rtt_s
            except FedRefineError as exc:
                log.debug("transmitter %s: no round trip measured: %s", self.id, exc)
        self.link_now()
        await super().publish_presence()

    async def drain_wait(self, until: float) -> None:
        """Offers out but no plan yet: wait for their plans (or deadlines) before leaving."""
        while self.pending and time.monotonic() < until:
            self._forget_expired()
            await asyncio.sleep(0.05)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, until - time.monotonic()))


def device_hint(model: LanguageModel, text: str, notes: DeviceNotes | None, top_k: int = DEFAULT_TOP_K) -> str:
    """A transmitter's text-to-text hint for q' (``fusion.refine.write_hint`` after its retrieved notes)."""
    lines = notes.retrieve(text, top_k).lines if notes is not None else ()
    return write_hint(model, text, notes=lines)


def prefill_with_inline(
    name: str,
    model: LanguageModel,
    shared: str,
    tail: int | None,
    budget: int,
    notes: DeviceNotes | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> tuple[TransmitterPrefill, InlineKV | None]:
    """``transmitter_prefill`` (after its notes), and its last ``tail`` tokens of every layer inline when they fit
    ``budget`` bytes."""
    pre = transmitter_prefill(name, model, shared, notes, top_k)
    cache = pre.cache
    if (
        not tail
        or inline_bytes(cache.num_layers, cache.kv_heads, min(tail, cache.num_tokens), cache.head_dim, INLINE_PRECISION)
        > budget
    ):
        return pre, None
    try:
        return pre, encode_inline(tail_tokens(dict(enumerate(cache.layers)), tail), INLINE_PRECISION)
    except CodecError as exc:  # NaN/inf in the cache: the stream path reports it if the plan asks for it
        log.info("transmitter %s: no inline cache: %s", name, exc)
        return pre, None


def prefill_notes(
    name: str, model: LanguageModel, shared: str, notes: DeviceNotes | None = None, top_k: int = DEFAULT_TOP_K
) -> tuple[TransmitterPrefill | None, None]:
    """Translate mode: the cache that travels is that of the retrieved note lines that name q''s subject
    (``fusion.notes.Retrieved.named``; ``fusion.translate.note_span``, keys position-free; no offsets in q').
    ``(None, None)`` when it has no notes specific to q' (``fusion.notes.Retrieved.specific``: nothing worth
    translating, and its other lines stay home); never an inline cache. The model reads nothing else: the gate
    weighs translate offers uniformly (docs/TRANSFER.md: the confidence numbers of a prefill of q' after the lines
    told holders from the rest too weakly to save bytes, AUC 0.65), so the offer carries the notes' coverage of q'."""
    if notes is None or model.style != "text":
        return None, None
    t0 = time.perf_counter()
    retrieved = notes.retrieve(shared, top_k)
    span = note_span(model, retrieved.translated)
    if span is None:
        return None, None
    cache = KVCache([span.layers[m] for m in range(len(span.layers))])
    offer = OfferSummary(
        fingerprint=model.fingerprint,
        num_layers=cache.num_layers,
        num_tokens=cache.num_tokens,
        p_none=1.0 - retrieved.coverage,  # read as the offer's confidence (the coverage), not a model's belief
        p_top=0.0,
        entropy=0.0,
        coverage=retrieved.coverage,
    )
    return TransmitterPrefill(name, shared, cache, [], offer, time.perf_counter() - t0, retrieved.translated), None


def ordered_layers(prefill: TransmitterPrefill, layers: Sequence[int]) -> dict:
    """The planned layers of a prefill in the plan's order (``select_layers`` checks the indices)."""
    selected = select_layers(prefill, layers)
    return {m: selected[m] for m in layers}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.transmitter``."""
    return cli.main("transmitter", argv)
