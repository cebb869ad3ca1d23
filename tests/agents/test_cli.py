"""Command lines: help, one-line errors with exit status 2, flags over environment over defaults, ops.ask."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from agents import gate, receiver, rephraser, transmitter
from agents.config import GateAgentConfig, ReceiverConfig, RephraserConfig, TransmitterConfig, parse_config
from bus.errors import ConfigError
from bus.schemas import Answer, ErrorReply, Omission, TransmitterUse
from ops import ask
from tests.agents.conftest import QUESTIONS, Fleet

MODULES = {"transmitter": transmitter, "receiver": receiver, "gate": gate, "rephraser": rephraser}


@pytest.fixture(autouse=True)
def _keep_logging():
    """The CLIs configure the root logger (to the captured stderr of the moment); put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("role", sorted(MODULES))
def test_every_agent_has_help(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert MODULES[role].main(["--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m agents.{role}" in out and "--nats" in out and "FEDREFINE_NATS" in out


@pytest.mark.parametrize(
    ("role", "argv", "needle"),
    [
        ("gate", ["--bogus"], "unrecognized arguments: --bogus"),
        ("gate", ["--offer-share", "3"], "--offer-share"),
        ("transmitter", ["--model", "x", "--link-mbps", "-1"], "--link-mbps"),
        ("transmitter", ["--model", "x", "--id", "a.b"], "invalid agent id"),
        ("receiver", [], "--model"),
        ("rephraser", [], "--model is required unless --rules-only"),
        ("transmitter", ["--model", "no/such/dir", "--nats", "nats://127.0.0.1:1", "--insecure"], "no model at"),
        ("transmitter", ["--model", "tiny-llama"], "--creds FILE is required"),
        ("transmitter", ["--model", "tiny-llama", "--creds", "/no/such.creds"], "cannot read credentials"),
        ("gate", ["--nats", "tls://127.0.0.1:1,ftp://127.0.0.1:2"], "scheme 'ftp' is not one of"),
        ("gate", ["--nats", "127.0.0.1:99999"], "port '99999' is not 1..65535"),
        ("receiver", ["--model", "x", "--insecure", "--fusers", "/nonexistent"], "no fusers directory at"),
        ("gate", ["--insecure", "--gate", "/nonexistent"], "no gating network directory at"),
        ("gate", ["--insecure", "--policy", "fastest"], "unknown policy 'fastest'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    role: str, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FEDREFINE_MODEL", "FEDREFINE_NATS", "NATS_URL"):
        monkeypatch.delenv(var, raising=False)
    assert MODULES[role].main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_flags_win_over_environment_over_defaults() -> None:
    env = {"FEDREFINE_NATS": "nats://10.0.0.1:4222", "FEDREFINE_LINK_MBPS": "8", "FEDREFINE_MODEL": "m"}
    cfg = parse_config(TransmitterConfig, "transmitter", ["--link-mbps", "2"], env=env)
    assert (cfg.nats, cfg.link_mbps, cfg.model) == ("nats://10.0.0.1:4222", 2.0, "m")
    assert cfg.id.startswith("transmitter-") and cfg.heartbeat_s == 1.0
    g = parse_config(GateAgentConfig, "gate", [], env={"FEDREFINE_POLICY": "keep-all", "FEDREFINE_ID": "g1"})
    assert (g.policy, g.id) == ("keep-all", "g1")
    r = parse_config(RephraserConfig, "rephraser", ["--rules-only"], env={})
    assert r.rules_only and r.model == ""
    with pytest.raises(ConfigError, match="FEDREFINE_HEARTBEAT_S"):
        parse_config(ReceiverConfig, "receiver", [], env={"FEDREFINE_MODEL": "m", "FEDREFINE_HEARTBEAT_S": "soon"})


def test_several_servers_from_a_flag_or_nats_url() -> None:
    cluster = "tls://127.0.0.1:4222, tls://127.0.0.1:4223,tls://127.0.0.1:4224"
    g = parse_config(GateAgentConfig, "gate", ["--nats", cluster], env={})
    assert g.nats == "tls://127.0.0.1:4222,tls://127.0.0.1:4223,tls://127.0.0.1:4224"
    g = parse_config(GateAgentConfig, "gate", [], env={"NATS_URL": "tls://a:1,tls://b:2"})
    assert g.nats == "tls://a:1,tls://b:2"
    g = parse_config(GateAgentConfig, "gate", [], env={"NATS_URL": "tls://a:1", "FEDREFINE_NATS": "tls://c:3"})
    assert g.nats == "tls://c:3"  # ours wins over the NATS tools' variable


@pytest.mark.parametrize("role", sorted(MODULES))
def test_every_role_runs_torch_on_its_configured_threads(role: str) -> None:
    """The gate too: torch's default (every core) left its OpenMP workers spinning after each scoring."""
    import torch

    from agents.cli import run_agent
    from bus.errors import AgentError

    configs = {"transmitter": TransmitterConfig, "receiver": ReceiverConfig, "gate": GateAgentConfig}
    cls = configs.get(role, RephraserConfig)
    seen = []

    def factory(cfg):
        seen.append(torch.get_num_threads())
        raise AgentError("stop here")  # before any connection

    before = torch.get_num_threads()
    try:
        argv = ["--model", "tiny-qwen3"] if role != "gate" else []
        for threads in (2, 1):
            assert run_agent(role, cls, factory, [*argv, "--threads", str(threads)]) == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_ask_without_a_server_says_how_to_start_one(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("FEDREFINE_CREDS", raising=False)
    assert ask.main(["What?", "--nats", "nats://127.0.0.1:1", "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: no NATS server at nats://127.0.0.1:1; start one with `python -m ops.server`"
    assert err[0].startswith("warning: --insecure")
    assert ask.main(["What?", "--nats", "nats://127.0.0.1:1"]) == 2  # no credentials, no --insecure
    assert capsys.readouterr().err.strip().startswith("error: --creds FILE is required")


async def test_ask_with_credentials_and_without(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    await fleet.standard()
    q = QUESTIONS[1]
    argv = [q.stem, *(x for o in q.options for x in ("--option", o)), "--nats", fleet.url, "--prefix", fleet.prefix]
    argv += ["--deadline-ms", "2000"]
    client = fleet.security("client")
    code = await asyncio.to_thread(ask.main, [*argv, "--creds", str(client.creds), "--tls-ca", str(client.tls_ca)])
    assert code == 0 and capsys.readouterr().out.startswith("answer: ")
    assert await asyncio.to_thread(ask.main, [*argv, "--insecure"]) == 2  # the server refuses an anonymous client
    assert "refused this client" in capsys.readouterr().err
    gate = fleet.security("gate")  # an identity that may not ask: the request never reaches a receiver
    code = await asyncio.to_thread(ask.main, [*argv, "--creds", str(gate.creds), "--tls-ca", str(gate.tls_ca)])
    assert code == 1


async def test_ask_pushes_a_file_and_reports_accuracy(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.standard()
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(q.model_dump_json() for q in QUESTIONS) + "\n")
    items = ask.load_items(path)
    assert [i.answer for i in items] == [q.answer for q in QUESTIONS]
    assert fleet.client is None
    await fleet.ask(QUESTIONS[0])  # opens the fleet's client
    outcomes = await ask.push_many(fleet.client, fleet.subjects, items, deadline_s=5.0, concurrency=3)
    summary = ask.summarize(outcomes)
    assert summary["queries"] == summary["answered"] == len(QUESTIONS)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["bytes_per_query"] > 0
    assert set(summary["used"]) == {"t1", "t2"}
    json.dumps(summary)


def test_load_items_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"stem": "a?", "options": ["1", "2", "3", "4"], "answer": "B"}\n{"options": []}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        ask.load_items(path)


def test_describe_shows_the_provenance() -> None:
    a = Answer(
        query_id="q",
        receiver_id="rx",
        text="C) green",
        choice="C",
        used=(TransmitterUse(transmitter_id="t1", layers=(0, 2), precision="fp16", bytes=1000, weight=0.8),),
        omitted=(Omission(transmitter_id="t2", reason="late", detail="0 of 3 layers"),),
        latency_s=0.05,
        bytes_received=1000,
        notes=("n1",),
    )
    text = ask.describe(a)
    assert "answer: C) green" in text and "t1: layers 0,2 at fp16" in text and "t2: late (0 of 3 layers)" in text
    assert "note: n1" in text
    assert ask.describe(ErrorReply(code="timeout", message="slow")) == "error (timeout): slow"


async def test_short_model_calls_run_on_the_event_loop_and_long_ones_on_the_compute_thread() -> None:
    """After one call on the compute thread, a kind of call that took under inline_compute_ms runs on the loop."""
    import threading
    import time

    from agents.base import Agent
    from agents.config import AgentConfig, make_config

    def where(pause_s: float = 0.0) -> int:
        time.sleep(pause_s)
        return threading.get_ident()

    def slow() -> int:
        return where(0.03)

    loop_thread = threading.get_ident()
    agent = Agent(make_config(AgentConfig, {"inline_compute_ms": 10.0, "insecure": True}, "gate"))
    assert [await agent.compute(where) == loop_thread for _ in range(3)] == [False, True, True]
    assert [await agent.compute(slow) == loop_thread for _ in range(2)] == [False, False]  # 30 ms: stays off the loop
    assert agent.computed == {"thread": 3, "loop": 2}
    never = Agent(make_config(AgentConfig, {"inline_compute_ms": 0.0, "insecure": True}, "gate"))
    assert [await never.compute(where) == loop_thread for _ in range(2)] == [False, False]


@pytest.mark.parametrize("deadline_s", [0.001, 0.2])
async def test_a_short_deadline_never_reports_a_negative_wait(fleet: Fleet, deadline_s: float) -> None:
    """A deadline shorter than the receiver's answer reserve leaves no time for a plan: the note says so."""
    await fleet.standard()
    reply = await fleet.ask(QUESTIONS[1], deadline_s=deadline_s)
    assert isinstance(reply, Answer), reply
    assert not any("within -" in note for note in reply.notes), reply.notes
    assert any("leaves no time to wait for a plan" in note for note in reply.notes), reply.notes
