"""A secure cluster with leaf nodes: configuration files, traffic across leaf links and routes, what a leaf may carry,
failover of a leaf node and of a client, a server restarted on its port at once."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.connect import close, connect
from bus.server import NatsServer, find_nats_server
from privacy.credentials import CredentialStore
from tests.conftest import secure_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path, pki: CredentialStore) -> CredentialStore:
    """Identities for a small federation, two leaf nodes (one carries t1 only, one any transmitter)."""
    s = secure_store(tmp_path / "creds", pki)
    s.ensure(
        [
            ("receiver", "rx", None),
            ("client", "alice", None),
            ("transmitter", "t1", None),
            ("transmitter", "t2", None),
            ("monitor", "mon", None),
            ("admin", "ops", None),
            ("leaf", "leaf1", "t1"),
            ("leaf", "leaf2", "*"),
        ]
    )
    return s


async def _until(check, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def test_configuration_files_run_with_a_plain_nats_server(store: CredentialStore, tmp_path: Path) -> None:
    topo = store.topology(3, [("leaf1", 1)], tmp_path / "conf")
    with topo:
        files = sorted(p.name for p in (tmp_path / "conf").glob("*.conf"))
        assert files == ["leaf1.conf", "n1.conf", "n2.conf", "n3.conf"]
        for name in files:
            path = tmp_path / "conf" / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a leaf's file holds its key
            check = subprocess.run([str(find_nats_server()), "-c", str(path), "-t"], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
        assert len(topo.urls) == 3 and all(u.startswith("tls://127.0.0.1:") for u in topo.urls)
    assert not any(s.running for s in topo.servers())


async def test_traffic_crosses_leaf_links_and_routes_and_a_leaf_carries_only_its_own(
    store: CredentialStore, tmp_path: Path
) -> None:
    topo = store.topology(3, [("leaf1", 1), ("leaf2", 2)], tmp_path / "conf").start()
    got: list[str] = []

    def noting(who: str):
        async def note(msg) -> None:
            got.append(f"{who}:{msg.subject}")

        return note

    conns = []
    try:
        rx = await connect(topo.url_list(0), security=store.client_security("rx"))
        t1 = await connect(topo.leaf_url("leaf1"), security=store.client_security("t1"))
        t2_on_leaf1 = await connect(topo.leaf_url("leaf1"), security=store.client_security("t2"))
        ops_on_leaf1 = await connect(topo.leaf_url("leaf1"), security=store.client_security("ops"), no_echo=True)
        alice = await connect(topo.url_list(1), security=store.client_security("alice"))
        conns = [rx, t1, t2_on_leaf1, ops_on_leaf1, alice]
        for subject in ("fr.offer.*.*", "fr.kv.rx.*.*", "fr.ask", "fr.presence.*.*"):
            await rx.subscribe(subject, cb=noting("rx"))
        await t1.subscribe("fr.query.*", cb=noting("t1"))
        await ops_on_leaf1.subscribe("fr.ask", cb=noting("leaf"))  # a device that runs receiver-side code on its leaf
        await ops_on_leaf1.subscribe("fr.rephrase.*", cb=noting("leaf"))
        await asyncio.sleep(0.5)  # interest crosses the routes and the leaf link
        await t1.publish("fr.offer.q1.t1", b"offer")
        await t1.publish("fr.kv.rx.q1.t1", b"kv")
        await t2_on_leaf1.publish("fr.offer.q1.t2", b"t2 through t1's leaf")  # the leaf carries t1 only
        await ops_on_leaf1.publish("fr.ask", b"an ask from a leaf")  # nothing of the receiver side crosses
        await ops_on_leaf1.publish("fr.presence.receiver.rx", b"a receiver's heartbeat from a leaf")
        await alice.publish("fr.ask", b"a question")  # reaches rx on the cluster, never the leaf
        await rx.publish("fr.query.rx", b"q'")
        for nc in conns:
            await nc.flush()
        await asyncio.sleep(0.3)
    finally:
        for nc in conns:
            await close(nc)
        topo.stop()
    assert sorted(got) == ["rx:fr.ask", "rx:fr.kv.rx.q1.t1", "rx:fr.offer.q1.t1", "t1:fr.query.rx"]


async def test_a_leaf_node_and_a_client_fail_over_and_a_killed_member_restarts_on_its_ports(
    store: CredentialStore, tmp_path: Path
) -> None:
    topo = store.topology(3, [("leaf1", 1)], tmp_path / "conf").start()
    got: list[bytes] = []

    async def note(msg) -> None:
        got.append(msg.data)

    try:
        rx = await connect(topo.url_list(1), security=store.client_security("rx"), reconnect_wait=0.1)
        t1 = await connect(topo.leaf_url("leaf1"), security=store.client_security("t1"))
        await rx.subscribe("fr.offer.*.*", cb=note)
        await asyncio.sleep(0.3)
        member = topo.members[1]  # the leaf's first choice and the receiver's server
        port = member.port
        member.kill()
        topo.wait_leaf("leaf1", links=2)  # linked again, to another member
        await _until(lambda: rx.is_connected and rx.connected_url is not None and rx.connected_url.port != port)
        await asyncio.sleep(0.3)
        await t1.publish("fr.offer.q2.t1", b"after the failover")
        await t1.flush()
        await _until(lambda: b"after the failover" in got)
        t0 = time.monotonic()
        topo.restart(member)  # its old connections linger in TIME_WAIT: it starts on the same ports anyway
        assert member.port == port and time.monotonic() - t0 < 5
        topo.wait_routes()
    finally:
        for nc in (rx, t1):
            await close(nc)
        topo.stop()


async def test_service_requests_reach_a_leaf_and_replies_reach_only_monitors(
    store: CredentialStore, tmp_path: Path
) -> None:
    topo = store.topology(1, [("leaf1", 0)], tmp_path / "conf").start()
    try:
        mon = await connect(topo.url_list(), security=store.client_security("mon"))
        t1 = await connect(topo.leaf_url("leaf1"), security=store.client_security("t1"))

        async def pong(msg) -> None:
            await msg.respond(b"pong from t1")

        await t1.subscribe("$SRV.PING", cb=pong)
        await asyncio.sleep(0.3)
        reply = await mon.request("$SRV.PING", b"", timeout=3)
        assert reply.data == b"pong from t1"
        assert mon._inbox_prefix.decode().startswith("_INBOX_MONITOR.mon")  # noqa: SLF001
    finally:
        await close(mon)
        await close(t1)
        topo.stop()


async def test_a_server_restarts_on_its_port_at_once(store: CredentialStore) -> None:
    server = store.server().start()
    port = server.port
    back = asyncio.Event()

    async def reconnected() -> None:
        back.set()

    nc = await connect(server.url, security=store.client_security("rx"), reconnect_wait=0.1, reconnected_cb=reconnected)
    server.stop()  # the server closes the client's connection first: its side of it lingers in TIME_WAIT
    t0 = time.monotonic()
    again = store.server(port).start()
    try:
        assert again.port == port and time.monotonic() - t0 < 2
        await asyncio.wait_for(back.wait(), timeout=10)  # the client is back on the restarted server
    finally:
        await close(nc)
        again.stop()


def test_a_named_server_rejects_a_bad_name() -> None:
    with pytest.raises(Exception, match="invalid server name"):
        NatsServer(name="n 1")


def test_ops_server_runs_a_cluster_with_leaf_nodes_and_stops_cleanly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "ops.server", "--cluster", "3", "--leaves", "2", "--creds-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        urls = proc.stdout.readline().strip().split(",")
        leaves = [proc.stdout.readline().split() for _ in range(2)]
        assert len(urls) == 3 and all(u.startswith("tls://127.0.0.1:") for u in urls)
        assert [name for name, _ in leaves] == ["leaf1", "leaf2"]
        store = CredentialStore.open(tmp_path / "c")
        assert store.get("leaf1").role == "leaf" and store.get("leaf1").serves == "t1"  # type: ignore[union-attr]

        async def each() -> None:
            for url in [*urls, leaves[0][1]]:
                await close(await connect(url, security=store.client_security("t1")))

        asyncio.run(each())
        assert sorted(p.name for p in (tmp_path / "c" / "servers").glob("*.conf")) == [
            "leaf1.conf",
            "leaf2.conf",
            "n1.conf",
            "n2.conf",
            "n3.conf",
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
