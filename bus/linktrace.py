"""Time-varying links replayed from a trace file, and a token-bucket shaper that follows one.

Two formats (picked by the file's content, not its name):

- **rate CSV**: ``time_s,rate_mbps`` lines (a header line and ``#`` comments are allowed); the rate holds from
  its time until the next line's; the last line's time is where the trace ends and loops (so its rate is not
  used unless it is the only line). MB/s = 1e6 bytes/s.
- **Mahimahi packet-delivery trace**: one integer per line, a millisecond timestamp at which one 1500-byte
  packet may be delivered (several lines with the same timestamp: several packets in that millisecond); the
  trace loops after its last timestamp, as ``mm-link`` does.

A :class:`LinkTrace` is a piecewise-constant rate (bytes/s) over ``[0, period_s)``, repeated. Time 0 is when
the user of the trace starts it (:class:`TraceShaper`: its creation, i.e. the transmitter's start). Any
problem with a file is one :class:`~bus.errors.ConfigError` line.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bus.errors import ConfigError, PolicyError
from bus.shaper import DEFAULT_BURST_SECONDS, MIN_BURST_BYTES, LinkShaper

MAHIMAHI_PACKET_BYTES = 1500  # bytes one Mahimahi delivery opportunity carries
MAHIMAHI_BIN_MS = 10  # Mahimahi opportunities are counted per bin of this many milliseconds
MBPS = 1_000_000.0  # bytes per second in one MB/s
MAX_TRACE_BYTES = 64 * 1024 * 1024  # a trace file larger than this is refused


class LinkTrace:
    """A periodic piecewise-constant link rate: ``rates[i]`` bytes/s from ``starts[i]`` to the next start."""

    def __init__(self, starts: Sequence[float], rates: Sequence[float], period_s: float, name: str = "trace") -> None:
        if not starts or len(starts) != len(rates):
            raise PolicyError(f"trace {name}: needs as many segment starts as rates (got {len(starts)}, {len(rates)})")
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise PolicyError(f"trace {name}: segment starts must begin at 0 and increase")
        if not (math.isfinite(period_s) and period_s > starts[-1]):
            raise PolicyError(f"trace {name}: period {period_s!r} must be after the last segment start")
        if any(not (math.isfinite(r) and r >= 0) for r in rates):
            raise PolicyError(f"trace {name}: rates must be finite and >= 0")
        self.name = name
        self.starts = [float(s) for s in starts]
        self.rates = [float(r) for r in rates]
        self.period_s = float(period_s)
        ends = self.starts[1:] + [self.period_s]
        self._cum = [0.0]  # bytes delivered from 0 to each segment's end
        for start, end, rate in zip(self.starts, ends, self.rates, strict=True):
            self._cum.append(self._cum[-1] + rate * (end - start))
        self.period_bytes = self._cum[-1]
        if self.period_bytes <= 0:
            raise PolicyError(f"trace {name}: delivers nothing (every rate is 0)")

    @property
    def mean_rate_bps(self) -> float:
        """Average rate over one period (bytes/s)."""
        return self.period_bytes / self.period_s

    def rate_at(self, t: float) -> float:
        """Rate (bytes/s) at ``t`` seconds from the trace's start."""
        return self.rates[bisect.bisect_right(self.starts, t % self.period_s) - 1]

    def _delivered(self, t: float) -> float:
        """Bytes the link carries from 0 to ``t`` (``t`` >= 0)."""
        loops, into = divmod(t, self.period_s)
        i = bisect.bisect_right(self.starts, into) - 1
        return loops * self.period_bytes + self._cum[i] + self.rates[i] * (into - self.starts[i])

    def bytes_between(self, t0: float, t1: float) -> float:
        """Bytes the link carries from ``t0`` to ``t1`` seconds (0 when ``t1 <= t0``)."""
        return 0.0 if t1 <= t0 else self._delivered(t1) - self._delivered(t0)

    def time_after(self, t0: float, nbytes: float) -> float:
        """The earliest ``t >= t0`` by which the link has carried ``nbytes`` more bytes than at ``t0``."""
        if nbytes <= 0:
            return t0
        target = self._delivered(t0) + nbytes
        loops, rest = divmod(target, self.period_bytes)
        i = bisect.bisect_left(self._cum, rest) - 1  # the segment during which the link reaches ``rest``
        i = min(max(i, 0), len(self.rates) - 1)
        while self.rates[i] == 0:  # an outage: the bytes arrive only when a later segment carries them
            i += 1
        return max(t0, loops * self.period_s + self.starts[i] + (rest - self._cum[i]) / self.rates[i])

    def describe(self) -> str:
        """One line: name, period, mean, min and max rate in MB/s."""
        return (
            f"{self.name}: {self.period_s:.1f} s loop, mean {self.mean_rate_bps / MBPS:.2f} MB/s, "
            f"{min(self.rates) / MBPS:.2f}-{max(self.rates) / MBPS:.2f} MB/s"
        )

    def __repr__(self) -> str:
        return f"LinkTrace({self.describe()})"


