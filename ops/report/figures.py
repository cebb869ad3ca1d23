"""The report's figures: one section per plot, each writing a PNG and the markdown around it.

Accuracy vs number of transmitters (Fig. 3a), accuracy per transmitter (Fig. 3b), latency of text-to-text vs
C2C vs private C2C (Fig. 3c), bytes per token per precision against text, and accuracy, deadline-met and bytes
per query vs link rate per policy. A section whose results are missing says how to measure them instead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ops.report.tables import (  # noqa: E402
    ADAPTIVE_EXCLUDED,
    UNSHAPED_LABEL,
    Data,
    Section,
    _bus_bytes_per_token,
    _ci,
    _missing,
    _names,
    _num,
    _pct,
    _receiver_acc,
    _table,
    _text_bytes_per_token,
    bandwidth_target,
)

log = logging.getLogger(__name__)

DPI = 120  # dots per inch of the PNGs
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8", "int4")


def _save(fig: plt.Figure, out: Path, name: str) -> Path:
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# ---- accuracy (Fig. 3a, 3b) -------------------------------------------------------------------------------


def _ablation(acc: Data, r: Data) -> bool:
    """The run's C2C row without the receiver's self-check (when the run had one)."""
    return (
        acc.get("self_check") is not None
        and r.get("mode") not in ("receiver", "transmitter")
        and (r.get("self_check") is None)
    )


def _acc_rows(acc: Data, mode: str, private: bool = False) -> list[Data]:
    rows = [
        r
        for r in acc.get("rows", [])
        if r.get("mode") == mode and bool(r.get("private", False)) == private and not _ablation(acc, r)
    ]
    precisions = [r["precision"] for r in rows if r.get("precision")]
    main = max(set(precisions), key=precisions.count) if precisions else None  # the run's default precision
    return [r for r in rows if r.get("precision") in (None, main)]


def _chain(rows: list[Data]) -> list[Data]:
    """C2C rows with 1..N transmitters, each adding one to the previous (the Fig. 3a curve)."""
    if not rows:
        return []
    longest = max(rows, key=lambda r: len(_names(r)))
    order = _names(longest)
    out = []
    for n in range(1, len(order) + 1):
        exact = [r for r in rows if _names(r) == order[:n]]
        same_n = [r for r in rows if len(_names(r)) == n]
        pick = exact or sorted(same_n, key=lambda r: -float(r["accuracy"]))[:1]
        out.extend(pick[:1])
    return out


def section_fig3a(results: dict[str, Data], out: Path) -> Section:
    """Accuracy vs number of transmitters."""
    text = "## Accuracy vs number of transmitters (Fig. 3a)\n\n"
    if "accuracy" not in results:
        return text + _missing("accuracy"), []
    acc = results["accuracy"]
    base = _receiver_acc(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows_md = []
    for mode, private, style, label in (
        ("c2c", False, "o-", "C2C (gate)"),
        ("c2c", True, "s--", "C2C private"),
        ("c2c-uniform", False, "^:", "C2C uniform weights"),
        ("c2c-shuffled", False, "x:", "C2C shuffled control"),
    ):
        chain = _chain(_acc_rows(acc, mode, private))
        if not chain:
            continue
        xs = [0] + [len(_names(r)) for r in chain] if base is not None else [len(_names(r)) for r in chain]
        ys = ([base] if base is not None else []) + [float(r["accuracy"]) for r in chain]
        errs = ([0.0] if base is not None else []) + [_ci(r) for r in chain]
        ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=label)
        rows_md += [
            [label, str(len(_names(r))), ", ".join(_names(r)), _pct(r["accuracy"]), _pct(_ci(r))] for r in chain
        ]
    t2t = _chain(_acc_rows(acc, "t2t"))
    if t2t:
        r = t2t[-1]
        ax.plot([len(_names(r))], [float(r["accuracy"])], "D", color="gray", label="text-to-text")
        rows_md.append(["text-to-text", str(len(_names(r))), ", ".join(_names(r)), _pct(r["accuracy"]), _pct(_ci(r))])
    if base is not None:
        ax.axhline(base, color="k", lw=0.8, ls="--", label=f"receiver alone ({100 * base:.1f}%)")
    ax.axhline(0.25, color="r", lw=0.6, ls=":", label="chance")
    ax.set(xlabel="transmitters", ylabel="accuracy", title="Accuracy vs number of transmitters", ylim=(0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    png = _save(fig, out, "fig3a_accuracy_vs_transmitters.png")
    text += f"![Fig. 3a]({png.name})\n\nReceiver alone: {_pct(base)}.\n\n"
    text += _table(["mode", "n", "transmitters", "accuracy", "±ci95"], rows_md)
    known = acc.get("receiver_known_after_fusion")
    if known is not None:
        text += f"\nReceiver on facts it knows, with fusion on: {_pct(known)}.\n"
    for r in acc.get("rows", []):
        if _ablation(acc, r):
            without = acc.get("receiver_known_after_fusion_without_self_check")
            text += (
                f"\nWithout the receiver's self-check (P(none) < {acc['self_check']}: answer alone), C2C with "
                f"{', '.join(_names(r))}: {_pct(r['accuracy'])} ± {_pct(_ci(r))}"
                + (f"; on facts the receiver knows: {_pct(without)}" if without is not None else "")
                + ".\n"
            )
    return text, [png]


def section_fig3b(results: dict[str, Data], out: Path) -> Section:
    """Accuracy per transmitter: the transmitter alone and C2C with that one transmitter."""
    text = "## Accuracy per transmitter (Fig. 3b)\n\n"
    if "accuracy" not in results:
        return text + _missing("accuracy"), []
    acc = results["accuracy"]
    alone = {_names(r)[0]: r for r in _acc_rows(acc, "transmitter") if _names(r)}
    fused = {_names(r)[0]: r for r in _acc_rows(acc, "c2c") if len(_names(r)) == 1}
    names = sorted(set(alone) | set(fused))
    if not names:
        return text + "no single-transmitter rows in accuracy.json\n", []
    base = _receiver_acc(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 4))
    width = 0.38
    for k, (rows, label) in enumerate(((alone, "transmitter alone"), (fused, "receiver + C2C"))):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ys = [float(rows[n]["accuracy"]) if n in rows else math.nan for n in names]
        errs = [_ci(rows[n]) if n in rows else 0.0 for n in names]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
    if base is not None:
        ax.axhline(base, color="k", lw=0.8, ls="--", label=f"receiver alone ({100 * base:.1f}%)")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set(ylabel="accuracy", title="Accuracy per transmitter", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    png = _save(fig, out, "fig3b_accuracy_per_transmitter.png")
    md = [[n, _pct(alone[n]["accuracy"]) if n in alone else "–", _pct(fused[n]["accuracy"]) if n in fused else "–"]
          for n in names]  # fmt: skip
    return text + f"![Fig. 3b]({png.name})\n\n" + _table(["transmitter", "alone", "receiver + C2C"], md), [png]


# ---- latency (Fig. 3c) and bytes per token ----------------------------------------------------------------


def section_fig3c(results: dict[str, Data], out: Path) -> Section:
    """Latency of text-to-text vs C2C vs private C2C (in-process, and over the bus when e2e exists)."""
    text = "## Latency: text-to-text vs C2C vs private C2C (Fig. 3c)\n\n"
    if "latency" not in results:
        return text + _missing("latency"), []
    rows = [r for r in results["latency"].get("rows", []) if r.get("p50_ms") is not None]
    e2e = results.get("e2e")
    if e2e and e2e.get("bus_p50_ms") is not None:
        rows = rows + [{"mode": "C2C over NATS (e2e)", "p50_ms": e2e["bus_p50_ms"], "p95_ms": None}]
    if not rows:
        return text + "latency.json has no rows\n", []
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    labels = [str(r["mode"]) for r in rows]
    p50 = [float(r["p50_ms"]) for r in rows]
    up = [max(0.0, float(r["p95_ms"]) - float(r["p50_ms"])) if r.get("p95_ms") is not None else 0.0 for r in rows]
    bars = ax.bar(labels, p50, yerr=[[0.0] * len(rows), up], capsize=4, color="tab:blue")
    ax.bar_label(bars, [f"{v:.0f}" for v in p50], label_type="center", color="white", fontsize=9)
    ax.set(ylabel="ms per question (p50, whisker p95)", title="Latency per question")
    ax.tick_params(axis="x", rotation=15)
    png = _save(fig, out, "fig3c_latency.png")
    md = [[str(r["mode"]), _num(r.get("p50_ms")), _num(r.get("p95_ms")), _num(r.get("bytes_per_token"))] for r in rows]
    return text + f"![Fig. 3c]({png.name})\n\n" + _table(["mode", "p50 ms", "p95 ms", "bytes/token"], md), [png]


def section_bytes(results: dict[str, Data], out: Path) -> Section:
    """Bytes per token per precision (codec on a Qwen3-0.6B-shaped cache; zoo caches through the agents) vs text."""
    text = "## Bytes per token: cache per precision vs text\n\n"
    best: dict[str, Data] = {}
    for r in results.get("codec", {}).get("rows", []):  # the compressed variant when both are present
        p = r.get("precision")
        if p is not None and (p not in best or r.get("bytes_per_token", math.inf) < best[p]["bytes_per_token"]):
            best[p] = r
    bus = _bus_bytes_per_token(results)
    if not best and not bus:
        return text + _missing("codec") + "\nand " + _missing("bandwidth"), []
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    bars: list[tuple[str, float, str]] = [(f"codec {p}", float(best[p]["bytes_per_token"]), "tab:blue")
                                          for p in sorted(best, key=lambda p: rank.get(p, 99))]  # fmt: skip
    bars += [(f"agents {p}", bus[p], "tab:orange") for p in sorted(bus, key=lambda p: rank.get(p, 99))]
    text_bpt = _text_bytes_per_token(results)
    if text_bpt is not None:
        bars.append(("text (t2t)", text_bpt, "tab:gray"))
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(bars) + 2), 4))
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.bar_label(drawn, [f"{b[1]:,.0f}" if b[1] >= 10 else f"{b[1]:.1f}" for b in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="bytes per token (log)", title="Bytes per token on the wire")
    ax.tick_params(axis="x", rotation=20)
    png = _save(fig, out, "bytes_per_token.png")
    md = [[f"codec {p}", _num(best[p].get("bytes_per_token"), 0), _num(best[p].get("ratio_vs_fp16"), 2),
           _num(best[p].get("rel_l2_error"), 4)] for p in sorted(best, key=lambda p: rank.get(p, 99))]  # fmt: skip
    md += [[f"agents {p}", _num(v, 1), "–", "–"] for p, v in sorted(bus.items(), key=lambda kv: rank.get(kv[0], 99))]
    if text_bpt is not None:
        md.append(["text (t2t)", _num(text_bpt, 2), "–", "–"])
    text += f"![bytes per token]({png.name})\n\n" + _table(["format", "bytes/token", "ratio vs fp16", "rel L2"], md)
    text += ("\n`codec`: `python -m ops.bench codec` on a Qwen3-0.6B-shaped cache (28 layers, 8 kv heads x 128); "
             "`agents`: the zoo's caches measured through the agents in the bandwidth sweep.\n")  # fmt: skip
    return text, [png]


# ---- bandwidth ----------------------------------------------------------------------------------------------


def _rate_axis(rows: list[Data]) -> tuple[dict[float | None, float], list[float], list[str]]:
    """x position per link rate on a log axis, unshaped placed right of the fastest shaped rate."""
    shaped = sorted({float(r["link_mbps"]) for r in rows if r.get("link_mbps") is not None})
    pos: dict[float | None, float] = {m: m for m in shaped}
    pos[None] = (shaped[-1] * 4) if shaped else 1.0
    ticks = shaped + [pos[None]]
    labels = [f"{m:g}" for m in shaped] + [UNSHAPED_LABEL]
    return pos, ticks, labels


def section_bandwidth(results: dict[str, Data], out: Path) -> Section:
    """Accuracy, deadline-met and bytes per query vs link rate, one line per policy."""
    text = "## Bandwidth: accuracy and deadlines vs link rate per policy\n\n"
    if "bandwidth" not in results:
        return text + _missing("bandwidth"), []
    bw = results["bandwidth"]
    rows = [r for r in bw.get("rows", []) if r.get("policy") and not r.get("trace")]  # rate rows
    if not rows:
        return text + "bandwidth.json has no rows\n", []
    pos, ticks, labels = _rate_axis(rows)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    base = bw.get("receiver_alone_accuracy")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("accuracy", "accuracy", False), ("deadline_met", "deadlines met", False),
              ("bytes_per_query", "bytes per query (log)", True))  # fmt: skip
    for ax, (key, ylabel, log_y) in zip(axes, panels, strict=True):
        for i, policy in enumerate(policies):
            pts = sorted(
                (pos[r.get("link_mbps")], float(r[key]))
                for r in rows
                if r["policy"] == policy and r.get(key) is not None and (float(r[key]) > 0 or not log_y)
            )
            if pts:  # shrinking markers of different shapes keep overlapping policies visible
                style = "--" if policy in ADAPTIVE_EXCLUDED else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=MARKERS[i % len(MARKERS)],
                        markersize=max(3.0, 9.0 - 1.5 * i), lw=1.2, label=policy)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels, rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel="link rate (MB/s)", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.05)
    if base is not None:
        axes[0].axhline(float(base), color="k", lw=0.8, ls=":", label=f"receiver alone ({100 * float(base):.1f}%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Bandwidth-adaptive policies on shaped links")
    png = _save(fig, out, "bandwidth_vs_link_rate.png")
    ordered = sorted(
        rows, key=lambda r: (r.get("link_mbps") is None, r.get("link_mbps") or 0, policies.index(r["policy"]))
    )
    md = [
        [
            UNSHAPED_LABEL if r.get("link_mbps") is None else f"{float(r['link_mbps']):g}",
            str(r["policy"]),
            _pct(r.get("accuracy")),
            _pct(r.get("deadline_met")),
            _num(r.get("bytes_per_query"), 0),
            _num(r.get("bytes_per_token"), 1),
            _num(r.get("p50_ms"), 0),
        ]
        for r in ordered
    ]
    text += f"![bandwidth]({png.name})\n\nReceiver alone: {_pct(base)}.\n\n"
    text += _table(["MB/s", "policy", "accuracy", "deadline met", "bytes/query", "bytes/token", "p50 ms"], md)
    text += "\n" + "".join(f"- {line}\n" for line in bandwidth_target(bw))
    return text, [png]
