"""``ops.bench bus`` end to end on a small cache: the raw baselines, the KV leg, an extra precision, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("flags", "ends"), [((), "one process"), (("--split",), "two processes")])
def test_bus_bench_reports_the_raw_baselines_for_the_real_tail(tmp_path: Path, flags: tuple, ends: str) -> None:
    out = tmp_path / "bus.json"
    cmd = [sys.executable, "-m", "ops.bench", "bus", "--real-size", "tail", "--repeats", "2", "--extra", "int4"]
    subprocess.run([*cmd, *flags, "--json", str(out)], check=True, capture_output=True, timeout=120)
    got = json.loads(out.read_text())
    assert got["ends"] == ends and len(got["raw_seconds"]) == len(got["kv_seconds"]) == 2
    assert all(0 < s < 20 for s in got["raw_seconds"] + got["kv_seconds"])  # one clock at both ends when split
    assert got["cache"] == {"layers": 30, "kv_heads": 3, "tokens": 1, "head_dim": 64, "dtype": "float16"}
    assert got["cache_bytes"] == 30 * 2 * 3 * 64 * 2 and got["secure"] is True
    assert got["raw_nats_mb_s"] > 0 and got["raw_packed_mb_s"] > 0 and got["kv_transfer_mb_s"] > 0
    assert abs(got["ratio_vs_packed"] - got["kv_transfer_mb_s"] / got["raw_packed_mb_s"]) < 0.01  # MB/s are rounded
    assert abs(got["ratio_vs_raw_bus"] - got["kv_transfer_mb_s"] / got["raw_bus_client_mb_s"]) < 0.01
    # the one-token tail travels in one tensor pack: 60 table rows and blobs, one header
    assert got["cache_bytes"] < got["kv_wire_bytes"] < got["cache_bytes"] + 60 * 33 + 100
    (int4,) = got["extra_kv"]
    assert int4["precision"] == "int4" and int4["wire_bytes"] < got["kv_wire_bytes"] / 2.5  # 3 heads x (32 + 2) B
