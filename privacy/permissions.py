"""Who may say what on the bus: the one permission table, and the nats-server authorization block made from it.

Every identity has a role and an id; its permissions are the role's row with ``{P}`` replaced by the subject prefix,
``{id}`` by its own id and ``{serves}`` by the receiver a rephraser serves or the transmitter a leaf node carries
(``*``: every one). Subjects that
name a sender (offers, plans, KV, presence, queries, answers) carry that identity's own id, so the server itself
pins who published them; agents then check that the ids inside a message equal the ids in its subject.

=============  ======================================================  ==========================================
role           publish                                                 subscribe
=============  ======================================================  ==========================================
client         ``P.ask``                                               ``_INBOX.{id}.>``, ``P.answer.*.*``
receiver       ``P.query.{id}``, ``P.rephrase.{id}``,                  ``P.ask``, ``P.offer.*.*``, ``P.plan.*.*``,
               ``P.answer.{id}.*``, ``P.presence.receiver.{id}``,      ``P.kv.{id}.*.*``, ``P.presence.*.*``,
               ``P.trace.receiver.{id}``; replies                      ``_INBOX.{id}.>``, service requests
rephraser      ``P.presence.rephraser.{id}``, ``P.trace...``; replies  ``P.rephrase.{serves}``, service requests
gate           ``P.plan.*.{id}``, ``P.presence.gate.{id}``,            ``P.query.*``, ``P.offer.*.*``,
               ``P.trace.gate.{id}``; replies                          ``P.presence.*.*``, service requests
transmitter    ``P.offer.*.{id}``, ``P.kv.*.*.{id}``,                  ``P.query.*``, ``P.plan.*.*``,
               ``P.presence.transmitter.{id}``, ``P.trace...``;        service requests
               replies
leaf           what its transmitter(s) ``{serves}`` publish, and       what transmitters read, and service
               service replies to monitors (``_INBOX_MONITOR.>``)      requests for them
monitor        ``$SRV.>``, ``P.status.*.*`` (service requests)         ``P.presence.*.*``, ``P.answer.*.*``,
                                                                       ``P.trace.*.*``, ``_INBOX_MONITOR.{id}.>``
admin          ``>``                                                   ``>``
=============  ======================================================  ==========================================

"Service requests" are ``$SRV.>`` (nats micro's PING, INFO and STATS, which every agent answers) and the agent's own
``P.status.<role>.{id}``; what the answers carry (counters, byte counts, latencies, ids) is in ``agents.service``,
never a question's text. A **leaf** identity is what a leaf node logs in to the cluster as (one per device): for a
leaf link, what that identity may publish is what the leaf may send into the cluster, and what it may subscribe to
is what the cluster sends out to it. A leaf carries transmitters only (``{serves}``: the transmitter id it carries,
``*`` any): nothing of the receiver side ever crosses a leaf link, and a device's leaf cannot speak for another
device's transmitter. Monitors' inboxes are ``_INBOX_MONITOR.<id>``, so service replies can cross a leaf link
(NATS does not carry ``allow_responses`` over one) without the leaf being able to reach any receiver-side inbox.

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

from bus.auth import INBOX_ROOT, MONITOR_INBOX_ROOT
from bus.errors import ConfigError
from bus.schemas import validate_id
from bus.subjects import Subjects

ROLES = ("client", "receiver", "rephraser", "gate", "transmitter", "leaf", "monitor", "admin")
RECEIVER_SIDE = frozenset({"client", "receiver", "rephraser", "admin"})  # may see raw questions and private answers
AGENT_ROLES = ("receiver", "rephraser", "gate", "transmitter")  # the roles that run as agents (bus.schemas.ROLES)
INBOX = INBOX_ROOT + ".{id}.>"
SERVICE = "$SRV.>"  # nats micro's PING / INFO / STATS requests (every agent is a service; monitors ask)


class RoleRow(BaseModel):
    """One row of the table: subject templates (``{P}`` prefix, ``{id}`` own id, ``{serves}`` served receiver or
    carried transmitter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False  # may reply to the requests it receives (NATS allow_responses, one reply each)


def _agent(role: str, publish: tuple[str, ...], subscribe: tuple[str, ...]) -> RoleRow:
    """An agent's row: its own subjects, plus its presence and trace subjects and its service endpoints."""
    own = f".{role}.{{id}}"
    return RoleRow(
        publish=(*publish, "{P}.presence" + own, "{P}.trace" + own),
        subscribe=(*subscribe, SERVICE, "{P}.status" + own),
        responses=True,
    )


TABLE: dict[str, RoleRow] = {
    "client": RoleRow(publish=("{P}.ask",), subscribe=(INBOX, "{P}.answer.*.*")),
    "receiver": _agent(
        "receiver",
        ("{P}.query.{id}", "{P}.rephrase.{id}", "{P}.answer.{id}.*"),
        ("{P}.ask", "{P}.offer.*.*", "{P}.plan.*.*", "{P}.kv.{id}.*.*", "{P}.presence.*.*", INBOX),
    ),
    "rephraser": _agent("rephraser", (), ("{P}.rephrase.{serves}",)),
    "gate": _agent("gate", ("{P}.plan.*.{id}",), ("{P}.query.*", "{P}.offer.*.*", "{P}.presence.*.*")),
    "transmitter": _agent("transmitter", ("{P}.offer.*.{id}", "{P}.kv.*.*.{id}"), ("{P}.query.*", "{P}.plan.*.*")),
    "leaf": RoleRow(
        publish=(
            "{P}.offer.*.{serves}",
            "{P}.kv.*.*.{serves}",
            "{P}.presence.transmitter.{serves}",
            "{P}.trace.transmitter.{serves}",
            MONITOR_INBOX_ROOT + ".>",
        ),
        subscribe=("{P}.query.*", "{P}.plan.*.*", SERVICE, "{P}.status.transmitter.{serves}"),
    ),
    "monitor": RoleRow(
        publish=(SERVICE, "{P}.status.*.*"),
        subscribe=("{P}.presence.*.*", "{P}.answer.*.*", "{P}.trace.*.*", MONITOR_INBOX_ROOT + ".{id}.>"),
    ),
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
