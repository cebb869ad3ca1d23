"""Link traces: both file formats, the rate integral and its inverse, the shaper that follows a trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.errors import ConfigError, PolicyError
from bus.linktrace import LinkTrace, TraceShaper, load_trace
from ops.traces import resolve_trace, shipped
from ops.traces.make import mahimahi
from tests.bus.test_shaper import FakeTime

MB = 1e6


def test_rate_csv(tmp_path: Path) -> None:
    path = tmp_path / "step.csv"
    path.write_text("# a step\ntime_s,rate_mbps\n0,2\n1.5,0.5\n3,0.5\n")
    trace = load_trace(path)
    assert trace.name == "step" and trace.period_s == 3.0
    assert trace.rate_at(0.2) == 2 * MB and trace.rate_at(2.0) == 0.5 * MB
    assert trace.rate_at(3.2) == 2 * MB  # it loops
    assert trace.bytes_between(1.0, 2.0) == pytest.approx(0.5 * 2 * MB + 0.5 * 0.5 * MB)
    assert trace.mean_rate_bps == pytest.approx((1.5 * 2 + 1.5 * 0.5) / 3 * MB)


def test_mahimahi_rate(tmp_path: Path) -> None:
    path = tmp_path / "cell.mahi"
    # 1 s at 2 packets per ms (3 MB/s), then 1 s at one packet per 2 ms (0.75 MB/s)
    lines = [str(ms) for ms in range(1, 1001) for _ in range(2)] + [str(ms) for ms in range(1002, 2001, 2)]
    path.write_text("\n".join(lines) + "\n")
    trace = load_trace(path)
    assert trace.period_s == pytest.approx(2.0)
    assert trace.rate_at(0.5) == pytest.approx(3.0 * MB)
    assert trace.rate_at(1.5) == pytest.approx(0.75 * MB)
    assert trace.period_bytes == pytest.approx(len(lines) * 1500)


def test_generated_mahimahi_matches_its_rates(tmp_path: Path) -> None:
    path = tmp_path / "gen.mahi"
    path.write_text(mahimahi([1.0] * 10 + [0.3] * 10))  # MB/s per 100 ms step
    trace = load_trace(path)
    assert trace.bytes_between(0.0, 1.0) == pytest.approx(1.0 * MB, rel=0.01)
    assert trace.bytes_between(1.0, 2.0) == pytest.approx(0.3 * MB, rel=0.01)


def test_time_after_inverts_bytes_between() -> None:
    trace = LinkTrace([0.0, 1.0, 2.0], [1000.0, 0.0, 4000.0], 3.0)  # an outage in the middle
    for t0 in (0.0, 0.5, 1.2, 2.5, 7.1):
        for n in (1.0, 300.0, 1000.0, 5000.0, 12_345.0):
            t1 = trace.time_after(t0, n)
            assert trace.bytes_between(t0, t1) == pytest.approx(n)
            assert not (1.0 < t1 % 3.0 < 2.0)  # nothing is delivered during the outage
    assert trace.time_after(0.5, 600.0) == pytest.approx(2.025)  # 500 B by 1 s, the outage, 100 B at 4 KB/s


@pytest.mark.parametrize(
    "text",
    [
        "time_s,rate_mbps\n",
        "0,1\n0.5\n",
        "0,1\n1,x\n",
        "1,1\n2,1\n",  # must start at 0
        "0,1\n2,1\n1,1\n",  # times go back
        "0,0\n1,0\n",  # delivers nothing
        "0,-1\n1,1\n",
        "5\n3\n",  # Mahimahi timestamps go back
        "5\nabc\n",
        "",
    ],
)
def test_bad_traces_are_one_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_trace(path)


def test_missing_trace() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace("/nonexistent/trace.csv")
    with pytest.raises(PolicyError):
        LinkTrace([0.0], [1.0], 0.0)


async def test_trace_shaper_follows_the_rate_drop() -> None:
    t = FakeTime()
    trace = LinkTrace([0.0, 1.0], [20 * MB, 0.5 * MB], 100.0)
    shaper = TraceShaper(trace, burst_bytes=1000, clock=t.clock, sleep=t.sleep)
    assert shaper.rate_bps == 20 * MB
    for _ in range(10):  # 10 MB at 20 MB/s (the first 1000 bytes from the bucket)
        await shaper.acquire(1_000_000)
    assert t.now == pytest.approx((10e6 - 1000) / 20e6)
    for _ in range(15):  # 15 MB more: 10 MB at 20 MB/s until 1 s, then 5 MB at 0.5 MB/s
        await shaper.acquire(1_000_000)
    assert t.now == pytest.approx(1.0 + (25e6 - 1000 - 20e6) / 0.5e6)
    assert shaper.rate_bps == 0.5 * MB
    assert shaper.backlog_bytes() == 0


async def test_trace_shaper_backlog() -> None:
    t = FakeTime()
    shaper = TraceShaper(LinkTrace([0.0], [1000.0], 1.0), burst_bytes=100, clock=t.clock, sleep=t.sleep)
    assert shaper.reserve(1100) == pytest.approx(1.0)
    assert shaper.backlog_bytes() == 1000
    t.now = 0.4
    assert shaper.backlog_bytes() == 600


def test_shipped_traces() -> None:
    assert {"wifi-walkout", "lte-congested"} <= set(shipped())
    walk = load_trace(resolve_trace("wifi-walkout"))
    assert walk.rate_at(1.0) > 15 * MB and walk.rate_at(8.0) < 1 * MB  # 20 MB/s, then ~0.5
    csv = load_trace(resolve_trace("lte-congested.csv"))
    mahi = load_trace(resolve_trace("lte-congested.mahi"))
    assert mahi.mean_rate_bps == pytest.approx(csv.mean_rate_bps, rel=0.02)
    with pytest.raises(ConfigError, match="shipped traces"):
        resolve_trace("no-such-trace")
