"""Who may say what on the bus: the one permission table, and the nats-server authorization block made from it.

Every identity has a role and an id; its permissions are the role's row with ``{P}`` replaced by the subject prefix,
``{id}`` by its own id and ``{serves}`` by the receiver a rephraser serves (``*``: every receiver). Subjects that
name a sender (offers, plans, KV, presence, queries, answers) carry that identity's own id, so the server itself
pins who published them; agents then check that the ids inside a message equal the ids in its subject.

=============  ======================================================  ==========================================
role           publish                                                 subscribe
=============  ======================================================  ==========================================
client         ``P.ask``                                               ``_INBOX.{id}.>``, ``P.answer.*.*``
receiver       ``P.query.{id}``, ``P.rephrase.{id}``,                  ``P.ask``, ``P.offer.*.*``, ``P.plan.*.*``,
               ``P.answer.{id}.*``, ``P.presence.receiver.{id}``;      ``P.kv.{id}.*.*``, ``P.presence.*.*``,
               replies to requests it received                         ``_INBOX.{id}.>``
rephraser      ``P.presence.rephraser.{id}``; replies                  ``P.rephrase.{serves}``
gate           ``P.plan.*.{id}``, ``P.presence.gate.{id}``             ``P.query.*``, ``P.offer.*.*``,
                                                                       ``P.presence.*.*``
transmitter    ``P.offer.*.{id}``, ``P.kv.*.*.{id}``,                  ``P.query.*``, ``P.plan.*.*``
               ``P.presence.transmitter.{id}``
monitor        (nothing)                                               ``P.presence.*.*``, ``P.answer.*.*``
admin          ``>``                                                   ``>``
=============  ======================================================  ==========================================

``client``, ``receiver``, ``rephraser`` and ``admin`` are the **receiver side**: only they ever see ``P.ask``,
``P.rephrase.*`` or a receiver-side inbox. ``admin`` is an operator's identity (and the test harness's): it may do
anything and must never be given to a device. Replies (``allow_responses``) go only to the inbox of the request's
sender, once. Nothing here sends anything; ``privacy.credentials`` writes the keys and ``bus.server`` runs the
server with the block.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from bus.auth import INBOX_ROOT
from bus.errors import ConfigError
from bus.schemas import validate_id
from bus.subjects import Subjects

ROLES = ("client", "receiver", "rephraser", "gate", "transmitter", "monitor", "admin")
RECEIVER_SIDE = frozenset({"client", "receiver", "rephraser", "admin"})  # may see raw questions and private answers
AGENT_ROLES = ("receiver", "rephraser", "gate", "transmitter")  # the roles that run as agents (bus.schemas.ROLES)
INBOX = INBOX_ROOT + ".{id}.>"


class RoleRow(BaseModel):
    """One row of the table: subject templates (``{P}`` prefix, ``{id}`` own id, ``{serves}`` served receiver)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False  # may reply to the requests it receives (NATS allow_responses, one reply each)


TABLE: dict[str, RoleRow] = {
    "client": RoleRow(publish=("{P}.ask",), subscribe=(INBOX, "{P}.answer.*.*")),
    "receiver": RoleRow(
        publish=("{P}.query.{id}", "{P}.rephrase.{id}", "{P}.answer.{id}.*", "{P}.presence.receiver.{id}"),
        subscribe=("{P}.ask", "{P}.offer.*.*", "{P}.plan.*.*", "{P}.kv.{id}.*.*", "{P}.presence.*.*", INBOX),
        responses=True,
    ),
    "rephraser": RoleRow(
        publish=("{P}.presence.rephraser.{id}",), subscribe=("{P}.rephrase.{serves}",), responses=True
    ),
    "gate": RoleRow(
        publish=("{P}.plan.*.{id}", "{P}.presence.gate.{id}"),
        subscribe=("{P}.query.*", "{P}.offer.*.*", "{P}.presence.*.*"),
    ),
    "transmitter": RoleRow(
        publish=("{P}.offer.*.{id}", "{P}.kv.*.*.{id}", "{P}.presence.transmitter.{id}"),
        subscribe=("{P}.query.*", "{P}.plan.*.*"),
    ),
    "monitor": RoleRow(subscribe=("{P}.presence.*.*", "{P}.answer.*.*")),
    "admin": RoleRow(publish=(">",), subscribe=(">",), responses=True),
}


class Permissions(BaseModel):
    """The concrete subjects one identity may publish and subscribe to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False

    def config_value(self) -> dict:
        """As nats-server wants it (allow lists: everything else is denied)."""
        out: dict = {
            "publish": {"allow": list(self.publish)} if self.publish else {"deny": [">"]},
            "subscribe": {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]},
        }
        if self.responses:
            out["allow_responses"] = {"max": 1}
        return out


class UserEntry(BaseModel):
    """One admitted public key and what it may do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: str = Field(pattern=r"^U[A-Z2-7]{55}$")
    permissions: Permissions


def check_role(role: str) -> str:
    """``role`` if it is in the table, else :class:`ConfigError`."""
    if role not in TABLE:
        raise ConfigError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", value=role)
    return role


def permissions_for(role: str, agent_id: str, prefix: str, serves: str | None = None) -> Permissions:
    """The table's row for ``role`` made concrete for one identity."""
    row = TABLE[check_role(role)]
    validate_id(agent_id, "identity id")
    Subjects(prefix)  # validates the prefix
    if serves is not None and serves != "*":
        validate_id(serves, "receiver id")

    def fill(template: str) -> str:
        return template.replace("{P}", prefix).replace("{id}", agent_id).replace("{serves}", serves or "*")

    return Permissions(
        publish=tuple(fill(t) for t in row.publish),
        subscribe=tuple(fill(t) for t in row.subscribe),
        responses=row.responses,
    )


def render_authorization(users: Iterable[UserEntry]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server configuration (JSON values are valid there)."""
    entries = []
    for user in users:
        value = {"nkey": user.public_key, "permissions": user.permissions.config_value()}
        entries.append("    " + json.dumps(value))
    if not entries:
        raise ConfigError("no identity is admitted: the server would refuse every client")
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}"


def table_markdown(prefix: str = "fr") -> str:
    """The table as markdown rows (docs/PROTOCOL.md carries it; a test checks they agree)."""
    rows = ["| role | publish | subscribe | replies |", "|---|---|---|---|"]
    for role in ROLES:
        row = TABLE[role]

        def cell(templates: tuple[str, ...]) -> str:
            subjects = [t.replace("{P}", prefix) for t in templates]
            return ", ".join(f"`{s}`" for s in subjects) or "(nothing)"

        rows.append(f"| {role} | {cell(row.publish)} | {cell(row.subscribe)} | {'yes' if row.responses else 'no'} |")
    return "\n".join(rows)
