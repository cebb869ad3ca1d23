"""Identities, permissions and TLS on a real nats-server: who may connect, say what, read what; revocation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus.auth import ClientSecurity, read_creds
from bus.connect import close, connect, subscribed
from bus.errors import AuthError, ConfigError, ConnectError
from bus.server import NatsServer
from privacy.credentials import CredentialStore
from privacy.permissions import ROLES, permissions_for, render_authorization
from tests.conftest import eventually, secure_store

ROOT = Path(__file__).resolve().parents[2]
IDS = [("client", "alice", None), ("receiver", "rx", None), ("rephraser", "reph", "rx"), ("gate", "gate", None)]
IDS += [("transmitter", "t1", None), ("transmitter", "t2", None), ("monitor", "mon", None)]


@pytest.fixture
async def secure(tmp_path: Path, pki: CredentialStore) -> AsyncIterator[tuple[CredentialStore, NatsServer]]:
    store = secure_store(tmp_path / "creds", pki)
    store.ensure(IDS)
    server = store.server().start()
    try:
        yield store, server
    finally:
        server.stop()


class Watch:
    """A connection's errors (the server reports a refused publish or subscription to the client)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def cb(self, exc: Exception) -> None:
        self.errors.append(str(exc).lower())

    def violations(self, kind: str) -> int:
        return sum(f"permissions violation for {kind}" in e for e in self.errors)


