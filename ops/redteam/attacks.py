"""The attack matrix: each attempt runs while legitimate questions are asked, and must fail without changing them.

An attempt is *blocked* when its own evidence says it failed (the server refused the publish or subscription, the
agents refused the message, nothing secret was read, a slow consumer was cut) **and** every legitimate question
asked meanwhile was answered exactly as in a clean round before any attack (same letter, same transmitters fused,
same probabilities to 4 decimals). ``ops.redteam.attempts`` holds the attempts; this module the harness.

Attackers hold the credentials of identities the federation has issued but that are not part of the honest
run: ``t-stolen`` (a transmitter), ``gate-stolen`` (a gate the receiver does not take plans from) and ``mallory``
(a user); ``none`` has only the server's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.auth import ClientSecurity
from bus.connect import close, connect
from bus.schemas import Answer, ErrorReply, Query, decode_message
from bus.subjects import Subjects
from ops.ask import Item, ask_once
from ops.redteam.sniff import Watch
from privacy.credentials import CredentialStore

log = logging.getLogger(__name__)

ATTACKERS = {"transmitter": "t-stolen", "gate": "gate-stolen", "client": "mallory"}  # role -> identity id
DEFAULT_LEAD_S = 0.3  # seconds an attack runs before the legitimate questions start
DEFAULT_TAIL_S = 0.2  # seconds it may go on after them
PROB_DECIMALS = 4  # probabilities compared to this many decimals

Attack = Callable[[asyncio.Event], Awaitable[tuple[bool, str]]]  # (stop) -> (its own evidence says blocked, detail)


def attacker_identities() -> list[tuple[str, str, str | None]]:
    """What a federation's credential store must issue for the matrix's attackers."""
    return [(role, agent_id, None) for role, agent_id in ATTACKERS.items()]


@dataclass
class Target:
    """A running federation and what to ask it."""

    url: str
    store: CredentialStore
    items: Sequence[Item]  # legitimate questions (some private)
    secrets: Sequence[str]  # what must never be read outside the receiver side: private stems, planted details
    receiver_id: str = "receiver"
    gate_id: str = "gate"
    transmitters: tuple[str, ...] = ()
    asker_id: str = "client"
    deadline_s: float = 5.0
    offer_share: float = 0.3  # the gate's offer window, as a share of the deadline

    @property
    def subjects(self) -> Subjects:
        """The federation's subjects."""
        return Subjects(self.store.prefix)


@dataclass
class Round:
    """The legitimate questions of one attempt: replies, seconds, and how many differ from the clean round."""

    replies: list[Answer | ErrorReply] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    changed: int = 0

    @property
    def answered(self) -> int:
        """Replies that are answers."""
        return sum(isinstance(r, Answer) for r in self.replies)

    @property
    def clean(self) -> bool:
        """Every question answered, none changed."""
        return self.answered == len(self.replies) and self.changed == 0


@dataclass
class Row:
    """One attempt of the matrix."""

    attacker: str
    attempt: str
    blocked: bool
    detail: str = ""
    legit_changed: int = 0


def fingerprint(reply: Answer | ErrorReply) -> tuple:
    """What must not change under attack: the letter, who was fused, the probabilities."""
    if not isinstance(reply, Answer):
        return ("error", reply.code)
    probs = tuple(round(p, PROB_DECIMALS) for p in reply.probs)
    return (reply.choice, tuple(sorted(u.transmitter_id for u in reply.used)), probs)


