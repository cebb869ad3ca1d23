"""Bandwidth-adaptive send policies: which layers of a cache to send, at what precision, in what order.

A policy is pure (no bus, no models): it turns a :class:`PolicyRequest` -- per-layer importance (the gating
network's scores), per-layer wire bytes at each precision, the plan's byte budget, the link rate, the time
left and the backlog -- into a :class:`SendPlan`: an ordered list of ``(layer, precision)``, most important
first so that a deadline cut loses the least, with the bytes and seconds it is expected to take.

Policies (``make_policy(name, **params)``; an unknown name or parameter is a :class:`PolicyError`):

- ``keep-all``            every layer at one precision (fp16): the baseline, ignores every budget.
- ``drop-by-importance``  one precision; drop the least important layers until the byte budget holds.
- ``precision-ladder``    all layers at fp16, else all at int8, else all at int4, then drop at int4.
- ``deadline-aware``      budget = safety x rate x (time left - rtt - reserve) - backlog (capped by the
                          plan's budget), then the ladder.

A request marked ``whole`` (a cache the receiver reads only with every layer: a model read into itself in
translate mode) never loses a layer: the built-in policies send all of it at the best precision that fits, or
nothing; a user's policy that drops layers of such a request is treated as sending nothing (``plan_whole``).

Precision is uniform per plan: the wire (``PlanEntry.precision``, one ``send_cache`` call per stream) carries
one precision per transmitter, so the ladder degrades every layer at once before it drops any.

The request and plan models, the wire-byte estimates and the budgets live in :mod:`bus.budget`; they are
re-exported here so that ``from bus.policy import PolicyRequest, link_budget, ...`` keeps working.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from bus.budget import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_RESERVE_S,
    DEFAULT_SAFETY,
    FRAME_OVERHEAD_BYTES,
    LADDER,
    LayerCost,
    PolicyRequest,
    SendItem,
    SendPlan,
    _check_params,
    _check_precision,
    layer_costs,
    layer_wire_bytes,
    link_budget,
    split_budget,
)
from bus.errors import PolicyError

__all__ = [
    "ALIASES",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PRECISION",
    "DEFAULT_RESERVE_S",
    "DEFAULT_SAFETY",
    "FRAME_OVERHEAD_BYTES",
    "LADDER",
    "POLICIES",
    "BandwidthPolicy",
    "DeadlineAware",
    "DropByImportance",
    "KeepAll",
    "LayerCost",
    "PolicyRequest",
    "PrecisionLadder",
    "SendItem",
    "SendPlan",
    "decide",
    "layer_costs",
    "layer_wire_bytes",
    "link_budget",
    "make_policy",
    "plan_whole",
    "policy_class",
    "split_budget",
    "user_policy_class",
]

log = logging.getLogger(__name__)

DEFAULT_PRECISION = "fp16"  # keep-all and drop-by-importance send at this precision


# ---- the policies -------------------------------------------------------------------------------------------


class BandwidthPolicy(ABC):
    """A pure decision: :class:`PolicyRequest` in, :class:`SendPlan` out."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, req: PolicyRequest) -> SendPlan:
        """What to send for this request, most important layer first."""

    def finish(self, req: PolicyRequest, chosen: list[SendItem], budget: int | None) -> SendPlan:
        """The :class:`SendPlan` of ``chosen`` (in send order): totals, dropped layers, expected seconds."""
        return self._finish(req, chosen, budget)

    def _finish(self, req: PolicyRequest, chosen: list[SendItem], budget: int | None) -> SendPlan:
        total = sum(i.bytes for i in chosen)
        kept = {i.layer for i in chosen}
        dropped = tuple(c.layer for c in req.ranked() if c.layer not in kept)
        seconds = total / req.link_rate_bps + req.rtt_s if req.link_rate_bps else None
        plan = SendPlan(
            policy=self.name,
            items=tuple(chosen),
            dropped=dropped,
            budget_bytes=budget,
            expected_bytes=total,
            expected_seconds=seconds,
        )
        log.debug("%s: %d layers at %s, %d bytes (budget %s)", self.name, len(chosen), plan.precision, total, budget)
        return plan

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _precision_for(req: PolicyRequest, precision: str) -> str:
    if precision not in req.precisions:
        raise PolicyError(f"precision {precision} is not among the sender's {req.precisions}")
    return precision


