"""Generate the shipped synthetic link traces (deterministic: a seeded random generator).

    python -m ops.traces.make [--out DIR] [--seed N]

Models (rates in MB/s = 1e6 bytes/s, one value per 100 ms step):

- **wifi-walkout** (12 s loop): 0-5 s on Wi-Fi at 20 MB/s with +-10% log-normal jitter; 5-6 s the signal fades
  and the rate falls geometrically from 20 to 2 MB/s; 6.0-6.3 s the phone hands over to the cell and carries
  almost nothing (0.05 MB/s); 6.3-12 s a cellular uplink at 0.5 MB/s with +-20% jitter. Looping means walking
  back in: every 12 s a stream may start on Wi-Fi and finish on the cell.
- **walkout-slow** (60 s loop): wifi-walkout at 1/100 of its rates that stays on the cell: 0-5 s 0.2 MB/s
  (+-10%), 5-6 s a fade to 0.02, 6.0-6.3 s 0.0005, then 0.005 MB/s (+-20%) until the loop, so a stream that meets
  the drop does not get the fast link back before its deadline: the regime of a translate-mode federation, whose
  notes' caches (~0.2 MB a device) a 0.5 MB/s cell carries in well under a second.
- **lte-congested** (20 s loop): a Markov chain over cell load -- free (4 MB/s), busy (1 MB/s) and congested
  (0.25 MB/s), staying in a state with probability 0.9 per step, else moving to a neighbouring one -- times
  log-normal fast fading (sigma 0.3). Written both as a rate CSV and as a Mahimahi packet-delivery trace
  (each millisecond gets the 1500-byte opportunities the rate allows, the remainder carried over).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from ops.traces import TRACES_DIR

STEP_S = 0.1  # seconds per trace step
PACKET_BYTES = 1500  # bytes per Mahimahi delivery opportunity
LTE_STATES = (4.0, 1.0, 0.25)  # MB/s: free, busy, congested
LTE_STAY = 0.9  # probability of staying in a load state for the next step
LTE_SIGMA = 0.3  # log-normal fast fading


def wifi_walkout(rng: random.Random, scale: float = 1.0, seconds: float = 12.0) -> list[float]:
    """MB/s per 100 ms step (see the module docstring): wifi-walkout, or at ``scale`` of its rates for ``seconds``
    (walkout-slow: 1/100 over 60 s, the cell part going on), rounded to 4 significant decimals of the full scale."""
    rates = []
    for i in range(round(seconds / STEP_S)):
        t = i * STEP_S
        if t < 5.0:
            rate = 20.0 * math.exp(rng.gauss(0, 0.1))
        elif t < 6.0:
            rate = 20.0 * (2.0 / 20.0) ** ((t - 5.0) / 1.0)
        elif t < 6.3:
            rate = 0.05
        else:
            rate = 0.5 * math.exp(rng.gauss(0, 0.2))
        rates.append(round(rate * scale, 4 + round(-math.log10(scale))))
    return rates


def lte_congested(rng: random.Random) -> list[float]:
    """MB/s per 100 ms step over 20 s (see the module docstring)."""
    state, rates = 1, []
    for _ in range(200):
        if rng.random() > LTE_STAY:
            state = min(len(LTE_STATES) - 1, max(0, state + rng.choice((-1, 1))))
        rates.append(round(LTE_STATES[state] * math.exp(rng.gauss(0, LTE_SIGMA)), 4))
    return rates


def rate_csv(rates: list[float], title: str) -> str:
    """``time_s,rate_mbps`` lines; the last line marks where the trace loops."""
    lines = [f"# {title}", "time_s,rate_mbps"]
    lines += [f"{i * STEP_S:.1f},{r}" for i, r in enumerate(rates)]
    lines.append(f"{len(rates) * STEP_S:.1f},{rates[-1]}")
    return "\n".join(lines) + "\n"


def mahimahi(rates: list[float]) -> str:
    """One line per 1500-byte delivery opportunity, its millisecond timestamp (1-based, as mm-link's traces)."""
    out, carry = [], 0.0
    per_step = round(STEP_S * 1000)
    for i, rate in enumerate(rates):
        for ms in range(per_step):
            carry += rate * 1e6 / 1000 / PACKET_BYTES
            while carry >= 1:
                out.append(str(i * per_step + ms + 1))
                carry -= 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the shipped traces."""
    parser = argparse.ArgumentParser(prog="python -m ops.traces.make", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TRACES_DIR, help="directory to write into")
    parser.add_argument("--seed", type=int, default=17, help="random seed")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    walk = wifi_walkout(random.Random(args.seed))
    lte = lte_congested(random.Random(args.seed + 1))
    (args.out / "wifi-walkout.csv").write_text(rate_csv(walk, "a phone walking out of Wi-Fi (ops/traces/make.py)"))
    (args.out / "lte-congested.csv").write_text(rate_csv(lte, "a congested LTE cell (ops/traces/make.py)"))
    (args.out / "lte-congested.mahi").write_text(mahimahi(lte))
    slow = wifi_walkout(random.Random(args.seed + 2), scale=0.01, seconds=60.0)
    title = "a phone walking out of Wi-Fi at 1/100 of the rates, staying on the cell (ops/traces/make.py)"
    (args.out / "walkout-slow.csv").write_text(rate_csv(slow, title))
    for name in ("wifi-walkout.csv", "lte-congested.csv", "lte-congested.mahi", "walkout-slow.csv"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
