"""Agent settings: one pydantic-settings model per role, built once at the entry point.

Every field ``some_name`` is the flag ``--some-name``, the environment variable ``FEDREFINE_SOME_NAME`` and the
key ``some_name`` (or ``some-name``) of an optional TOML file given by ``--config FILE`` (or ``FEDREFINE_CONFIG``).
A flag wins over the environment, the environment over the file, the file over the default; ``NATS_URL`` is read
when ``FEDREFINE_NATS`` is not set. In the file, top-level keys apply to every role and a ``[<role>]`` table to
that role only (it wins). A bad value from anywhere is a :class:`~bus.errors.ConfigError` with one line that
names where it came from; the CLIs print it as ``error: ...`` and exit 2.

Nothing here imports torch: ``--help`` and a bad flag answer before any model code is loaded.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from bus.auth import ClientSecurity, read_creds
from bus.cli import DEFAULT_NATS_URL, NATS_HELP, NATS_URL_ENV, OneLineParser, nats_servers
from bus.connect import DEFAULT_CONNECT_RETRIES
from bus.errors import AuthError, ConfigError
from bus.policy import POLICIES
from bus.schemas import DEFAULT_HEARTBEAT_S, MAX_HEARTBEAT_S, MAX_INLINE_BYTES, PRECISIONS, validate_id
from bus.subjects import DEFAULT_PREFIX, Subjects
from fusion.notes import DEFAULT_TOP_K

ENV_PREFIX = "FEDREFINE_"
CONFIG_ENV = "FEDREFINE_CONFIG"  # the TOML settings file when --config is not given
DEFAULT_DRAIN_S = 10.0  # seconds a stopping agent waits for its in-flight work
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
S = TypeVar("S", bound=BaseSettings)


def _existing(value: str | None, what: str, directory: bool) -> str | None:
    """``value`` (``~`` expanded) when it names a directory (or a file); a ValueError saying what is there instead."""
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_dir() if directory else path.is_file()):
        there = " (it is a file)" if path.is_file() else " (it is a directory)" if path.is_dir() else ""
        raise ValueError(f"no {what} at {str(path)!r}{there}")
    return str(path)


def default_id(role: str) -> str:
    """A fresh agent id like ``transmitter-3f9a1c``."""
    return f"{role}-{uuid.uuid4().hex[:6]}"


def checked_nats(value: str) -> str:
    """A settings model's ``nats`` value, normalised (``bus.cli.nats_servers``); ValueError when unusable."""
    try:
        return nats_servers(value)
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("--nats: ")) from exc


