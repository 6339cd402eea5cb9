"""The types the agent and the control plane exchange: one place, versioned.

Bump WIRE_VERSION when a change is not backwards compatible; the control plane refuses
agents that speak another major version with a clear message instead of misreading them.
"""

from __future__ import annotations

import datetime as dt
import socket
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vpnfleet.core import netparse

WIRE_VERSION = 1

_strict = ConfigDict(extra="forbid")


class RegisterRequest(BaseModel):
    """An agent announcing itself at start."""

    model_config = _strict
    wire_version: int = WIRE_VERSION
    name: str
    template: str = "default"
    public_endpoint: str | None = None
    pod_ip: str | None = None

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


class UserState(BaseModel):
    """A user as agents see it (no secrets)."""

    id: int
    name: str
    enabled: bool
    mode: str
    max_sessions: int
    groups: list[str] = Field(default_factory=list)
    gateway_address: str | None = None
    cert_serial: str | None = None


class GroupState(BaseModel):
    id: int
    name: str


class RuleState(BaseModel):
    id: int
    group_id: int
    destination: str
    proto: str
    ports: str | None


class PoolState(BaseModel):
    id: int
    name: str
    kind: str
    cidr: str


class PodState(BaseModel):
    """A registered pod (gateway routes point at its IP)."""

    id: int
    name: str
    pod_ip: str | None = None


class LiveSession(BaseModel):
    """An open session anywhere in the fleet (for fleet-wide session limits and routes)."""

    uid: str
    user: str
    pod: str
    tunnel_ip: str
    mode: str
    real_ip: str | None = None


class Snapshot(BaseModel):
    """The complete state an agent decides from, consistent at `revision`."""

    revision: int
    users: list[UserState]
    groups: list[GroupState]
    rules: list[RuleState]
    pools: list[PoolState]
    sessions: list[LiveSession]
    pods: list[PodState] = Field(default_factory=list)


class SessionOpen(BaseModel):
    """A client finished connecting on a pod. `uid` makes delivery idempotent."""

    model_config = _strict
    uid: str = Field(min_length=8, max_length=64)
    user: str
    pod: str
    mode: str
    tunnel_ip: str
    real_ip: str | None = None
    real_port: int | None = Field(default=None, ge=0, le=65535)
    client_id: int | None = None
    started_at: dt.datetime


class SessionClose(BaseModel):
    """A client went away. Delivered after its SessionOpen (the spool keeps order)."""

    model_config = _strict
    uid: str = Field(min_length=8, max_length=64)
    ended_at: dt.datetime
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)
    reason: str | None = Field(default=None, max_length=200)


class SessionVerdict(BaseModel):
    """The control plane's answer to SessionOpen: may the session stay?"""

    uid: str
    session_id: int
    allowed: bool
    reason: str | None = None


class SessionReport(BaseModel):
    """The pod's whole list of live sessions: the control plane closes any it does not name."""

    model_config = _strict
    pod: str
    live: list[str]


class Heartbeat(BaseModel):
    model_config = _strict
    name: str
    applied_revision: int = Field(ge=0)
    ready: bool
    status: dict[str, object] = Field(default_factory=dict)


class DeniedRecord(BaseModel):
    """Denied attempts of one source to one destination within one window."""

    model_config = _strict
    event: str = "denied"
    user: str | None = None
    session_uid: str | None = None
    src: str
    dst: str | None = None
    proto: str = Field(max_length=8)
    dport: int | None = Field(default=None, ge=0, le=65535)
    first_at: dt.datetime
    last_at: dt.datetime
    count: int = Field(ge=1)


class DeniedBatch(BaseModel):
    model_config = _strict
    pod: str
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


class FlowReport(BaseModel):
    """One NAT'd connection as an agent reports it: the JSON of the agent's own record,
    core.flows.FlowRecord.as_dict() (this model is its wire twin, hence the other name).

    `kind="start"` when the flow opens (no end, no counters); `kind="end"` when it closes, and
    complete on its own (a flow whose start was lost gets only this one). Both carry the same
    `flow_id`, which makes redelivery harmless. `pod`, when given, must match the batch's.
    """

    model_config = _strict
    # Agents spool and send the line they print ("event": "flow" marks it for log pipelines).
    event: Literal["flow"] | None = None
    kind: Literal["start", "end"]
    flow_id: str = Field(min_length=1, max_length=128)
    pod: str | None = None
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
    packets_out: int | None = Field(default=None, ge=0)
    bytes_out: int | None = Field(default=None, ge=0)
    packets_in: int | None = Field(default=None, ge=0)
    bytes_in: int | None = Field(default=None, ge=0)
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
    pod: str
    records: list[FlowReport] = Field(max_length=5000)

    @model_validator(mode="after")
    def _one_pod(self) -> FlowBatch:
        for i, r in enumerate(self.records):
            if r.pod is not None and r.pod != self.pod:
                raise ValueError(f"records[{i}] is from pod {r.pod!r}, the batch from {self.pod!r}")
        return self
