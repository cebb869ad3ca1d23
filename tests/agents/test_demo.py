"""``python -m ops.demo``: Ctrl-C in the middle leaves no process behind; the report reads right."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.schemas import Answer, ErrorReply, Omission, TransmitterUse
from ops.ask import Item, Outcome
from ops.demo import Setup, items_of, table
from tests.agents.conftest import QUESTIONS

ROOT = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.add(kid)
            todo.append(kid)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_ctrl_c_stops_every_agent_and_the_server(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ops.demo",
        "--tiny",
        "--questions",
        "2000",
        "--concurrency",
        "2",
        "--log-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        end = time.monotonic() + 240
        seen = ""
        while "pushing" not in seen:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, f"demo exited early: {seen}"
            seen += line
            assert time.monotonic() < end, f"agents never came up: {seen}"
        family = _descendants(proc.pid)
        assert len(family) >= 8  # nats-server and seven agents
        time.sleep(1.0)  # questions in flight
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not [pid for pid in family if _alive(pid)]
    logs = {p.stem: p.read_text() for p in tmp_path.glob("*.log")}
    assert len(logs) == 7 and all("stopped" in text for text in logs.values()), logs


@pytest.mark.slow
def test_the_cluster_demo_answers_everything_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Three servers, a leaf node per transmitter, two gates and two rephrasers: every process stops at the end."""
    cmd = [sys.executable, "-m", "ops.demo", "--tiny", "--cluster", "--questions", "8", "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    family: set[int] = set()
    seen = ""
    try:
        end = time.monotonic() + 240
        while "pushing" not in seen:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, f"demo exited early: {seen}"
            seen += line
            assert time.monotonic() < end, f"agents never came up: {seen}"
        family = _descendants(proc.pid)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "answered          8/8" in out and "leaf node" in out
    assert "leaf-t1-tiny-llama" in seen and "receiver side" in seen
    assert len(family) >= 16  # seven nats-servers (three members, four leaves) and nine agents
    assert not [pid for pid in family if _alive(pid)]
    assert len(list(tmp_path.glob("*.log"))) == 9


def test_the_report_shows_accuracy_latency_bytes_and_usage() -> None:
    setup = Setup(
        "test",
        "rx-model",
        {"t1": "/m/t1-llama", "t2": "/m/t2"},
        "/f",
        None,
        list(QUESTIONS[:2]),
        {"t1": None, "t2": 2.0},
    )
    items = items_of(setup.questions)
    assert [i.private for i in items] == [True, False]
    used = TransmitterUse(transmitter_id="t1", layers=(0, 1), precision="fp16", bytes=1500)
    late = Omission(transmitter_id="t2", reason="late")
    right = Answer(
        query_id="a",
        receiver_id="rx",
        text="C) green",
        choice="C",
        used=(used,),
        omitted=(late,),
        latency_s=0.1,
        bytes_received=1500,
    )
    outcomes = [
        Outcome(items[0], right, 0.1),
        Outcome(Item("x?", ("a", "b", "c", "d")), ErrorReply(code="timeout", message="slow"), 2.0),
    ]
    text = table(setup, outcomes, alone=0.25)
    assert "answered          1/2" in text and "accuracy          1.000" in text and "receiver alone: 0.250" in text
    assert "t1-llama" in text and "2 MB/s" in text and "late: 1" in text and "1,500" in text
    assert "alone" not in text.splitlines()[1]
    knew = right.model_copy(update={"used": (), "omitted": (), "bytes_received": 0, "alone": True})
    text = table(setup, [*outcomes, Outcome(items[1], knew, 0.01)], alone=0.25)
    assert "(1 alone: the receiver knew, nobody was asked)" in text.splitlines()[1]
