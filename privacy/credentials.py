"""A federation's credentials on disk: one nkey per identity, a local CA and the server's certificate, revocation.

Layout of a credentials directory (``python -m ops.server --creds-dir DIR`` creates it, ``python -m ops.creds``
issues and revokes)::

    DIR/identities.json        who exists: role, id, served receiver, public key, revoked (no secrets)
    DIR/<id>.creds             one identity's seed (bus.auth format), mode 0600: hand it to that device only
    DIR/ca.pem                 the federation's CA certificate: every client verifies the server with it
    DIR/ca-key.pem             the CA's key (mode 0600; only needed to issue another server certificate)
    DIR/server-cert.pem, DIR/server-key.pem   the server's certificate (127.0.0.1, ::1, localhost) and key

Ids are unique across roles (an identity's inbox is ``_INBOX.<id>``). Revoking deletes the identity's file and
drops its key from the server's authorization block; a running server applies it on reload (``bus.server``).
Nothing here sends anything.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import nkeys
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.auth import ClientSecurity, format_creds, read_creds
from bus.errors import ConfigError
from bus.schemas import validate_id
from bus.server import NatsServer, start_cluster
from bus.serverconf import ServerTLS
from bus.subjects import DEFAULT_PREFIX, Subjects
from bus.topology import LeafSpec, Topology
from privacy.permissions import UserEntry, check_role, permissions_for, render_authorization

REGISTRY_FILE = "identities.json"
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
DEFAULT_CREDS_DIR = Path(".cache") / "creds"
DEFAULT_TLS_HOSTS = ("127.0.0.1", "::1", "localhost")
DEFAULT_CA_DAYS = 3650  # validity of the federation's CA certificate
DEFAULT_CERT_DAYS = 825  # validity of the server certificate
# what `python -m ops.server --creds-dir DIR` issues: the demo's agents, one user client and a monitor
DEFAULT_IDENTITIES: tuple[tuple[str, str, str | None], ...] = (
    ("client", "client", None),
    ("monitor", "monitor", None),
    ("receiver", "receiver", None),
    ("rephraser", "rephraser", "receiver"),
    ("gate", "gate", None),
    ("transmitter", "t1", None),
    ("transmitter", "t2", None),
    ("transmitter", "t3", None),
    ("transmitter", "t4", None),
)


class Identity(BaseModel):
    """One identity of the federation (public facts only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    id: str
    public_key: str
    serves: str | None = None  # a rephraser's receiver, a leaf node's transmitter ("*": every one)
    revoked: bool = False
    issued_unix: float = Field(default_factory=time.time)


class Registry(BaseModel):
    """``identities.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    prefix: str = DEFAULT_PREFIX
    identities: tuple[Identity, ...] = ()


def new_user_key() -> tuple[str, str]:
    """A fresh user nkey: (seed, public key)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def _write_secret(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


class CredentialStore:
    """The credentials directory of one federation (one subject prefix)."""

    def __init__(self, root: str | Path, prefix: str = DEFAULT_PREFIX) -> None:
        self.root = Path(root)
        Subjects(prefix)
        self.prefix = prefix
        self._registry = Registry(prefix=prefix)
        path = self.root / REGISTRY_FILE
        if path.is_file():
            try:
                self._registry = Registry.model_validate_json(path.read_text())
            except (ValidationError, OSError) as exc:
                raise ConfigError(f"{path} is not a FedRefine identity registry: {exc}", path=str(path)) from exc
            if self._registry.prefix != prefix:
                raise ConfigError(
                    f"the credentials in {self.root} are for prefix {self._registry.prefix!r}, not {prefix!r}",
                    path=str(self.root),
                )

    @classmethod
    def open(cls, root: str | Path) -> CredentialStore:
        """An existing directory, with the prefix it was made for."""
        path = Path(root) / REGISTRY_FILE
        if not path.is_file():
            raise ConfigError(f"no credentials in {root} (create them with python -m ops.server --creds-dir {root})")
        try:
            prefix = json.loads(path.read_text()).get("prefix", DEFAULT_PREFIX)
        except (ValueError, OSError, AttributeError) as exc:
            raise ConfigError(f"{path} is not a FedRefine identity registry: {exc}", path=str(path)) from exc
        return cls(root, prefix)

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.root)!r}, prefix={self.prefix!r}, identities={len(self.active())})"

    # ---- identities ---------------------------------------------------------------------------------------------

    @property
    def identities(self) -> tuple[Identity, ...]:
        """Every identity ever issued, revoked ones included."""
        return self._registry.identities

    def active(self) -> list[Identity]:
        """Identities the server admits."""
        return [i for i in self._registry.identities if not i.revoked]

    def get(self, agent_id: str) -> Identity | None:
        """The identity with this id (revoked or not), or None."""
        return next((i for i in self._registry.identities if i.id == agent_id), None)

    def creds_path(self, agent_id: str) -> Path:
        """Where that identity's credentials file is."""
        return self.root / f"{validate_id(agent_id, 'identity id')}.creds"

    def ensure(self, identities: Iterable[tuple[str, str, str | None]] = DEFAULT_IDENTITIES) -> list[Path]:
        """Issue each (role, id, serves) that does not exist yet, and the TLS files if missing; their creds paths."""
        self.ensure_tls()
        paths = []
        for role, agent_id, serves in identities:
            current = self.get(agent_id)
            if current is None or current.revoked:
                paths.append(self.issue(role, agent_id, serves))
            elif current.role != role:
                raise ConfigError(f"identity {agent_id} exists as a {current.role}, not a {role}", id=agent_id)
            else:
                paths.append(self.creds_path(agent_id))
        return paths

    def issue(self, role: str, agent_id: str, serves: str | None = None) -> Path:
        """A new identity (or a fresh key for a revoked one); returns its credentials file."""
        check_role(role)
        validate_id(agent_id, "identity id")
        if role in ("rephraser", "leaf") and serves is None:
            serves = "*"
        permissions_for(role, agent_id, self.prefix, serves)  # validates everything
        current = self.get(agent_id)
        if current is not None and not current.revoked:
            raise ConfigError(f"identity {agent_id} already exists ({current.role}); revoke it first", id=agent_id)
        seed, public = new_user_key()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        path = self.creds_path(agent_id)
        _write_secret(path, format_creds(role, agent_id, self.prefix, public, seed).encode())
        identity = Identity(role=role, id=agent_id, public_key=public, serves=serves)
        others = tuple(i for i in self._registry.identities if i.id != agent_id)
        self._save(self._registry.model_copy(update={"identities": (*others, identity)}))
        return path

    def revoke(self, agent_id: str) -> Identity:
        """Stop admitting an identity and delete its credentials file (the server applies it on reload)."""
        current = self.get(agent_id)
        if current is None or current.revoked:
            raise ConfigError(f"no active identity {agent_id} in {self.root}", id=agent_id)
        revoked = current.model_copy(update={"revoked": True})
        identities = tuple(revoked if i.id == agent_id else i for i in self._registry.identities)
        self._save(self._registry.model_copy(update={"identities": identities}))
        self.creds_path(agent_id).unlink(missing_ok=True)
        return revoked

    def _save(self, registry: Registry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / REGISTRY_FILE
        tmp = path.with_name(REGISTRY_FILE + ".tmp")
        tmp.write_text(registry.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        self._registry = registry

    # ---- what the server and the clients need -------------------------------------------------------------------

    def users(self) -> list[UserEntry]:
        """Every active identity's public key and permissions."""
        return [
            UserEntry(public_key=i.public_key, permissions=permissions_for(i.role, i.id, self.prefix, i.serves))
            for i in self.active()
        ]

    def authorization(self) -> str:
        """The server's authorization block (``privacy.permissions.render_authorization``)."""
        return render_authorization(self.users())

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the server with."""
        return self.root / CA_CERT

    def server_tls(self) -> ServerTLS:
        """The server's certificate and key (and the CA, which a cluster's routes verify each other with)."""
        return ServerTLS(self.root / SERVER_CERT, self.root / SERVER_KEY, self.ca_file)

    def client_security(self, agent_id: str) -> ClientSecurity:
        """How identity ``agent_id`` connects: its credentials file and the CA."""
        path = self.creds_path(agent_id)
        if not path.is_file():
            raise ConfigError(f"no credentials file for {agent_id} in {self.root}", id=agent_id)
        return ClientSecurity(creds=path, tls_ca=self.ca_file)

    def server(self, port: int | None = None, **options: object) -> NatsServer:
        """A (not yet started) server that admits exactly the active identities, over TLS only."""
        self.ensure_tls()
        return NatsServer(port, authorization=self.authorization(), tls=self.server_tls(), **options)  # type: ignore[arg-type]

    def cluster(self, size: int, **options: object) -> list[NatsServer]:
        """``size`` started servers in one cluster, each admitting exactly the active identities over TLS."""
        self.ensure_tls()
        return start_cluster(size, authorization=self.authorization(), tls=self.server_tls(), **options)

    def topology(
        self, size: int, leaves: Iterable[tuple[str, int]] = (), conf_dir: str | Path | None = None, **options: object
    ) -> Topology:
        """A (not yet started) cluster of ``size`` members and leaf nodes ``(leaf id, preferred member)``, each leaf
        logging in to the cluster with that leaf identity's key; configuration files in ``conf_dir``
        (default ``DIR/servers``)."""
        self.ensure_tls()
        specs = []
        for leaf_id, prefer in leaves:
            identity = self.get(leaf_id)
            if identity is None or identity.revoked or identity.role != "leaf":
                raise ConfigError(f"no active leaf identity {leaf_id} in {self.root} (ops.creds issue leaf ID)")
            specs.append(LeafSpec(leaf_id, read_creds(self.creds_path(leaf_id)).seed, prefer))
        where = Path(conf_dir) if conf_dir is not None else self.root / "servers"
        return Topology(
            size,
            specs,
            conf_dir=where,
            authorization=self.authorization(),
            tls=self.server_tls(),
            **options,  # type: ignore[arg-type]
        )

    def ensure_tls(self, hosts: Iterable[str] = DEFAULT_TLS_HOSTS) -> None:
        """Create the CA and the server certificate once."""
        if all((self.root / name).is_file() for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        write_tls(self.root, tuple(hosts))

    def copy_tls_from(self, other: CredentialStore) -> None:
        """Use another store's CA and server certificate (tests: one certificate for many throwaway federations)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
            _write_secret(self.root / name, (other.root / name).read_bytes())


def write_tls(root: Path, hosts: tuple[str, ...] = DEFAULT_TLS_HOSTS) -> None:
    """A self-signed CA (EC P-256) and a server certificate for ``hosts`` signed by it, as PEM files in ``root``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedRefine federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=DEFAULT_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedRefine NATS server")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=DEFAULT_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # clientAuth too: in a cluster each server dials the others with this certificate
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write_secret(root / CA_KEY, ca_key.private_bytes(pem, private, none))
    _write_secret(root / SERVER_KEY, key.private_bytes(pem, private, none))
    (root / CA_CERT).write_bytes(ca_cert.public_bytes(pem))
    (root / SERVER_CERT).write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
