"""Link estimator: EWMA of burst throughput and RTT, load signals, presence snapshot."""

from __future__ import annotations

import math

import pytest

from bus.errors import PolicyError
from bus.linkest import MIN_LOAD_FACTOR, LinkEstimator, LinkSnapshot
from bus.schemas import Presence


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_samples_means_unknown_unless_configured():
    est = LinkEstimator()
    assert est.rate_bps is None and est.usable_rate_bps is None and est.confidence == 0.0
    snap = est.snapshot()
    assert snap.samples == 0 and snap.presence_fields() == {}
    shaped = LinkEstimator(configured_rate_bps=1e6)
    assert shaped.rate_bps == 1e6 and shaped.snapshot().presence_fields() == {"link_rate_bps": 1e6}


def test_rate_converges_to_a_steady_link():
    est = LinkEstimator(alpha=0.3)
    for _ in range(30):
        est.observe_send(1_000_000, 0.5)  # 2 MB/s
    assert est.rate_bps == pytest.approx(2e6, rel=1e-6)
    assert est.confidence > 0.99
    for _ in range(30):
        est.observe_send(1_000_000, 2.0)  # the link slowed to 0.5 MB/s
    assert est.rate_bps == pytest.approx(5e5, rel=0.01)


def test_tiny_bursts_barely_move_a_byte_weighted_estimate():
    est = LinkEstimator(alpha=0.3)
    est.observe_send(4_000_000, 4.0)  # 1 MB/s
    est.observe_send(100, 0.0)  # a header that left instantly
    assert est.rate_bps == pytest.approx(1e6, rel=0.05)
    est.observe_send(0, 1.0)  # nothing sent: ignored
    assert est.samples == 2


def test_configured_rate_caps_loopback_measurements():
    est = LinkEstimator(configured_rate_bps=1e6)
    est.observe_send(10_000_000, 0.01)  # loopback at 1 GB/s
    assert est.rate_bps == 1e6
    for _ in range(10):
        est.observe_send(1_000_000, 4.0)  # the real link is slower than configured
    assert est.rate_bps < 1e6


def test_rtt_is_smoothed():
    est = LinkEstimator(alpha=0.5)
    assert est.rtt_s is None
    est.observe_rtt(0.010)
    est.observe_rtt(0.020)
    assert est.rtt_s == pytest.approx(0.015)
    assert est.snapshot().rtt_s == pytest.approx(0.015)


def test_load_signals_tighten_the_usable_rate_and_recover():
    clock = FakeClock()
    est = LinkEstimator(penalty=0.5, recovery_s=5.0, clock=clock)
    est.observe_send(1_000_000, 1.0)
    assert est.usable_rate_bps == pytest.approx(1e6)
    est.observe_slow_consumer()
    assert est.usable_rate_bps == pytest.approx(5e5)
    est.observe_backlog(1000)  # grew from 0
    assert est.usable_rate_bps == pytest.approx(2.5e5)
    est.observe_backlog(500)  # shrinking backlog is not load
    assert est.usable_rate_bps == pytest.approx(2.5e5)
    assert est.snapshot().backlog_bytes == 500
    clock.now += 5.0
    assert est.load_factor == pytest.approx(1 - 0.75 * math.exp(-1), rel=1e-6)
    clock.now += 100.0
    assert est.usable_rate_bps == pytest.approx(1e6, rel=1e-6)
    for _ in range(50):
        est.observe_slow_consumer()
    assert est.load_factor >= MIN_LOAD_FACTOR


def test_snapshot_feeds_presence():
    est = LinkEstimator()
    est.observe_send(2_000_000, 1.0)
    snap = est.snapshot()
    assert isinstance(snap, LinkSnapshot) and snap.samples == 1 and 0 < snap.confidence < 1
    presence = Presence(role="transmitter", agent_id="t1", sent_unix=1.0, **snap.presence_fields())
    assert presence.link_rate_bps == pytest.approx(2e6)
    assert LinkSnapshot.model_validate_json(snap.model_dump_json()) == snap


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinkEstimator(configured_rate_bps=-1.0),
        lambda: LinkEstimator(configured_rate_bps=math.inf),
        lambda: LinkEstimator(alpha=0.0),
        lambda: LinkEstimator(penalty=1.5),
        lambda: LinkEstimator(recovery_s=0.0),
        lambda: LinkEstimator().observe_send(-1, 1.0),
        lambda: LinkEstimator().observe_send(10, math.nan),
        lambda: LinkEstimator().observe_rtt(-0.1),
        lambda: LinkEstimator().observe_backlog(-3),
    ],
)
def test_nonsense_is_a_policy_error(make):
    with pytest.raises(PolicyError):
        make()
