"""ops.gateway: the official openai client against a live federation, streamed and not; tokens; errors."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import openai
import pytest
from openai import AsyncOpenAI

from ops.gateway import GatewayConfig, parse, serve
from tests.agents.conftest import QUESTIONS, Fleet

TOKEN = "test-token-7f3a"


@pytest.fixture
async def gateway(fleet: Fleet) -> AsyncIterator[str]:
    """A federation (two transmitters) behind a gateway with its own client identity; yields its base URL."""
    await fleet.standard()
    security = fleet.security("gateway", "client")
    argv = ["--nats", fleet.url, "--prefix", fleet.prefix, "--creds", str(security.creds), "--port", "0"]
    cfg = parse([*argv, "--tls-ca", str(security.tls_ca), "--token", TOKEN, "--deadline-ms", "4000"], env={})
    assert cfg.host == "127.0.0.1"  # loopback unless asked
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, on_ready=ready.set_result))
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.exception() if task.done() else "the gateway did not start"
    yield ready.result()
    task.cancel()
    await asyncio.wait({task}, timeout=10)


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


def _ask(question) -> dict:
    return {
        "model": "fedrefine",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": question.stem}],
        "extra_body": {"options": list(question.options), "deadline_ms": 4000},
    }


async def test_openai_client_gets_an_answer_with_the_federations_facts(gateway: str) -> None:
    async with AsyncOpenAI(base_url=gateway, api_key=TOKEN, max_retries=0) as client:
        models = await client.models.list()
        reply = await client.chat.completions.create(**_ask(QUESTIONS[1]))
    assert [m.id for m in models.data] == ["fedrefine"]
    q = QUESTIONS[1]
    text = reply.choices[0].message.content
    facts = reply.model_extra["fedrefine"]
    assert reply.choices[0].finish_reason == "stop" and text
    assert facts["choice"] in "ABCD" and text.endswith(q.options["ABCD".index(facts["choice"])])
    used = set(facts["transmitters_used"])
    assert used <= {"t1", "t2"} and used | {m["transmitter_id"] for m in facts["omitted"]} == {"t1", "t2"}
    assert facts["bytes_received"] == sum(u["bytes"] for u in facts["used"]) or not used
    assert reply.usage.prompt_tokens == len(q.stem.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_openai_client_streams_the_same_answer(gateway: str) -> None:
    q = QUESTIONS[2]
    async with AsyncOpenAI(base_url=gateway, api_key=TOKEN, max_retries=0) as client:
        plain = await client.chat.completions.create(**_ask(q))
        stream = await client.chat.completions.create(**_ask(q), stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == plain.choices[0].message.content
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(last) == 1 and last[0].model_extra["fedrefine"]["choice"] in "ABCD"
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
