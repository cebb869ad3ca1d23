"""Link estimation: what a transmitter's uplink can carry now, from what its own sends measured.

A transmitter feeds :class:`LinkEstimator` with every publish+flush burst (``observe_send(bytes, seconds)``)
and every flush round trip (``observe_rtt``). The rate is a byte-weighted EWMA: decayed sums of bytes and of
seconds, ``rate = bytes / seconds``, so a tiny burst that left in a few microseconds (into the shaper's
bucket or the socket buffer) barely moves it, while a large one dominates. Load lowers the *usable* rate
the gate plans with: a slow-consumer signal or a growing backlog multiplies a load factor by a penalty,
and the factor recovers exponentially towards 1. A configured link rate (``--link-mbps``) is both the
prior before the first sample and a cap: loopback measures faster than the link the shaper emulates.
``snapshot()`` gives the small model that goes into presence heartbeats.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from bus.errors import PolicyError

log = logging.getLogger(__name__)

MBPS = 1_000_000.0  # bytes per second in one MB/s (rates in flags and configs are megabytes per second)
DEFAULT_ALPHA = 0.3  # EWMA weight of the newest sample (rate and RTT)
DEFAULT_PENALTY = 0.5  # load factor multiplier on a slow-consumer signal or backlog growth
DEFAULT_RECOVERY_S = 5.0  # seconds for the load factor to recover 63% of the way back to 1
MIN_LOAD_FACTOR = 0.05  # the usable rate never falls below this share of the measured one
DEFAULT_MIN_BURST_S = 1e-4  # seconds; shorter bursts are counted as this long (no division blow-ups)


class LinkSnapshot(BaseModel):
    """A transmitter's link estimate as reported in presence (rates in bytes/s, times in seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_bps: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # measured (or configured) rate
    usable_rate_bps: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # rate x load factor
    configured_rate_bps: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # shaped link, if any
    rtt_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    load_factor: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    backlog_bytes: int = Field(default=0, ge=0)
    samples: int = Field(default=0, ge=0)
    confidence: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)

    def presence_fields(self) -> dict[str, float]:
        """Fields for ``bus.schemas.Presence`` (``link_rate_bps`` is the usable rate, omitted when unknown)."""
        return {} if self.usable_rate_bps is None else {"link_rate_bps": self.usable_rate_bps}


def _positive(value: float | None, what: str, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise PolicyError(f"{what} must be a positive number, got {value!r}")
    return float(value)


class LinkEstimator:
    """EWMA of send throughput and round-trip time, with load signals that tighten the usable rate."""

    def __init__(
        self,
        *,
        configured_rate_bps: float | None = None,
        alpha: float = DEFAULT_ALPHA,
        penalty: float = DEFAULT_PENALTY,
        recovery_s: float = DEFAULT_RECOVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured_rate_bps = _positive(configured_rate_bps, "configured link rate")
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise PolicyError(f"EWMA alpha must be in (0, 1], got {alpha!r}")
        if not (isinstance(penalty, int | float) and 0 < penalty < 1):
            raise PolicyError(f"load penalty must be in (0, 1), got {penalty!r}")
        self.alpha = float(alpha)
        self.penalty = float(penalty)
        self.recovery_s = _positive(recovery_s, "recovery time", allow_none=False)
        self.clock = clock
        self.samples = 0
        self.rtt_samples = 0
        self._bytes = 0.0  # decayed sum of burst bytes
        self._seconds = 0.0  # decayed sum of burst seconds
        self._rtt: float | None = None
        self._load = 1.0
        self._load_stamp = clock()
        self.backlog_bytes = 0

    def set_configured_rate(self, rate_bps: float | None) -> None:
        """A new configured link rate (prior and cap), e.g. a replayed trace's rate now."""
        self.configured_rate_bps = _positive(rate_bps, "configured link rate")

    # -- observations ---------------------------------------------------------------------------------

    def observe_send(self, nbytes: int, seconds: float) -> None:
        """One publish+flush burst: ``nbytes`` left in ``seconds``."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError(f"burst bytes must be an int >= 0, got {nbytes!r}")
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise PolicyError(f"burst seconds must be a finite number >= 0, got {seconds!r}")
        if nbytes == 0:
            return
        keep = 1.0 - self.alpha
        self._bytes = keep * self._bytes + nbytes
        self._seconds = keep * self._seconds + max(seconds, DEFAULT_MIN_BURST_S)
        self.samples += 1

    def observe_rtt(self, seconds: float) -> None:
        """One round trip to the server (a flush's PING/PONG)."""
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise PolicyError(f"round-trip time must be a finite number >= 0, got {seconds!r}")
        self._rtt = seconds if self._rtt is None else (1 - self.alpha) * self._rtt + self.alpha * seconds
        self.rtt_samples += 1

    def observe_backlog(self, nbytes: int) -> None:
        """Bytes queued ahead of new sends now; growth since the last observation counts as load."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError(f"backlog must be an int >= 0, got {nbytes!r}")
        if nbytes > self.backlog_bytes:
            self._penalise("backlog grew from %d to %d bytes", self.backlog_bytes, nbytes)
        self.backlog_bytes = nbytes

    def observe_slow_consumer(self) -> None:
        """The server or client reported a slow consumer: the link is overloaded."""
        self._penalise("slow consumer")

    def _penalise(self, why: str, *args: object) -> None:
        self._load = max(MIN_LOAD_FACTOR, self.load_factor * self.penalty)
        self._load_stamp = self.clock()
        log.debug("link load: " + why + "; load factor now %.3f", *args, self._load)

    # -- estimates ------------------------------------------------------------------------------------

    @property
    def load_factor(self) -> float:
        """Share of the measured rate usable now (1 = no load), recovering towards 1 over time."""
        elapsed = max(0.0, self.clock() - self._load_stamp)
        return 1.0 - (1.0 - self._load) * math.exp(-elapsed / self.recovery_s)

    @property
    def rate_bps(self) -> float | None:
        """Measured rate (capped by the configured one), the configured rate before any sample, else None."""
        if self.samples == 0:
            return self.configured_rate_bps
        measured = self._bytes / self._seconds
        return measured if self.configured_rate_bps is None else min(measured, self.configured_rate_bps)

    @property
    def usable_rate_bps(self) -> float | None:
        """The rate the gate should plan with: measured rate x load factor."""
        rate = self.rate_bps
        return None if rate is None else rate * self.load_factor

    @property
    def rtt_s(self) -> float | None:
        """Smoothed round-trip time, None before the first sample."""
        return self._rtt

    @property
    def confidence(self) -> float:
        """Share of the EWMA's weight held by real samples, ``1 - (1 - alpha) ** samples`` (0 with none)."""
        return 1.0 - (1.0 - self.alpha) ** self.samples

    def snapshot(self) -> LinkSnapshot:
        """The estimate as a small immutable model (for presence)."""
        return LinkSnapshot(
            rate_bps=self.rate_bps,
            usable_rate_bps=self.usable_rate_bps,
            configured_rate_bps=self.configured_rate_bps,
            rtt_s=self._rtt,
            load_factor=min(1.0, self.load_factor),
            backlog_bytes=self.backlog_bytes,
            samples=self.samples,
            confidence=min(1.0, max(0.0, self.confidence)),
        )

    def __repr__(self) -> str:
        rate = self.usable_rate_bps
        shown = "unknown" if rate is None else f"{rate / 1e6:.3f} MB/s"
        return f"LinkEstimator({shown}, samples={self.samples}, load={self.load_factor:.2f})"
