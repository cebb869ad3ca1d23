"""Agent configuration: one pydantic model per role, built once at the entry point from flags and environment.

Every field ``some_name`` is the flag ``--some-name`` and the environment variable ``FEDREFINE_SOME_NAME``;
a flag wins over the environment, the environment over the default. A bad value (flag or environment) is a
:class:`~bus.errors.ConfigError` with one line; the CLIs print it as ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.auth import ClientSecurity, read_creds
from bus.errors import AuthError, ConfigError
from bus.schemas import MAX_HEARTBEAT_S, MAX_INLINE_BYTES, PRECISIONS, validate_id
from bus.subjects import DEFAULT_PREFIX, Subjects
from fusion.notes import DEFAULT_TOP_K

ENV_PREFIX = "FEDREFINE_"
NATS_URL_ENV = "NATS_URL"  # read when FEDREFINE_NATS is not set
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_HEARTBEAT_S = 1.0  # seconds between presence heartbeats
DEFAULT_EXPIRY_BEATS = 3.0  # an agent is gone after this many heartbeat intervals of silence
DEFAULT_DRAIN_S = 10.0  # seconds a stopping agent waits for its in-flight work
DEFAULT_CONNECT_RETRIES = 5  # first-connection attempts before an agent gives up
DEFAULT_BACKOFF_MAX_S = 2.0  # longest wait between reconnect attempts (exponential from 0.1 s)
DEFAULT_MAX_CONTROL_BYTES = 256 * 1024  # a control message (JSON) larger than this is rejected unread
DEFAULT_OFFER_SHARE = 0.3  # gate: share of the time left it waits for offers from live transmitters
DEFAULT_PLAN_SHARE = 0.5  # receiver: share of the deadline after which a missing plan means "gate down"
DEFAULT_REPHRASE_SHARE = 0.3  # receiver: share of the deadline it waits for its rephraser
DEFAULT_ANSWER_RESERVE_S = 0.25  # receiver: seconds kept free before the deadline to fuse and read the answer
DEFAULT_ASSUMED_RATE_MBPS = 125.0  # gate: link rate (MB/s) assumed for a transmitter that reports none (loopback)
DEFAULT_INLINE_KV_BYTES = 8192  # transmitter: largest cache tail it sends inside its offer
DEFAULT_INLINE_KV_MS = 2.0  # transmitter: ... and only when its link carries that in this many milliseconds
DEFAULT_INLINE_COMPUTE_MS = 10.0  # model calls shorter than this run on the event loop (no thread hand-off)
DEFAULT_MAX_INFLIGHT = 64  # queries one agent works on at once (receiver: more wait in its queue)
DEFAULT_MAX_QUEUED = 1024  # receiver: asks waiting for one of its --max-inflight slots; more are refused (limit)
DEFAULT_MAX_DEADLINE_S = 60.0  # the longest deadline an agent honours: an ask or query beyond it is refused

Level = Literal["debug", "info", "warning", "error"]
C = TypeVar("C", bound="AgentConfig")


def default_id(role: str) -> str:
    """A fresh agent id like ``transmitter-3f9a1c``."""
    return f"{role}-{uuid.uuid4().hex[:6]}"


class AgentConfig(BaseModel):
    """What every agent needs: where the bus is, who it is, how it heartbeats and stops."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats: str = Field(
        default=DEFAULT_NATS_URL,
        description="NATS server URL, or several comma-separated (a cluster: the first is tried first, the others on "
        "failure); also read from NATS_URL",
    )
    creds: str | None = Field(
        default=None, description="this agent's credentials file (python -m ops.server --creds-dir DIR writes them)"
    )
    tls_ca: str | None = Field(default=None, description="CA certificate that verifies the server (DIR/ca.pem)")
    insecure: bool = Field(
        default=False, description="connect without credentials or TLS (only to a server run with --insecure)"
    )
    id: str = Field(
        default="", description="agent id (A-Z a-z 0-9 _ -, at most 64); default: from --creds, else <role>-<random>"
    )
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix of the federation")
    heartbeat_s: float = Field(
        default=DEFAULT_HEARTBEAT_S, gt=0, le=MAX_HEARTBEAT_S, description="seconds between heartbeats"
    )
    drain_s: float = Field(default=DEFAULT_DRAIN_S, ge=0, le=600, description="seconds to finish work when stopping")
    connect_retries: int = Field(default=DEFAULT_CONNECT_RETRIES, ge=1, le=1000, description="first-connect attempts")
    backoff_max_s: float = Field(default=DEFAULT_BACKOFF_MAX_S, gt=0, le=60, description="longest reconnect wait")
    max_control_bytes: int = Field(default=DEFAULT_MAX_CONTROL_BYTES, ge=1024, description="largest control message")
    max_inflight: int = Field(default=DEFAULT_MAX_INFLIGHT, ge=1, le=10_000, description="queries at once")
    max_deadline_s: float = Field(
        default=DEFAULT_MAX_DEADLINE_S, gt=0, le=3600, description="longest deadline honoured (seconds)"
    )
    log_level: Level = Field(default="info", description="logging level")
    trace: bool = Field(
        default=True, description="publish trace events (ids, times, byte counts; never text) for ops.watch"
    )
    threads: int = Field(default=1, ge=1, le=256, description="torch threads for model and gate math")
    inline_compute_ms: float = Field(
        default=DEFAULT_INLINE_COMPUTE_MS,
        ge=0,
        le=1000,
        description="run a model call on the event loop when such calls took under this many ms (0: always on "
        "the compute thread)",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if value:
            validate_id(value, "agent id")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        Subjects(value)  # raises SchemaError with one line
        return value

    @field_validator("nats")
    @classmethod
    def _url(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",")]
        for url in urls:
            if "://" not in url or not url.split("://", 1)[1]:
                raise ValueError(f"{url!r} is not a URL like nats://127.0.0.1:4222 (several: comma-separated)")
        return ",".join(urls)

    def security(self) -> ClientSecurity:
        """How this agent connects; :class:`ConfigError` without credentials unless ``insecure`` says so."""
        if self.creds is None and not self.insecure:
            raise ConfigError(
                "--creds FILE is required (python -m ops.server --creds-dir DIR writes one per agent); "
                "--insecure connects without credentials or TLS, to a server run with --insecure"
            )
        return ClientSecurity(creds=self.creds, tls_ca=self.tls_ca, insecure=self.insecure and self.creds is None)


