"""One ask a receiver is answering: what came for it (offers, plan, KV layers) and what its answer will say.

The receiver (``agents.receiver``) drives the steps; this class holds the state of one query and answers the
questions the steps ask of it: does this offer or plan belong here, which planned layers are in, which
transmitters are still awaited, what arrived complete and why the others are left out.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.fuserbook import FuserBook
from agents.kvintake import GuardedKVReceiver
from bus.errors import ChunkError, FusionError, SchemaError
from bus.inline import decode_inline
from bus.schemas import PRECISIONS, Ask, Offer, Omission, OmissionReason, Plan, PlanEntry, Precision, TransmitterUse
from fusion.c2c import ReceiverView
from fusion.fuse import Received
from fusion.kvcache import KV, KVCache

Rejected = Callable[[str, str], None]  # (transmitter id, why): its inline cache is reported like a bad offer


@dataclass
class OpenQuery:
    """One ask in progress, from its query to its reply."""

    query_id: str
    ask: Ask
    t0: float  # monotonic receipt of the ask
    deadline: float  # monotonic
    deadline_unix: float
    kv: GuardedKVReceiver  # the receiver's KV intake (streamed layers land there)
    book: FuserBook  # the receiver's fusers (translate asks: its translators)
    queued_s: float = 0.0  # seconds it waited in the receiver's queue before its turn
    notes: list[str] = field(default_factory=list)  # what the answer's notes will say
    digest: int | None = None  # digest_of(the Query it published): offers and plans must carry it
    gates: tuple[str, ...] = ()  # the gate(s) its Query named: only their plan counts (agents.gatepick)
    offers: dict[str, Offer] = field(default_factory=dict)
    plan: Plan | None = None
    plan_seen: asyncio.Event = field(default_factory=asyncio.Event)  # a plan came, or its one gate left
    gate_gone: bool = False  # the one gate it asked left or stopped heartbeating before planning it
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # an offer, a layer or a departure arrived
    left: set[str] = field(default_factory=set)  # transmitters that left during the query
    view: ReceiverView | None = None  # how the receiver reads the shared prompt (and q, when private)
    prefix: asyncio.Future[KVCache] | None = None  # its own cache of the prefix, prefilled while caches travel
    early: dict[str, tuple[tuple[int, ...], asyncio.Future[Any]]] = field(default_factory=dict)  # deltas so far
    inline: dict[str, dict[int, KV]] = field(default_factory=dict)  # planned layers that came inside offers
    inline_errors: dict[str, str] = field(default_factory=dict)  # why an inline cache could not be used

    # ---- what arrives -------------------------------------------------------------------------------------

    def take_offer(self, offer: Offer) -> None:
        """Keep a transmitter's offer (SchemaError when it carries another query's digest)."""
        if offer.query_digest != self.digest:
            tid = offer.transmitter_id
            raise SchemaError(f"offer from {tid} carries the digest of another query than {self.query_id}")
        self.offers[offer.transmitter_id] = offer
        self.progress.set()  # a plan may be waiting for the cache inside this offer

    def take_plan(self, plan: Plan, subject: str) -> None:
        """Keep the gate's plan (SchemaError when its digest or deadline is another query's)."""
        if plan.query_digest != self.digest or abs(plan.deadline_unix - self.deadline_unix) > 1e-3:
            raise SchemaError(f"plan on {subject} is for another query (digest or deadline differ)")
        self.plan = plan
        self.plan_seen.set()

    def gate_left(self, gate_id: str) -> None:
        """The gate left: when it was the only one asked and has not planned, stop waiting for a plan."""
        if self.plan is None and self.gates == (gate_id,):
            self.gate_gone = True
            self.plan_seen.set()

    def transmitter_left(self, transmitter_id: str) -> None:
        """A transmitter left: its stream is no longer waited for."""
        self.left.add(transmitter_id)
        self.progress.set()

    # ---- planned layers -----------------------------------------------------------------------------------

    def arrived(self, entry: PlanEntry, rejected: Rejected) -> dict[int, Any]:
        """The complete layers of one planned transmitter so far (from its offer when the entry is inline)."""
        if entry.inline:
            return self._inline_layers(entry, rejected)
        return self.kv.completed(self.query_id, entry.transmitter_id)

    def _inline_layers(self, entry: PlanEntry, rejected: Rejected) -> dict[int, KV]:
        """The planned layers of an inline entry, decoded once from its offer (none while the offer is unseen:
        offers and plans arrive on different subscriptions)."""
        tid = entry.transmitter_id
        offer = self.offers.get(tid)
        if tid not in self.inline and tid not in self.inline_errors and offer is not None:
            try:
                self.inline[tid] = decode_inline(offer, list(entry.layers))
            except ChunkError as exc:
                self.inline_errors[tid] = str(exc)
                rejected(tid, f"inline cache of {tid}: {exc}")
        return self.inline.get(tid, {})

    def awaited(self, rejected: Rejected) -> list[PlanEntry]:
        """Planned transmitters whose layers are not all in yet and that have not left or failed."""
        assert self.plan is not None
        return [
            e
            for e in self.plan.entries
            if e.transmitter_id not in self.left
            and e.transmitter_id not in self.inline_errors
            and not self.expected(e) <= set(self.arrived(e, rejected))
        ]

    def expected(self, entry: PlanEntry) -> set[int]:
        """The planned layers still to come from one transmitter: all of them, or those it sent before it cut its
        stream short (its link slowed and it re-planned: ``bus.frames.StreamCut``)."""
        sent = self.cut_short(entry)
        return set(entry.layers if sent is None else sent)

    def cut_short(self, entry: PlanEntry) -> tuple[int, ...] | None:
        """The planned layers a transmitter said it sent when it cut its stream short, in send order (None: it did
        not cut it)."""
        cut = None if entry.inline else self.kv.cut_layers(self.query_id, entry.transmitter_id)
        if cut is None:
            return None
        planned = set(entry.layers)
        return tuple(m for m in cut if m in planned)

    async def progressed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the next offer, layer, cut or departure; False when none came."""
        self.progress.clear()
        try:
            await asyncio.wait_for(self.progress.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    def fits(self, offer: Offer) -> bool:
        """Its offsets place its tokens in q' (a translate offer sends its notes' cache: no offsets at all)."""
        return len(offer.offsets) == offer.n_tokens or (self.ask.mode == "translate" and not offer.offsets)

    def received(self, entry: PlanEntry, done: Mapping[int, Any], layers: list[int]) -> Received | None:
        """What a fuser reads of one transmitter: its layers, offsets and weight (None when it cannot be fused)."""
        offer = self.offers.get(entry.transmitter_id)
        if offer is None or not self.fits(offer) or self.book.get(offer.model_fingerprint) is None:
            return None
        return Received(offer.model_fingerprint, {m: done[m] for m in layers}, list(offer.offsets), entry.weight)

    def complete_streams(self, rejected: Rejected) -> list[tuple[str, Received]]:
        """Planned transmitters whose layers are all in and whose deltas have not been started yet."""
        assert self.plan is not None
        out = []
        for entry in self.plan.entries:
            if entry.transmitter_id in self.early:
                continue
            done = self.arrived(entry, rejected)
            want = self.expected(entry)
            if want and want <= set(done) and (got := self.received(entry, done, sorted(want))):
                out.append((entry.transmitter_id, got))
        return out

    def bytes_from(self, tid: str) -> int:
        """Bytes that reached the receiver from one transmitter: KV stream, offer's inline cache text, hint."""
        offer = self.offers.get(tid)
        carried = len(offer.inline.data) if offer is not None and offer.inline is not None else 0
        carried += len(offer.hint.encode()) if offer is not None and offer.hint else 0
        return self.kv.stream_bytes.get((self.query_id, tid), 0) + carried

    # ---- what goes into the answer ------------------------------------------------------------------------

    def gather(
        self, receiver_fp: str, rejected: Rejected
    ) -> tuple[dict[str, Received], dict[str, TransmitterUse], list[Omission]]:
        """What arrived complete, per planned transmitter, and why the others are not used."""
        received: dict[str, Received] = {}
        uses: dict[str, TransmitterUse] = {}
        omitted: list[Omission] = []
        for entry in self.plan.entries if self.plan is not None else ():
            tid = entry.transmitter_id
            done = self.arrived(entry, rejected)
            got = sorted(set(entry.layers) & set(done))
            why = self._left_out(entry, got, receiver_fp)
            if why is not None:
                omitted.append(Omission(transmitter_id=tid, reason=why[0], detail=why[1]))
                continue
            sent = self.cut_short(entry)
            if len(got) < len(entry.layers):
                how = "before its link slowed and it cut the stream" if sent is not None else "by the deadline"
                self.notes.append(f"{tid}: {len(got)} of {len(entry.layers)} planned layers arrived {how}")
            precision = self._precision(entry, got)
            received[tid] = self.received(entry, done, got)  # type: ignore[assignment]  # _left_out checked it
            uses[tid] = TransmitterUse(
                transmitter_id=tid,
                layers=tuple(got),
                sent=sent,
                precision=precision,
                bytes=self.bytes_from(tid),
                weight=entry.weight,
            )
        if self.plan is not None:
            omitted.extend(self.plan.omitted)
            if not self.plan.entries and not self.plan.omitted:
                self.notes.append("no live transmitter offered; answered alone")
            elif not received:
                self.notes.append("no transmitter's cache was usable; answered alone")
        return dict(sorted(received.items())), uses, omitted

    def _precision(self, entry: PlanEntry, got: list[int]) -> Precision:
        """The precision the used layers travelled at: the plan's, or, when a transmitter re-planned mid-stream to a
        cheaper one, the coarsest that went in (with a note of the mix)."""
        if entry.inline:
            return entry.precision
        seen = self.kv.layer_precisions(self.query_id, entry.transmitter_id)
        mix = Counter(seen[m] for m in got if m in seen)
        if not mix or set(mix) == {entry.precision}:
            return entry.precision
        coarsest = max(mix, key=PRECISIONS.index)
        detail = ", ".join(f"{n} at {p}" for p, n in sorted(mix.items(), key=lambda kv: PRECISIONS.index(kv[0])))
        self.notes.append(f"{entry.transmitter_id}: layers re-planned mid-stream ({detail}; planned {entry.precision})")
        return coarsest  # type: ignore[return-value]

    def _left_out(self, entry: PlanEntry, got: list[int], receiver_fp: str) -> tuple[OmissionReason, str] | None:
        """Why a planned transmitter cannot be used, or None."""
        tid = entry.transmitter_id
        offer = self.offers.get(tid)
        if tid in self.inline_errors:
            return "error", self.inline_errors[tid][:500]
        if not got:
            reason: OmissionReason = "left" if tid in self.left else "late"
            return reason, f"0 of {len(entry.layers)} planned layers complete by the deadline"
        if offer is None or not self.fits(offer):
            return "error", "no offer with token offsets seen for this query"
        if self.book.get(offer.model_fingerprint) is None:
            return "no_fuser", f"no fuser for model {offer.model_fingerprint} into {receiver_fp}"
        return None

    async def ready_deltas(self, received: Mapping[str, Received]) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The deltas computed while other streams travelled, of the transmitters that go into the answer."""
        ready = {}
        for tid, (layers, fut) in self.early.items():
            if tid in received and not fut.cancelled():
                try:
                    ready[tid] = (layers, await fut)
                except FusionError:
                    pass  # fuse() computes them again and reports why they cannot be used
        return ready

    def cancel_early(self) -> None:
        """Stop deltas no one will read; retrieve the failures of finished ones (so none is reported unread)."""
        for _, fut in self.early.values():
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()

    def elapsed(self) -> float:
        """Seconds since the ask was received."""
        return time.monotonic() - self.t0
