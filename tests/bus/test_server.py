"""The embedded nats-server: start, connect, stop, clear errors, and never a leaked process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bus.connect import close, connect
from bus.errors import ServerError
from bus.server import NatsServer, find_nats_server


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def test_fixture_server_is_up(nats_server: NatsServer) -> None:
    assert nats_server.running
    assert nats_server.url.startswith("tls://127.0.0.1:") and nats_server.secure
    assert nats_server.max_payload == 8 * 1024 * 1024


async def test_async_context_manager_serves_and_stops() -> None:
    async with NatsServer(max_payload=2 * 1024 * 1024) as server:
        pid = server.pid
        nc = await connect(server.url)
        assert nc.max_payload == 2 * 1024 * 1024
        await close(nc)
    assert pid is not None and not _alive(pid)
    assert not server.running


def test_sync_start_stop_is_idempotent() -> None:
    server = NatsServer().start()
    pid = server.pid
    assert pid is not None and _alive(pid)
    server.stop()
    server.stop()
    assert not _alive(pid)
    with pytest.raises(ServerError):
        _ = server.url


async def test_exception_inside_context_still_stops_server() -> None:
    pids = []
    with pytest.raises(RuntimeError):
        async with NatsServer() as server:
            pids.append(server.pid)
            raise RuntimeError("boom")
    assert pids and not _alive(pids[0])


def test_port_in_use_is_one_line_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServerError) as info:
            NatsServer(port).start()
    assert f"port {port} is already in use" in str(info.value)
    assert "\n" not in str(info.value)


def test_given_port_is_used() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with NatsServer(port) as server:
        assert server.port == port


def test_missing_binary_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ServerError) as info:
        find_nats_server(tmp_path / "no-such-nats-server")
    assert "not found" in str(info.value) and "\n" not in str(info.value)


def test_binary_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "elsewhere" / "nats-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("FEDREFINE_NATS_SERVER", raising=False)
    with pytest.raises(ServerError, match="FEDREFINE_NATS_SERVER"):
        find_nats_server()
    monkeypatch.setenv("FEDREFINE_NATS_SERVER", str(fake))
    assert find_nats_server() == fake
    venv_bin = tmp_path / "venv" / "nats-server"
    venv_bin.parent.mkdir()
    venv_bin.write_text("#!/bin/sh\n")
    venv_bin.chmod(0o755)
    assert find_nats_server() == venv_bin


def test_bad_settings_rejected() -> None:
    with pytest.raises(ServerError):
        NatsServer(70000)
    with pytest.raises(ServerError):
        NatsServer(max_payload=0)


def test_jetstream_store_dir(tmp_path: Path) -> None:
    store = tmp_path / "js"
    with NatsServer(jetstream_dir=store) as server:
        assert "JetStream" in server.log_text()
    assert store.is_dir()


def test_no_leak_when_owner_process_dies_without_stop(tmp_path: Path) -> None:
    """A program that starts a server and exits (even on an exception) leaves no nats-server behind."""
    script = textwrap.dedent(
        """
        import sys
        from bus.server import NatsServer
        server = NatsServer().start()
        print(server.pid, flush=True)
        raise SystemExit(3)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=os.getcwd())
    assert out.returncode == 3, out.stderr
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "insecure"])
def test_cli_prints_url_and_stops_on_ctrl_c(secure: bool, tmp_path: Path) -> None:
    flags = ["--creds-dir", str(tmp_path / "creds")] if secure else ["--insecure"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.server", "--max-payload", "2MB", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("tls://127.0.0.1:" if secure else "nats://127.0.0.1:")
        first = proc.stderr.readline()
        if secure:
            assert first.startswith("wrote credentials to ") and (tmp_path / "creds" / "t1.creds").is_file()
        else:
            assert first.startswith("warning: --insecure")
        kids = _children(proc.pid)
        assert kids and all(_alive(k) for k in kids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert not any(_alive(k) for k in kids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ops.server", "--port", "99999", "--creds-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
