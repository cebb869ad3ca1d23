"""The fault and load benchmarks' arithmetic: in time, typed errors, recovery, percentiles."""

from __future__ import annotations

from bus.schemas import Answer, ErrorReply
from ops.bench.loadkit import Shot, latency_row, percentile, recovery_s


def _answer(latency_s: float = 0.1) -> Answer:
    return Answer(query_id="q", receiver_id="rx", text="A) x", choice="A", latency_s=latency_s)


def test_in_time_and_typed_errors_count_the_asker_clock_too() -> None:
    assert Shot(0, 0.0, 1.0, _answer(0.9)).in_time(2.0)
    assert not Shot(0, 0.0, 2.5, _answer(1.9)).in_time(2.0)  # the reply reached the asker too late
    assert not Shot(0, 0.0, 1.0, _answer(2.1)).in_time(2.0)  # the receiver itself was late
    error = ErrorReply(code="limit", message="full")
    assert Shot(0, 0.0, 0.1, error).typed_error_in_time(2.0) and not Shot(0, 0.0, 9.0, error).typed_error_in_time(2.0)


def test_recovery_is_the_first_send_after_the_last_unwhole_answer() -> None:
    shots = [Shot(i, float(i), 0.5, _answer()) for i in range(10)]
    bad = {2, 3, 5}
    assert recovery_s(shots, 1.0, lambda s: s.index not in bad) == 5.0  # shot 6 is sent 5 s after the event
    assert recovery_s(shots, 6.0, lambda s: s.index not in bad) == 0.0  # nothing went wrong after it
    assert recovery_s(shots, 1.0, lambda s: s.index != 9) is None  # still not whole at the end


def test_percentiles_and_the_latency_row() -> None:
    assert percentile([], 0.5) is None and percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    shots = [Shot(i, 0.0, (i + 1) / 1000, _answer()) for i in range(100)]
    row = latency_row(shots)
    assert row["p50_ms"] == 51.0 and row["p99_ms"] == 99.0 and row["p95_ms"] == 95.0
