"""Subject names of the query protocol, built and parsed in one place.

Layout under a configurable prefix (default ``fr``)::

    fr.ask                                    request/reply from a user or program
    fr.query.<receiver_id>                    the rephrased query q', from that receiver
    fr.offer.<query_id>.<transmitter_id>      a transmitter's offer to the gate
    fr.plan.<query_id>.<gate_id>              a gate's plan
    fr.kv.<receiver_id>.<query_id>.<sender>   KV chunks for one receiver, query and transmitter
    fr.presence.<role>.<agent_id>             heartbeats and goodbyes
    fr.answer.<receiver_id>.<query_id>        the answer to a question that is not private (besides the reply)
    fr.rephrase.<receiver_id>                 receiver side only: request/reply to that receiver's rephraser
    fr.trace.<role>.<agent_id>                that agent's trace events (ids, timings, byte counts; never text)
    fr.status.<role>.<agent_id>               that agent's status endpoint (its nats micro service; request/reply)

Every subject a message is published on names its publisher (the last token, or the receiver's or agent's id), so
server permissions (``privacy.permissions``) pin each identity to its own subjects; agents check that the ids
inside a message equal the ids in its subject. Every id is checked with :func:`bus.schemas.validate_id`, so no
caller can smuggle ``.``, ``*`` or ``>`` into a subject.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from bus.errors import SchemaError
from bus.schemas import ROLES, validate_id

DEFAULT_PREFIX = "fr"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,32}(\.[A-Za-z0-9_-]{1,32}){0,3}")
KINDS = ("ask", "query", "offer", "plan", "kv", "presence", "answer", "rephrase", "trace", "status")
# tokens after the kind
_TOKENS = {
    "ask": 0,
    "query": 1,
    "offer": 2,
    "plan": 2,
    "kv": 3,
    "presence": 2,
    "answer": 2,
    "rephrase": 1,
    "trace": 2,
    "status": 2,
}


class SubjectParts(BaseModel):
    """What :meth:`Subjects.parse` found in a subject."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    query_id: str | None = None
    receiver_id: str | None = None
    sender: str | None = None  # who published: the transmitter (offer, kv) or the gate (plan)
    role: str | None = None
    agent_id: str | None = None


def _role(role: str) -> str:
    if role not in ROLES:
        raise SchemaError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", value=role)
    return role