class AgentConfig(BaseSettings):
    """What every agent needs: where the bus is, who it is, how it heartbeats and stops."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True)

    nats: str = Field(default=DEFAULT_NATS_URL, description=NATS_HELP)
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
        return checked_nats(value)

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
    compress: Literal["auto", "none", "lz4", "deflate"] = Field(
        default="auto",
        description="KV compression after quantizing: auto tries LZ4 on a stream's first layer; deflate is "
        "smaller (int4 4.3-4.8x fp16 on the real models vs 3.8x) at ~50 MB/s of CPU: for links slower than that",
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
        description="answer alone, asking no one, when the receiver knows: a letter-style receiver trained to say "
        "'none' when its P(none) is below this (the zoo's: 0.5 suits it); a text-style (pretrained) one when its "
        "confidence in its own answer is at least this (calibrate it: accuracy --real reports the threshold)",
    )

    @field_validator("fusers")
    @classmethod
    def _fusers_dir(cls, value: str | None) -> str | None:
        return _existing(value, "fusers directory", directory=True)

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
        default=None, description="gating network directory (fusion.gate.save_gate: FUSERS/gate-<fp>); unset: uniform"
    )
    policy: str = Field(
        default="deadline-aware",
        description=f"bandwidth policy: {', '.join(POLICIES)}, or a module:Class of your own (docs/POLICIES.md)",
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

    @field_validator("gate")
    @classmethod
    def _gate_dir(cls, value: str | None) -> str | None:
        return _existing(value, "gating network directory", directory=True)

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        from bus.errors import PolicyError
        from bus.policy import policy_class

        try:
            policy_class(value)  # a built-in name or alias, or a module:Class that imports and fits
        except PolicyError as exc:
            raise ValueError(str(exc)) from exc
        return value

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


# ---- flags, environment and the settings file -----------------------------------------------------------------


AGENT_SETTINGS: dict[str, type[BaseSettings]] = {
    "transmitter": TransmitterConfig,
    "receiver": ReceiverConfig,
    "gate": GateAgentConfig,
    "rephraser": RephraserConfig,
}

# Which --help group each flag is listed under; a flag not named here is a "role" flag.
GROUPS: dict[str, tuple[str, ...]] = {
    "connection": ("config", "nats", "creds", "tls_ca", "insecure", "id", "prefix", "heartbeat_s", "drain_s",
                   "connect_retries", "backoff_max_s", "max_control_bytes", "max_inflight", "max_deadline_s",
                   "log_level", "trace"),
    "model": ("model", "dtype", "device", "threads", "inline_compute_ms"),
    "bandwidth": ("link_mbps", "link_burst_bytes", "link_trace", "inline_kv_bytes", "inline_kv_ms", "policy",
                  "precision", "assumed_rate_mbps"),
}  # fmt: skip
GROUP_TITLES = {
    "connection": "connection (the bus, this agent's identity, limits, logging)",
    "model": "model",
    "role": "role",
    "bandwidth": "bandwidth",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(a is bool for a in get_args(annotation))
    return False


def _choices(field: Any) -> list[str] | None:
    if get_origin(field.annotation) is Literal:
        return [str(a) for a in get_args(field.annotation)]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return list(extra["choices"]) if "choices" in extra else None  # type: ignore[arg-type]


def _group_of(name: str) -> str:
    return next((group for group, names in GROUPS.items() if name in names), "role")


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default is None or field.default == "":
        return "default: unset"
    if isinstance(field.default, bool):
        return "default: on" if field.default else "default: off"
    return f"default: {field.default}"


def build_parser(cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per settings field in four groups (connection, model, role, bandwidth), with default and env name."""
    parser = OneLineParser(
        prog=prog,
        description=description,
        epilog=f"Every flag is also an environment variable ({ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}NATS) and a key of "
        "the --config file; a flag wins over the environment, the environment over the file.",
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    groups["connection"].add_argument(
        "--config", metavar="FILE", default=None, help=f"TOML settings file (default: unset; env {CONFIG_ENV})"
    )
    for name, field in cls.model_fields.items():
        help_text = f"{field.description or name} ({_default_text(field)}; env {ENV_PREFIX}{name.upper()})"
        group = groups[_group_of(name)]
        if _is_bool(field.annotation):
            group.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices = _choices(field)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        group.add_argument(_flag(name), dest=name, default=None, metavar=metavar, help=help_text)
    return parser


def _env_values(cls: type[BaseSettings], env: Mapping[str, str]) -> dict[str, Any]:
    """``FEDREFINE_*`` values (pydantic-settings' env source over ``env``), ``NATS_URL`` under ``FEDREFINE_NATS``."""
    source = EnvSettingsSource(cls)
    source.env_vars = {key.lower(): value for key, value in env.items()}
    out = {key: value for key, value in source().items() if key in cls.model_fields}
    if "nats" not in out and env.get(NATS_URL_ENV):
        out["nats"] = env[NATS_URL_ENV]
    return out


def read_settings_file(
    cls: type[BaseSettings], path: str, role: str, roles: Mapping[str, type[BaseSettings]] | None = None
) -> dict[str, Any]:
    """The values of a TOML settings file for ``role``: top-level keys, then its ``[role]`` table.

    ``roles`` are the tables a file may hold (default: the four agents); a top-level key none of them knows is an
    error, one another role knows is left to it.
    """
    try:
        with open(Path(path).expanduser(), "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not TOML: {exc}", path=path) from exc
    roles = roles or AGENT_SETTINGS
    for key, value in data.items():
        if isinstance(value, dict) and key not in roles:
            raise ConfigError(f"--config: {path}: unknown table [{key}] (tables: {', '.join(roles)})", path=path)
    anyone = {name for other in roles.values() for name in other.model_fields}
    top = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    for key in top:
        if key not in anyone:
            raise ConfigError(f"--config: {path}: {key!r} is no agent's setting", path=path)
    flat = {k: v for k, v in top.items() if k in cls.model_fields}  # other roles' keys may share the file
    for key, value in data.get(role, {}).items():
        if key.replace("-", "_") not in cls.model_fields:
            raise ConfigError(f"--config: {path}: {key!r} is not a {role} setting", path=path)
        flat[key.replace("-", "_")] = value
    return flat


def validate_settings(cls: type[S], values: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> S:
    """``values`` validated into ``cls``; any problem is one :class:`ConfigError` line naming where it came from."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        where = (origins or {}).get(name) or (_flag(name) if name else "config")
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}", errors=exc.errors()) from exc


def make_config(cls: type[C], values: Mapping[str, Any], role: str, origins: Mapping[str, str] | None = None) -> C:
    """Validate ``values`` into ``cls`` (filling a default id); any problem is one :class:`ConfigError` line.

    ``origins`` names where each value came from (a flag, a variable, a file), for the message.
    """
    cfg = validate_settings(cls, values, origins)
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


def settings_values(
    cls: type[BaseSettings],
    role: str,
    argv: Sequence[str] | None,
    env: Mapping[str, str],
    parser: argparse.ArgumentParser,
    roles: Mapping[str, type[BaseSettings]] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of ``cls``'s fields and where each came from: flags over ``FEDREFINE_*`` over the settings file."""
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config") or env.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    layers: list[tuple[dict[str, Any], Callable[[str], str]]] = []
    if config_file:
        layers.append((read_settings_file(cls, config_file, role, roles), lambda k: f"--config {config_file}: {k}"))
    layers.append((_env_values(cls, env), lambda k: ENV_PREFIX + k.upper()))
    layers.append(({k: v for k, v in args.items() if v is not None}, _flag))
    for layer, origin in layers:
        values.update(layer)
        origins.update({key: origin(key) for key in layer})
    return values, origins


def parse_config(
    cls: type[C],
    role: str,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str = "",
) -> C:
    """Flags (``argv``) over ``FEDREFINE_*`` variables (``env``, default ``os.environ``) over the settings file."""
    parser = build_parser(cls, f"python -m agents.{role}", description)
    values, origins = settings_values(cls, role, argv, os.environ if env is None else env, parser)
    return make_config(cls, values, role, origins)
