"""Benchmark results in, markdown out: loading the JSON files, cell formatting, the plain tables.

The plot-free half of the report: :func:`load_results` reads whichever ``ops.bench`` JSON files exist,
:func:`bandwidth_target` words the bandwidth target, :func:`section_tables` renders the standalone, bus and
end-to-end results as tables. The helpers here (cells, markdown tables, row fields) are shared with
:mod:`ops.report.figures`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bus.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_IN = Path("out/bench")  # where `python -m ops.bench NAME --json out/bench/NAME.json` leaves results
DEFAULT_OUT = Path("out/report")
BENCHES = ("codec", "bus", "standalone", "accuracy", "latency", "e2e", "bandwidth", "accuracy_real", "latency_real")
UNSHAPED_LABEL = "unshaped"
ADAPTIVE_EXCLUDED = ("keep-all", "t2t")  # rows that are baselines, not adaptive policies
TARGET_MET = 0.95  # bandwidth target: deadlines the best adaptive policy meets where keep-all misses half
TARGET_GAIN = 0.80  # ... keeping this share of keep-all's accuracy gain over the receiver alone
Data = dict[str, Any]
Section = tuple[str, list[Path]]  # markdown, PNGs written


def load_results(directory: Path) -> dict[str, Data]:
    """``{bench: parsed JSON}`` for every benchmark file present; a corrupt file is a ConfigError."""
    found: dict[str, Data] = {}
    for name in BENCHES:
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read benchmark result {path}: {exc}", path=str(path)) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"benchmark result {path} is not a JSON object", path=str(path))
        found[name] = data
    for name in ("accuracy", "latency"):  # a real run saved under the toy world's name
        if found.get(name, {}).get("real") and f"{name}_real" not in found:
            found[f"{name}_real"] = found.pop(name)
    return found


def _missing(bench: str) -> str:
    extra = " --quick" if bench in ("standalone", "accuracy", "e2e", "bandwidth") else ""
    return f"not measured (run `python -m ops.bench {bench}{extra} --json {DEFAULT_IN}/{bench}.json`)\n"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{float(x):,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _names(row: Data) -> list[str]:
    t = row.get("transmitters") or []
    return [t] if isinstance(t, str) else list(t)


def _ci(row: Data) -> float:
    ci = row.get("ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2:  # an interval: half its width
        return abs(float(ci[1]) - float(ci[0])) / 2
    return float(ci or 0.0)


def _receiver_acc(results: dict[str, Data]) -> float | None:
    for r in results.get("accuracy", {}).get("rows", []):
        if r.get("mode") == "receiver":
            return float(r["accuracy"])
    bw = results.get("bandwidth", {}).get("receiver_alone_accuracy")
    return None if bw is None else float(bw)


def _text_bytes_per_token(results: dict[str, Data]) -> float | None:
    for r in results.get("latency", {}).get("rows", []):
        if r.get("mode") == "t2t" and r.get("bytes_per_token") is not None:
            return float(r["bytes_per_token"])
    vals = [r["bytes_per_token"] for r in results.get("bandwidth", {}).get("rows", []) if r.get("policy") == "t2t"]
    vals = [float(v) for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _bus_bytes_per_token(results: dict[str, Data]) -> dict[str, float]:
    """Mean measured bytes per token through the agents, per plan precision (rows that used one precision)."""
    per: dict[str, list[float]] = {}
    for r in results.get("bandwidth", {}).get("rows", []):
        precs = r.get("precisions") or {}
        if len(precs) == 1 and r.get("bytes_per_token") is not None:
            per.setdefault(next(iter(precs)), []).append(float(r["bytes_per_token"]))
    return {p: sum(v) / len(v) for p, v in per.items()}


def bandwidth_target(bw: Data) -> list[str]:
    """Sentences on the issue's target: where keep-all misses >= half the deadlines, how the best policy does."""
    rows = [r for r in bw.get("rows", []) if not r.get("trace")]  # rate rows (traces have no rate axis)
    base = bw.get("receiver_alone_accuracy")
    keep = {r.get("link_mbps"): r for r in rows if r.get("policy") == "keep-all"}
    full = keep.get(None) or (keep[max((k for k in keep if k is not None), default=None)] if keep else None)
    if not keep or full is None or base is None:
        return ["target: not checkable (needs keep-all rows and receiver_alone_accuracy)"]
    gain = float(full["accuracy"]) - float(base)
    if gain <= 0:
        return [f"target: not checkable (keep-all gains {100 * gain:+.1f} points over the receiver alone)"]
    out = []
    for rate, k in sorted(keep.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        if k.get("deadline_met") is None or float(k["deadline_met"]) > 0.5:
            continue
        cands = [r for r in rows if r.get("link_mbps") == rate and r.get("policy") not in ADAPTIVE_EXCLUDED]
        if not cands:
            continue
        best = max(cands, key=lambda r: (float(r.get("deadline_met") or 0), float(r.get("accuracy") or 0)))
        kept = (float(best["accuracy"]) - float(base)) / gain
        ok = float(best["deadline_met"]) >= TARGET_MET and kept >= TARGET_GAIN
        out.append(
            f"at {rate if rate is not None else UNSHAPED_LABEL} MB/s keep-all meets {_pct(k['deadline_met'])} of "
            f"deadlines; best adaptive `{best['policy']}` meets {_pct(best['deadline_met'])} and keeps "
            f"{_pct(kept)} of keep-all's gain ({'met' if ok else 'NOT met'}: needs >= {_pct(TARGET_MET)} and "
            f">= {_pct(TARGET_GAIN)})"
        )
    return out or ["keep-all meets more than half of the deadlines at every measured rate: target not exercised"]


# ---- plain tables ---------------------------------------------------------------------------------------------


def _fmt(value: Any, kind: str) -> str:
    """One table cell: ``pct``, ``int``, ``f1``/``f2`` (decimals) or ``str``."""
    if kind == "pct":
        return _pct(value)
    if kind == "str":
        return "–" if value is None else str(value)
    return _num(value, 0 if kind == "int" else int(kind[1:]))


# (title, benchmark, rows key or None for one flat object, [(column, field, kind)])
TABLES: tuple[tuple[str, str, str | None, list[tuple[str, str, str]]], ...] = (
    ("Models alone", "standalone", "models",
     [("model", "name", "str"), ("role", "role", "str"), ("arch", "arch", "str"), ("params", "params", "int"),
      ("known", "acc_known", "pct"), ("unknown", "acc_unknown", "pct"), ("all", "acc_all", "pct"), ("n", "n", "str")]),
    ("Bus throughput", "bus", None,
     [("cache bytes", "cache_bytes", "int"), ("raw nats-py MB/s", "raw_nats_mb_s", "f1"),
      ("KV transfer MB/s", "kv_transfer_mb_s", "f1"), ("ratio", "ratio", "f2")]),
    ("Agents over NATS vs in process", "e2e", None,
     [("queries", "queries", "str"), ("answered", "answered", "str"), ("parity", "parity", "pct"),
      ("bus p50 ms", "bus_p50_ms", "f1"), ("in-process p50 ms", "inproc_p50_ms", "f1"),
      ("overhead", "overhead_ratio", "f2"), ("bytes/query", "bytes_per_query", "int")]),
)  # fmt: skip


def section_tables(results: dict[str, Data], out: Path) -> Section:
    """Standalone models, bus throughput and end-to-end parity as tables."""
    text = ""
    for title, bench, key, columns in TABLES:
        text += f"\n## {title}\n\n"
        if bench not in results:
            text += _missing(bench)
            continue
        rows = results[bench].get(key, []) if key else [results[bench]]
        md = [[_fmt(r.get(field), kind) for _, field, kind in columns] for r in rows]
        text += _table([c for c, _, _ in columns], md)
    return text, []
