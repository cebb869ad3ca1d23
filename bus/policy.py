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

Precision is uniform per plan: the wire (``PlanEntry.precision``, one ``send_cache`` call per stream) carries
one precision per transmitter, so the ladder degrades every layer at once before it drops any.

Byte estimates (:func:`layer_wire_bytes`) are raw quantised sizes (``bus.schemas.expected_raw_bytes``: data
plus fp16 scales) plus a worst-case frame header per chunk. They are what travels without compression; LZ4
saves ~0-10% on fp16 KV and ~nothing on int8/int4 (DESIGN.md), so the estimate is slightly conservative.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.errors import PolicyError
from bus.schemas import MAX_LAYER_INDEX, PRECISIONS, expected_raw_bytes

log = logging.getLogger(__name__)

LADDER: tuple[str, ...] = ("fp16", "int8", "int4")  # precisions the ladder walks, best first
DEFAULT_PRECISION = "fp16"  # keep-all and drop-by-importance send at this precision
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024  # bytes per NATS message on the project's embedded server
FRAME_OVERHEAD_BYTES = 640  # bytes per chunk frame: magic, length and header JSON (worst case measured 604)
DEFAULT_SAFETY = 0.8  # deadline-aware plans to use this share of the estimated link rate
DEFAULT_RESERVE_S = 0.0  # seconds the receiver needs after the last byte (fuse + decode), kept free


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


class _PolicyModel(BaseModel):
    """Frozen, strict model whose validation failures are one-line :class:`PolicyError`s."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PolicyError(f"invalid {type(self).__name__}: {_one_line(exc)}") from exc


class LayerCost(_PolicyModel):
    """One layer a transmitter could send: its importance and its wire bytes at each precision."""

    layer: int = Field(ge=0, le=MAX_LAYER_INDEX)
    importance: float = Field(ge=0.0, allow_inf_nan=False)  # gating network's score; higher = more useful
    bytes: dict[str, int]  # precision -> estimated wire bytes of K and V together

    @field_validator("bytes")
    @classmethod
    def _sizes(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("needs the bytes of at least one precision")
        for precision, size in value.items():
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
            if size <= 0:
                raise ValueError(f"{precision} size must be positive, got {size}")
        return value


class PolicyRequest(_PolicyModel):
    """Everything a policy may look at for one transmitter and one query."""

    layers: tuple[LayerCost, ...] = Field(min_length=1)
    budget_bytes: int | None = Field(default=None, ge=0)  # the plan's hard byte budget (None: no cap)
    link_rate_bps: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # usable uplink, bytes/s
    time_left_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # until the query's deadline
    rtt_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # round trip to the server
    backlog_bytes: int = Field(default=0, ge=0)  # bytes already queued ahead of this send
    precisions: tuple[str, ...] = Field(default=LADDER, min_length=1)  # what the sender may use, best first

    @field_validator("precisions")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in value if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {bad[0]!r}; choose from {PRECISIONS}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PolicyRequest:
        seen = [c.layer for c in self.layers]
        if len(set(seen)) != len(seen):
            raise ValueError("a layer appears twice")
        for cost in self.layers:
            missing = [p for p in self.precisions if p not in cost.bytes]
            if missing:
                raise ValueError(f"layer {cost.layer} has no size for precision {missing[0]}")
        return self

    def ranked(self) -> list[LayerCost]:
        """Layers most important first (ties: lower layer index first)."""
        return sorted(self.layers, key=lambda c: (-c.importance, c.layer))


class SendItem(_PolicyModel):
    """One layer to send."""

    layer: int = Field(ge=0, le=MAX_LAYER_INDEX)
    precision: str
    bytes: int = Field(ge=0)
    importance: float = Field(ge=0.0, allow_inf_nan=False)


class SendPlan(_PolicyModel):
    """A policy's decision: what to send, in send order (most important first), and what it should cost."""

    policy: str
    items: tuple[SendItem, ...] = ()
    dropped: tuple[int, ...] = ()  # layers left out, most important first
    budget_bytes: int | None = None  # the budget the policy worked to (None: unlimited)
    expected_bytes: int = Field(default=0, ge=0)
    expected_seconds: float | None = None  # bytes / rate + rtt, when the rate is known

    @property
    def layers(self) -> tuple[int, ...]:
        """Layer indices in send order."""
        return tuple(i.layer for i in self.items)

    @property
    def precision(self) -> str | None:
        """The plan's single precision (None when empty)."""
        return self.items[0].precision if self.items else None

    def pairs(self) -> list[tuple[int, str]]:
        """``[(layer, precision)]`` in send order."""
        return [(i.layer, i.precision) for i in self.items]


# ---- sizes and budgets ---------------------------------------------------------------------------------------


