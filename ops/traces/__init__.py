"""Synthetic link traces shipped with FedRefine (made by ``python -m ops.traces.make``), and name resolution.

``wifi-walkout.csv``   a phone walking out of Wi-Fi: ~20 MB/s, then the signal fades over a second, a short
                       hand-over gap, then a cellular uplink near 0.5 MB/s (loops after 12 s).
``lte-congested.csv``  a congested LTE cell: a three-state load chain (4, 1, 0.25 MB/s) with fast fading,
                       100 ms steps, 20 s loop.
``walkout-slow.csv``   wifi-walkout at 1/100 of its rates that stays on the cell (0.2 MB/s, then ~0.005 MB/s until
                       a 60 s loop): where a translate-mode federation's megabyte caches meet the drop.
``lte-congested.mahi`` the same cell as a Mahimahi packet-delivery trace (1500-byte opportunities per ms).

``resolve_trace("wifi-walkout")`` finds a shipped trace by name; any other text is taken as a file path.
"""

from __future__ import annotations

from pathlib import Path

from bus.errors import ConfigError

TRACES_DIR = Path(__file__).resolve().parent
SUFFIXES = (".csv", ".mahi")


def shipped() -> list[str]:
    """Names of the shipped traces (file names without suffix; a name with two formats is listed once)."""
    return sorted({p.stem for p in TRACES_DIR.iterdir() if p.suffix in SUFFIXES})


def resolve_trace(spec: str) -> Path:
    """A path to the trace ``spec`` names: an existing file, a shipped file name, or a shipped stem."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    for candidate in (TRACES_DIR / spec, *(TRACES_DIR / f"{spec}{s}" for s in SUFFIXES)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no trace file {spec!r} (shipped traces: {', '.join(shipped())})")
