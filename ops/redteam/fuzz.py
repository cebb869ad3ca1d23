"""Hostile copies of live traffic: every message seen, mutated, published back on its own subject by its owner.

A watcher (an ``admin`` identity) sees every message; for each one the :class:`Fuzzer` publishes ``copies``
mutations on the same subject through a connection of the identity that subject belongs to (the transmitter of
an offer, the gate of a plan, the receiver of a query, the asker of an ask: the server would refuse anyone
else). Mutations: bit flips, truncation, wrong types, huge and negative numbers, unknown fields, invalid UTF-8,
oversized, duplicated, other query ids, and no reply subject ("headers dropped": the protocol uses none, and a
copy of a request never carries one). The fuzzer never mutates its own copies (it knows their digests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.auth import ClientSecurity
from bus.connect import close, connect
from bus.errors import SchemaError
from bus.subjects import Subjects

DEFAULT_COPIES = 3  # mutated copies per message seen
DEFAULT_BUDGET = 1500  # copies in all
OVERSIZED_BYTES = 300 * 1024  # over every agent's control-message limit (256 KiB)
MUTATIONS = (
    "bitflip",
    "truncate",
    "wrong_type",
    "huge",
    "negative",
    "unknown_field",
    "bad_utf8",
    "oversized",
    "duplicate",
    "other_query",
    "no_reply",
)
_QID = re.compile(rb"[0-9a-f]{16}")


def owner(subjects: Subjects, subject: str, asker: str) -> str | None:
    """The identity allowed to publish on ``subject`` (None: an inbox, or not ours)."""
    try:
        parts = subjects.parse(subject)
    except SchemaError:
        return None
    if parts.kind == "ask":
        return asker
    if parts.kind in ("offer", "plan", "kv"):
        return parts.sender
    if parts.kind in ("query", "rephrase", "answer"):
        return parts.receiver_id
    if parts.kind == "presence":
        return parts.agent_id
    return None


def _json_mutation(obj: dict, kind: str, r: random.Random, other_ids: list[str]) -> dict:
    keys = list(obj) or ["x"]
    key = r.choice(keys)
    if kind == "wrong_type":
        obj[key] = r.choice([None, 7, "seven", [1, 2], {"a": 1}, True])
    elif kind in ("huge", "negative"):
        numeric = [k for k, v in obj.items() if isinstance(v, int | float) and not isinstance(v, bool)] or keys
        obj[r.choice(numeric)] = r.choice([1e308, 10**30, 2**64]) if kind == "huge" else r.choice([-1, -1e9, -0.5])
    elif kind == "unknown_field":
        obj["zz_unknown"] = r.randrange(100)
    elif kind == "other_query":
        for k in ("query_id", "ask_id", "receiver_id", "transmitter_id", "agent_id"):
            if k in obj and other_ids:
                obj[k] = r.choice(other_ids)
                break
    return obj


def mutate(data: bytes, kind: str, r: random.Random, other_ids: list[str]) -> bytes:
    """One mutated copy of ``data`` (JSON control message or binary KV frames)."""
    if kind == "bitflip":
        out = bytearray(data or b"\x00")
        for _ in range(r.randint(1, 3)):
            pos = r.randrange(len(out))
            out[pos] ^= 1 << r.randrange(8)
        return bytes(out)
    if kind == "truncate":
        return data[: r.randrange(max(1, len(data)))]
    if kind == "bad_utf8":
        pos = r.randrange(len(data) + 1)
        return data[:pos] + b"\xff\xfe\xc3" + data[pos:]
    if kind == "oversized":
        return data + b" " * OVERSIZED_BYTES
    if kind in ("duplicate", "no_reply"):
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return json.dumps(_json_mutation(obj, kind, r, other_ids)).encode()
    if kind == "other_query" and other_ids:  # binary KV frames: the query id in the header, the checksums left
        return _QID.sub(r.choice(other_ids).encode()[:16].ljust(16, b"0"), data, count=1)
    return data + bytes([r.randrange(256)])


@dataclass
class Fuzzer:
    """Republishes mutated copies of what ``watch`` (an admin's connection) sees, each as its subject's owner."""

    url: str
    subjects: Subjects
    security: Callable[[str], ClientSecurity]  # identity id -> how it connects
    asker: str = "client"
    seed: int = 0
    copies: int = DEFAULT_COPIES
    budget: int = DEFAULT_BUDGET
    sent: Counter[str] = field(default_factory=Counter)  # mutation kind -> copies published
    seen: int = 0
    _conns: dict[str, Client] = field(default_factory=dict)
    _mine: set[int] = field(default_factory=set)
    _ids: list[str] = field(default_factory=list)
    _queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None

    async def start(self, watcher: Client) -> Fuzzer:
        """Watch everything under the prefix; mutate in a background task."""
        self._queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._work())

        async def on_msg(msg: Msg) -> None:
            if xxhash.xxh3_64_intdigest(msg.data) in self._mine:
                return
            self.seen += 1
            with contextlib.suppress(SchemaError):
                qid = self.subjects.parse(msg.subject).query_id
                if qid and qid not in self._ids:
                    self._ids.append(qid)
            assert self._queue is not None
            self._queue.put_nowait((msg.subject, bytes(msg.data)))

        await watcher.subscribe(f"{self.subjects.prefix}.>", cb=on_msg)
        await watcher.flush()
        return self

    async def stop(self) -> None:
        """Stop mutating; close the owners' connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for nc in self._conns.values():
            await close(nc)

    async def _conn(self, identity: str) -> Client:
        if identity not in self._conns:
            self._conns[identity] = await connect(self.url, name=f"fuzz-{identity}", security=self.security(identity))
        return self._conns[identity]

    async def _work(self) -> None:
        r = random.Random(self.seed)
        assert self._queue is not None
        while True:
            subject, data = await self._queue.get()
            identity = owner(self.subjects, subject, self.asker)
            if identity is None or sum(self.sent.values()) >= self.budget:
                continue
            nc = await self._conn(identity)
            for _ in range(self.copies):
                kind = r.choice(MUTATIONS)
                copy = mutate(data, kind, r, [i for i in self._ids[-16:] if i not in subject])
                self._mine.add(xxhash.xxh3_64_intdigest(copy))
                await nc.publish(subject, copy)
                self.sent[kind] += 1