def layer_wire_bytes(
    shape: Sequence[int],
    precision: str,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    frame_overhead: int = FRAME_OVERHEAD_BYTES,
) -> int:
    """Estimated wire bytes of one layer's K and V of ``shape`` (batch, kv_heads, tokens, head_dim)."""
    if precision not in PRECISIONS:
        raise PolicyError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise PolicyError(f"layer shape must be 4 positive ints (batch, kv_heads, tokens, head_dim), got {shape}")
    if max_payload <= frame_overhead:
        raise PolicyError(f"max_payload {max_payload} must exceed the frame overhead {frame_overhead}")
    is_int = precision in ("int8", "int4")
    total = 0
    for axis in ("channel", "token"):  # K scales per channel, V per token (KIVI)
        raw = expected_raw_bytes(tuple(shape), precision, axis if is_int else "none")
        chunks = -(-raw // (max_payload - frame_overhead))
        total += raw + chunks * frame_overhead
    return total


def layer_costs(
    importance: Sequence[float],
    shape: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    precisions: Sequence[str] = LADDER,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[LayerCost, ...]:
    """Costs of layers that share one shape; ``layers`` names them (default 0..n-1), ``importance`` scores them."""
    names = list(range(len(importance))) if layers is None else list(layers)
    if len(names) != len(importance):
        raise PolicyError(f"{len(importance)} importance scores for {len(names)} layers")
    sizes = {p: layer_wire_bytes(shape, p, max_payload=max_payload) for p in precisions}
    return tuple(LayerCost(layer=m, importance=float(s), bytes=sizes) for m, s in zip(names, importance, strict=True))


def link_budget(
    rate_bps: float,
    time_left_s: float,
    *,
    rtt_s: float = 0.0,
    backlog_bytes: int = 0,
    safety: float = DEFAULT_SAFETY,
    reserve_s: float = DEFAULT_RESERVE_S,
) -> int:
    """Bytes that fit the deadline: ``safety x rate x (time_left - rtt - reserve) - backlog`` (>= 0)."""
    for name, value, low in (("link rate", rate_bps, 0.0), ("time left", time_left_s, 0.0)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > low):
            raise PolicyError(f"{name} must be a positive number, got {value!r}")
    _check_params(safety=safety, reserve_s=reserve_s)
    usable_s = max(0.0, time_left_s - rtt_s - reserve_s)
    return max(0, int(safety * rate_bps * usable_s) - backlog_bytes)


def split_budget(total_bytes: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Share a receiver-side byte budget among transmitters in proportion to their gate weights."""
    if total_bytes < 0:
        raise PolicyError(f"byte budget must be >= 0, got {total_bytes}")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise PolicyError("transmitter weights must be finite and >= 0")
    mass = sum(weights.values())
    if mass <= 0:
        return {name: 0 for name in weights}
    return {name: int(total_bytes * w / mass) for name, w in weights.items()}


def _check_params(*, safety: float | None = None, reserve_s: float | None = None) -> None:
    if safety is not None and not (isinstance(safety, int | float) and 0 < safety <= 1):
        raise PolicyError(f"safety must be in (0, 1], got {safety!r}")
    if reserve_s is not None and not (
        isinstance(reserve_s, int | float) and math.isfinite(reserve_s) and reserve_s >= 0
    ):
        raise PolicyError(f"reserve_s must be a finite number >= 0, got {reserve_s!r}")


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PolicyError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    return precision


# ---- the policies -------------------------------------------------------------------------------------------


class BandwidthPolicy(ABC):
    """A pure decision: :class:`PolicyRequest` in, :class:`SendPlan` out."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, req: PolicyRequest) -> SendPlan:
        """What to send for this request, most important layer first."""

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
    """Most important first; a layer that does not fit is skipped (a cheaper later one may still fit)."""
    left = math.inf if budget is None else budget
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


def make_policy(name: str, *, ignore_unused: bool = False, **params: Any) -> BandwidthPolicy:
    """The policy called ``name`` (or a short alias) built with ``params``; PolicyError on anything unknown.

    ``ignore_unused=True`` drops parameters this policy does not take (an agent configures every knob once
    and lets the chosen policy use the ones it knows); unknown names are still errors.
    """
    if not isinstance(name, str):
        raise PolicyError(f"policy name must be a string, got {name!r}")
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}", name=name)
    cls = POLICIES[key]
    if ignore_unused:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        params = {k: v for k, v in params.items() if k in accepted}
    try:
        return cls(**params)
    except TypeError as exc:
        raise PolicyError(f"bad parameters for policy {key}: {exc}", name=key) from exc


def decide(name: str, **request: Any) -> SendPlan:
    """One-shot: ``make_policy(name).plan(PolicyRequest(**request))``."""
    return make_policy(name).plan(PolicyRequest(**request))