def _greedy(req: PolicyRequest, precision: str, budget: int | None) -> list[SendItem]:
    """Most important first; a layer that does not fit is skipped (a cheaper later one may still fit). A request
    for a whole cache (``req.whole``) gets every layer or, when they do not all fit, none."""
    left = math.inf if budget is None else budget
    if req.whole and sum(c.bytes[precision] for c in req.layers) > left:
        return []
    chosen = []
    for cost in req.ranked():
        size = cost.bytes[precision]
        if size <= left:
            chosen.append(SendItem(layer=cost.layer, precision=precision, bytes=size, importance=cost.importance))
            left -= size
    return chosen


def _ladder(req: PolicyRequest, ladder: Sequence[str], budget: int | None) -> list[SendItem]:
    """The best precision at which every layer fits; else drop by importance at the cheapest precision."""
    steps = [p for p in ladder if p in req.precisions] or [req.precisions[-1]]
    for precision in steps:
        if budget is None or sum(c.bytes[precision] for c in req.layers) <= budget:
            return _greedy(req, precision, None)
    cheapest = min(steps, key=lambda p: sum(c.bytes[p] for c in req.layers))
    return _greedy(req, cheapest, budget)


class KeepAll(BandwidthPolicy):
    """Every layer at one precision, whatever the budget (the baseline)."""

    name = "keep-all"

    def __init__(self, precision: str = DEFAULT_PRECISION) -> None:
        self.precision = _check_precision(precision)

    def plan(self, req: PolicyRequest) -> SendPlan:
        """All layers, most important first."""
        return self._finish(req, _greedy(req, _precision_for(req, self.precision), None), None)


class DropByImportance(BandwidthPolicy):
    """One precision; the least important layers go until the plan's byte budget holds."""

    name = "drop-by-importance"

    def __init__(self, precision: str = DEFAULT_PRECISION) -> None:
        self.precision = _check_precision(precision)

    def plan(self, req: PolicyRequest) -> SendPlan:
        """Greedy by importance under ``req.budget_bytes``."""
        precision = _precision_for(req, self.precision)
        return self._finish(req, _greedy(req, precision, req.budget_bytes), req.budget_bytes)


class PrecisionLadder(BandwidthPolicy):
    """fp16 -> int8 -> int4 for every layer, then drop the least important, under the plan's byte budget."""

    name = "precision-ladder"

    def __init__(self, ladder: Sequence[str] = LADDER) -> None:
        self.ladder = tuple(_check_precision(p) for p in ladder)
        if not self.ladder:
            raise PolicyError("the precision ladder needs at least one precision")

    def plan(self, req: PolicyRequest) -> SendPlan:
        """The ladder under ``req.budget_bytes``."""
        return self._finish(req, _ladder(req, self.ladder, req.budget_bytes), req.budget_bytes)


class DeadlineAware(BandwidthPolicy):
    """Budget from the link estimate and the time left (capped by the plan's budget), then the ladder."""

    name = "deadline-aware"

    def __init__(
        self,
        safety: float = DEFAULT_SAFETY,
        reserve_s: float = DEFAULT_RESERVE_S,
        ladder: Sequence[str] = LADDER,
        assumed_rate_bps: float | None = None,
    ) -> None:
        _check_params(safety=safety, reserve_s=reserve_s)
        if assumed_rate_bps is not None and not (math.isfinite(assumed_rate_bps) and assumed_rate_bps > 0):
            raise PolicyError(f"assumed_rate_bps must be a positive number, got {assumed_rate_bps!r}")
        self.safety = float(safety)
        self.reserve_s = float(reserve_s)
        self.ladder = PrecisionLadder(ladder).ladder
        self.assumed_rate_bps = assumed_rate_bps

    def budget(self, req: PolicyRequest) -> int:
        """The bytes this request may send."""
        rate = req.link_rate_bps or self.assumed_rate_bps
        if rate is None:
            raise PolicyError("deadline-aware policy needs a link rate (no estimate yet and no assumed_rate_bps)")
        if req.time_left_s is None:
            raise PolicyError("deadline-aware policy needs the time left before the deadline")
        budget = link_budget(
            rate,
            req.time_left_s,
            rtt_s=req.rtt_s,
            backlog_bytes=req.backlog_bytes,
            safety=self.safety,
            reserve_s=self.reserve_s,
        )
        return budget if req.budget_bytes is None else min(budget, req.budget_bytes)

    def plan(self, req: PolicyRequest) -> SendPlan:
        """The ladder under the deadline's budget."""
        budget = self.budget(req)
        return self._finish(req, _ladder(req, self.ladder, budget), budget)

    def __repr__(self) -> str:
        return f"DeadlineAware(safety={self.safety}, reserve_s={self.reserve_s}, ladder={self.ladder})"


