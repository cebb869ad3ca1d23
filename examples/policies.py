"""A bandwidth policy of your own: a phone on a metered data plan.

Load it with ``--policy examples.policies:MeteredPhone`` (gate, transmitter, ``python -m ops.bench bandwidth
--policies ...``); docs/POLICIES.md walks through it. It never sends more than ``max_bytes`` per query and never
fp16: int8 when every planned layer fits the budget at int8, else int4, else the most important layers at int4
that fit (nothing, for a request marked ``whole``: a cache the receiver reads only with every layer). The budget
is the smallest of ``max_bytes``, the plan's byte budget and what the link carries before the deadline.
"""

from __future__ import annotations

from bus.policy import BandwidthPolicy, PolicyRequest, SendItem, SendPlan, link_budget

DEFAULT_MAX_BYTES = 2_000_000  # bytes per query and transmitter
PREFERENCE = ("int8", "int4")  # precisions it sends, best first


class MeteredPhone(BandwidthPolicy):
    """At most ``max_bytes`` per query, int8 or int4, most important layers first."""

    name = "metered-phone"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)

    def budget(self, req: PolicyRequest) -> int:
        """Bytes this query may take: the cap, the plan's budget, and the link's until the deadline."""
        budget = self.max_bytes
        if req.budget_bytes is not None:
            budget = min(budget, req.budget_bytes)
        if req.link_rate_bps and req.time_left_s:
            budget = min(budget, link_budget(req.link_rate_bps, req.time_left_s, rtt_s=req.rtt_s))
        return budget

    def plan(self, req: PolicyRequest) -> SendPlan:
        """The best of int8 / int4 at which every layer fits, else the most important ones at the cheapest."""
        budget = self.budget(req)
        usable = [p for p in PREFERENCE if p in req.precisions] or [req.precisions[-1]]
        for precision in usable:
            if sum(c.bytes[precision] for c in req.layers) <= budget:
                return self.finish(req, self._items(req, precision, None), budget)
        if req.whole:  # the receiver reads these layers only all together: a few of them would be wasted bytes
            return self.finish(req, [], budget)
        return self.finish(req, self._items(req, usable[-1], budget), budget)

    @staticmethod
    def _items(req: PolicyRequest, precision: str, budget: int | None) -> list[SendItem]:
        left, items = budget, []
        for cost in req.ranked():  # most important first: a deadline cut loses the least
            size = cost.bytes[precision]
            if left is None or size <= left:
                items.append(SendItem(layer=cost.layer, precision=precision, bytes=size, importance=cost.importance))
                left = None if left is None else left - size
        return items
