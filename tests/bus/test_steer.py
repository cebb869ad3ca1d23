"""Mid-stream re-planning: the steer's decisions (pure), and a steered stream over a real nats-server."""

from __future__ import annotations

import pytest
import torch

from bus.connect import BusConnections
from bus.errors import TransportError
from bus.policy import make_policy
from bus.steer import DeadlineSteer, cheaper_or_equal
from bus.transport import KVReceiver, StreamProgress, send_cache

SHAPE = (1, 4, 64, 64)  # ~64 KB of fp16 K+V per layer
LAYERS = (3, 1, 0, 2)  # send order, most important first


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steer(
    policy: str, rate: float, deadline: float = 2.0, backlog: int = 0, whole: bool = False
) -> tuple[DeadlineSteer, Clock]:
    clock = Clock()
    steer = DeadlineSteer(
        make_policy(policy),
        deadline=deadline,
        shapes={m: SHAPE for m in LAYERS},
        importance={m: float(len(LAYERS) - i) for i, m in enumerate(LAYERS)},
        rate=lambda: rate,
        backlog=lambda: backlog,
        reserve_s=0.25,
        clock=clock,
        whole=whole,
    )
    return steer, clock


def _progress(sent: int, precision: str = "fp16") -> StreamProgress:
    return StreamProgress(
        tuple((m, precision) for m in LAYERS[:sent]), tuple((m, precision) for m in LAYERS[sent:]), 0, 0.0
    )


def test_on_time_stream_goes_on() -> None:
    steer, clock = _steer("deadline-aware", rate=10e6)
    clock.now = 0.5
    assert steer(_progress(1)) is None and steer.replans == 0


def test_rate_drop_degrades_precision_before_dropping() -> None:
    steer, clock = _steer("deadline-aware", rate=0.15e6)  # the rest at fp16 (~197 KB) needs 1.3 s
    clock.now = 0.5
    new = steer(_progress(1))
    assert new is not None and steer.replans == 1
    assert [m for m, _ in new] == list(LAYERS[1:])  # every layer still goes, in the same order
    assert {p for _, p in new} <= {"int8", "int4"}


def test_rate_collapse_drops_the_least_important() -> None:
    steer, clock = _steer("deadline-aware", rate=0.02e6)
    clock.now = 0.5
    new = steer(_progress(1))
    assert new is not None and all(p == "int4" for _, p in new)
    assert 0 < len(new) < 3 and new[0][0] == LAYERS[1]  # the most important of the rest first
    clock.now = 1.9  # past the deadline less the reserve: nothing more
    assert steer(_progress(2, "int4")) == []


def test_a_whole_stream_goes_cheaper_or_is_cut_never_thinned() -> None:
    """Where the deadline-aware steer drops the least important layers, a whole stream (the receiver reads it only
    with every layer) keeps every layer at a cheaper precision, or is cut when even int4 is late."""
    steer, clock = _steer("deadline-aware", rate=0.15e6, whole=True)
    clock.now = 0.5
    new = steer(_progress(1))
    assert new is not None and [m for m, _ in new] == list(LAYERS[1:]) and {p for _, p in new} <= {"int8", "int4"}
    steer, clock = _steer("deadline-aware", rate=0.02e6, whole=True)  # thinned to 1-2 int4 layers unless whole
    clock.now = 0.5
    assert steer(_progress(1)) == [] and steer.replans == 1


def test_backlog_counts() -> None:
    steer, clock = _steer("deadline-aware", rate=1e6, backlog=2_000_000)
    clock.now = 0.1
    assert steer(_progress(1)) is not None


def test_keep_all_never_replans() -> None:
    steer, clock = _steer("keep-all", rate=0.02e6)
    clock.now = 0.5
    assert steer(_progress(1)) is None
    steer, clock = _steer("keep-all", rate=0.02e6)
    clock.now = 0.5
    assert steer(_progress(1, "int8")) is None  # fp16 would be better than the stream: not allowed, kept


def test_cheaper_or_equal() -> None:
    assert cheaper_or_equal("fp16") == ("fp16", "int8", "int4")
    assert cheaper_or_equal("int8") == ("int8", "int4")
    assert cheaper_or_equal("bf16") == ("bf16", "fp16", "int8", "int4")


def _cache() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {m: (torch.randn(SHAPE, generator=gen).half(), torch.randn(SHAPE, generator=gen).half()) for m in LAYERS}


async def test_steered_stream_mixes_precisions_over_the_bus(nats_server, subject: str) -> None:
    cache = _cache()
    asked: list[StreamProgress] = []

    def steer(progress: StreamProgress) -> list[tuple[int, str]] | None:
        asked.append(progress)
        if len(progress.sent) == 1:
            return [(LAYERS[1], "int4"), (LAYERS[2], "int8")]  # the link slowed: cheaper, and the last layer dropped
        return None

    cuts = []
    async with BusConnections(nats_server.url, name="t", security=nats_server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        async with KVReceiver(conns.sub, subject, out_dtype=torch.float32, on_cut=cuts.append) as rx:
            report = await send_cache(conns.pub, subject, cache, query_id="q1", sender="tx", steer=steer)
            # no layer list: the stream counts as complete once the layers its cut names are in, not at a timeout
            out = await rx.wait_complete("q1", "tx", timeout=30)
            precisions = rx.layer_precisions("q1", "tx")
    assert report.layers == LAYERS[:3] and report.precisions == ("fp16", "int4", "int8")
    assert report.dropped == (LAYERS[3],)
    assert [(c.query_id, c.sender, c.layers) for c in cuts] == [("q1", "tx", LAYERS[:3])]
    assert set(out) == set(LAYERS[:3])
    assert precisions == dict(zip(LAYERS[:3], ("fp16", "int4", "int8"), strict=True))
    assert [len(p.sent) for p in asked] == [1, 2]
    k0, k1, k2 = (out[m][0] for m in LAYERS[:3])
    assert torch.equal(k0, cache[LAYERS[0]][0].float())  # fp16 exactly
    err4 = (k1 - cache[LAYERS[1]][0].float()).abs().mean()
    err8 = (k2 - cache[LAYERS[2]][0].float()).abs().mean()
    assert 0 < err8 < err4 < 0.5  # quantized, int4 coarser than int8


async def test_a_steer_may_not_add_layers(nats_server, subject: str) -> None:
    cache = _cache()
    async with BusConnections(nats_server.url, name="t", security=nats_server.security) as conns:
        assert conns.pub is not None
        with pytest.raises(TransportError, match="steer returned"):
            await send_cache(
                conns.pub, subject, cache, query_id="q1", sender="tx", steer=lambda p: [(LAYERS[0], "fp16")]
            )


async def test_an_unsteered_stream_sends_no_cut(nats_server, subject: str) -> None:
    cache = _cache()
    cuts = []
    async with BusConnections(nats_server.url, name="t", security=nats_server.security) as conns:
        assert conns.pub is not None and conns.sub is not None
        async with KVReceiver(conns.sub, subject, out_dtype=torch.float32, on_cut=cuts.append) as rx:
            report = await send_cache(conns.pub, subject, cache, query_id="q1", sender="tx")
            await rx.wait_complete("q1", "tx", timeout=30)
            assert rx.cut_layers("q1", "tx") is None
    assert cuts == [] and report.dropped == ()