class Subjects:
    """Builds and parses the protocol's subjects under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if _PREFIX_RE.fullmatch(prefix) is None:
            raise SchemaError(f"invalid subject prefix {prefix!r}: 1-4 dot-separated tokens of A-Z a-z 0-9 _ -")
        self.prefix = prefix
        self._n = prefix.count(".") + 1

    def __repr__(self) -> str:
        return f"Subjects(prefix={self.prefix!r})"

    # -- builders -------------------------------------------------------------------------------------

    def ask(self) -> str:
        """Subject users send questions to (request/reply)."""
        return f"{self.prefix}.ask"

    def query(self, receiver_id: str) -> str:
        """Subject of the rephrased queries of one receiver."""
        return f"{self.prefix}.query.{validate_id(receiver_id, 'receiver id')}"

    def queries_all(self) -> str:
        """Wildcard over the queries of every receiver."""
        return f"{self.prefix}.query.*"

    def offer(self, query_id: str, transmitter_id: str) -> str:
        """Subject of one transmitter's offer for one query."""
        return f"{self.prefix}.offer.{validate_id(query_id, 'query id')}.{validate_id(transmitter_id, 'sender id')}"

    def offers_all(self) -> str:
        """Wildcard over offers of every query and transmitter."""
        return f"{self.prefix}.offer.*.*"

    def plan(self, query_id: str, gate_id: str) -> str:
        """Subject of one gate's plan for one query."""
        return f"{self.prefix}.plan.{validate_id(query_id, 'query id')}.{validate_id(gate_id, 'gate id')}"

    def plans_all(self) -> str:
        """Wildcard over plans of every query and gate."""
        return f"{self.prefix}.plan.*.*"

    def kv(self, receiver_id: str, query_id: str, sender: str) -> str:
        """Subject a transmitter streams one query's KV chunks to."""
        return (
            f"{self.prefix}.kv.{validate_id(receiver_id, 'receiver id')}."
            f"{validate_id(query_id, 'query id')}.{validate_id(sender, 'sender id')}"
        )

    def kv_for_receiver(self, receiver_id: str) -> str:
        """Wildcard over every KV chunk addressed to one receiver."""
        return f"{self.prefix}.kv.{validate_id(receiver_id, 'receiver id')}.*.*"

    def presence(self, role: str, agent_id: str) -> str:
        """Heartbeat / goodbye subject of one agent."""
        return f"{self.prefix}.presence.{_role(role)}.{validate_id(agent_id, 'agent id')}"

    def presence_all(self, role: str | None = None) -> str:
        """Wildcard over presence of every agent (of one role if given)."""
        if role is None:
            return f"{self.prefix}.presence.*.*"
        return f"{self.prefix}.presence.{_role(role)}.*"

    def trace(self, role: str, agent_id: str) -> str:
        """Subject of one agent's trace events (``agents.tracing``)."""
        return f"{self.prefix}.trace.{_role(role)}.{validate_id(agent_id, 'agent id')}"

    def traces_all(self) -> str:
        """Wildcard over every agent's trace events."""
        return f"{self.prefix}.trace.*.*"

    def status(self, role: str, agent_id: str) -> str:
        """Subject of one agent's status endpoint (request/reply: its counters)."""
        return f"{self.prefix}.status.{_role(role)}.{validate_id(agent_id, 'agent id')}"

    def answer(self, receiver_id: str, query_id: str) -> str:
        """Subject the answer to one (not private) query is published on."""
        return f"{self.prefix}.answer.{validate_id(receiver_id, 'receiver id')}.{validate_id(query_id, 'query id')}"

    def answers_all(self) -> str:
        """Wildcard over every published answer."""
        return f"{self.prefix}.answer.*.*"

    def rephrase(self, receiver_id: str) -> str:
        """Receiver-side subject of one receiver's rephraser (request/reply: Ask in, Query of q' out)."""
        return f"{self.prefix}.rephrase.{validate_id(receiver_id, 'receiver id')}"

    # -- parser ---------------------------------------------------------------------------------------

    def parse(self, subject: str) -> SubjectParts:
        """Split a concrete subject into its parts; raise :class:`SchemaError` for anything else."""
        tokens = subject.split(".")
        if ".".join(tokens[: self._n]) != self.prefix or len(tokens) <= self._n:
            raise SchemaError(f"subject {subject!r} is not under prefix {self.prefix!r}", subject=subject)
        kind, rest = tokens[self._n], tokens[self._n + 1 :]
        if kind not in _TOKENS:
            raise SchemaError(f"unknown subject kind {kind!r} in {subject!r}", subject=subject)
        if len(rest) != _TOKENS[kind]:
            raise SchemaError(f"subject {subject!r} needs {_TOKENS[kind]} tokens after {kind!r}", subject=subject)
        if kind == "ask":
            return SubjectParts(kind=kind)
        if kind == "query":
            return SubjectParts(kind=kind, receiver_id=validate_id(rest[0], "receiver id"))
        if kind in ("offer", "plan"):
            return SubjectParts(
                kind=kind, query_id=validate_id(rest[0], "query id"), sender=validate_id(rest[1], "sender id")
            )
        if kind == "answer":
            return SubjectParts(
                kind=kind, receiver_id=validate_id(rest[0], "receiver id"), query_id=validate_id(rest[1], "query id")
            )
        if kind == "kv":
            return SubjectParts(
                kind=kind,
                receiver_id=validate_id(rest[0], "receiver id"),
                query_id=validate_id(rest[1], "query id"),
                sender=validate_id(rest[2], "sender id"),
            )
        if kind == "rephrase":
            return SubjectParts(kind=kind, receiver_id=validate_id(rest[0], "receiver id"))
        return SubjectParts(kind=kind, role=_role(rest[0]), agent_id=validate_id(rest[1], "agent id"))
