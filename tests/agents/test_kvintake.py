"""The receiver's KV intake holds no more of a stream than its plan's bytes."""

from __future__ import annotations

import torch

from agents.kvintake import GuardedKVReceiver
from bus.connect import BusConnections
from bus.errors import LimitError
from bus.subjects import Subjects
from bus.transport import send_cache


async def test_a_stream_past_its_planned_bytes_is_refused(nats_server) -> None:
    subjects = Subjects("bud")
    cache = {m: (torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)) for m in range(4)}  # 32 KB a layer in fp16
    budgets = {"small": 40_000, "ample": None}
    async with BusConnections(nats_server.url, name="t", security=nats_server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        rx = GuardedKVReceiver(
            conns.sub,
            subjects.kv_for_receiver("rx"),
            subjects=subjects,
            guard=lambda qid, tid: None,
            is_late=lambda qid: False,
            budget=lambda qid, tid: budgets[qid],
            out_dtype=torch.float16,
        )
        async with rx:
            for qid in budgets:
                await send_cache(
                    conns.pub, subjects.kv("rx", qid, "tx"), cache, query_id=qid, sender="tx", pack_bytes=0
                )
            await rx.wait_complete("ample", "tx", timeout=30)
    assert len(rx.completed("ample", "tx")) == 4
    small = rx.completed("small", "tx")
    assert len(small) == 1 and rx.stream_bytes[("small", "tx")] <= 40_000  # one layer fits, the rest is refused
    refused = [exc for _, exc in rx.errors if isinstance(exc, LimitError)]
    assert refused and all(exc.reason == "planned" for exc in refused)
