"""Client-side security: read a credentials file, verify the server by TLS, turn both into ``nats.connect`` options.

A FedRefine **credentials file** holds one identity's NATS nkey seed (the server knows only the public key) and
says who that identity is, so an agent can default its id from it and refuse a file of another role::

    # FedRefine credentials: transmitter t1 (prefix fr). Secret: whoever holds this file is t1.
    # identity: role=transmitter id=t1 prefix=fr key=UAB...
    -----BEGIN USER NKEY SEED-----
    SUA...
    ------END USER NKEY SEED------

The seed block is the decorated format the Go tools read, so the same file works with the ``nats`` CLI as
``--nkey FILE``. A NATS ``.creds`` file (a user JWT and its seed, for servers in operator mode) is accepted too:
it goes to nats-py as ``user_credentials`` and carries no FedRefine identity line. Generating identities and the
server's permission table is ``privacy.credentials``'s job; this module only reads.

Every connection with an identity uses the inbox prefix ``_INBOX.<id>`` (a monitor's: ``_INBOX_MONITOR.<id>``): the
server lets only that identity subscribe there, so the replies to its requests reach nobody else.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from bus.errors import AuthError

SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
SEED_END = "------END USER NKEY SEED------"
JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
IDENTITY_MARK = "# identity:"
INBOX_ROOT = "_INBOX"  # nats-py's default inbox prefix; ours is _INBOX.<id>
MONITOR_INBOX_ROOT = "_INBOX_MONITOR"  # a monitor's: _INBOX_MONITOR.<id> (service replies cross leaf links there)
MAX_CREDS_BYTES = 64 * 1024  # a credentials file larger than this is not one
_SEED_RE = re.compile(r"\bSU[A-Z2-7]{56}\b")  # a user nkey seed: 'S' (seed) 'U' (user), base32
_FIELD_RE = re.compile(r"(\w+)=(\S+)")


class Creds(BaseModel):
    """What a credentials file says: the identity (when it is a FedRefine file) and how to authenticate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    role: str | None = None  # receiver, rephraser, gate, transmitter, client, monitor, admin (privacy.permissions)
    id: str | None = None
    prefix: str | None = None  # the subject prefix its permissions are for
    public_key: str | None = None
    seed: str | None = None  # nkey seed (None for a JWT .creds file)
    jwt: bool = False  # a NATS user JWT file: nats-py reads it itself

    def __repr__(self) -> str:  # never print the seed
        return f"Creds(role={self.role!r}, id={self.id!r}, prefix={self.prefix!r}, path={str(self.path)!r})"

    __str__ = __repr__


def format_creds(role: str, agent_id: str, prefix: str, public_key: str, seed: str) -> str:
    """The text of a FedRefine credentials file (see the module docstring)."""
    return (
        f"# FedRefine credentials: {role} {agent_id} (prefix {prefix}). Secret: whoever holds it is {agent_id}.\n"
        f"# Agents: --creds THIS_FILE (or FEDREFINE_CREDS); the nats CLI: --nkey THIS_FILE\n"
        f"{IDENTITY_MARK} role={role} id={agent_id} prefix={prefix} key={public_key}\n"
        f"{SEED_BEGIN}\n{seed}\n{SEED_END}\n"
    )


def read_creds(path: str | Path) -> Creds:
    """Parse a credentials file; :class:`AuthError` (one line) when it is missing or is not one."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CREDS_BYTES:
            raise AuthError(f"{p} is not a credentials file (too large)", path=str(p))
        text = p.read_text(errors="replace")
    except OSError as exc:
        raise AuthError(f"cannot read credentials {p}: {exc.strerror or exc}", path=str(p)) from exc
    if JWT_BEGIN in text:
        return Creds(path=p, jwt=True)
    seeds = _SEED_RE.findall(text)
    if len(seeds) != 1:
        raise AuthError(f"{p} holds no user nkey seed (expected one 'SU...' line)", path=str(p))
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(IDENTITY_MARK):
            fields = dict(_FIELD_RE.findall(line.removeprefix(IDENTITY_MARK)))
    return Creds(
        path=p,
        role=fields.get("role"),
        id=fields.get("id"),
        prefix=fields.get("prefix"),
        public_key=fields.get("key"),
        seed=seeds[0],
    )


def tls_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A client TLS context that verifies the server against ``ca_file`` (None: the system's trusted CAs)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise AuthError(f"cannot load the TLS CA {ca_file}: {exc}", path=str(ca_file)) from exc


class ClientSecurity(BaseModel):
    """How one client proves who it is (``creds``) and checks the server (``tls_ca``); built once at the entry point.

    ``insecure`` is the explicit opt-out: no credentials and no TLS, for a server run with ``--insecure``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    creds: Path | None = None
    tls_ca: Path | None = None
    insecure: bool = False

    def identity(self) -> Creds | None:
        """The parsed credentials (None without ``creds``)."""
        return read_creds(self.creds) if self.creds is not None else None

    def connect_options(self, url: str | list[str]) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: authentication, TLS, and the identity's own inbox prefix."""
        options: dict[str, Any] = {}
        creds = self.identity()
        if creds is not None:
            if creds.jwt:
                options["user_credentials"] = str(creds.path)
            else:
                options["nkeys_seed_str"] = creds.seed
            if creds.id:
                options["inbox_prefix"] = inbox_prefix(creds.id, creds.role)
        urls = [url] if isinstance(url, str) else list(url)
        if self.tls_ca is not None or any(u.startswith("tls://") for u in urls):
            options["tls"] = tls_context(self.tls_ca)
        return options


def inbox_prefix(agent_id: str, role: str | None = None) -> str:
    """Where an identity's request replies arrive: ``_INBOX.<id>`` (``_INBOX_MONITOR.<id>`` for a monitor); only that
    identity may subscribe there."""
    return f"{MONITOR_INBOX_ROOT if role == 'monitor' else INBOX_ROOT}.{agent_id}"