class ModelAgentConfig(AgentConfig):
    """An agent that runs a language model."""

    model: str = Field(description="a .gguf file, a Hugging Face checkpoint directory, or a tiny test model name")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="weights' dtype")
    device: str = Field(default="", description="torch device (cpu, cuda, cuda:1, mps; default: cuda when present)")

    def load_model(self):
        """The agent's ``fusion.models.LanguageModel`` (torch is imported here, after the flags are parsed)."""
        from fusion.models import LanguageModel

        return LanguageModel.load(self.model, device=self.device or None, dtype=self.dtype)


class TransmitterConfig(ModelAgentConfig):
    """``python -m agents.transmitter``."""

    link_mbps: float | None = Field(
        default=None, gt=0, description="shape the uplink to this many MB/s (megabytes, 1e6 bytes, per second)"
    )
    link_burst_bytes: int | None = Field(
        default=None, ge=1, description="bytes the shaped link lets through at once (default: bus.shaper's)"
    )
    link_trace: str | None = Field(
        default=None,
        description="replay this link trace on the uplink: a time_s,rate_mbps CSV or a Mahimahi packet trace "
        "(bus.linktrace; shipped ones in ops/traces); not with --link-mbps",
    )
    policy: str = Field(
        default="deadline-aware",
        description="bandwidth policy that re-plans a stream's remaining layers when the link slows mid-stream "
        "(a bus.policy name or a module:Class of your own)",
    )
    inline_kv_bytes: int = Field(
        default=DEFAULT_INLINE_KV_BYTES,
        ge=0,
        le=MAX_INLINE_BYTES,
        description="send the cache tail inside the offer when it is at most this many bytes (0: never)",
    )
    inline_kv_ms: float = Field(
        default=DEFAULT_INLINE_KV_MS,
        gt=0,
        le=1000,
        description="... and the link carries it in at most this many milliseconds",
    )
    notes: str | None = Field(
        default=None, description="this device's notes file, one fact per line (read before q', never sent)"
    )
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, le=32, description="note lines retrieved for each query")

    @field_validator("link_trace")
    @classmethod
    def _trace_file(cls, value: str | None) -> str | None:
        if value:
            from bus.linktrace import load_trace

            try:
                load_trace(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value or None

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        from bus.errors import PolicyError
        from bus.policy import policy_class

        try:
            policy_class(value)
        except PolicyError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _one_link(self) -> TransmitterConfig:
        if self.link_trace and self.link_mbps:
            raise ValueError("--link-mbps and --link-trace both shape the uplink; give one")
        return self

    @field_validator("notes")
    @classmethod
    def _notes_file(cls, value: str | None) -> str | None:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"no notes file at {value!r}")
        return value or None


class ReceiverConfig(ModelAgentConfig):
    """``python -m agents.receiver``."""

    fusers: str | None = Field(default=None, description="directory of pair fusers (fusion.registry layout)")
    gates: str | None = Field(
        default=None, description="ids of the gates whose plans this receiver takes, comma-separated (default: any)"
    )
    answer_reserve_s: float = Field(
        default=DEFAULT_ANSWER_RESERVE_S, ge=0, le=60, description="seconds kept to fuse and answer"
    )
    max_queued: int = Field(
        default=DEFAULT_MAX_QUEUED,
        ge=0,
        le=1_000_000,
        description="asks that wait (in order) for one of the --max-inflight slots; more are refused with 'limit'",
    )
    plan_share: float = Field(default=DEFAULT_PLAN_SHARE, gt=0, lt=1, description="deadline share to wait for a plan")
    rephrase_share: float = Field(
        default=DEFAULT_REPHRASE_SHARE, gt=0, lt=1, description="deadline share to wait for the rephraser"
    )
    self_check: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="answer alone, asking no one, when the receiver's own P(none) is below this (only for a "
        "receiver trained to say 'none'; the zoo's is, and 0.5 suits it)",
    )

    @field_validator("gates")
    @classmethod
    def _gates(cls, value: str | None) -> str | None:
        for gid in (value or "").split(","):
            if gid.strip():
                validate_id(gid.strip(), "gate id")
        return value

    @property
    def trusted_gates(self) -> tuple[str, ...]:
        """The gates named by ``gates`` (empty: any gate identity)."""
        return tuple(g.strip() for g in (self.gates or "").split(",") if g.strip())


