"""The types the agent and the control plane exchange: one place, versioned.

Bump WIRE_VERSION when a change is not backwards compatible; the control plane refuses
agents that speak another major version with a clear message instead of misreading them.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vpnfleet.core import netparse
from vpnfleet.core.authpolicy import AuthPolicy

WIRE_VERSION = 3  # 3: UserState.auth

# --- bounds every API input shares ----------------------------------------------------------------
#
# Both databases store integers as signed 64-bit and refuse (PostgreSQL) or fail on (SQLite)
# text with NUL characters or lone UTF-16 surrogates: such input is refused at the schema,
# naming the field, instead of failing at the database as an HTTP 500. A plain `Integer`
# column is 32-bit on PostgreSQL (row ids, denied counts, client ids): MAX_INT32 bounds those.

MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
Count = Annotated[int, Field(ge=0, le=MAX_INT64)]


def _unstorable(value: object, path: str) -> str | None:
    """The path of the first text in ``value`` a database cannot store, if any."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path}: NUL characters are not allowed"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: text is not valid Unicode (a lone surrogate)"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _unstorable(k, path) or _unstorable(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unstorable(v, f"{path}[{i}]")
            if found:
                return found
    return None


class Storable(BaseModel):
    """Base of the models the API reads: text a database cannot store is refused by name."""

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: object) -> object:
        if isinstance(data, dict):
            found = _unstorable(data, "")
            if found:
                raise ValueError(found)
        return data


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("needs a time zone (e.g. 2026-01-31T12:00:00Z)")
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


# An aware time, normalized to UTC; one that leaves the calendar in UTC is refused.
UtcTime = Annotated[dt.datetime, AfterValidator(_utc)]
# A pod's name, as registered (what a pod reports about itself must name a pod).
PodName = Annotated[str, AfterValidator(lambda v: netparse.validate_name(v, "pod name"))]

_strict = ConfigDict(extra="forbid")


# Server certificates are issued for `SERVER_CN_PREFIX + pod name`, and every client profile
# says `verify-x509-name server. name-prefix`: a certificate the fleet CA signed for anything
# else (a user, the control plane's HTTPS name) is refused by stock clients.
SERVER_CN_PREFIX = "server."
MAX_POD_NAME = 64 - len(SERVER_CN_PREFIX)  # a certificate CN holds at most 64 characters


class EnrollRequest(Storable):
    """A pod asking, with the enrollment token, for a credential of its own."""

    model_config = _strict
    wire_version: int = Field(default=WIRE_VERSION, ge=0, le=MAX_INT64)
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        netparse.validate_name(v, "pod name")
        if len(v) > MAX_POD_NAME:
            raise ValueError(f"pod name {v!r} is longer than {MAX_POD_NAME} characters")
        return v


class Enrollment(BaseModel):
    """The pod's own credential: shown once; it acts as this pod and no other."""

    name: str
    token: str


class RegisterRequest(Storable):
    """An agent announcing itself at start."""

    model_config = _strict
    wire_version: int = Field(default=WIRE_VERSION, ge=0, le=MAX_INT64)
    name: str
    template: str = "default"
    public_endpoint: str | None = Field(default=None, max_length=300)
    pod_ip: str | None = Field(default=None, max_length=15)

    @field_validator("name", "template")
    @classmethod
    def _name(cls, v: str) -> str:
        return netparse.validate_name(v, "pod name")


class Bootstrap(BaseModel):
    """What an agent needs to run OpenVPN: its own key pair, the CA, CRL, pools."""

    pod_id: int
    name: str
    ca_pem: str
    cert_pem: str
    key_pem: str
    crl_pem: str
    tls_crypt_key: str
    nat_pool: str
    gateway_pool: str | None
    revision: int
    # OpenVPN's auth-gen-token: the fleet's shared secret and the token lifetime, the longest
    # a single sign-on login lasts across reconnects (docs/sso.md). Absent from a control
    # plane older than single sign-on: the pod then hands out no tokens.
    auth_token_key: str | None = None
    sso_session_seconds: int | None = Field(default=None, ge=300, le=30 * 86400)


