"""Who is live: a roster built from presence heartbeats and goodbyes, with expiry of the silent.

An agent joins with its first heartbeat, leaves with a goodbye, and expires after ``expiry_beats`` of its own
announced heartbeat intervals without one (an interval is at most ``bus.schemas.MAX_HEARTBEAT_S``). A heartbeat
must be newer than the last one taken from the same agent (``sent_unix``) and not from the future (beyond
``DEFAULT_MAX_SKEW_S``): a replayed or altered copy of an old heartbeat is refused, so it cannot bring back
stale claims. A refused older one still counts as a sign of life (with the claims already held): a copy dated a
few seconds ahead must not make the agent's own next heartbeats look stale and the agent expire. Changes are
logged once (joined / left / expired) and handed to listeners, so the gate stops expecting offers from a
transmitter that is gone and the receiver stops waiting for its stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bus.errors import SchemaError
from bus.schemas import Goodbye, Presence

log = logging.getLogger(__name__)

DEFAULT_MAX_SKEW_S = 5.0  # seconds a heartbeat's sent_unix may be ahead of this clock (NTP-synced devices)

Change = Literal["joined", "left", "expired", "seen"]
Listener = Callable[[str, "Member"], None]


@dataclass
class Member:
    """One live agent as its last heartbeat described it."""

    presence: Presence
    last_seen: float  # roster clock
    expires: float  # roster clock

    @property
    def role(self) -> str:
        """The agent's role."""
        return self.presence.role

    @property
    def agent_id(self) -> str:
        """The agent's id."""
        return self.presence.agent_id


class Roster:
    """Live agents by (role, id), from :class:`Presence` and :class:`Goodbye` messages."""

    def __init__(
        self,
        expiry_beats: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
    ) -> None:
        self.expiry_beats = expiry_beats
        self.clock = clock
        self.wall = wall
        self.max_skew_s = max_skew_s
        self._members: dict[tuple[str, str], Member] = {}
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(change, member)`` on every join, leave and expiry."""
        self._listeners.append(listener)

    def _emit(self, change: str, member: Member) -> None:
        for listener in self._listeners:
            try:
                listener(change, member)
            except Exception:  # a listener bug must not break presence handling
                log.exception("roster listener failed on %s %s", change, member.agent_id)

    def update(self, msg: Presence | Goodbye) -> Change:
        """Apply one heartbeat or goodbye; return what changed (:class:`SchemaError`: a stale or future heartbeat)."""
        key = (msg.role, msg.agent_id)
        if isinstance(msg, Goodbye):
            member = self._members.pop(key, None)
            if member is None:
                return "seen"
            log.info("%s %s left%s", msg.role, msg.agent_id, f" ({msg.reason})" if msg.reason else "")
            self._emit("left", member)
            return "left"
        ahead = msg.sent_unix - self.wall()
        if ahead > self.max_skew_s:
            raise SchemaError(f"heartbeat of {msg.agent_id} sent {ahead:.1f} s in the future")
        member = self._members.get(key)
        now = self.clock()
        if member is not None and msg.sent_unix <= member.presence.sent_unix:
            member.last_seen, member.expires = now, now + self.expiry_beats * member.presence.interval_s
            raise SchemaError(f"heartbeat of {msg.agent_id} is not newer than the last one (a replay)")
        expires = now + self.expiry_beats * msg.interval_s
        if member is not None:
            member.presence, member.last_seen, member.expires = msg, now, expires
            return "seen"
        member = self._members[key] = Member(msg, now, expires)
        fp = f" (model {msg.model_fingerprint})" if msg.model_fingerprint else ""
        log.info("%s %s joined%s", msg.role, msg.agent_id, fp)
        self._emit("joined", member)
        return "joined"

    def expire(self) -> list[Member]:
        """Drop every agent whose heartbeats stopped; return them."""
        now = self.clock()
        gone = [m for m in self._members.values() if m.expires <= now]
        for member in gone:
            del self._members[(member.role, member.agent_id)]
            log.warning("%s %s expired: no heartbeat for %.1f s", member.role, member.agent_id, now - member.last_seen)
            self._emit("expired", member)
        return gone

    def live(self, role: str) -> dict[str, Member]:
        """Live agents of one role, by id (sorted)."""
        return {aid: m for (r, aid), m in sorted(self._members.items()) if r == role}

    def get(self, role: str, agent_id: str) -> Member | None:
        """One live agent, or None."""
        return self._members.get((role, agent_id))

    def is_live(self, role: str, agent_id: str) -> bool:
        """Whether that agent is live."""
        return (role, agent_id) in self._members

    def __len__(self) -> int:
        return len(self._members)
