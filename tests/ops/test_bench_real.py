"""The real-size benchmarks on a tiny real-style kit: ``bandwidth --real`` (rates and a trace, a built-in and a
user's policy, the issue's row shape) and ``e2e --real`` (bus vs in process)."""

from __future__ import annotations

import argparse
import json

import pytest

from bus.errors import ConfigError
from ops.bench.bandwidth import add_arguments, run

ROW_KEYS = {"link", "policy", "deadline_met", "accuracy", "bytes_per_query", "precision_mix", "layers_sent"}


def _bandwidth_real(tiny_real_kit, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict:
    """``ops.bench bandwidth --real`` on the tiny kit, receiver m1, two questions, with ``argv`` added."""
    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    add_arguments(parser)
    return run(parser.parse_args(["--real", "--kit", str(root), "--receiver-model", "m1", "--questions", "2", *argv]))


def test_bandwidth_real_rows(tiny_real_kit, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    result = _bandwidth_real(
        tiny_real_kit,
        monkeypatch,
        ["--rates", "0.5", "--traces", "wifi-walkout", "--policies", "deadline-aware,examples.policies:MeteredPhone"]
        + ["--deadline-s", "5", "--json", str(tmp_path / "bw.json"), "--mode", "c2c"],
    )
    partial = json.loads((tmp_path / "bw.json").read_text())  # written cell by cell as the sweep goes
    assert partial["partial"] == partial["cells"] == 4 and len(partial["rows"]) == 4
    assert result["real"] and result["questions"] == 2 and result["transmitters"] == 4
    assert 0 <= result["receiver_alone_accuracy"] <= 1
    rows = result["rows"]
    assert [(r["link"], r["policy"]) for r in rows] == [
        (0.5, "deadline-aware"),
        (0.5, "metered-phone"),
        ("wifi-walkout", "deadline-aware"),
        ("wifi-walkout", "metered-phone"),
    ]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["answered"] == 2
        assert row["precision_mix"] and sum(row["precision_mix"].values()) == pytest.approx(1.0)
        assert row["bytes_per_query"] > 0 and row["layers_sent"] > 0
    # the kit's window-1 fusers read the last token of each layer: on these tiny models it rides inside the offer
    # at fp16 whatever the policy (the gate asks no policy for bytes that already travelled)
    assert all(set(r["precision_mix"]) <= {"fp16", "int8", "int4"} for r in rows)


def test_bandwidth_real_translate_streams_the_notes_caches(tiny_real_kit, monkeypatch) -> None:
    result = _bandwidth_real(
        tiny_real_kit,
        monkeypatch,
        ["--rates", "unshaped", "--policies", "keep-all", "--deadline-s", "5", "--mode", "translate"]
        + ["--format", "choice"],
    )
    assert result["mode"] == "translate" and result["questions"] == 2
    (row,) = result["rows"]
    assert row["answered"] == 2 and row["deadline_met"] == 1.0
    # every device with notes for q' streams every layer of its notes' cache: far more than a window-1 fuser reads
    assert row["layers_sent"] > 1 and row["bytes_per_token"] and row["bytes_per_query"] > 1000


def test_kit_needs_real(tmp_path) -> None:
    from bus.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match="--kit needs --real"):
        run(parser.parse_args(["--kit", str(tmp_path), "--rates", "1"]))
    with pytest.raises(ConfigError, match="need --real"):
        run(parser.parse_args(["--mode", "translate", "--rates", "1"]))


def test_e2e_modes_are_checked_before_anything_starts() -> None:
    from ops.bench import e2e

    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    with pytest.raises(ConfigError, match="--mode translate needs --real"):
        e2e.run(parser.parse_args(["--tiny", "--mode", "translate"]))
    with pytest.raises(ConfigError, match="the mode already"):
        e2e.run(parser.parse_args(["--real", "--translate"]))  # --real asks in translate mode unless --mode c2c


@pytest.mark.slow
def test_e2e_real_on_a_tiny_kit(tiny_real_kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ops.bench e2e --real --t2t``: the real federation as processes against ``refine()`` with the same notes (seven
    agent processes start: ~1.5 min on a loaded two-core machine)."""
    from ops.bench import e2e

    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    argv = ["--real", "--kit", str(root), "--receiver-model", "m2", "--questions", "3", "--t2t", "--translate"]
    argv += ["--mode", "c2c"]
    args = parser.parse_args(argv)
    args.warmup = 1
    result = e2e.run(args)
    assert {"queries", "answered", "parity", "p50_ms", "p50_ms_in_process", "overhead_ratio"} <= set(result)
    assert result["queries"] == 3 and result["answered"] == 3
    assert result["parity"] == 1.0  # the bus is transport: the same answers as in process
    assert result["p50_ms"] > 0 and result["p50_ms_in_process"] > 0
    assert result["overhead_ratio"] == pytest.approx(result["p50_ms"] / result["p50_ms_in_process"], rel=0.01)
    assert result["private_queries"] >= 0 and result["transmitters"] == 4
    # Fig. 3c over the bus: the same questions in text-to-text mode through the same federation
    assert result["t2t_answered"] == 3 and result["t2t_p50_ms"] > 0
    assert result["t2t_over_c2c_p50"] == pytest.approx(result["t2t_p50_ms"] / result["p50_ms"], rel=0.01)
    assert 0 <= result["accuracy_t2t"] <= 1
    # translate mode over the same federation: the notes' caches on the bus, translated as in process
    assert result["translate_queries"] == 3 and result["translate_answered"] == 3
    assert result["translate_parity"] == 1.0 and result["translate_p50_ms"] > 0
    assert result["translate_bytes_per_query"] > 0


@pytest.mark.slow
def test_load_real_soak_reads_every_agents_memory(tiny_real_kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ops.bench load --real --levels '' --mode translate``: the real federation's soak alone, every question in
    translate mode (the notes' caches on the bus), every agent's memory read."""
    from ops.bench import load

    root, home = tiny_real_kit
    monkeypatch.setenv("FEDREFINE_HOME", str(home))
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args(
        ["--real", "--kit", str(root), "--receiver-model", "m1", "--receivers", "1", "--levels", ""]
        + ["--questions", "3", "--soak-questions", "6", "--soak-in-flight", "2", "--deadline-s", "30"]
        + ["--warmup-share", "0.34", "--mode", "translate"]
    )
    result = load.run(args)
    assert result["setup"].startswith("real") and result["mode"] == "translate"
    assert result["rows"] == []  # --levels '': the soak alone
    soak = result["soak"]
    assert soak["questions"] == 6 and soak["answered"] == 6
    # every agent of the federation was read: one receiver, its helpers and the four transmitter devices
    assert len(soak["rss_mb_end"]) >= 6 and all(mb > 0 for mb in soak["rss_mb_end"].values())
    assert soak["rss_growth"] is not None
