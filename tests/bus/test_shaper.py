"""LinkShaper: exact token-bucket arithmetic on a fake clock, and the configured rate on a real link."""

from __future__ import annotations

import time

import pytest
import torch

from bus.connect import subscribe
from bus.errors import PolicyError
from bus.shaper import LinkShaper
from bus.transport import KVReceiver, send_cache


class FakeTime:
    """A clock that only moves when the shaper sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_bucket_arithmetic_on_fake_clock() -> None:
    t = FakeTime()
    shaper = LinkShaper(1000.0, burst_bytes=500, clock=t.clock, sleep=t.sleep)
    assert await shaper.acquire(500) == 0.0  # the burst goes out at once
    assert await shaper.acquire(250) == pytest.approx(0.25)
    for _ in range(10):
        await shaper.acquire(1000)  # larger than the bucket: paid by waiting
    assert t.now == pytest.approx(10.25)
    t.now += 100.0  # idle: the bucket refills only up to the burst
    assert await shaper.acquire(500) == 0.0
    assert await shaper.acquire(1) == pytest.approx(0.001)
    assert shaper.bytes_total == 500 + 250 + 10_000 + 501


async def test_long_run_rate_is_exact_on_fake_clock() -> None:
    t = FakeTime()
    shaper = LinkShaper(4e6, burst_bytes=64 * 1024, clock=t.clock, sleep=t.sleep)
    total = 0
    for size in [70_000, 1_000, 300_000, 5, 64 * 1024] * 40:
        await shaper.acquire(size)
        total += size
    assert t.now == pytest.approx((total - 64 * 1024) / 4e6)


def test_bad_rates_rejected() -> None:
    for rate in (0, -1, float("nan"), float("inf"), "fast"):
        with pytest.raises(PolicyError):
            LinkShaper(rate)  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        LinkShaper(1e6, burst_bytes=0)


async def test_shaped_send_holds_rate_within_ten_percent(nats_client, subject: str) -> None:
    """6 MB at 4 MB/s over a real server: the receiver sees 4 MB/s +-10% (about 1.5 s)."""
    rate = 4e6
    chunk = 64 * 1024
    cache = {i: (torch.randn(1, 8, 96, 128).half(), torch.randn(1, 8, 96, 128).half()) for i in range(16)}  # 6.3 MB
    arrivals: list[tuple[float, int]] = []

    async def timestamp(msg) -> None:
        arrivals.append((time.perf_counter(), len(msg.data)))

    await subscribe(nats_client, subject, timestamp)  # a second subscriber sees every frame as it arrives
    async with KVReceiver(nats_client, subject, out_dtype=torch.float16) as rx:
        shaper = LinkShaper(rate, burst_bytes=chunk + 1024)
        report = await send_cache(
            nats_client,
            subject,
            cache,
            precision="fp16",
            compress=False,
            query_id="q",
            sender="t",
            shaper=shaper,
            chunk_bytes=chunk,
        )
        await rx.wait_complete("q", "t", timeout=30)
    assert len(arrivals) == report.chunks > 50
    span = arrivals[-1][0] - arrivals[0][0]
    measured = sum(n for _, n in arrivals[1:]) / span
    assert 0.9 * rate <= measured <= 1.1 * rate, f"measured {measured / 1e6:.2f} MB/s"
