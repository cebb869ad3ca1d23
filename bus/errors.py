"""The one error tree of FedRefine.

Every package raises from here (``bus`` is the bottom layer, so the tree lives in it)::

    FedRefineError                 base; ``str(err)`` is one line a user can act on
    ├── ConfigError                bad flag, bad environment variable, bad config value
    ├── BusError                   NATS and the embedded server
    │   ├── ServerError            nats-server binary missing, port in use, failed to start
    │   ├── ConnectError           no server at the URL / connection lost for good
    │   ├── AuthError              missing, unreadable or refused credentials; TLS that does not verify
    │   └── TransportError         publish/subscribe failures, payload too large, timeouts
    ├── SchemaError                a message that does not validate, bad id, bad subject
    ├── CodecError                 KV codec
    │   ├── ChunkError             malformed, truncated, bad checksum, out of range, duplicate conflict
    │   └── LimitError             bytes / chunks / queries-in-flight limits exceeded
    ├── FusionError                models and fusion math
    │   ├── ModelError             missing path, unknown architecture, bad checkpoint
    │   └── FuserError             wrong-pair fuser, corrupt file, version mismatch
    ├── PrivacyError               rephrasing / redaction failures
    ├── PolicyError                bandwidth policy given nonsense
    └── AgentError                 agent life-cycle problems

Foreign errors (nats, lz4, torch, pydantic) are mapped at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations

from typing import Any


class FedRefineError(Exception):
    """Base of every FedRefine error; carries its facts as keyword fields."""

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        self.facts = facts
        for key, value in facts.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class ConfigError(FedRefineError):
    """A bad flag, environment variable or config value."""


class BusError(FedRefineError):
    """Something went wrong with NATS or the embedded server."""


class ServerError(BusError):
    """The embedded nats-server could not be found, configured or started."""


class ConnectError(BusError):
    """No NATS server answers at the given URL, or the connection was lost for good."""


class AuthError(BusError):
    """Credentials are missing, unreadable or refused, or the server's TLS certificate does not verify."""


class TransportError(BusError):
    """Publishing or receiving over NATS failed."""


class SchemaError(FedRefineError):
    """A message, id or subject that does not validate."""


class CodecError(FedRefineError):
    """The KV codec could not encode or decode."""


class ChunkError(CodecError):
    """A KV chunk is malformed, truncated, corrupt, out of range or conflicting."""


class LimitError(CodecError):
    """A reassembler limit (bytes, chunks, queries in flight) was exceeded."""


class FusionError(FedRefineError):
    """Model or fusion failure."""


class ModelError(FusionError):
    """A model could not be loaded or built (missing path, unknown architecture)."""


class FuserError(FusionError):
    """A fuser is for another model pair, corrupt, or of an unsupported version."""


class PrivacyError(FedRefineError):
    """Rephrasing or redaction failed."""


class PolicyError(FedRefineError):
    """A bandwidth policy was given nonsense (negative rate, zero deadline, unknown name)."""


class AgentError(FedRefineError):
    """An agent could not start, serve or stop."""
