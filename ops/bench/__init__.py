"""Benchmarks: ``python -m ops.bench <name> [--json FILE]``.

Each benchmark is a module ``ops.bench.<name>`` exposing ``add_arguments(parser)`` and
``run(args) -> dict``; the dispatcher prints the dict as JSON (and writes it to ``--json FILE``).
Figures compared with each other always come from one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENCHMARKS: dict[str, str] = {
    "codec": "KV codec: bytes per token, ratio vs fp16, speed and error per precision",
    "bus": "raw nats-py publish vs KV transfer through our transport, same bytes, one server",
    "standalone": "each zoo model alone on the test questions",
    "accuracy": "receiver / transmitters / text-to-text / C2C modes on held-out questions",
    "latency": "text-to-text vs C2C wall time and bytes per token",
    "e2e": "the agents over NATS vs refine() in process",
    "bandwidth": "links (rates and traces) x policies (built-in or module:Class) through the agents",
    "attacks": "the attack matrix against a federation of processes, with legitimate questions meanwhile",
    "leakage": "what leaves the receiver side: a sniffer, n-gram overlap of q' with q, a KV-inversion attacker",
    "faults": "faults under load on a cluster with leaf nodes: answered by the deadline, wrong answers, recovery",
    "load": "20 to 1000 questions in flight from several receivers, and a soak for memory growth",
}


def write_json(path: str | Path | None, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder made); nothing when ``path`` is None. Long runs call
    it with what they have so far, so ``--json`` fills as they go; the dispatcher writes the final result."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