# --- the fleet state agents replicate ---------------------------------------------------------
#
# One shape per object, built once on the control plane (controlplane/fleetstate.py) and read
# once by the agent (core/fleet.py). Every field is required: None is written out where "none"
# is the value (no gateway address, no current certificate), never assumed for a missing field,
# and types are checked strictly ("yes" is not True, "1" is not 1). A reader that filled gaps
# with its own defaults is how a port-limited grant once silently became all ports.

PoolKind = Literal["nat", "gateway"]

_state = ConfigDict(extra="forbid", strict=True, frozen=True)


class UserState(BaseModel):
    """A user as agents see it (no secrets)."""

    model_config = _state
    id: int
    name: str
    enabled: bool
    mode: netparse.Mode
    max_sessions: int = Field(ge=1)
    groups: list[str]  # group names, sorted
    gateway_address: str | None  # the stable lease of a gateway user
    cert_serial: str | None  # the user's main certificate (profiles from operators)
    auth: AuthPolicy  # what a connection must present (core/authpolicy.py: already resolved)
    # The certificates of the user's own devices (self-service), sorted. Left out of the
    # message when there are none, so agents from before devices read every other user as
    # before (docs/console.md: upgrade the agents before users add devices).
    device_serials: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)


class GroupState(BaseModel):
    model_config = _state
    id: int
    name: str


class MembershipState(BaseModel):
    """A user's membership of a group; it is its own key."""

    model_config = _state
    group_id: int
    group: str
    user_id: int
    user: str


class RuleState(BaseModel):
    """A grant: members of group `group_id` may reach `destination` over `proto` on `ports`
    (None: every port)."""

    model_config = _state
    id: int
    group_id: int
    destination: str
    proto: netparse.Protocol
    ports: str | None


class PoolState(BaseModel):
    model_config = _state
    id: int
    name: str
    kind: PoolKind
    cidr: str


class PodState(BaseModel):
    """A registered pod (gateway routes point at its IP)."""

    model_config = _state
    id: int
    name: str
    pod_ip: str | None


class LiveSession(BaseModel):
    """An open session anywhere in the fleet (for fleet-wide session limits and routes).

    `kill` says why the control plane asks this session to end (an administrator's kill, the
    same device reconnecting); None while it may stay. It is state, not an event, so a pod that
    was away when the kill was asked for still learns it from its next snapshot. A killed
    session stays live until its pod closes it, and no longer counts toward session limits.
    """

    model_config = _state
    uid: str
    user: str
    pod: str
    tunnel_ip: str
    mode: netparse.Mode
    real_ip: str | None
    kill: str | None


class CrlUpdate(BaseModel):
    """Certificates this change revoked: agents fetch the new CRL."""

    model_config = _state
    revoked: list[str]  # serials


class PkiState(BaseModel):
    """The CA agents trust."""

    model_config = _state
    ca_fingerprint_sha256: str


class UserKey(BaseModel):
    model_config = _state
    id: int
    name: str


class GroupKey(BaseModel):
    model_config = _state
    id: int
    name: str


class RuleKey(BaseModel):
    model_config = _state
    id: int
    group_id: int


class SessionKey(BaseModel):
    model_config = _state
    uid: str


class Snapshot(BaseModel):
    """The complete state an agent decides from, consistent at `revision`."""

    model_config = _state
    revision: int
    users: list[UserState]
    groups: list[GroupState]
    rules: list[RuleState]
    pools: list[PoolState]
    sessions: list[LiveSession]
    pods: list[PodState]


# --- the watch stream -----------------------------------------------------------------------------
#
# `GET /api/v1/watch` sends one JSON object per line: a change event, a resync or a heartbeat.
# A change event names its object kind and op; an upsert carries the whole object (`object`), a
# delete its key (`key`). Every message has the revision it belongs to. The `type`/`kind`/`op`
# tags have defaults only so that code can build events tersely; a message parsed from the
# wire must carry them (the discriminated union below needs the tag to pick a model).

# `at` is the one field read leniently: JSON has no datetime, so it arrives as ISO 8601 text.
_At = Annotated[AwareDatetime, Field(strict=False)]


class _Change(BaseModel):
    model_config = _state
    type: Literal["change"] = "change"
    revision: int = Field(ge=1)
    at: _At


class UserUpsert(_Change):
    kind: Literal["user"] = "user"
    op: Literal["upsert"] = "upsert"
    object: UserState


class UserDelete(_Change):
    kind: Literal["user"] = "user"
    op: Literal["delete"] = "delete"
    key: UserKey