POLICIES: dict[str, type[BandwidthPolicy]] = {
    cls.name: cls for cls in (KeepAll, DropByImportance, PrecisionLadder, DeadlineAware)
}
ALIASES = {"keep": "keep-all", "drop": "drop-by-importance", "ladder": "precision-ladder", "deadline": "deadline-aware"}


def plan_whole(policy: BandwidthPolicy, req: PolicyRequest) -> SendPlan:
    """``policy.plan(req)``, held to ``req.whole``: a plan that leaves out some layers of a whole request sends none."""
    plan = policy.plan(req)
    if req.whole and plan.items and len(plan.items) < len(req.layers):
        return policy.finish(req, [], plan.budget_bytes)
    return plan


def user_policy_class(spec: str) -> type[BandwidthPolicy]:
    """The class ``module:Class`` names (imported now); PolicyError unless it is a :class:`BandwidthPolicy`."""
    module_name, _, attr = spec.strip().partition(":")
    if not module_name or not attr:
        raise PolicyError(f"policy {spec!r}: expected module:Class, e.g. examples.policies:GreedyTail", name=spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the user's module failing while it loads
        raise PolicyError(f"policy {spec!r}: cannot import {module_name}: {exc}", name=spec) from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise PolicyError(f"policy {spec!r}: module {module_name} has no {attr}", name=spec)
    if not (isinstance(cls, type) and issubclass(cls, BandwidthPolicy)):
        raise PolicyError(f"policy {spec!r}: {attr} is not a subclass of bus.policy.BandwidthPolicy", name=spec)
    if inspect.isabstract(cls):
        raise PolicyError(f"policy {spec!r}: {attr} does not implement plan()", name=spec)
    return cls


def policy_class(name: str) -> type[BandwidthPolicy]:
    """A built-in policy by name or alias, or a user's ``module:Class``; PolicyError on anything unknown."""
    if not isinstance(name, str):
        raise PolicyError(f"policy name must be a string, got {name!r}")
    if ":" in name:
        return user_policy_class(name)
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in POLICIES:
        raise PolicyError(
            f"unknown policy {name!r}; choose one of {', '.join(POLICIES)} or a module:Class of your own", name=name
        )
    return POLICIES[key]


def make_policy(name: str, *, ignore_unused: bool = False, **params: Any) -> BandwidthPolicy:
    """The policy called ``name`` (a short alias, or a user's ``module:Class``) built with ``params``; PolicyError
    on anything unknown.

    ``ignore_unused=True`` drops parameters this policy does not take (an agent configures every knob once
    and lets the chosen policy use the ones it knows); unknown names are still errors.
    """
    cls = policy_class(name)
    label = getattr(cls, "name", None) or name
    if ignore_unused:
        sig = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
            params = {k: v for k, v in params.items() if k in set(sig) - {"self"}}
    try:
        policy = cls(**params)
    except TypeError as exc:
        raise PolicyError(f"bad parameters for policy {label}: {exc}", name=label) from exc
    except PolicyError:
        raise
    except Exception as exc:  # a user's constructor failing
        raise PolicyError(f"policy {label} failed to start: {exc}", name=label) from exc
    if not isinstance(getattr(policy, "name", None), str) or not policy.name:
        raise PolicyError(f"policy {name!r} has no name (set the class attribute name = '...')", name=name)
    return policy


def decide(name: str, **request: Any) -> SendPlan:
    """One-shot: ``make_policy(name).plan(PolicyRequest(**request))``."""
    return make_policy(name).plan(PolicyRequest(**request))
