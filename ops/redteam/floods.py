"""Attempts of the attack matrix that send data: KV frames for others' queries, replays, floods, a slow consumer."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable

import torch

from bus.codec import encode_layer_frames
from bus.connect import close
from bus.schemas import Query
from ops.redteam.attacks import ATTACKERS, Attack, Matrix, on_queries
from ops.redteam.raw import SlowConsumer

FLOOD_RATE = 10_000  # messages a second
OVERSIZED_BYTES = 4 * 1024 * 1024  # a payload far over every agent's control-message limit (256 KiB)
SLOW_FILL_BYTES = 1024 * 1024  # per message published to fill the slow consumer
SLOW_FILL_MESSAGES = 3  # messages published (each honest subscriber gets them once: 3 MiB)
SLOW_SUBSCRIPTIONS = 64  # times the slow consumer subscribes to offers: it is owed each message 64 times (192 MiB,
# three times nats-server's default max_pending of 64 MiB), so it is cut without the others being flooded


def _frames(query_id: str, sender: str) -> list[bytes]:
    k = torch.randn(1, 2, 4, 16)
    return encode_layer_frames(0, k, k, precision="fp16", query_id=query_id, sender=sender, layers_total=1)


def kv_into(kind: str) -> Callable[[Matrix], Attack]:
    """KV frames for others' queries: ``other`` (fresh frames, as itself and as t1), ``replay`` (frames of an old
    query sent again, into the new query's stream)."""

    def make(m: Matrix) -> Attack:
        async def attack(stop: asyncio.Event) -> tuple[bool, str]:
            nc, watch = await m.connect("transmitter")
            me = ATTACKERS["transmitter"]
            old: list[bytes] = _frames("0ld0ld0ld0ld0ld0", me)
            sent = 0

            async def act(query: Query) -> None:
                nonlocal sent, old
                rid, qid = query.receiver_id, query.query_id
                frames = _frames(qid, me) if kind == "other" else old
                for frame in frames:
                    await nc.publish(m.subjects.kv(rid, qid, me), frame)
                    if kind == "other":
                        await nc.publish(m.subjects.kv(rid, qid, m.target.transmitters[0]), frame)
                    sent += 1
                old = _frames(qid, me)  # what the next query's replay sends

            await on_queries(m, nc, act)
            await stop.wait()
            await nc.flush()
            await close(nc)
            refused = watch.violations("publish")
            ok = sent > 0 and (kind != "other" or refused > 0)
            return ok, f"{sent} frames sent; {refused} refused by the server; the receiver refuses the rest"

        return attack

    return make


def flood(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        nc, _ = await m.connect("transmitter")
        me = ATTACKERS["transmitter"]
        subjects = [
            lambda: m.subjects.offer(uuid.uuid4().hex[:16], me),
            lambda: m.subjects.presence("transmitter", me),
            lambda: m.subjects.kv(m.target.receiver_id, uuid.uuid4().hex[:16], me),
        ]
        sent, t0 = 0, time.monotonic()
        while not stop.is_set():
            for _ in range(100):
                await nc.publish(subjects[sent % 3](), os.urandom(64))
                sent += 1
            await asyncio.sleep(max(0.0, sent / FLOOD_RATE - (time.monotonic() - t0)))
        rate = sent / (time.monotonic() - t0)
        await close(nc)
        return True, f"{sent} junk messages at {rate:,.0f} a second on its own subjects"

    return attack


def oversized(m: Matrix) -> Attack:
    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        nc, _ = await m.connect("transmitter")
        me = ATTACKERS["transmitter"]
        blob = os.urandom(OVERSIZED_BYTES)
        sent = 0

        async def act(query: Query) -> None:
            nonlocal sent
            for subject in (
                m.subjects.offer(query.query_id, me),
                m.subjects.presence("transmitter", me),
                m.subjects.kv(query.receiver_id, query.query_id, me),
            ):
                await nc.publish(subject, blob)
                sent += 1

        await on_queries(m, nc, act)
        await stop.wait()
        await close(nc)
        return sent > 0, f"{sent} messages of {OVERSIZED_BYTES >> 20} MiB"

    return attack


def slow_consumer(m: Matrix) -> Attack:
    """A gate's identity subscribes to offers (64 times over) and stops reading; a transmitter's sends 3 MiB of
    offers, which the server owes it 64 times (192 MiB), while the legitimate questions run."""

    async def attack(stop: asyncio.Event) -> tuple[bool, str]:
        staged = m.hold()  # the legitimate questions start once the consumer is stuck with its backlog
        patterns = [m.subjects.offers_all()] * SLOW_SUBSCRIPTIONS + [m.subjects.queries_all()]
        slow = await SlowConsumer(m.target.url, m.security(ATTACKERS["gate"]), patterns).open()
        nc, _ = await m.connect("transmitter")
        blob = os.urandom(SLOW_FILL_BYTES)
        for i in range(SLOW_FILL_MESSAGES):
            await nc.publish(m.subjects.offer(f"fill{i}", ATTACKERS["transmitter"]), blob)
            if i % 8 == 7:
                await nc.flush()
        await nc.flush()
        await close(nc)
        staged.set()
        await stop.wait()
        cut = await slow.cut()
        await slow.close()
        owed = SLOW_FILL_MESSAGES * SLOW_FILL_BYTES * SLOW_SUBSCRIPTIONS >> 20
        return True, f"{owed} MiB owed to a client that never reads; the server cut it: {cut}"

    return attack
