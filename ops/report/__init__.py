"""The paper's figures as PNG plots and a markdown summary, from whatever ``ops.bench`` results exist.

Run it as ``python -m ops.report [--in DIR] [--out DIR]`` (see :mod:`ops.report.build`). Layout:

- :mod:`ops.report.tables`   loading the benchmark JSON, cell formatting, the plain tables, the bandwidth target.
- :mod:`ops.report.figures`  one section per plot (Fig. 3a, 3b, 3c, bandwidth vs link rate, bytes per token).
- :mod:`ops.report.build`    the sections in report order, :func:`build_report` and the CLI's :func:`main`.
"""

from __future__ import annotations

from ops.report.build import SECTIONS, build_report, main
from ops.report.figures import section_bandwidth, section_bytes, section_fig3a, section_fig3b, section_fig3c
from ops.report.tables import (
    BENCHES,
    DEFAULT_IN,
    DEFAULT_OUT,
    TABLES,
    TARGET_GAIN,
    TARGET_MET,
    Data,
    Section,
    bandwidth_target,
    load_results,
    section_tables,
)

__all__ = [
    "BENCHES",
    "DEFAULT_IN",
    "DEFAULT_OUT",
    "SECTIONS",
    "TABLES",
    "TARGET_GAIN",
    "TARGET_MET",
    "Data",
    "Section",
    "bandwidth_target",
    "build_report",
    "load_results",
    "main",
    "section_bandwidth",
    "section_bytes",
    "section_fig3a",
    "section_fig3b",
    "section_fig3c",
    "section_tables",
]