class GroupUpsert(_Change):
    kind: Literal["group"] = "group"
    op: Literal["upsert"] = "upsert"
    object: GroupState


class GroupDelete(_Change):
    """Its rules and memberships went with it (the members' user upserts follow)."""

    kind: Literal["group"] = "group"
    op: Literal["delete"] = "delete"
    key: GroupKey


class MembershipUpsert(_Change):
    kind: Literal["membership"] = "membership"
    op: Literal["upsert"] = "upsert"
    object: MembershipState


class MembershipDelete(_Change):
    kind: Literal["membership"] = "membership"
    op: Literal["delete"] = "delete"
    key: MembershipState


class RuleUpsert(_Change):
    kind: Literal["rule"] = "rule"
    op: Literal["upsert"] = "upsert"
    object: RuleState


class RuleDelete(_Change):
    kind: Literal["rule"] = "rule"
    op: Literal["delete"] = "delete"
    key: RuleKey


class PoolUpsert(_Change):
    """Pools are never deleted, so `pool` has no delete op."""

    kind: Literal["pool"] = "pool"
    op: Literal["upsert"] = "upsert"
    object: PoolState


class PodUpsert(_Change):
    """Pods are never deleted (a silent pod is forgotten, see POD_FORGET_AFTER)."""

    kind: Literal["pod"] = "pod"
    op: Literal["upsert"] = "upsert"
    object: PodState


class SessionUpsert(_Change):
    """A session opened, or was marked to end (`object.kill`)."""

    kind: Literal["session"] = "session"
    op: Literal["upsert"] = "upsert"
    object: LiveSession


class SessionDelete(_Change):
    """A session ended (its pod closed it, or the pod no longer has it)."""

    kind: Literal["session"] = "session"
    op: Literal["delete"] = "delete"
    key: SessionKey


class CrlUpsert(_Change):
    kind: Literal["crl"] = "crl"
    op: Literal["upsert"] = "upsert"
    object: CrlUpdate


class PkiUpsert(_Change):
    kind: Literal["pki"] = "pki"
    op: Literal["upsert"] = "upsert"
    object: PkiState


UserEvent = Annotated[UserUpsert | UserDelete, Field(discriminator="op")]
GroupEvent = Annotated[GroupUpsert | GroupDelete, Field(discriminator="op")]
MembershipEvent = Annotated[MembershipUpsert | MembershipDelete, Field(discriminator="op")]
RuleEvent = Annotated[RuleUpsert | RuleDelete, Field(discriminator="op")]
SessionEvent = Annotated[SessionUpsert | SessionDelete, Field(discriminator="op")]

ChangeEvent = Annotated[
    UserEvent
    | GroupEvent
    | MembershipEvent
    | RuleEvent
    | PoolUpsert
    | PodUpsert
    | SessionEvent
    | CrlUpsert
    | PkiUpsert,
    Field(discriminator="kind"),
]


class WatchResync(BaseModel):
    """The stream cannot continue from where the client is: fetch a snapshot and resume from
    its revision (too far behind, ahead of the log, or a change this side cannot read)."""

    model_config = _state
    type: Literal["resync"] = "resync"
    revision: int = Field(ge=0)


class WatchHeartbeat(BaseModel):
    """Nothing changed for a while; the log is at `revision`."""

    model_config = _state
    type: Literal["heartbeat"] = "heartbeat"
    revision: int = Field(ge=0)


WatchMessage = Annotated[ChangeEvent | WatchResync | WatchHeartbeat, Field(discriminator="type")]

_WATCH_MESSAGE: TypeAdapter[WatchMessage] = TypeAdapter(WatchMessage)
_CHANGE_EVENT: TypeAdapter[ChangeEvent] = TypeAdapter(ChangeEvent)


def _problem(exc: ValidationError, what: str) -> ValueError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ValueError(f"malformed {what}: {where + ': ' if where else ''}{first['msg']}{more}")


def parse_watch_message(obj: object) -> WatchMessage:
    """The one reader of the watch stream: a decoded JSON object (or its text) in, a typed
    message out. Anything malformed or unknown (missing or extra field, wrong type, unknown
    type, kind or op) raises ValueError: a follower that skipped it would silently diverge."""
    try:
        if isinstance(obj, str | bytes):
            return _WATCH_MESSAGE.validate_json(obj)
        return _WATCH_MESSAGE.validate_python(obj)
    except ValidationError as exc:
        raise _problem(exc, "watch message") from None


