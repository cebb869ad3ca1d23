"""What a send costs and what the link allows: the request and plan models, wire-byte estimates, byte budgets.

The pure inputs and outputs of the :mod:`bus.policy` policies. A :class:`PolicyRequest` holds, for one
transmitter and one query, per-layer importance (the gating network's scores) and per-layer wire bytes at each
precision (:class:`LayerCost`), the plan's byte budget, the link rate, the time left and the backlog; a
:class:`SendPlan` is an ordered list of :class:`SendItem` ``(layer, precision)``, most important first, with the
bytes and seconds it is expected to take. :func:`link_budget` turns a link rate and the time left into bytes;
:func:`split_budget` shares a receiver-side budget among transmitters. Invalid input is a :class:`PolicyError`.

Byte estimates (:func:`layer_wire_bytes`) are raw quantised sizes (``bus.schemas.expected_raw_bytes``: data
plus fp16 scales) plus a frame header per chunk (``bus.frames.frame_overhead`` of the query's and sender's ids
when the planner knows them, else the worst case for 64-character ids), or, for a small layer that travels in a
tensor pack, a 33-byte row and padding per tensor and one header per layer. They are what travels without
compression; LZ4 saves ~0-10% on fp16 KV and ~nothing on int8/int4, deflate 12-20% (``bus.codec``), so the estimate
is slightly conservative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.errors import PolicyError
from bus.frames import LAYER_PACK_TENSOR_BYTES, MAX_FRAME_OVERHEAD, packed_tensor_bytes
from bus.schemas import MAX_LAYER_INDEX, PRECISIONS, expected_raw_bytes, int_scale_axis

log = logging.getLogger(__name__)

LADDER: tuple[str, ...] = ("fp16", "int8", "int4")  # precisions the ladder walks, best first
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024  # bytes per NATS message on the project's embedded server
FRAME_OVERHEAD_BYTES = MAX_FRAME_OVERHEAD  # bytes a chunk frame adds to its payload with the longest ids
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
    whole: bool = False  # the receiver uses these layers only all together: a plan sends every one or none

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
    packed: bool = True,
) -> int:
    """Estimated wire bytes of one layer's K and V of ``shape`` (batch, kv_heads, tokens, head_dim).

    A layer whose K and V are each at most ``bus.frames.LAYER_PACK_TENSOR_BYTES`` travels in a tensor pack (the
    reference sender's rule; ``packed=False``: as chunk frames, e.g. a sender that does not pack): a table row and
    16-aligned blob per tensor plus one header, counted as ``frame_overhead`` (a pack's header with the same ids is
    smaller). Otherwise each tensor's chunks pay a frame header each.
    """
    if precision not in PRECISIONS:
        raise PolicyError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if len(shape) != 4 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise PolicyError(f"layer shape must be 4 positive ints (batch, kv_heads, tokens, head_dim), got {shape}")
    if max_payload <= frame_overhead:
        raise PolicyError(f"max_payload {max_payload} must exceed the frame overhead {frame_overhead}")
    is_int = precision in ("int8", "int4")
    raws = [
        expected_raw_bytes(tuple(shape), precision, int_scale_axis(t, tuple(shape), precision) if is_int else "none")
        for t in ("k", "v")
    ]
    if packed and max(raws) <= LAYER_PACK_TENSOR_BYTES:
        return frame_overhead + sum(packed_tensor_bytes(raw) for raw in raws)
    return sum(raw + -(-raw // (max_payload - frame_overhead)) * frame_overhead for raw in raws)


def layer_costs(
    importance: Sequence[float],
    shape: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    precisions: Sequence[str] = LADDER,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    frame_overhead: int = FRAME_OVERHEAD_BYTES,
) -> tuple[LayerCost, ...]:
    """Costs of layers that share one shape; ``layers`` names them (default 0..n-1), ``importance`` scores them."""
    names = list(range(len(importance))) if layers is None else list(layers)
    if len(names) != len(importance):
        raise PolicyError(f"{len(importance)} importance scores for {len(names)} layers")
    sizes = {p: layer_wire_bytes(shape, p, max_payload=max_payload, frame_overhead=frame_overhead) for p in precisions}
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
