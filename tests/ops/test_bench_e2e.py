"""The e2e benchmark's per-kind summary (the benchmark itself runs agents; see ``python -m ops.bench e2e``)."""

from __future__ import annotations

import statistics

import pytest

from ops.bench.e2e import by_kind


def test_each_kind_of_question_is_summarised_apart():
    rows = [
        ("alone", 0.002, 0.001),
        ("alone", 0.004, 0.001),
        ("plain", 0.015, 0.010),
        ("plain", None, 0.012),  # unanswered over the bus: counted, timed in process only
        ("private", 0.030, 0.020),
    ]
    got = by_kind(rows)
    assert list(got) == ["alone", "plain", "private"]
    assert got["alone"] == {"n": 2, "bus_p50_ms": 3.0, "inproc_p50_ms": 1.0, "overhead_ratio": 3.0}
    assert got["plain"]["n"] == 2 and got["plain"]["bus_p50_ms"] == 15.0 and got["plain"]["inproc_p50_ms"] == 11.0
    assert got["private"]["overhead_ratio"] == pytest.approx(1.5)


def test_a_kind_with_no_question_is_left_out_and_one_never_answered_has_no_bus_figure():
    got = by_kind([("plain", None, 0.01)])
    assert list(got) == ["plain"]
    assert got["plain"]["bus_p50_ms"] is None and got["plain"]["overhead_ratio"] is None


def test_the_cost_of_security_is_the_secure_p50_over_the_plain_one_of_the_same_run():
    from ops.bench.e2e import secure_vs_plain

    got = secure_vs_plain({"secure": [0.021, 0.020, None], "plain": [0.020, 0.019, 0.018]}, agree=2, n=3)
    assert got["secure_p50_ms"] == 20.5 and got["plain_p50_ms"] == 19.0
    assert got["overhead_ratio_secure"] == pytest.approx(20.5 / 19.0, abs=1e-3)
    assert got["secure_plain_same_answer"] == pytest.approx(0.6667)
    assert got["overhead_ratio_secure_paired"] == pytest.approx(
        statistics.median([0.021 / 0.020, 0.020 / 0.019]), abs=1e-3
    )
