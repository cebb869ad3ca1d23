"""``bus.connect.publish_views`` / ``publish_joined``: a message queued as its parts (no copy) or joined once with
its PUB line arrives as their concatenation, in order with ordinary publishes, and a big KV stream sent that way
decodes to the same tensors as one sent by copying."""

from __future__ import annotations

import pytest
import torch

from bus import connect as busconn
from bus.errors import TransportError
from bus.transport import KVReceiver, send_cache
from tests.conftest import eventually


@pytest.mark.parametrize("how", ["views", "joined"])
async def test_parts_arrive_joined_and_in_order(nats_server, subject: str, how: str) -> None:
    pub = await busconn.connect(nats_server.url, name="pytest-views-pub", security=nats_server.security)
    sub = await busconn.connect(nats_server.url, name="pytest-views-sub", security=nats_server.security)
    try:
        got: list[bytes] = []

        async def keep(msg) -> None:
            got.append(msg.data)

        await busconn.subscribe(sub, subject, keep)
        await busconn.subscribed(sub)
        assert busconn.can_publish_views(pub)
        big = torch.arange(300_000, dtype=torch.int32).view(torch.uint8).numpy()  # a 1.2 MB view, not bytes
        await pub.publish(subject, b"first")
        queued = len(pub._pending)
        await getattr(busconn, f"publish_{how}")(pub, subject, (b"head:", memoryview(big)))
        assert len(pub._pending) - queued in ((0, 1) if how == "joined" else (0, 4))  # 0: the flusher took it
        await pub.publish(subject, b"last")
        await busconn.flush(pub)
        await eventually(lambda: len(got) == 3, timeout=5.0, what="three messages")
        assert got[0] == b"first" and got[2] == b"last"
        assert got[1] == b"head:" + big.tobytes()
        assert pub.stats["out_msgs"] == 3
    finally:
        await busconn.close(pub)
        await busconn.close(sub)


@pytest.mark.parametrize("how", ["views", "joined"])
async def test_a_bad_subject_or_size_is_refused_before_queueing(nats_client, subject: str, how: str) -> None:
    queued = list(nats_client._pending)
    publish = getattr(busconn, f"publish_{how}")
    with pytest.raises(TransportError, match="bad subject"):
        await publish(nats_client, "a b", (b"x",))
    with pytest.raises(TransportError, match="max_payload"):
        await publish(nats_client, subject, (bytes(nats_client.max_payload + 1),))
    assert nats_client._pending == queued


async def test_a_closed_client_falls_back_to_publish(nats_server) -> None:
    nc = await busconn.connect(nats_server.url, name="pytest-views-closed", security=nats_server.security)
    assert busconn.can_publish_views(nc)
    await busconn.close(nc)
    assert not busconn.can_publish_views(nc)


@pytest.mark.parametrize("views", [True, False])
async def test_a_stream_of_megabyte_chunks_decodes_the_same_with_or_without_views(
    nats_server, subject: str, monkeypatch: pytest.MonkeyPatch, views: bool
) -> None:
    if not views:
        monkeypatch.setattr(busconn, "can_publish_views", lambda nc: False)
    calls = []
    queue = busconn.publish_views

    async def counted(nc, subj, parts):
        calls.append(len(parts))
        await queue(nc, subj, parts)

    monkeypatch.setattr(busconn, "publish_views", counted)
    gen = torch.Generator().manual_seed(3)
    layers = {m: tuple(torch.randn(1, 4, 300, 128, generator=gen).half() for _ in "kv") for m in range(3)}
    pub = await busconn.connect(nats_server.url, name="pytest-views-kv", security=nats_server.security)
    sub = await busconn.connect(nats_server.url, name="pytest-views-kvsub", security=nats_server.security)
    try:
        async with KVReceiver(sub, subject, out_dtype=torch.float16) as rx:
            report = await send_cache(pub, subject, layers, precision="fp16", compress="none", query_id="q", sender="t")
            await rx.wait_complete("q", "t", timeout=10.0)
            got = rx.completed("q", "t")
        assert report.messages == 6  # each 300 KB tensor in a message of its own
        assert calls == ([2] * 6 if views else [])  # a head and the tensor's view, or one copied frame
        for m, (k, v) in layers.items():
            assert torch.equal(got[m][0], k) and torch.equal(got[m][1], v)
    finally:
        await busconn.close(pub)
        await busconn.close(sub)