def test_a_credentials_file_round_trips_and_never_shows_its_seed(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    path = store.issue("transmitter", "t1")
    creds = read_creds(path)
    assert (creds.role, creds.id, creds.prefix) == ("transmitter", "t1", "fr")
    assert creds.public_key == store.get("t1").public_key  # type: ignore[union-attr]
    assert creds.seed and creds.seed.startswith("SU") and creds.seed not in repr(creds) + str(creds)
    assert path.stat().st_mode & 0o777 == 0o600 and creds.seed not in (tmp_path / "identities.json").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        store.issue("gate", "t1")  # ids are unique across roles: the inbox _INBOX.<id> is the identity's
    with pytest.raises(ConfigError, match="unknown role"):
        store.issue("emperor", "x")


def test_bad_credentials_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.creds").write_text("hello\n")
    for path, needle in ((tmp_path / "junk.creds", "no user nkey seed"), (tmp_path / "none.creds", "cannot read")):
        with pytest.raises(AuthError, match=needle) as err:
            read_creds(path)
        assert "\n" not in str(err.value)


def test_every_role_renders_to_allow_lists_and_the_receiver_side_alone_sees_asks() -> None:
    for role in ROLES:
        perms = permissions_for(role, "x1", "fr", "rx" if role == "rephraser" else None)
        seen_ask = "fr.ask" in perms.subscribe or ">" in perms.subscribe
        assert seen_ask == (role in ("receiver", "admin")), role
        own = ("fr.", "_INBOX.x1.", "_INBOX_MONITOR.x1.", "$SRV.")
        leaf_replies = role == "leaf" and "_INBOX_MONITOR.>" in perms.publish  # service replies to any monitor
        assert all(
            s.startswith(own) or s == ">"
            for s in perms.publish + perms.subscribe
            if not leaf_replies or s != "_INBOX_MONITOR.>"
        )
        assert not any(s.startswith("_INBOX.") and not s.startswith("_INBOX.x1.") for s in perms.publish), role
    with pytest.raises(ConfigError, match="no identity"):
        render_authorization([])


async def test_only_known_identities_get_in_and_only_over_tls(secure) -> None:
    store, server = secure
    nc = await connect(server.url, security=store.client_security("t1"))
    await close(nc)
    plain_url = server.url.replace("tls://", "nats://")
    cases = {
        "no credentials": (server.url, ClientSecurity(tls_ca=store.ca_file), "requires credentials"),
        "no CA": (server.url, ClientSecurity(creds=store.creds_path("t1")), "does not verify"),
    }
    stranger = CredentialStore(Path(store.root).parent / "other")
    stranger.copy_tls_from(store)
    stranger.issue("gate", "gate")
    cases["a key of another federation"] = (server.url, stranger.client_security("gate"), "unknown")
    for url, security, needle in cases.values():
        with pytest.raises(AuthError, match=needle):
            await connect(url, security=security, retries=1)
    with pytest.raises((AuthError, Exception)):  # a client that does not speak TLS gets nowhere
        await connect(plain_url, retries=1, connect_timeout=1.0)


async def test_each_identity_may_publish_and_read_only_its_own(secure) -> None:
    store, server = secure
    watch = {i: Watch() for i in ("t1", "gate", "alice", "rx")}
    conns = {i: await connect(server.url, security=store.client_security(i), error_cb=w.cb) for i, w in watch.items()}
    got: list[str] = []

    async def note(msg) -> None:
        got.append(msg.subject)

    try:
        rx = conns["rx"]
        for subject in ("fr.offer.*.*", "fr.plan.*.*", "fr.presence.*.*", "fr.ask"):
            await rx.subscribe(subject, cb=note)
        await subscribed(rx)  # the SUBs reached the server (one flush can race them)
        t1, gate = conns["t1"], conns["gate"]
        await t1.publish("fr.offer.q1.t1", b"own")  # allowed
        await t1.publish("fr.offer.q1.t2", b"as t2")  # another transmitter's subject
        await t1.publish("fr.presence.transmitter.t2", b"goodbye as t2")
        await t1.publish("fr.plan.q1.gate", b"a plan")  # only gates plan
        await t1.publish("fr.query.rx", b"a query")  # only receivers query
        await t1.publish("_INBOX.alice.x.y", b"a fake answer")  # nobody writes into an inbox uninvited
        await gate.publish("fr.plan.q1.gate", b"own plan")  # allowed
        await gate.publish("fr.plan.q1.gate2", b"as another gate")
        await t1.subscribe("fr.ask")  # raw questions
        await t1.subscribe(">")
        await gate.subscribe("fr.rephrase.*")
        await gate.subscribe("_INBOX.>")
        await conns["alice"].subscribe("_INBOX.rx.>")  # another identity's inbox
        for nc in conns.values():
            await nc.flush()
        await eventually(
            lambda: (
                watch["t1"].violations("publish") >= 5
                and watch["t1"].violations("subscription") >= 2
                and watch["gate"].violations("publish") >= 1
                and watch["gate"].violations("subscription") >= 2
                and watch["alice"].violations("subscription") >= 1
            ),
            what="the server's permission errors",
        )
        await eventually(lambda: len(got) >= 2, what="the allowed messages")
    finally:
        for nc in conns.values():
            await close(nc)
    assert sorted(got) == ["fr.offer.q1.t1", "fr.plan.q1.gate"]
    assert watch["t1"].violations("publish") == 5 and watch["t1"].violations("subscription") == 2
    assert watch["gate"].violations("publish") == 1 and watch["gate"].violations("subscription") == 2
    assert watch["alice"].violations("subscription") == 1


async def test_a_reply_reaches_only_the_asker_and_only_once(secure) -> None:
    store, server = secure
    alice = await connect(server.url, security=store.client_security("alice"))
    rx_watch = Watch()
    rx = await connect(server.url, security=store.client_security("rx"), error_cb=rx_watch.cb)

    async def answer_twice(msg) -> None:
        await msg.respond(b"first")
        await msg.respond(b"second")  # allow_responses: one reply per request

    try:
        await rx.subscribe("fr.ask", cb=answer_twice)
        await subscribed(rx)
        reply = await alice.request("fr.ask", b"q", timeout=2)
        assert reply.data == b"first" and reply.subject.startswith("_INBOX.alice.")
        await eventually(lambda: rx_watch.violations("publish") >= 1, what="the refused second reply")
    finally:
        await close(alice)
        await close(rx)
    assert rx_watch.violations("publish") == 1


async def test_revoking_an_identity_cuts_it_off_and_a_new_one_gets_in(secure) -> None:
    store, server = secure
    watch = Watch()
    t2 = await connect(server.url, security=store.client_security("t2"), error_cb=watch.cb, max_reconnect_attempts=3)
    store.revoke("t2")
    store.issue("transmitter", "t3")
    server.reload(store.authorization())
    end = time.monotonic() + 5
    refused = False
    while not refused and time.monotonic() < end:  # cut at the reload, then refused when it tries to reconnect
        refused = any("authorization violation" in e for e in watch.errors)
        await asyncio.sleep(0.05)
    assert not t2.is_connected and any("authorization violation" in e for e in watch.errors), watch.errors
    assert not store.creds_path("t2").exists()
    nc = await connect(server.url, security=store.client_security("t3"))
    await close(nc)
    await close(t2)


def test_ops_creds_issue_and_revoke_reach_a_running_ops_server(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    server = subprocess.Popen(
        [sys.executable, "-m", "ops.server", "--creds-dir", str(creds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ops.creds", "--creds-dir", str(creds), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)

    async def connected(agent_id: str) -> bool | None:
        """True: admitted; False: refused; None: the server dropped the attempt (a reload in progress): ask again."""
        try:
            nc = await connect(url, security=store.client_security(agent_id), retries=1)
        except AuthError:
            return False
        except ConnectError:
            return None
        await close(nc)
        return True

    try:
        url = server.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("tls://")
        store = CredentialStore.open(creds)
        assert {i.id for i in store.active()} >= {"receiver", "rephraser", "gate", "t1", "client", "monitor"}
        out = cli("issue", "transmitter", "phone-7")
        assert out.returncode == 0 and "issued transmitter phone-7" in out.stdout and "reloading" in out.stdout
        store = CredentialStore.open(creds)
        assert _eventually(lambda: asyncio.run(connected("phone-7")) is True)
        path = store.creds_path("phone-7")
        saved = path.read_text()
        assert cli("revoke", "phone-7").returncode == 0
        path.write_text(saved)  # a thief kept a copy: it no longer gets in
        assert _eventually(lambda: asyncio.run(connected("phone-7")) is False)
        listed = cli("list").stdout
        assert "phone-7" in listed and "REVOKED" in listed
        bad = cli("revoke", "nobody")
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert not (creds / "server.pid").exists()


def _eventually(check, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


async def test_a_cluster_admits_the_same_identities_everywhere_and_revokes_on_every_member(
    tmp_path: Path, pki: CredentialStore
) -> None:
    store = secure_store(tmp_path / "creds", pki)
    store.ensure(IDS)
    servers = store.cluster(2)
    urls = ",".join(s.url for s in servers)
    try:
        rx = await connect(servers[0].url, security=store.client_security("rx"))

        async def answer(msg) -> None:
            await msg.respond(b"ok")

        await rx.subscribe("fr.ask", cb=answer)
        await subscribed(rx)
        watch = Watch()
        alice = await connect(urls, security=store.client_security("alice"), error_cb=watch.cb)
        reply = await _eventually_reply(alice)
        assert reply == b"ok"  # asked on one member, answered from the other
        t1_watch = Watch()
        t1 = await connect(servers[1].url, security=store.client_security("t1"), error_cb=t1_watch.cb)
        await t1.publish("fr.offer.q1.t2", b"as t2")
        await t1.flush()
        await eventually(lambda: t1_watch.violations("publish") >= 1, what="the refused publish")
        assert t1_watch.violations("publish") == 1
        with pytest.raises(AuthError):
            await connect(servers[1].url, security=ClientSecurity(tls_ca=store.ca_file), retries=1)
        store.revoke("alice")
        for server in servers:
            server.reload(store.authorization())
        end = time.monotonic() + 5
        while not any("authorization violation" in e for e in watch.errors) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        assert any("authorization violation" in e for e in watch.errors)
        for nc in (rx, alice, t1):
            await close(nc)
    finally:
        for server in servers:
            server.stop()


async def _eventually_reply(nc) -> bytes:
    """A request answered across the cluster (the subscription's interest may take a moment to propagate)."""
    end = time.monotonic() + 5
    while True:
        try:
            return (await nc.request("fr.ask", b"q", timeout=0.5)).data
        except Exception:  # noqa: BLE001 - no responders yet on this member
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


def test_ops_server_runs_a_secure_cluster(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.server", "--cluster", "2", "--creds-dir", str(tmp_path / "creds")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        urls = proc.stdout.readline().strip().split(",")  # type: ignore[union-attr]
        assert len(urls) == 2 and all(u.startswith("tls://127.0.0.1:") for u in urls)
        store = CredentialStore.open(tmp_path / "creds")

        async def both() -> None:
            for url in urls:
                await close(await connect(url, security=store.client_security("t1")))

        asyncio.run(both())
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
