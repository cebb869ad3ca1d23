"""Benchmarks: ``python -m ops.bench <name> [--json FILE]``.

Each benchmark is a module ``ops.bench.<name>`` exposing ``add_arguments(parser)`` and
``run(args) -> dict``; the dispatcher prints the dict as JSON (and writes it to ``--json FILE``).
Figures compared with each other always come from one run.
"""

from __future__ import annotations

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