def parse_change_event(obj: object) -> ChangeEvent:
    """Like parse_watch_message, for a change event only (the control plane's change log)."""
    try:
        return _CHANGE_EVENT.validate_python(obj)
    except ValidationError as exc:
        raise _problem(exc, "change event") from None


class SessionOpen(Storable):
    """A client finished connecting on a pod. `uid` makes delivery idempotent."""

    model_config = _strict
    uid: str = Field(min_length=8, max_length=64)
    user: str = Field(max_length=64)
    pod: PodName
    mode: netparse.Mode
    tunnel_ip: str = Field(max_length=15)
    real_ip: str | None = Field(default=None, max_length=45)
    real_port: int | None = Field(default=None, ge=0, le=65535)
    client_id: Annotated[int, Field(ge=0, le=MAX_INT32)] | None = None  # OpenVPN's CID
    started_at: UtcTime


class SessionClose(Storable):
    """A client went away. Delivered after its SessionOpen (the spool keeps order)."""

    model_config = _strict
    uid: str = Field(min_length=8, max_length=64)
    ended_at: UtcTime
    bytes_in: Count = 0
    bytes_out: Count = 0
    reason: str | None = Field(default=None, max_length=200)


class SessionVerdict(BaseModel):
    """The control plane's answer to SessionOpen: may the session stay?"""

    uid: str
    session_id: int
    allowed: bool
    reason: str | None = None


# A batch of session records: what the agent's spool holds, in its order. The control plane
# takes at most MAX_SESSION_BATCH records per request (one transaction); the agent sends at
# most agent/sessionship.BATCH. The largest record is about 1.5 KB of JSON (a 200-character
# close reason, escaped), so a full batch stays under the default 1 MiB body limit.
MAX_SESSION_BATCH = 500


class OpenRecord(BaseModel):
    model_config = _strict
    kind: Literal["open"]
    body: SessionOpen


class CloseRecord(BaseModel):
    model_config = _strict
    kind: Literal["close"]
    body: SessionClose


SessionRecord = Annotated[OpenRecord | CloseRecord, Field(discriminator="kind")]


class SessionBatch(BaseModel):  # each record checks its own text (Storable)
    """Session records of one pod, applied in this order in one transaction
    (``POST /api/v1/agent/sessions/batch``)."""

    model_config = _strict
    pod: PodName
    records: list[SessionRecord] = Field(min_length=1, max_length=MAX_SESSION_BATCH)

    @model_validator(mode="after")
    def _one_pod(self) -> SessionBatch:
        for i, rec in enumerate(self.records):
            if isinstance(rec, OpenRecord) and rec.body.pod != self.pod:
                raise ValueError(
                    f"records[{i}]: opens a session on pod {rec.body.pod!r}, "
                    f"the batch is pod {self.pod!r}'s"
                )
        return self


class SessionResult(BaseModel):
    """The outcome of one record of a batch, as its own endpoint would have answered it:
    ``status`` 200 with ``verdict`` (open) or ``closed`` (close), or the 4xx status and
    ``detail`` the record alone would have got (that record changed nothing)."""

    kind: Literal["open", "close"]
    uid: str
    status: int
    verdict: SessionVerdict | None = None
    closed: bool | None = None
    detail: str | None = None


class SessionBatchResult(BaseModel):
    results: list[SessionResult]


class SessionReport(Storable):
    """The pod's whole list of live sessions: the control plane closes any it does not name."""

    model_config = _strict
    pod: PodName
    live: list[Annotated[str, Field(max_length=64)]] = Field(max_length=100_000)


MAX_STATUS_BYTES = 16 * 1024


class Heartbeat(Storable):
    model_config = _strict
    name: PodName
    applied_revision: Count
    ready: bool
    status: dict[str, object] = Field(default_factory=dict)

    @field_validator("status")
    @classmethod
    def _bounded(cls, v: dict[str, object]) -> dict[str, object]:
        size = len(json.dumps(v, default=str))
        if size > MAX_STATUS_BYTES:
            raise ValueError(f"is {size} bytes of JSON, over the limit of {MAX_STATUS_BYTES}")
        return v