class Matrix:
    """Runs attempts against a :class:`Target`, each while its legitimate questions are asked."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.subjects = target.subjects
        self.asker: Client | None = None
        self.reference: list[tuple] = []
        self.reference_seconds: list[float] = []
        self.rows: list[Row] = []
        self.current = Round()  # the legitimate round in progress (an attack may look at its timings)
        self._holds: list[asyncio.Event] = []
        self.legit_queries = self.legit_answered = self.legit_changed = 0

    async def __aenter__(self) -> Matrix:
        self.asker = await connect(self.target.url, name="legit", security=self.security(self.target.asker_id))
        clean = await self._ask_all()
        self.reference = [fingerprint(r) for r in clean.replies]
        self.reference_seconds = clean.seconds
        bad = [r for r in clean.replies if not isinstance(r, Answer)]
        if bad:
            raise RuntimeError(f"the federation does not answer before any attack: {bad[0]}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.asker is not None:
            await close(self.asker)

    def security(self, agent_id: str) -> ClientSecurity:
        """An identity's way in."""
        return self.target.store.client_security(agent_id)

    async def connect(self, role: str) -> tuple[Client, Watch]:
        """A connection as the attacker of ``role``, with its error watch."""
        watch = Watch()
        nc = await connect(
            self.target.url, name=f"attacker-{role}", security=self.security(ATTACKERS[role]), error_cb=watch.cb
        )
        return nc, watch

    async def _ask_all(self, rnd: Round | None = None) -> Round:
        assert self.asker is not None
        rnd = rnd if rnd is not None else Round()
        for item in self.target.items:
            t0 = time.perf_counter()
            rnd.replies.append(await ask_once(self.asker, self.subjects, item, self.target.deadline_s))
            rnd.seconds.append(time.perf_counter() - t0)
        return rnd

    def hold(self) -> asyncio.Event:
        """For an attack that must set the stage first: the legitimate questions wait until it sets the event."""
        event = asyncio.Event()
        self._holds.append(event)
        return event

    async def during(self, attack: Attack) -> tuple[tuple[bool, str], Round]:
        """Run ``attack`` while the legitimate questions are asked; its evidence and the round."""
        stop = asyncio.Event()
        rnd = self.current = Round()
        self._holds = []
        task = asyncio.ensure_future(attack(stop))
        await asyncio.sleep(DEFAULT_LEAD_S)
        for hold in self._holds:
            await asyncio.wait({task, asyncio.ensure_future(hold.wait())}, timeout=60.0, return_when="FIRST_COMPLETED")
        await self._ask_all(rnd)
        await asyncio.sleep(DEFAULT_TAIL_S)
        stop.set()
        try:
            evidence = await asyncio.wait_for(task, timeout=30.0)
        except TimeoutError:
            evidence = (False, "the attack did not stop")
        rnd.changed = 0
        for item, reply, ref in zip(self.target.items, rnd.replies, self.reference, strict=True):
            if fingerprint(reply) != ref:
                rnd.changed += 1
                log.warning(
                    "changed under attack: %s: %s, clean: %s", item.id or item.stem[:40], fingerprint(reply), ref
                )
        self.legit_queries += len(rnd.replies)
        self.legit_answered += rnd.answered
        self.legit_changed += rnd.changed
        return evidence, rnd

    async def run(self, attempts: Sequence[tuple[str, str, Callable[[Matrix], Attack]]]) -> list[Row]:
        """Every attempt in turn; a row each."""
        for attacker, name, make in attempts:
            try:
                (ok, detail), rnd = await self.during(make(self))
            except Exception as exc:  # an attempt that crashes says nothing about the federation: count it as won
                log.exception("attempt %s/%s crashed", attacker, name)
                ok, detail, rnd = False, f"attempt crashed: {type(exc).__name__}: {exc}", Round()
            changed = f"; {rnd.changed} legitimate answer(s) changed" if rnd.changed else ""
            missing = len(rnd.replies) - rnd.answered
            unanswered = f"; {missing} legitimate question(s) unanswered" if missing else ""
            row = Row(attacker, name, ok and rnd.clean, detail + changed + unanswered, rnd.changed)
            log.info("%-11s %-48s %s  %s", attacker, name, "blocked" if row.blocked else "SUCCEEDED", row.detail)
            self.rows.append(row)
        return self.rows

    def report(self) -> dict[str, Any]:
        """The issue's JSON: rows, and the legitimate queries asked during the attacks."""
        return {
            "rows": [{"attacker": r.attacker, "attempt": r.attempt, "blocked": r.blocked} for r in self.rows],
            "legit_queries": self.legit_queries,
            "legit_answered": self.legit_answered,
            "legit_changed": self.legit_changed,
            "attempts": len(self.rows),
            "blocked": sum(r.blocked for r in self.rows),
            "details": {f"{r.attacker}/{r.attempt}": r.detail for r in self.rows},
        }


async def stopped(stop: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``stop``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout)
    return stop.is_set()


async def on_queries(m: Matrix, nc, act: Callable[[Query], object]) -> None:
    """Call ``act`` on every query the attacker can read (transmitters and gates read ``fr.query.*``)."""

    async def cb(msg: Msg) -> None:
        try:
            query = decode_message(msg.data)
        except Exception:  # noqa: BLE001 - whatever it is, it is not for us
            return
        if isinstance(query, Query):
            result = act(query)
            if asyncio.iscoroutine(result):
                await result

    await nc.subscribe(m.subjects.queries_all(), cb=cb)
    await nc.flush()
