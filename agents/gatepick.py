"""Which gate plans a query: one live gate of the receiver's trusted set per query, in turn.

Several gates may run at once (no single point of failure), but a query must get exactly one plan: the receiver,
the transmitters and the receiver's KV intake all act on the plan of the gate the query names, so two plans could
split them. The receiver therefore names one gate in each :class:`~bus.schemas.Query` (``gates``), taking the live
gates of its ``--gates`` (any gate identity when that is empty) in turn:

- *live* means heartbeating (the receiver's roster): a gate whose last heartbeat is more than
  ``DEFAULT_LATE_BEATS`` of its intervals old is passed over (a killed gate: after 1.5 s at the default 1 s
  interval, before its heartbeats expire at 3), one that leaves cleanly at once; one that comes back is picked
  again from its first heartbeat on, without restarting anyone;
- a gate that let a query go without a plan is *suspect* and skipped until it heartbeats again after that (a
  killed gate never does; a slow one does within a second), so a dead gate costs at most the queries picked for
  it before the receiver noticed;
- with no live gate heard at all (the receiver just started, or every gate is down) the query names the whole
  trusted set, as before there was a choice: whichever gate is up plans it, and with none the receiver answers
  alone at its plan deadline, saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agents.roster import Roster

DEFAULT_LATE_BEATS = 1.5  # a gate whose heartbeat is this many of its intervals overdue is not picked


class GatePicker:
    """Round-robin over the live, trusted, unsuspected gates of a roster."""

    def __init__(self, trusted: tuple[str, ...], roster: Roster, wall: Callable[[], float] = time.time) -> None:
        self.trusted = trusted
        self.roster = roster
        self.wall = wall
        self.clock = roster.clock
        self._turn = 0
        self._missed: dict[str, float] = {}  # gate -> wall time it let a query go unplanned

    def live(self) -> list[str]:
        """Live gates this receiver takes plans from, suspects included (sorted)."""
        return [g for g in self.roster.live("gate") if not self.trusted or g in self.trusted]

    def suspect(self, gate: str) -> bool:
        """Whether ``gate`` missed a plan and has not heartbeaten since, or its heartbeat is overdue."""
        member = self.roster.get("gate", gate)
        if member is not None and self.clock() - member.last_seen > DEFAULT_LATE_BEATS * member.presence.interval_s:
            return True
        missed = self._missed.get(gate)
        if missed is None:
            return False
        if member is not None and member.presence.sent_unix > missed:
            del self._missed[gate]
            return False
        return True

    def pick(self) -> tuple[str, ...]:
        """The gates the next query names: one live gate, or the trusted set when none is live."""
        live = self.live()
        healthy = [g for g in live if not self.suspect(g)] or live  # all suspect: they may be slow, not dead
        if not healthy:
            return self.trusted
        self._turn += 1
        return (healthy[self._turn % len(healthy)],)

    def missed(self, gates: tuple[str, ...]) -> None:
        """The query that named ``gates`` got no plan in time: skip the one gate it named until it heartbeats."""
        if len(gates) == 1:
            self._missed[gates[0]] = self.wall()
