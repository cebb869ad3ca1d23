"""The real-model figures: ``accuracy --real`` (every row, per question format) and ``latency --real``.

A real run's rows carry ``format`` (``choice``: four options by likelihood; ``text``: exact match) and ``task``;
each row is drawn once per format. Results come from ``accuracy_real.json`` and ``latency_real.json`` (or an
``accuracy.json`` / ``latency.json`` whose ``real`` is true).
"""

from __future__ import annotations

from pathlib import Path

from ops.report.figures import _save, plt
from ops.report.tables import Data, Section, _ci, _num, _pct, _table

FORMAT_COLORS = {"choice": "tab:blue", "text": "tab:orange"}


def _missing_real(bench: str) -> str:
    return f"not measured (run `make real`, then `python -m ops.bench {bench} --real --json DIR/{bench}_real.json`)\n"


def _by_format(rows: list[Data]) -> dict[str, list[Data]]:
    out: dict[str, list[Data]] = {}
    for r in rows:
        out.setdefault(str(r.get("format") or "all"), []).append(r)
    return out


def _label(r: Data) -> str:
    return str(r.get("label") or r.get("mode"))


def section_real_accuracy(results: dict[str, Data], out: Path) -> Section:
    """Every row of the real run as grouped bars (one colour per format), and C2C accuracy vs devices."""
    text = "## Real models: accuracy\n\n"
    acc = results.get("accuracy_real")
    if acc is None:
        return text + _missing_real("accuracy"), []
    formats = _by_format(acc.get("rows", []))
    labels = list(dict.fromkeys(_label(r) for r in acc.get("rows", [])))
    if not labels:
        return text + "accuracy_real.json has no rows\n", []
    fig, ax = plt.subplots(figsize=(7, max(3.5, 0.32 * len(labels) * max(1, len(formats)) + 1)))
    height = 0.8 / max(1, len(formats))
    for k, (fmt, rows) in enumerate(sorted(formats.items())):
        by_label = {_label(r): r for r in rows}
        ys = [i + (k - (len(formats) - 1) / 2) * height for i in range(len(labels))]
        vals = [float(by_label[lab]["accuracy"]) if lab in by_label else 0.0 for lab in labels]
        errs = [_ci(by_label[lab]) if lab in by_label else 0.0 for lab in labels]
        ax.barh(ys, vals, height, xerr=errs, capsize=2, label=fmt, color=FORMAT_COLORS.get(fmt))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    task = acc.get("task") or "questions"
    ax.set(xlabel="accuracy", xlim=(0, 1.02), title=f"Real models ({acc.get('receiver', '?')} receives): {task}")
    ax.legend(fontsize=8, title="format")
    pngs = [_save(fig, out, "real_accuracy.png")]
    text += f"![real-model accuracy]({pngs[0].name})\n\n"
    pngs += _devices_curve(formats, out)
    if len(pngs) > 1:
        text += f"![real-model accuracy vs devices]({pngs[1].name})\n\n"
    md = [
        [_label(r), str(r.get("format", "")), _pct(r.get("accuracy")), _pct(_ci(r)), str(r.get("n", "")),
         _num(r.get("bytes_per_question"), 0)]
        for r in acc.get("rows", [])
    ]  # fmt: skip
    return text + _table(["row", "format", "accuracy", "±ci95", "n", "bytes/question"], md), pngs


def _devices_curve(formats: dict[str, list[Data]], out: Path) -> list[Path]:
    """C2C with the first 1..N devices (rows ``c2c+k``), the receiver alone at 0, per format."""
    curves = {}
    for fmt, rows in formats.items():
        by_label = {_label(r): r for r in rows}
        ks = sorted(int(lab.removeprefix("c2c+")) for lab in by_label if lab.startswith("c2c+") and lab[4:].isdigit())
        if not ks:
            continue
        xs, ys = [], []
        if "receiver" in by_label:
            xs, ys = [0], [float(by_label["receiver"]["accuracy"])]
        xs += ks
        ys += [float(by_label[f"c2c+{k}"]["accuracy"]) for k in ks]
        curves[fmt] = (xs, ys)
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for fmt, (xs, ys) in sorted(curves.items()):
        ax.plot(xs, ys, "o-", label=fmt, color=FORMAT_COLORS.get(fmt))
    ax.set(xlabel="devices fused (0: receiver alone)", ylabel="accuracy", ylim=(0, 1.02),
           title="Real models: accuracy vs devices")  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, title="format")
    return [_save(fig, out, "real_accuracy_vs_devices.png")]


def section_real_latency(results: dict[str, Data], out: Path) -> Section:
    """p50 (whisker p95) per mode of the real run."""
    text = "## Real models: latency\n\n"
    lat = results.get("latency_real")
    if lat is None:
        return text + _missing_real("latency"), []
    rows = [r for r in lat.get("rows", []) if r.get("p50_ms") is not None]
    if not rows:
        return text + "latency_real.json has no rows\n", []
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    p50 = [float(r["p50_ms"]) for r in rows]
    up = [max(0.0, float(r["p95_ms"]) - float(r["p50_ms"])) if r.get("p95_ms") is not None else 0.0 for r in rows]
    bars = ax.bar([str(r["mode"]) for r in rows], p50, yerr=[[0.0] * len(rows), up], capsize=4, color="tab:green")
    ax.bar_label(bars, [f"{v:.0f}" for v in p50], label_type="center", color="white", fontsize=9)
    ax.set(ylabel="ms per question (p50, whisker p95)", title="Real models: latency per question")
    png = _save(fig, out, "real_latency.png")
    md = [[str(r["mode"]), _num(r.get("p50_ms")), _num(r.get("p95_ms"))] for r in rows]
    return text + f"![real-model latency]({png.name})\n\n" + _table(["mode", "p50 ms", "p95 ms"], md), [png]
