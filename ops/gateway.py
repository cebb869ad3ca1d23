"""An OpenAI-compatible HTTP endpoint in front of a federation (chat completions, streamed or not; models).

    python -m ops.gateway --nats URL --creds DIR/gateway.creds --tls-ca DIR/ca.pem --token-file TOKEN

    POST /v1/chat/completions   the last user message is the question, asked on the bus (``ops.ask``); the answer
                                comes back as a chat completion (``stream: true``: server-sent events)
    GET  /v1/models             the one model this gateway serves (``--model-name``)

Extra request fields (the OpenAI clients send them with ``extra_body``): ``private`` (bool: rephrase before
anything leaves the receiver side), ``options`` (a list of answer options; the reply's ``fedrefine.choice`` is the
letter) and ``deadline_ms``. Earlier turns and system messages are not sent: a federation answers one question.

Every completion carries ``usage`` (prompt and completion counted in whitespace-separated words: the gateway
holds no tokenizer, and the members' tokenizers differ) and a ``fedrefine`` object: ``query_id``,
``receiver_id``, ``choice``, ``alone``, ``latency_s``, ``bytes_received`` (KV bytes), ``transmitters_used``
(ids), ``used`` and ``omitted`` (per transmitter: layers, precision, weight, bytes; or why not) and ``notes``.

Security is on: the gateway binds to 127.0.0.1 unless ``--host`` says otherwise, asks for ``Authorization:
Bearer TOKEN`` (``--token``, ``--token-file`` or ``FEDREFINE_TOKEN``; without one, a random token is made and
printed once), and connects to the bus as a ``client`` identity with its own credentials (``python -m ops.creds
issue client gateway`` writes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.config import (
    AGENT_SETTINGS,
    ENV_PREFIX,
    build_parser,
    checked_nats,
    settings_values,
    validate_settings,
)
from bus.cli import DEFAULT_NATS_URL, NATS_HELP
from bus.errors import ConfigError, FedRefineError
from bus.schemas import Mode
from bus.subjects import DEFAULT_PREFIX, Subjects

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # loopback only: another address must be asked for
DEFAULT_PORT = 8000
DEFAULT_MODEL_NAME = "fedrefine"
DEFAULT_DEADLINE_MS = 10_000  # a request's deadline when it names none (milliseconds)
MAX_DEADLINE_MS = 60_000  # the longest deadline a request may ask for
DEFAULT_STOP_S = 5.0  # seconds a stopping gateway waits for requests in flight
HTTP_STATUS = {"bad_request": 400, "limit": 429, "timeout": 504, "unavailable": 503, "internal": 502}


class GatewayConfig(BaseSettings):
    """``python -m ops.gateway``: where the bus is, who the gateway is on it, where it listens, who may call it."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True)

    nats: str = Field(default=DEFAULT_NATS_URL, description=NATS_HELP)
    creds: str | None = Field(default=None, description="the gateway's client credentials (python -m ops.creds)")
    tls_ca: str | None = Field(default=None, description="CA certificate that verifies the server (DIR/ca.pem)")
    insecure: bool = Field(default=False, description="bus without credentials or TLS (a server run with --insecure)")
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix of the federation")
    host: str = Field(default=DEFAULT_HOST, description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="port to listen on (0: a free one)")
    token: SecretStr | None = Field(default=None, description="the bearer token callers must send")
    token_file: str | None = Field(default=None, description="read the bearer token from this file")
    auth: bool = Field(default=True, description="require the bearer token (--no-auth: only on a trusted host)")
    model_name: str = Field(default=DEFAULT_MODEL_NAME, min_length=1, description="the model id /v1/models lists")
    deadline_ms: int = Field(
        default=DEFAULT_DEADLINE_MS, ge=1, le=MAX_DEADLINE_MS, description="deadline of a request that names none"
    )
    mode: Mode = Field(
        default="c2c",
        description="how a request that names none is asked: c2c, t2t (text hints) or translate (the devices' notes' "
        "caches: a real federation whose receiver has translators, as `ops.real build` makes by default)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="logging level")

    @field_validator("nats")
    @classmethod
    def _url(cls, value: str) -> str:
        return checked_nats(value)

    def bearer_token(self) -> str | None:
        """The token callers must present (None with ``--no-auth``); ConfigError if ``token_file`` is unreadable."""
        if not self.auth:
            return None
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file:
            try:
                token = Path(self.token_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"--token-file: cannot read {self.token_file}: {exc.strerror or exc}") from exc
            if not token:
                raise ConfigError(f"--token-file: {self.token_file} is empty")
            return token
        return None


# ---- the OpenAI request and reply ---------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """One message of a chat request (text, or a list of parts of which the text ones are read)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content or () if p.get("type") == "text")


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: the OpenAI fields read here, FedRefine's extensions, the rest ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = DEFAULT_MODEL_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    private: bool = False  # extension: rephrase before anything leaves the receiver side
    options: list[str] = Field(default_factory=list)  # extension: answer options (the reply says the letter)
    deadline_ms: int | None = Field(default=None, ge=1, le=MAX_DEADLINE_MS)  # extension
    mode: Mode | None = None  # extension: c2c, t2t or translate (default: the gateway's --mode)

    def question(self) -> str:
        """The last user message's text (ValueError when there is none)."""
        for message in reversed(self.messages):
            if message.role == "user" and message.text().strip():
                return message.text()
        raise ValueError("no user message with text")


def _words(text: str) -> int:
    return len(text.split())


def facts(reply: Any) -> dict[str, Any]:
    """The ``fedrefine`` extension object of an answer: provenance, bytes and latency."""
    return {
        "query_id": reply.query_id,
        "receiver_id": reply.receiver_id,
        "choice": reply.choice,
        "alone": reply.alone,
        "latency_s": reply.latency_s,
        "bytes_received": reply.bytes_received,
        "transmitters_used": [u.transmitter_id for u in reply.used],
        "used": [u.model_dump(mode="json") for u in reply.used],
        "omitted": [m.model_dump(mode="json") for m in reply.omitted],
        "notes": list(reply.notes),
    }


def completion(reply: Any, question: str, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object for an answer."""
    prompt, answer = _words(question), _words(reply.text)
    return {
        "id": f"chatcmpl-{reply.query_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer},
        "fedrefine": facts(reply),
    }


def error_body(message: str, code: str, status: int) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status in (400, 404) else "authentication_error" if status == 401 else code
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


# ---- the app ------------------------------------------------------------------------------------------------


def create_app(nc: Any, cfg: GatewayConfig, token: str | None, watch: Any = None) -> Any:
    """The ASGI app over a connected NATS client ``nc`` (the caller owns and closes it)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from bus.schemas import Answer
    from ops.ask import Item, ask_once

    subjects = Subjects(cfg.prefix)
    app = FastAPI(title="FedRefine gateway", docs_url=None, redoc_url=None)

    def fail(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse(error_body(message, code, status), status_code=status)

    @app.middleware("http")
    async def bearer(request: Request, call_next):  # every route needs the token, /v1/models too
        if token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return fail(401, "invalid_api_key", "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return fail(400, "bad_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "fedrefine"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        try:
            question = body.question()
        except ValueError as exc:
            return fail(400, "bad_request", f"messages: {exc}")
        deadline_s = (body.deadline_ms or cfg.deadline_ms) / 1000
        item = Item(question, tuple(body.options), body.private, mode=body.mode or cfg.mode)
        asked = asyncio.ensure_future(ask_once(nc, subjects, item, deadline_s, watch))
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(asked, question, cfg.model_name, usage), media_type="text/event-stream")
        reply = await asked
        if not isinstance(reply, Answer):
            return fail(HTTP_STATUS[reply.code], reply.code, reply.message)
        return completion(reply, question, cfg.model_name)

    return app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


async def _events(asked: asyncio.Future, question: str, model: str, usage: bool) -> AsyncIterator[str]:
    """The answer as ``chat.completion.chunk`` events: the role at once, then the text, then the facts."""
    from bus.schemas import Answer

    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}  # fmt: skip
    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    try:
        reply = await asked
    except asyncio.CancelledError:  # the caller went away
        asked.cancel()
        raise
    if not isinstance(reply, Answer):
        yield _sse(error_body(reply.message, reply.code, HTTP_STATUS[reply.code]))
        return
    done = completion(reply, question, model)
    base["id"] = done["id"]
    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": reply.text}, "finish_reason": None}]})
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "fedrefine": done["fedrefine"]}
    yield _sse(last)
    if usage:
        yield _sse({**base, "choices": [], "usage": done["usage"]})
    yield _sse("[DONE]")


# ---- the command --------------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> GatewayConfig:
    """The gateway's settings: flags over ``FEDREFINE_*`` variables over ``--config FILE`` (its ``[gateway]``)."""
    parser = build_parser(GatewayConfig, "python -m ops.gateway", __doc__.splitlines()[0])
    roles = {**AGENT_SETTINGS, "gateway": GatewayConfig}
    values, origins = settings_values(GatewayConfig, "gateway", argv, os.environ if env is None else env, parser, roles)
    return validate_settings(GatewayConfig, values, origins)


async def serve(cfg: GatewayConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Connect to the bus, serve HTTP until cancelled (or signalled), then stop both; ``on_ready`` gets the base URL."""
    import uvicorn

    from bus.connect import close, connect
    from ops.ask import ReconnectWatch, client_security

    token = cfg.bearer_token()
    security = client_security(cfg.creds, cfg.tls_ca, cfg.insecure)
    watch = ReconnectWatch()
    nc = await connect(cfg.nats, name="ops.gateway", retries=1, security=security, reconnected_cb=watch.on_reconnect)
    if token is None and cfg.auth:
        token = secrets.token_urlsafe(24)
        print(f"bearer token (made for this run; --token-file keeps one): {token}", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        create_app(nc, cfg, token, watch), host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if not server.started:  # uvicorn logged why (an address in use, one not on this host)
            with contextlib.suppress(BaseException):
                task.result()
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}")
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}/v1"
        print(f"serving {url} for the federation at {cfg.nats}", flush=True)
        if on_ready is not None:
            on_ready(url)
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=DEFAULT_STOP_S)
        await close(nc)


def main(argv: Sequence[str] | None = None) -> int:
    """0 after a clean stop, 2 on bad input or no bus."""
    try:
        cfg = parse(argv)
    except SystemExit as exc:  # --help (0), or a bad flag already reported on one line (2)
        return int(exc.code or 0)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(cfg))
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
