"""ops.gateway: the official openai client against a live federation on the quick zoo, streamed and not; tokens
and bad requests on the tiny-model fleet."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import openai
import pytest
from openai import AsyncOpenAI

from agents.config import GateAgentConfig, ReceiverConfig, RephraserConfig, make_config
from agents.gate import GateAgent
from agents.receiver import ReceiverAgent
from agents.rephraser import RephraserAgent
from fusion.models import LanguageModel
from fusion.prompts import Question
from ops.gateway import GatewayConfig, parse, serve
from tests.agents.conftest import Fleet

pytestmark = pytest.mark.slow

TOKEN = "test-token-7f3a"


@pytest.fixture(scope="session")
def quick_setup():
    """The quick zoo's paths (models, fusers, gate) and two held-out questions; fusers trained once if missing."""
    from ops.demo import zoo_setup

    return zoo_setup(full=False, n_questions=2)


async def _serve(fleet: Fleet) -> tuple[asyncio.Task, str]:
    """A gateway in front of ``fleet`` with its own client identity; the task and the base URL."""
    security = fleet.security("gateway", "client")
    argv = ["--nats", fleet.url, "--prefix", fleet.prefix, "--creds", str(security.creds), "--port", "0"]
    cfg = parse([*argv, "--tls-ca", str(security.tls_ca), "--token", TOKEN, "--deadline-ms", "8000"], env={})
    assert cfg.host == "127.0.0.1"  # loopback unless asked
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, on_ready=ready.set_result))
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.exception() if task.done() else "the gateway did not start"
    return task, ready.result()


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.wait({task}, timeout=10)


@pytest.fixture
async def gateway(fleet: Fleet) -> AsyncIterator[str]:
    """The tiny-model federation (two transmitters) behind a gateway; yields its base URL."""
    await fleet.standard()
    task, url = await _serve(fleet)
    yield url
    await _stop(task)


@pytest.fixture
async def zoo_gateway(fleet: Fleet, quick_setup) -> AsyncIterator[tuple[str, list[Question]]]:
    """The quick zoo's federation (receiver, rules-only rephraser, trained gate, four transmitters) behind a
    gateway, every agent with its own identity; yields the base URL and held-out questions."""
    setup = quick_setup
    rx = make_config(ReceiverConfig, fleet._base("rx", "receiver", model=setup.receiver, fusers=setup.fusers,
                                                 gates="gate"), "receiver")  # fmt: skip
    await fleet._start(ReceiverAgent(rx))
    reph = make_config(RephraserConfig, fleet._base("reph", "rephraser", "rx", rules_only=True), "rephraser")
    await fleet._start(RephraserAgent(reph))
    await fleet._start(GateAgent(make_config(GateAgentConfig, fleet._base("gate", "gate", gate=setup.gate), "gate")))
    for tid, path in setup.transmitters.items():
        await fleet.transmitter(tid, LanguageModel.load(path))
    await fleet.wait_roster("gate", "transmitter", set(setup.transmitters))
    await fleet.wait_roster("gate", "receiver", {"rx"})
    task, url = await _serve(fleet)
    yield url, list(setup.questions)
    await _stop(task)


async def _post(url: str, body: dict, token: str | None = TOKEN) -> tuple[int, dict]:
    """A raw POST (no OpenAI client): the status and the JSON body."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def call() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(call)


def _ask(question: Question) -> dict:
    return {
        "model": "fedrefine",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": question.stem}],
        "extra_body": {"options": list(question.options), "deadline_ms": 8000},
    }


async def test_openai_client_gets_an_answer_with_the_federations_facts(zoo_gateway) -> None:
    url, questions = zoo_gateway
    q = questions[0]
    async with AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
        models = await client.models.list()
        reply = await client.chat.completions.create(**_ask(q))
    assert [m.id for m in models.data] == ["fedrefine"]
    text = reply.choices[0].message.content
    facts = reply.model_extra["fedrefine"]
    assert reply.choices[0].finish_reason == "stop" and text
    assert facts["choice"] in "ABCD" and text.endswith(q.options["ABCD".index(facts["choice"])])
    everyone = {"t1-llama", "t2-qwen2", "t3-qwen3", "t4-llama-weak"}
    used = set(facts["transmitters_used"])
    assert used | {m["transmitter_id"] for m in facts["omitted"]} == everyone, facts
    assert used == {u["transmitter_id"] for u in facts["used"]}
    assert all(u["bytes"] > 0 for u in facts["used"]) and (facts["bytes_received"] > 0 or not used)
    assert facts["query_id"] in reply.id and facts["receiver_id"] == "rx"
    assert reply.usage.prompt_tokens == len(q.stem.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_a_request_names_its_mode(zoo_gateway) -> None:
    """``"mode"`` (extension; the gateway's ``--mode`` otherwise): text-to-text here, where no cache travels."""
    url, questions = zoo_gateway
    q = questions[0]
    ask = _ask(q)
    async with AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
        reply = await client.chat.completions.create(**{**ask, "extra_body": {**ask["extra_body"], "mode": "t2t"}})
    facts = reply.model_extra["fedrefine"]
    assert facts["choice"] in "ABCD" and facts["used"]
    assert all(u["layers"] == [] and u["precision"] is None and u["bytes"] > 0 for u in facts["used"])  # hints
    status, body = await _post(f"{url}/chat/completions", {**_ask(q), "mode": "telepathy"})
    assert status == 400 and "mode" in body["error"]["message"]


async def test_openai_client_streams_the_same_answer(zoo_gateway) -> None:
    url, questions = zoo_gateway
    q = questions[1]
    async with AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
        plain = await client.chat.completions.create(**_ask(q))
        stream = await client.chat.completions.create(**_ask(q), stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == plain.choices[0].message.content
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(last) == 1
    assert last[0].model_extra["fedrefine"]["choice"] == plain.model_extra["fedrefine"]["choice"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(q.stem.split())


async def test_a_wrong_or_missing_token_is_refused(gateway: str) -> None:
    async with AsyncOpenAI(base_url=gateway, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    status, body = await _post(f"{gateway}/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_bad_requests_are_400_in_openais_shape(gateway: str) -> None:
    url = f"{gateway}/chat/completions"
    status, body = await _post(url, {"messages": [{"role": "system", "content": "x"}]})
    assert status == 400 and "no user message" in body["error"]["message"]
    status, body = await _post(url, {"messages": []})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await _post(url, {"messages": [{"role": "user", "content": "x?"}], "options": ["only"]})
    assert status == 400 and "4-option" in body["error"]["message"]


def test_gateway_settings(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    cfg = parse(["--token-file", str(token_file), "--nats", "h:1"], env={"FEDREFINE_PORT": "9001"})
    assert (cfg.bearer_token(), cfg.port, cfg.nats, cfg.host) == ("s3cret", 9001, "nats://h:1", "127.0.0.1")
    assert "s3cret" not in repr(parse(["--token", "s3cret"], env={}))
    assert parse(["--no-auth"], env={"FEDREFINE_TOKEN": "x"}).bearer_token() is None
    assert GatewayConfig.model_fields["host"].default == "127.0.0.1"
    assert parse([], env={}).mode == "c2c" and parse(["--mode", "translate"], env={}).mode == "translate"
