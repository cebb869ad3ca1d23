"""``python -m ops.watch`` driven in a real terminal (tmux): the roster and live query timelines on the screen."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bus.schemas import Answer
from tests.agents.conftest import QUESTIONS, Fleet

ROOT = Path(__file__).resolve().parents[2]


def _watch_cmd(fleet: Fleet, *extra: str) -> list[str]:
    security = fleet.security("mon", "monitor")
    return [
        sys.executable, "-m", "ops.watch", "--nats", fleet.url, "--prefix", fleet.prefix,
        "--creds", str(security.creds), "--tls-ca", str(security.tls_ca), *extra,
    ]  # fmt: skip


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_the_live_view_shows_the_federation_and_each_query_in_a_terminal(fleet: Fleet) -> None:
    await fleet.standard()
    session = f"fedrefine-watch-{uuid.uuid4().hex[:8]}"
    # the terminal's own size, not a COLUMNS inherited from whoever started the tmux server
    command = "env -u COLUMNS -u LINES " + " ".join(f"'{part}'" for part in _watch_cmd(fleet, "--interval", "0.5"))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "230", "-y", "60", "-c", str(ROOT), command])
    try:
        await asyncio.sleep(3.0)  # the view starts (python, rich) and subscribes
        answers = [await fleet.ask(q, private=i == 0) for i, q in enumerate(QUESTIONS[:3])]
        assert all(isinstance(a, Answer) for a in answers)
        last = answers[-1].query_id  # type: ignore[union-attr]
        screen = ""
        end = time.monotonic() + 15
        wanted = ["federation", "queries", "rx", "reph", "gate", "t1", "t2", last, "answer", "fused 2", "asks 3"]
        while time.monotonic() < end:
            screen = _tmux("capture-pane", "-p", "-t", session)
            if all(w in screen for w in wanted):
                break
            await asyncio.sleep(0.3)
        assert all(w in screen for w in wanted), (set(wanted) - {w for w in wanted if w in screen}, screen)
        line = next(row for row in screen.splitlines() if last in row)
        for step in ("ask", "query", "offers 2", "plan", "kv", "answer"):
            assert step in line, line
        assert QUESTIONS[0].pii[0] not in screen and QUESTIONS[2].stem not in screen  # no question text, ever
        _tmux("send-keys", "-t", session, "C-c")
        end = time.monotonic() + 10
        while session in _tmux("ls") and time.monotonic() < end:
            await asyncio.sleep(0.2)
        assert session not in _tmux("ls")  # Ctrl-C ended it (the session closes with its one command)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


async def test_once_prints_one_frame_and_exits(fleet: Fleet) -> None:
    await fleet.standard()
    proc = await asyncio.create_subprocess_exec(
        *_watch_cmd(fleet, "--once", "2.5"), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    done = asyncio.ensure_future(proc.communicate())
    answers = []
    while not done.done():  # asked until it exits, so a slow start (python, rich) cannot miss every one
        answers.append(await fleet.ask(QUESTIONS[1]))
        await asyncio.wait({done}, timeout=0.3)
    out, err = await asyncio.wait_for(done, timeout=30)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert all(isinstance(a, Answer) for a in answers) and "fedrefine" not in err.decode()
    assert any(a.query_id in text for a in answers)  # type: ignore[union-attr]
    for agent in ("rx", "reph", "gate", "t1", "t2"):
        assert agent in text


def test_bad_input_is_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ops.watch", "--nats", "nats://127.0.0.1:1", "--insecure"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.startswith("error: no NATS server at") and run.stderr.count("\n") == 1
