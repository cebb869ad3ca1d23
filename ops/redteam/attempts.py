"""The attempts of the attack matrix (``ops.redteam.attacks``): what the issue found working, and more.

Each ``make(matrix)`` returns the attack coroutine: it runs until ``stop`` is set (the legitimate questions are
done) and returns (its own evidence says it failed, a line of detail).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable

import nkeys
from nats.aio.msg import Msg

from bus.auth import ClientSecurity
from bus.connect import close, connect
from bus.errors import AuthError, ConnectError
from bus.schemas import (
    SCHEMA_VERSION,
    Ask,
    ErrorReply,
    Goodbye,
    Offer,
    Plan,
    PlanEntry,
    Presence,
    Query,
    decode_message,
    digest_of,
)
from ops.redteam.attacks import ATTACKERS, Attack, Matrix, on_queries, stopped
from ops.redteam.floods import flood, kv_into, oversized, slow_consumer
from ops.redteam.sniff import Sniffer, secret_hits

LONG_ASKS = 300  # asks with a one-hour deadline
RECEIVER_SIDE = ("{P}.ask", "{P}.rephrase.*", "_INBOX.>", ">")


def _patterns(m: Matrix, extra: tuple[str, ...]) -> list[str]:
    p = m.subjects.prefix
    return [s.replace("{P}", p) for s in RECEIVER_SIDE + extra]


def _offer(m: Matrix, query: Query, tid: str) -> Offer:
    return Offer(
        query_id=query.query_id,
        transmitter_id=tid,
        query_digest=digest_of(query),
        model_fingerprint="forged",
        n_tokens=1,
        n_layers=1,
        kv_heads=1,
        head_dim=1,
        confidence=1.0,
        p_none=0.0,
        offsets=((0, 1),),
    )


# ---- no credentials -----------------------------------------------------------------------------------------


def no_credentials(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        try:
            nc = await connect(m.target.url, security=ClientSecurity(tls_ca=m.target.store.ca_file), retries=1)
        except AuthError as exc:
            return True, f"refused: {exc}"
        await close(nc)
        return False, "connected without credentials"

    return attack


def no_tls(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        plain = m.target.url.replace("tls://", "nats://")
        try:
            nc = await connect(plain, security=ClientSecurity(creds=m.target.store.creds_path(ATTACKERS["client"])))
        except (AuthError, ConnectError) as exc:
            return True, f"refused: {type(exc).__name__}"
        await close(nc)
        return False, "connected in the clear"

    return attack


def unknown_key(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        path = m.target.store.root / f"forged-{uuid.uuid4().hex[:6]}.creds"
        path.write_text(f"{seed}\n")
        try:
            nc = await connect(m.target.url, security=ClientSecurity(creds=path, tls_ca=m.target.store.ca_file))
        except AuthError as exc:
            return True, f"refused: {exc}"
        finally:
            path.unlink(missing_ok=True)
        await close(nc)
        return False, "a self-made key got in"

    return attack


# ---- reading --------------------------------------------------------------------------------------------------


def sniff(role: str, extra: tuple[str, ...]) -> Callable[[Matrix], Attack]:
    """Listen on ``>``, the receiver side and everything the role may read; no secret may show up."""

    def make(m: Matrix) -> Attack:
        async def attack(stop: asyncio.Event) -> tuple[bool, str]:
            sniffer = Sniffer(m.target.url, m.security(ATTACKERS[role]), _patterns(m, extra), name=f"sniff-{role}")
            await sniffer.start()
            await stop.wait()
            await sniffer.stop()
            hits = secret_hits(sniffer.messages, m.target.secrets)
            refused = sniffer.watch.violations("subscription")
            detail = (
                f"{len(sniffer.messages)} messages read, {len(hits)} secrets in them, {refused} subscriptions refused"
            )
            return not hits and refused >= len(RECEIVER_SIDE), detail

        return attack

    return make


def others_answers(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        inbox = f"_INBOX.{m.target.asker_id}.>"
        sniffer = Sniffer(m.target.url, m.security(ATTACKERS["client"]), [inbox, m.subjects.answers_all()])
        await sniffer.start()
        await stop.wait()
        await sniffer.stop()
        private = {i.stem for i in m.target.items if i.private}
        seen_private = [s for s, d in sniffer.messages if s.startswith("_INBOX.")]
        answers = [s for s, _ in sniffer.messages if not s.startswith("_INBOX.")]
        want = sum(not i.private for i in m.target.items)
        detail = f"inbox subscription refused: {sniffer.watch.violations('subscription') == 1}; {len(answers)} "
        detail += f"public answers seen (of {want} questions that are not private; {len(private)} private: none)"
        return not seen_private and sniffer.watch.violations("subscription") == 1 and len(answers) <= want, detail

    return attack


# ---- forging as others -----------------------------------------------------------------------------------------


def forged(role: str, what: str) -> Callable[[Matrix], Attack]:
    """Publish, on every query, as someone else: ``answer``, ``plan`` (as the trusted gate), ``offer`` (as t1),
    ``goodbye`` (of every transmitter, every 100 ms), ``query`` (as the receiver, with a one-hour deadline), or a
    captured ``offer_replay`` (the gate reads offers; may it send one?)."""

    def make(m: Matrix) -> Attack:
        async def attack(stop: asyncio.Event) -> tuple[bool, str]:
            nc, watch = await m.connect(role)
            t = m.target
            sent = 0
            captured: list[Msg] = []

            async def act(query: Query) -> None:
                nonlocal sent
                if what == "answer":
                    fake = ErrorReply(code="internal", message="forged")
                    await nc.publish(f"_INBOX.{t.asker_id}.{uuid.uuid4().hex}.1", fake.to_bytes())
                elif what == "plan":
                    plan = Plan(
                        query_id=query.query_id,
                        receiver_id=query.receiver_id,
                        query_digest=digest_of(query),
                        deadline_unix=query.deadline_unix,
                    )
                    await nc.publish(m.subjects.plan(query.query_id, t.gate_id), plan.to_bytes())
                elif what == "offer":
                    victim = t.transmitters[0]
                    await nc.publish(m.subjects.offer(query.query_id, victim), _offer(m, query, victim).to_bytes())
                    own = _offer(m, query, victim)  # on its own subject, but naming the victim inside
                    await nc.publish(m.subjects.offer(query.query_id, ATTACKERS[role]), own.to_bytes())
                elif what == "offer_replay":
                    for old in captured[-4:]:
                        parts = m.subjects.parse(old.subject)
                        await nc.publish(m.subjects.offer(query.query_id, parts.sender or "t1"), old.data)
                elif what == "query":
                    long = query.model_copy(
                        update={"query_id": uuid.uuid4().hex[:16], "deadline_unix": time.time() + 3600}
                    )
                    await nc.publish(m.subjects.query(t.receiver_id), long.to_bytes())
                sent += 1

            if what == "offer_replay":

                async def keep(msg: Msg) -> None:
                    captured.append(msg)

                await nc.subscribe(m.subjects.offers_all(), cb=keep)
            if what == "goodbye":
                while not await stopped(stop, 0.1):
                    for tid in t.transmitters:
                        bye = Goodbye(role="transmitter", agent_id=tid, reason="forged").to_bytes()
                        await nc.publish(m.subjects.presence("transmitter", tid), bye)
                        await nc.publish(m.subjects.presence(role, ATTACKERS[role]), bye)  # its own subject
                        sent += 2
            else:
                await on_queries(m, nc, act)
                await stop.wait()
            await nc.flush()
            await asyncio.sleep(0.1)
            await close(nc)
            refused = watch.violations("publish")
            return refused > 0, f"{sent} forgeries sent, {refused} refused by the server (the rest by the agents)"

        return attack

    return make


def gate_plans(kind: str) -> Callable[[Matrix], Attack]:
    """A gate the receiver does not take plans from plans every query: ``empty`` (nobody sends), or ``weight50``
    (every transmitter at weight 50, a JSON the schema refuses)."""

    def make(m: Matrix) -> Attack:
        async def attack(stop: asyncio.Event) -> tuple[bool, str]:
            nc, watch = await m.connect("gate")
            sent = 0

            async def act(query: Query) -> None:
                nonlocal sent
                plan = Plan(
                    query_id=query.query_id,
                    receiver_id=query.receiver_id,
                    query_digest=digest_of(query),
                    deadline_unix=query.deadline_unix,
                )
                data = json.loads(plan.to_bytes())
                if kind == "weight50":
                    entry = PlanEntry(transmitter_id="x", layers=(0,), precision="fp16", weight=1.0, byte_budget=0)
                    data["entries"] = [
                        {**entry.model_dump(), "transmitter_id": tid, "weight": 50.0} for tid in m.target.transmitters
                    ]
                await nc.publish(m.subjects.plan(query.query_id, ATTACKERS["gate"]), json.dumps(data).encode())
                sent += 1

            await on_queries(m, nc, act)
            await stop.wait()
            await close(nc)
            return sent > 0, f"{sent} plans published on its own subject; the receiver and transmitters refuse them"

        return attack

    return make


# ---- claims about itself -------------------------------------------------------------------------------------


def phantom(m: Matrix) -> Attack:
    """A heartbeat that says "wait for me for 11 days", then honest-looking heartbeats and never an offer."""

    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        nc, _ = await m.connect("transmitter")
        me = ATTACKERS["transmitter"]
        subject = m.subjects.presence("transmitter", me)
        beat = {"kind": "presence", "schema_version": SCHEMA_VERSION, "role": "transmitter", "agent_id": me}
        beat["interval_s"] = 1e6
        await nc.publish(subject, json.dumps({**beat, "sent_unix": time.time()}).encode())
        while not await stopped(stop, 0.5):
            honest = Presence(role="transmitter", agent_id=me, interval_s=60.0, sent_unix=time.time())
            await nc.publish(subject, honest.to_bytes())
        await close(nc)
        window = m.target.offer_share * m.target.deadline_s * 0.9
        waited = sum(s >= window for s in m.current.seconds)
        return waited <= 2, f"{waited} legitimate question(s) waited for the phantom (an offer window: {window:.1f} s)"

    return attack


def long_asks(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        nc, _ = await m.connect("client")
        ask = Ask(question="What is the color of Zorbin?", options=("a", "b", "c", "d"), deadline_s=3600).to_bytes()
        replies = await asyncio.gather(*(nc.request(m.subjects.ask(), ask, timeout=10) for _ in range(LONG_ASKS)))
        await close(nc)
        codes = [getattr(decode_message(r.data), "code", "answer") for r in replies]
        limited = codes.count("limit")
        return limited == LONG_ASKS, f"{limited} of {LONG_ASKS} one-hour asks refused with 'limit'"

    return attack


ATTEMPTS: list[tuple[str, str, Callable[[Matrix], Attack]]] = [
    ("none", "connect without credentials", no_credentials),
    ("none", "connect without TLS", no_tls),
    ("none", "connect with a self-made key", unknown_key),
    ("transmitter", "read raw questions and planted details anywhere", sniff("transmitter", ("{P}.query.*",))),
    ("transmitter", "read answers (inboxes, fr.answer)", sniff("transmitter", ("{P}.answer.*.*", "{P}.plan.*.*"))),
    ("transmitter", "fake answer into the asker's inbox", forged("transmitter", "answer")),
    ("transmitter", "fake plan as the gate", forged("transmitter", "plan")),
    ("transmitter", "offer under another transmitter's id", forged("transmitter", "offer")),
    ("transmitter", "goodbyes of every transmitter every 100 ms", forged("transmitter", "goodbye")),
    ("transmitter", "queries with a one-hour deadline", forged("transmitter", "query")),
    ("transmitter", "phantom heartbeat (interval 1e6 s), never offers", phantom),
    ("transmitter", "KV frames for another user's query", kv_into("other")),
    ("transmitter", "replay old KV frames into a new query", kv_into("replay")),
    ("transmitter", "flood: 10,000 messages a second", flood),
    ("transmitter", "flood: 4 MiB payloads", oversized),
    ("transmitter", "slow consumer (with the gate's key) owed 192 MiB", slow_consumer),
    ("gate", "read raw questions and planted details anywhere", sniff("gate", ("{P}.query.*", "{P}.offer.*.*"))),
    ("gate", "fake empty plan for every query", gate_plans("empty")),
    ("gate", "plan every transmitter at weight 50", gate_plans("weight50")),
    ("gate", "plan under the receiver's gate's id", forged("gate", "plan")),
    ("gate", "goodbyes of every transmitter every 100 ms", forged("gate", "goodbye")),
    ("gate", "fake answer into the asker's inbox", forged("gate", "answer")),
    ("gate", "replay captured offers", forged("gate", "offer_replay")),
    ("client", "300 asks with a one-hour deadline", long_asks),
    ("client", "read another user's answers", others_answers),
]