class GateAgentConfig(AgentConfig):
    """``python -m agents.gate``."""

    gate: str | None = Field(
        default=None, description="gating network directory (fusion.gate.save_gate); none: uniform"
    )
    policy: str = Field(
        default="deadline-aware", description="bandwidth policy (a bus.policy name or a module:Class of your own)"
    )
    precision: Literal["fp32", "fp16", "bf16", "int8", "int4"] = Field(
        default="fp16", description="precision for policies that use one (keep-all, drop-by-importance)"
    )
    offer_share: float = Field(default=DEFAULT_OFFER_SHARE, gt=0, lt=1, description="time share to wait for offers")
    assumed_rate_mbps: float = Field(
        default=DEFAULT_ASSUMED_RATE_MBPS, gt=0, description="link rate (MB/s) of transmitters that report none"
    )
    answer_reserve_s: float = Field(
        default=DEFAULT_ANSWER_RESERVE_S, ge=0, le=60, description="seconds the receiver keeps after the last byte"
    )

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"unknown precision {value!r}")
        return value


class RephraserConfig(ModelAgentConfig):
    """``python -m agents.rephraser`` (runs the receiver's model, on the receiver side)."""

    model: str = Field(default="", description="the receiver's model (directory or tiny name); not with --rules-only")
    receiver_id: str | None = Field(default=None, description="serve only this receiver (default: every receiver)")
    rules_only: bool = Field(default=False, description="redact by rules only, never reword with the model")

    @model_validator(mode="after")
    def _needs_model(self) -> RephraserConfig:
        if not self.model and not self.rules_only:
            raise ValueError("--model is required unless --rules-only")
        return self

    @field_validator("receiver_id")
    @classmethod
    def _rid(cls, value: str | None) -> str | None:
        if value is not None:
            validate_id(value, "receiver id")
        return value


# ---- flags and environment ----------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error: ...`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(a is bool for a in get_args(annotation))
    return False


def build_parser(cls: type[AgentConfig], prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with one flag per config field (help shows the default and the environment name)."""
    parser = _OneLineParser(prog=prog, description=description)
    for name, field in cls.model_fields.items():
        env = ENV_PREFIX + name.upper()
        default = "required" if field.is_required() else f"default {field.default!r}"
        help_text = f"{field.description or name} ({default}; env {env})"
        if _is_bool(field.annotation):
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def _env_values(cls: type[AgentConfig], env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get(NATS_URL_ENV):  # the NATS tools' own variable; FEDREFINE_NATS wins over it
        out["nats"] = env[NATS_URL_ENV]
    for name in cls.model_fields:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    return out


def make_config(cls: type[C], values: Mapping[str, Any], role: str) -> C:
    """Validate ``values`` into ``cls`` (filling a default id); any problem is one :class:`ConfigError` line."""
    data = dict(values)
    try:
        cfg = cls(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _flag(str(first["loc"][0])) if first["loc"] else "config"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}", errors=exc.errors()) from exc
    if cfg.creds is not None:
        cfg = _identity_from_creds(cfg, role)
    if not cfg.id:
        cfg = cfg.model_copy(update={"id": default_id(role)})
    return cfg


def _identity_from_creds(cfg: C, role: str) -> C:
    """The agent's id from its credentials file, which must be of this role and prefix (and id, if one is given)."""
    assert cfg.creds is not None
    try:
        creds = read_creds(cfg.creds)
    except AuthError as exc:
        raise ConfigError(f"--creds: {exc}", path=cfg.creds) from exc
    if creds.role is not None and creds.role != role:
        raise ConfigError(f"--creds: {cfg.creds} are a {creds.role}'s credentials, not a {role}'s", path=cfg.creds)
    if creds.prefix is not None and creds.prefix != cfg.prefix:
        raise ConfigError(f"--creds: {cfg.creds} are for prefix {creds.prefix!r}, not {cfg.prefix!r}", path=cfg.creds)
    if creds.id is not None:
        if cfg.id and cfg.id != creds.id:
            raise ConfigError(f"--id {cfg.id} but --creds {cfg.creds} are {creds.id}'s", path=cfg.creds)
        return cfg.model_copy(update={"id": creds.id})
    return cfg


def parse_config(
    cls: type[C],
    role: str,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str = "",
) -> C:
    """Flags (``argv``) over ``FEDREFINE_*`` variables (``env``, default ``os.environ``) over defaults."""
    parser = build_parser(cls, f"python -m agents.{role}", description)
    args = parser.parse_args(argv)
    values = _env_values(cls, os.environ if env is None else env)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return make_config(cls, values, role)