class DeniedRecord(Storable):
    """Denied attempts of one source to one destination within one window."""

    model_config = _strict
    event: str = Field(default="denied", max_length=32)
    user: str | None = Field(default=None, max_length=64)
    session_uid: str | None = Field(default=None, max_length=64)
    src: str = Field(max_length=15)
    dst: str | None = Field(default=None, max_length=15)
    proto: str = Field(max_length=8)
    dport: int | None = Field(default=None, ge=0, le=65535)
    first_at: UtcTime
    last_at: UtcTime
    count: int = Field(ge=1, le=MAX_INT32)


class DeniedBatch(BaseModel):  # each record checks its own text (Storable)
    model_config = _strict
    pod: PodName
    events: list[DeniedRecord] = Field(max_length=5000)


# Flow records: times are integer milliseconds since the Unix epoch (UTC), so no zone can be
# lost on the way; the latest accepted is 2100-01-01, which catches seconds sent as ms * 1000.
# Fleet conventions the control plane's metrics and `vpnfleet status` must agree on.
# A pod silent for longer was replaced (a Deployment names pods anew on every rollout, so the
# pods table only grows): it leaves per-pod series, pod counts and the status screen.
POD_FORGET_AFTER = dt.timedelta(hours=1)
# Certificates (the CA included) closer than this to their notAfter are reported.
CERT_EXPIRY_WARNING = dt.timedelta(days=30)

MAX_EPOCH_MS = 4_102_444_800_000


def _ipv4(value: str, what: str) -> str:
    # inet_aton/inet_ntoa, not ipaddress: a batch holds 15,000 addresses and this is ~10x
    # cheaper. The round trip also refuses the shorthand forms inet_aton takes ("10.1").
    try:
        if socket.inet_ntoa(socket.inet_aton(value)) == value:
            return value
    except (OSError, UnicodeError, ValueError):
        pass
    raise ValueError(f"{what} {value!r} is not an IPv4 address")


class FlowReport(Storable):
    """One NAT'd connection as an agent reports it: the JSON of the agent's own record,
    core.flowtracker.FlowRecord.as_dict() (this model is its wire twin, hence the other name).

    `kind="start"` when the flow opens (no end, no counters); `kind="end"` when it closes, and
    complete on its own (a flow whose start was lost gets only this one). Both carry the same
    `flow_id`, which makes redelivery harmless. `pod`, when given, must match the batch's.
    """

    model_config = _strict
    # Agents spool and send the line they print ("event": "flow" marks it for log pipelines).
    event: Literal["flow"] | None = None
    kind: Literal["start", "end"]
    flow_id: str = Field(min_length=1, max_length=128)
    pod: PodName | None = None
    user: str | None = Field(default=None, max_length=64)
    session_uid: str | None = Field(default=None, max_length=64)
    proto: str = Field(min_length=1, max_length=8)
    start_ms: int = Field(ge=0, le=MAX_EPOCH_MS)
    end_ms: int | None = Field(default=None, ge=0, le=MAX_EPOCH_MS)
    tunnel_ip: str
    tunnel_port: int = Field(ge=0, le=65535)
    nat_ip: str
    nat_port: int = Field(ge=0, le=65535)
    dst_ip: str | None = None
    dst_port: int | None = Field(default=None, ge=0, le=65535)
    packets_out: Count | None = None
    bytes_out: Count | None = None
    packets_in: Count | None = None
    bytes_in: Count | None = None
    end_inferred: bool = False

    @field_validator("tunnel_ip", "nat_ip", "dst_ip")
    @classmethod
    def _address(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _ipv4(v, str(info.field_name))

    @model_validator(mode="after")
    def _end_has_time(self) -> FlowReport:
        if self.kind == "end" and self.end_ms is None:
            raise ValueError("an end record needs end_ms")
        return self


class FlowBatch(BaseModel):
    """Flow records of one pod, in the order the pod saw them (up to 5,000 per request)."""

    model_config = _strict
    pod: PodName
    records: list[FlowReport] = Field(max_length=5000)

    @model_validator(mode="after")
    def _one_pod(self) -> FlowBatch:
        for i, r in enumerate(self.records):
            if r.pod is not None and r.pod != self.pod:
                raise ValueError(f"records[{i}] is from pod {r.pod!r}, the batch from {self.pod!r}")
        return self