def _rate_csv(lines: list[tuple[int, str]], name: str) -> LinkTrace:
    times, rates = [], []
    for n, line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            raise ConfigError(f"trace {name} line {n}: expected 'time_s,rate_mbps', got {line!r}")
        try:
            t, r = float(parts[0]), float(parts[1])
        except ValueError:
            if not times:  # a header line
                continue
            raise ConfigError(f"trace {name} line {n}: {line!r} is not two numbers") from None
        if not (math.isfinite(t) and math.isfinite(r) and t >= 0 and r >= 0):
            raise ConfigError(f"trace {name} line {n}: time and rate must be finite and >= 0")
        if times and t <= times[-1]:
            raise ConfigError(f"trace {name} line {n}: times must increase ({t} after {times[-1]})")
        times.append(t)
        rates.append(r * MBPS)
    if not times:
        raise ConfigError(f"trace {name}: no 'time_s,rate_mbps' lines")
    if times[0] != 0:
        raise ConfigError(f"trace {name}: the first time must be 0, got {times[0]}")
    if len(times) == 1:  # one rate: a constant link
        return _checked(lambda: LinkTrace([0.0], rates, 1.0, name), name)
    return _checked(lambda: LinkTrace(times[:-1], rates[:-1], times[-1], name), name)


def _mahimahi(lines: list[tuple[int, str]], name: str) -> LinkTrace:
    stamps = []
    for n, line in lines:
        try:
            ms = int(line)
        except ValueError:
            raise ConfigError(f"trace {name} line {n}: a Mahimahi trace has one integer ms per line") from None
        if ms < 0 or (stamps and ms < stamps[-1]):
            raise ConfigError(f"trace {name} line {n}: timestamps must be >= 0 and never decrease")
        stamps.append(ms)
    period_ms = max(stamps[-1], 1)
    bins = [0] * (-(-period_ms // MAHIMAHI_BIN_MS))
    for ms in stamps:
        bins[min(len(bins) - 1, (ms - 1) // MAHIMAHI_BIN_MS if ms else 0)] += 1
    starts, rates = [], []
    for i, count in enumerate(bins):  # runs of equal bins become one segment
        rate = count * MAHIMAHI_PACKET_BYTES / (MAHIMAHI_BIN_MS / 1000)
        if not rates or rate != rates[-1]:
            starts.append(i * MAHIMAHI_BIN_MS / 1000)
            rates.append(rate)
    return _checked(lambda: LinkTrace(starts, rates, len(bins) * MAHIMAHI_BIN_MS / 1000, name), name)


def _checked(build: Callable[[], LinkTrace], name: str) -> LinkTrace:
    try:
        return build()
    except PolicyError as exc:
        raise ConfigError(str(exc)) from exc


def load_trace(path: str | Path) -> LinkTrace:
    """A trace from a rate CSV or a Mahimahi file (see the module docstring); ConfigError on any problem."""
    path = Path(path).expanduser()
    name = path.stem
    try:
        if path.stat().st_size > MAX_TRACE_BYTES:
            raise ConfigError(f"trace {path} is larger than {MAX_TRACE_BYTES // 2**20} MiB")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    lines = [(n, s) for n, s in ((n, raw.split("#", 1)[0].strip()) for n, raw in enumerate(text.splitlines(), 1)) if s]
    if not lines:
        raise ConfigError(f"trace {path} is empty")
    return _rate_csv(lines, name) if any("," in s for _, s in lines[:2]) else _mahimahi(lines, name)


class TraceShaper(LinkShaper):
    """A :class:`LinkShaper` whose refill rate follows a :class:`LinkTrace` (time 0: this shaper's creation)."""

    def __init__(
        self,
        trace: LinkTrace,
        burst_bytes: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if burst_bytes is None:
            burst_bytes = max(MIN_BURST_BYTES, int(trace.mean_rate_bps * DEFAULT_BURST_SECONDS))
        super().__init__(trace.mean_rate_bps, burst_bytes, clock=clock, sleep=sleep)
        self.trace = trace
        self.origin = clock()

    def elapsed(self) -> float:
        """Seconds into the trace now."""
        return self.clock() - self.origin

    @property
    def rate_bps(self) -> float:
        """The trace's rate now (bytes/s)."""
        return self.trace.rate_at(self.elapsed())

    def backlog_bytes(self) -> int:
        """Bytes reserved but not yet carried by the link (the bucket's debt)."""
        t0, t1 = self._stamp - self.origin, self.clock() - self.origin
        tokens = min(float(self.burst_bytes), self._tokens + self.trace.bytes_between(t0, t1))
        return max(0, math.ceil(-tokens))

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes from the bucket now; return how many seconds the caller must wait."""
        if n < 0:
            raise PolicyError(f"cannot send {n} bytes")
        now = self.clock()
        t0, t1 = self._stamp - self.origin, now - self.origin
        self._tokens = min(float(self.burst_bytes), self._tokens + self.trace.bytes_between(t0, t1))
        self._stamp = now
        self._tokens -= n
        self.bytes_total += n
        if self._tokens >= 0:
            return 0.0
        return self.trace.time_after(t1, -self._tokens) - t1

    def __repr__(self) -> str:
        return f"TraceShaper({self.trace.describe()}, burst_bytes={self.burst_bytes})"
