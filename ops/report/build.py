"""``python -m ops.report [--in DIR] [--out DIR]``: the paper's figures as PNG plots and a markdown summary.

Reads whichever benchmark JSON files exist in ``--in`` (``codec.json``, ``bus.json``, ``standalone.json``,
``accuracy.json``, ``latency.json``, ``e2e.json``, ``bandwidth.json``, as written by ``python -m ops.bench NAME
--json DIR/NAME.json``; ``accuracy_real.json`` and ``latency_real.json`` from ``--real``) and writes
``--out/REPORT.md`` plus one PNG per figure: accuracy vs number of transmitters (Fig. 3a), accuracy per
transmitter (Fig. 3b), latency of text-to-text vs C2C vs private C2C (Fig. 3c), accuracy and deadline-met vs link
rate per policy, bytes per token per precision against text, and the real-model figures. A missing file makes its
section say how to measure it; nothing is invented.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from bus.cli import OneLineParser
from bus.errors import ConfigError, FedRefineError
from ops.report.figures import section_bandwidth, section_bytes, section_fig3a, section_fig3b, section_fig3c
from ops.report.real import section_real_accuracy, section_real_latency
from ops.report.tables import DEFAULT_IN, DEFAULT_OUT, Data, Section, load_results, section_tables

log = logging.getLogger(__name__)

SECTIONS: tuple[Callable[[dict[str, Data], Path], Section], ...] = (
    section_fig3a,
    section_fig3b,
    section_fig3c,
    section_bandwidth,
    section_bytes,
    section_real_accuracy,
    section_real_latency,
    section_tables,
)


def build_report(in_dir: Path, out_dir: Path) -> tuple[Path, list[Path]]:
    """Write ``REPORT.md`` and the PNGs for whatever results exist; return the markdown path and the PNGs."""
    if not in_dir.is_dir():
        raise ConfigError(
            f"no benchmark results folder {in_dir} (run `python -m ops.bench NAME --json {in_dir}/NAME.json`)"
        )
    results = load_results(in_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create report folder {out_dir}: {exc}") from exc
    parts = [f"# FedRefine results\n\nFrom {len(results)} benchmark file(s) in `{in_dir}`: "
             f"{', '.join(sorted(results)) or 'none'}.\n"]  # fmt: skip
    pngs: list[Path] = []
    for section in SECTIONS:
        try:
            text, written = section(results, out_dir)
        except (KeyError, TypeError, ValueError) as exc:
            name = section.__name__.removeprefix("section_")
            raise ConfigError(f"benchmark results do not fit the {name} section: {exc!r}") from exc
        parts.append(text)
        pngs += written
    md = out_dir / "REPORT.md"
    md.write_text("\n".join(parts))
    return md, pngs


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the report, print where it is; one ``error:`` line and exit 2 on failure."""
    parser = OneLineParser(
        prog="python -m ops.report", description="the paper's figures (PNG) and a summary from benchmark JSON"
    )
    parser.add_argument("--in", dest="in_dir", type=Path, default=DEFAULT_IN, help=f"results folder ({DEFAULT_IN})")
    parser.add_argument("--out", dest="out_dir", type=Path, default=DEFAULT_OUT, help=f"report folder ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        md, pngs = build_report(args.in_dir, args.out_dir)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {len(pngs)} plot(s)")
    return 0
