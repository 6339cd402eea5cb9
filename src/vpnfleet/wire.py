"""The types the agent and the control plane exchange: one place, versioned.

Bump WIRE_VERSION when a change is not backwards compatible; the control plane refuses
agents that speak another major version with a clear message instead of misreading them.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
