"""ops.report: PNGs and a markdown summary from small synthetic benchmark results; missing files say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.errors import ConfigError
from ops.report import bandwidth_target, build_report, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def acc(mode: str, names: list[str], accuracy: float, private: bool = False, precision: str = "fp16") -> dict:
    return {"mode": mode, "transmitters": names, "private": private, "precision": precision,
            "accuracy": accuracy, "ci95": 0.05, "n": 400}  # fmt: skip


ACCURACY = {
    "rows": [
        acc("receiver", [], 0.31),
        acc("transmitter", ["llama"], 0.52),
        acc("transmitter", ["qwen2"], 0.44),
        acc("c2c", ["llama"], 0.47),
        acc("c2c", ["qwen2"], 0.41),
        acc("c2c", ["llama", "qwen2"], 0.583),
        acc("c2c", ["llama", "qwen2"], 0.55, private=True),
        acc("c2c", ["llama", "qwen2"], 0.5, precision="int4"),
        acc("t2t", ["llama", "qwen2"], 0.42),
    ],
    "receiver_known_after_fusion": 0.93,
}
LATENCY = {
    "rows": [
        {"mode": "t2t", "p50_ms": 812.0, "p95_ms": 990.0, "bytes_per_token": 4.2},
        {"mode": "c2c", "p50_ms": 120.5, "p95_ms": 150.0, "bytes_per_token": 3072.0},
        {"mode": "c2c-private", "p50_ms": 133.0, "p95_ms": 170.0, "bytes_per_token": 3072.0},
    ]
}
CODEC = {
    "rows": [
        {"precision": p, "compress": c, "bytes_per_token": b, "ratio_vs_fp16": r, "encode_mb_s": 500.0,
         "decode_mb_s": 800.0, "rel_l2_error": e}
        for p, c, b, r, e in (("fp16", False, 114688, 1.0, 0.0003), ("fp16", True, 103000, 1.11, 0.0003),
                              ("int8", True, 57900, 1.98, 0.004), ("int4", True, 29400, 3.9, 0.07))
    ]
}  # fmt: skip
BW_KEYS = ("link_mbps", "policy", "accuracy", "deadline_met", "bytes_per_query", "bytes_per_token", "p50_ms")
BANDWIDTH = {
    "receiver_alone_accuracy": 0.31,
    "rows": [
        dict(zip(BW_KEYS, values, strict=True))
        for values in (
            (0.25, "keep-all", 0.33, 0.10, 900000, 3000.0, 3100.0),
            (0.25, "deadline-aware", 0.55, 1.0, 150000, 500.0, 640.0),
            (0.25, "t2t", 0.40, 1.0, 40, 4.0, 800.0),
            (4.0, "keep-all", 0.60, 1.0, 900000, 3000.0, 300.0),
            (4.0, "deadline-aware", 0.60, 1.0, 900000, 3000.0, 300.0),
            (None, "keep-all", 0.61, 1.0, 900000, 3000.0, 120.0),
            (None, "deadline-aware", 0.61, 1.0, 900000, 3000.0, 120.0),
        )
    ],
}  # fmt: skip


for _row in BANDWIDTH["rows"]:  # the plan precisions the sweep records per row
    if _row["policy"] != "t2t":
        _row["precisions"] = {"int4" if _row["bytes_per_query"] < 900000 else "fp16": 4}


def write(tmp: Path, **files: dict) -> Path:
    d = tmp / "bench"
    d.mkdir()
    for name, data in files.items():
        (d / f"{name}.json").write_text(json.dumps(data))
    return d


def test_full_report_has_plots_and_numbers(tmp_path):
    src = write(tmp_path, accuracy=ACCURACY, latency=LATENCY, codec=CODEC, bandwidth=BANDWIDTH)
    md, pngs = build_report(src, tmp_path / "report")
    names = {p.name for p in pngs}
    assert names == {
        "fig3a_accuracy_vs_transmitters.png",
        "fig3b_accuracy_per_transmitter.png",
        "fig3c_latency.png",
        "bandwidth_vs_link_rate.png",
        "bytes_per_token.png",
    }
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    text = md.read_text()
    assert "58.3%" in text  # C2C with both transmitters
    assert "93.0%" in text  # receiver's own facts after fusion
    assert "812.0" in text and "120.5" in text  # latency p50s
    assert "57,900" in text and "4.2" in text  # int8 bytes per token vs text
    assert "| 0.25 | deadline-aware | 55.0% | 100.0%" in text
    assert "not measured (run `python -m ops.bench standalone" in text  # tables for absent results
    assert "keeps 80.0% of keep-all's gain (met" in text
    assert "| agents int4 | 500.0 |" in text and "| agents fp16 | 3,000.0 |" in text


def test_missing_results_say_how_to_measure_them(tmp_path):
    src = write(tmp_path)
    md, pngs = build_report(src, tmp_path / "out")
    text = md.read_text()
    assert pngs == []
    for bench in ("accuracy", "latency", "codec", "bandwidth", "standalone", "bus", "e2e"):
        assert f"python -m ops.bench {bench}" in text


def test_bandwidth_target_sentences():
    lines = bandwidth_target(BANDWIDTH)
    assert len(lines) == 1 and "0.25 MB/s" in lines[0] and "NOT" not in lines[0]
    worse = {
        **BANDWIDTH,
        "rows": [dict(r, accuracy=0.4) if r["policy"] == "deadline-aware" else r for r in BANDWIDTH["rows"]],
    }
    assert "NOT met" in bandwidth_target(worse)[0]
    fine = {**BANDWIDTH, "rows": [r for r in BANDWIDTH["rows"] if r["link_mbps"] != 0.25]}
    assert "not exercised" in bandwidth_target(fine)[0]
    assert "not checkable" in bandwidth_target({"rows": []})[0]
    no_gain = {**BANDWIDTH, "receiver_alone_accuracy": 0.7}
    assert "gains -9.0 points" in bandwidth_target(no_gain)[0]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    src = write(tmp_path)
    (src / "bandwidth.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bandwidth.json"):
        build_report(src, tmp_path / "out")
    assert main(["--in", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["--in", str(tmp_path / "nowhere")]) == 2
    (src / "bandwidth.json").write_text(json.dumps({"rows": [{"policy": "x", "link_mbps": "fast"}]}))
    assert main(["--in", str(src), "--out", str(tmp_path / "out")]) == 2


def real_row(label: str, mode: str, fmt: str, accuracy: float, n: int = 100) -> dict:
    row = {"label": label, "mode": mode, "transmitters": [], "private": False, "precision": "fp16", "format": fmt}
    return {**row, "task": "device-notes", "accuracy": accuracy, "ci95": 0.04, "n": n, "bytes_per_question": 1234.0}


REAL_ACCURACY = {
    "real": True,
    "task": "device-notes",
    "receiver": "smollm2",
    "rows": [
        real_row(label, mode, fmt, acc + (0.1 if fmt == "text" else 0.0))
        for label, mode, acc in (("receiver", "receiver", 0.21), ("c2c+1", "c2c", 0.34), ("c2c+2", "c2c", 0.47),
                                 ("t2t", "t2t", 0.29), ("int4", "c2c", 0.44))
        for fmt in ("choice", "text")
    ],
}  # fmt: skip
REAL_LATENCY = {"real": True, "rows": [{"mode": "t2t", "p50_ms": 2345.0, "p95_ms": 2900.0},
                                       {"mode": "c2c", "p50_ms": 678.0, "p95_ms": 800.0}]}  # fmt: skip


def test_real_model_figures_from_rows_with_format_and_task(tmp_path):
    src = write(tmp_path, accuracy_real=REAL_ACCURACY, latency=REAL_LATENCY)  # a real latency under its toy name
    md, pngs = build_report(src, tmp_path / "report")
    names = {p.name for p in pngs}
    assert names == {"real_accuracy.png", "real_accuracy_vs_devices.png", "real_latency.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    text = md.read_text()
    assert "| c2c+2 | choice | 47.0% |" in text and "| c2c+2 | text | 57.0% |" in text
    assert "| t2t | 2,345.0 | 2,900.0 |" in text and "device-notes" not in text.split("## Real models: latency")[1]
    assert "Latency: text-to-text vs C2C" in text and "not measured (run `python -m ops.bench latency" in text


def test_real_sections_say_how_to_measure_them(tmp_path):
    md, _ = build_report(write(tmp_path), tmp_path / "out")
    assert "python -m ops.bench accuracy --real" in md.read_text()
