"""Request and response bodies of the admin API (the agent's live in vpnfleet.wire)."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vpnfleet.core import authpolicy, groupclaim, netparse
from vpnfleet.wire import Storable

_strict = ConfigDict(extra="forbid")
MAX_PORTS_TEXT = 1000  # the rules.ports column


class UserCreate(Storable):
    model_config = _strict
    name: str
    email: str | None = None
    mode: str = "nat"
    enabled: bool = True
    max_sessions: int = Field(default=1, ge=1, le=100)
    groups: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return netparse.validate_name(v, "user name")

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        return netparse.parse_mode(v)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        return _check_email(v)


def _check_email(v: str | None) -> str | None:
    if v is None or v == "":
        return None
    return netparse.validate_email(v)


class UserUpdate(Storable):
    model_config = _strict
    email: str | None = None
    mode: str | None = None
    enabled: bool | None = None
    max_sessions: int | None = Field(default=None, ge=1, le=100)
    # "cert" or "cert+sso"; null: as the user's groups say
    auth_policy: str | None = None

    @field_validator("auth_policy")
    @classmethod
    def _auth(cls, v: str | None) -> str | None:
        return None if v is None else authpolicy.parse_policy(v)

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | None) -> str | None:
        return None if v is None else netparse.parse_mode(v)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        return _check_email(v)


class CertOut(BaseModel):
    serial: str
    common_name: str
    not_after: dt.datetime
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    fingerprint_sha256: str | None = None


class UserOut(BaseModel):
    id: int
    name: str
    email: str | None
    mode: str
    enabled: bool
    max_sessions: int
    groups: list[str]
    gateway_address: str | None
    certificate: CertOut | None
    auth_policy: str | None  # the user's own (None: as the groups say)
    auth: str  # what the user's connections must present, all things considered
    created_at: dt.datetime
    updated_at: dt.datetime


class GroupCreate(Storable):
    model_config = _strict
    name: str
    description: str | None = Field(default=None, max_length=500)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return netparse.validate_name(v, "group name")


class GroupUpdate(Storable):
    model_config = _strict
    description: str | None = Field(default=None, max_length=500)
    # "cert" or "cert+sso" asked of the members' connections; null: no requirement
    auth_policy: str | None = None

    @field_validator("auth_policy")
    @classmethod
    def _auth(cls, v: str | None) -> str | None:
        return None if v is None else authpolicy.parse_policy(v)


class GroupOut(BaseModel):
    id: int
    name: str
    description: str | None
    auth_policy: str | None
    members: list[str]
    rules: int
    created_at: dt.datetime


class MemberIn(Storable):
    model_config = _strict
    user: str


class RuleCreate(Storable):
    model_config = _strict
    group: str
    destination: str
    proto: str = "any"
    ports: str | None = None
    description: str | None = Field(default=None, max_length=500)

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        return str(netparse.parse_destination(v))

    @field_validator("proto")
    @classmethod
    def _proto(cls, v: str) -> str:
        return netparse.parse_protocol(v)

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: str | None) -> str | None:
        text = netparse.format_ports(netparse.parse_ports(v))
        if text is not None and len(text) > MAX_PORTS_TEXT:
            raise ValueError(
                f"{len(text)} characters of port ranges, over the limit of {MAX_PORTS_TEXT}: "
                "use ranges (8000-8100) or split the rule"
            )
        return text

    @model_validator(mode="after")
    def _ports_need_tcp_udp(self) -> RuleCreate:
        netparse.check_ports_for_protocol(
            netparse.parse_protocol(self.proto), netparse.parse_ports(self.ports)
        )
        return self


class RuleOut(BaseModel):
    id: int
    group: str
    destination: str
    proto: str
    ports: str | None
    description: str | None
    created_at: dt.datetime


class PoolSet(Storable):
    model_config = _strict
    cidr: str
    kind: str | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return str(netparse.parse_pool_cidr(v))

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str | None) -> str | None:
        if v is not None and v not in ("nat", "gateway"):
            raise ValueError(f"unknown pool kind {v!r}: use 'nat' or 'gateway'")
        return v


class PoolOut(BaseModel):
    id: int
    name: str
    kind: str
    cidr: str
    capacity: int
    leases: int
    updated_at: dt.datetime


class TokenCreate(Storable):
    model_config = _strict
    name: str
    role: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return netparse.validate_name(v, "token name")

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        from vpnfleet.controlplane.auth import TOKEN_ROLES

        if v not in TOKEN_ROLES:
            raise ValueError(
                f"unknown role {v!r}: use one of {', '.join(TOKEN_ROLES)} "
                "(pod credentials are made by enrollment, not by hand)"
            )
        return v


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    created_at: dt.datetime
    created_by: str | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


class TokenCreated(TokenOut):
    token: str


class ReissueIn(Storable):
    model_config = _strict
    reason: str | None = Field(default=None, max_length=200)


class PKIOut(BaseModel):
    ca: CertOut
    ca_pem: str
    issued: int
    revoked: int
    crl_next_update_days: int


class AdminAuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    role: str
    action: str
    target: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    revision: int | None


class SessionOut(BaseModel):
    id: int
    user: str
    pod: str
    mode: str
    tunnel_ip: str
    real_ip: str | None
    real_port: int | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    bytes_in: int
    bytes_out: int
    end_reason: str | None
    kill_reason: str | None = Field(
        description="why the control plane asked this session to end; it stays live until "
        "its pod closes it"
    )
    kill_requested_at: dt.datetime | None


class PodOut(BaseModel):
    id: int
    name: str
    template: str
    public_endpoint: str | None
    pod_ip: str | None
    registered_at: dt.datetime
    last_heartbeat: dt.datetime | None
    applied_revision: int
    ready: bool
    status: dict[str, Any]


class RevisionOut(BaseModel):
    revision: int


def _check_group_map(v: dict[str, str], longest: int, unnamed: str) -> dict[str, str]:
    """A mapping from an outside source's group (a DN, an IdP's name or id: at most `longest`
    characters, `unnamed` when blank) to a vpnfleet group name."""
    for key, group in v.items():
        if not key.strip() or len(key) > longest:
            raise ValueError(unnamed)
        netparse.validate_name(group, "group name")
    return v


class DirectorySettings(Storable):
    """The LDAP/AD directory sync, as `PUT /directory` takes it (docs/sso.md)."""

    model_config = _strict
    url: str = Field(max_length=300)
    flavor: str = "openldap"
    start_tls: bool = False
    ca_file: str | None = Field(default=None, max_length=1000)
    bind_dn: str = Field(min_length=1, max_length=1000)
    user_bases: list[str] = Field(min_length=1, max_length=20)
    group_bases: list[str] = Field(min_length=1, max_length=20)
    user_filter: str = Field(default="(objectClass=inetOrgPerson)", max_length=2000)
    group_filter: str = Field(
        default="(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))", max_length=2000
    )
    name_attribute: str = Field(default="uid", max_length=100)
    email_attribute: str | None = Field(default="mail", max_length=100)
    group_name_attribute: str = Field(default="cn", max_length=100)
    member_attribute: str = "member"
    disabled_attribute: str | None = Field(default=None, max_length=100)
    disabled_value: str | None = Field(default=None, max_length=200)
    nested: bool = True
    # directory group (DN, or its name attribute) -> vpnfleet group the sync manages
    group_map: dict[str, str] = Field(min_length=1, max_length=1000)
    new_user_mode: str = "nat"
    enabled: bool = True  # the periodic sync; `sync` on demand works either way
    interval_seconds: int = Field(default=300, ge=10, le=86400)
    max_disable_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from vpnfleet.controlplane.ldapsource import check_url

        check_url(v)
        return v

    @field_validator("flavor")
    @classmethod
    def _flavor(cls, v: str) -> str:
        if v not in ("openldap", "ad"):
            raise ValueError("flavor must be 'openldap' or 'ad'")
        return v

    @field_validator("member_attribute")
    @classmethod
    def _member(cls, v: str) -> str:
        if v not in ("member", "uniqueMember", "memberOf"):
            raise ValueError("member_attribute must be member, uniqueMember or memberOf")
        return v

    @field_validator("user_filter", "group_filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        if not (v.startswith("(") and v.endswith(")")) or v.count("(") != v.count(")"):
            raise ValueError(f"{v!r} is not an LDAP filter in parentheses")
        return v

    @field_validator("user_bases", "group_bases")
    @classmethod
    def _bases(cls, v: list[str]) -> list[str]:
        for base in v:
            if "=" not in base or len(base) > 1000:
                raise ValueError(f"{base!r} is not a DN")
        return v

    @field_validator("group_map")
    @classmethod
    def _map(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_group_map(v, 1000, "a mapped directory group needs a DN or a name")

    @field_validator("new_user_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        return netparse.parse_mode(v)


class DirectorySetIn(DirectorySettings):
    # Sealed before it is stored, never shown again; may be left out to keep the stored one.
    bind_password: str | None = Field(default=None, min_length=1, max_length=1000)


class DirectoryStatusOut(BaseModel):
    configured: bool
    enabled: bool = False
    interval_seconds: int | None = None
    last_attempt_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None
    last_status: str | None = None
    last_error: str | None = None
    last_actor: str | None = None
    last_counts: dict[str, Any] | None = None
    syncing: str | None = None  # the replica holding the sync lease right now


class DirectoryOut(DirectorySettings):
    updated_at: dt.datetime
    updated_by: str | None
    status: DirectoryStatusOut


class DirectoryDiff(BaseModel):
    groups_created: list[str]
    users_created: list[str]
    users_adopted: list[str]
    users_disabled: list[str]  # "name: why"
    users_enabled: list[str]
    emails_updated: list[str]
    members_added: list[str]  # "group/user"
    members_removed: list[str]


class DirectorySyncOut(BaseModel):
    dry_run: bool
    applied: bool
    counts: dict[str, int]
    diff: DirectoryDiff
    directory_users: int
    queries: int  # LDAP requests sent (bind, StartTLS, each search page)
    seconds: float
    read_seconds: float  # of which reading and resolving the directory
    skipped: list[str]
    sessions_killed: int
    revision: int | None


IDP_MAX_GROUP_MAP = 500  # IdP groups mapped to vpnfleet groups
SSO_SESSION_SECONDS = 12 * 3600  # a working day: one login in the morning


class IdpSettings(Storable):
    """The OpenID provider for VPN single sign-on, as `PUT /idp` takes it (docs/sso.md)."""

    model_config = _strict
    issuer: str = Field(min_length=1, max_length=500)
    client_id: str = Field(min_length=1, max_length=300)
    # The control plane's address as users' browsers reach it: the redirect URI registered
    # at the IdP is `{public_url}/sso/callback`.
    public_url: str = Field(min_length=1, max_length=500)
    scopes: list[str] = Field(default=["openid", "profile", "email"], min_length=1, max_length=20)
    # Which ID token claim names the person, and which vpnfleet field it must equal.
    user_claim: str = Field(default="preferred_username", min_length=1, max_length=100)
    match: str = "name"
    clock_skew_seconds: int = Field(default=60, ge=0, le=600)
    login_timeout_seconds: int = Field(default=180, ge=30, le=900)
    # How long one login keeps admitting the user's reconnects (to any pod) without a new
    # login: the lifetime of OpenVPN's auth-gen-token. Pods read it when they register.
    session_lifetime_seconds: int = Field(default=SSO_SESSION_SECONDS, ge=300, le=30 * 86400)
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    ca_file: str | None = Field(default=None, max_length=1000)
    allow_http: bool = False  # plain-http IdP and public URL (a lab); never in production
    # Refuse a login whose browser comes from another address than the VPN connection (the
    # control plane must see browsers' real addresses: `--forwarded-allow-ips`).
    same_address: bool = False
    # Group memberships from the IdP (docs/sso.md): the ID token claim listing the user's
    # groups, and IdP group (name, path or object id) -> the vpnfleet group it manages. At
    # each admitted login the user's memberships of the mapped vpnfleet groups follow the
    # claim; no other group is ever touched.
    groups_claim: str | None = Field(default=None, min_length=1, max_length=100)
    group_map: dict[str, str] = Field(default_factory=dict, max_length=IDP_MAX_GROUP_MAP)

    @field_validator("groups_claim")
    @classmethod
    def _groups_claim(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(c.isspace() or not c.isprintable() or c in "\"'" for c in v):
            raise ValueError(f"{v!r} is not a claim name")
        if v in groupclaim.RESERVED_CLAIMS:
            raise ValueError(f"{v!r} is a claim of the token itself, not a list of groups")
        return v

    @field_validator("group_map")
    @classmethod
    def _group_map(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_group_map(
            v, groupclaim.MAX_GROUP_VALUE, "a mapped IdP group needs a name or an id"
        )

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("scopes must include openid")
        for scope in v:
            if not scope or len(scope) > 100 or any(c.isspace() or c == '"' for c in scope):
                raise ValueError(f"{scope!r} is not a scope")
        return v

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        if v not in ("name", "email"):
            raise ValueError("match must be 'name' (the user name) or 'email'")
        return v

    @model_validator(mode="after")
    def _urls(self) -> IdpSettings:
        from vpnfleet.controlplane.oidcprovider import check_url

        check_url(self.issuer, "issuer", allow_http=self.allow_http)
        check_url(self.public_url, "public_url", allow_http=self.allow_http)
        if urlsplit(self.public_url).query:
            raise ValueError("public_url must have no query")
        if self.groups_claim is not None and not self.group_map:
            raise ValueError("groups_claim needs group_map: the vpnfleet groups it manages")
        if self.group_map and self.groups_claim is None:
            raise ValueError("group_map needs groups_claim: the ID token claim listing groups")
        if self.groups_claim is not None and self.groups_claim == self.user_claim:
            raise ValueError("groups_claim must be another claim than user_claim")
        return self


class IdpSetIn(IdpSettings):
    # Sealed before it is stored, never shown again; left out keeps the stored one. An IdP
    # client registered as public (PKCE only) has none.
    client_secret: str | None = Field(default=None, min_length=1, max_length=1000)


class IdpOut(IdpSettings):
    redirect_uri: str
    client_secret_set: bool
    updated_at: dt.datetime
    updated_by: str | None


class IdpTestOut(BaseModel):
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    signing_algorithms: list[str]
    pkce_methods: list[str] | None
    key_ids: list[str]
    keys: int
    redirect_uri: str
    seconds: float


class SsoLoginIn(Storable):
    """A pod registers a connection waiting for its user's single sign-on login."""

    model_config = _strict
    server: str = Field(min_length=1, max_length=64)
    cid: int = Field(ge=0, le=2**53)
    kid: int = Field(ge=0, le=2**53)
    user: str = Field(min_length=1, max_length=64)
    real_ip: str | None = Field(default=None, max_length=64)


class SsoLoginOut(BaseModel):
    id: str
    url: str  # the short URL the client opens (WEB_AUTH::)
    timeout_seconds: int
    expires_at: dt.datetime


class SsoDecision(BaseModel):
    id: str
    server: str
    cid: int
    kid: int
    user: str
    admitted: bool
    reason: str | None


class SsoDecisions(BaseModel):
    decisions: list[SsoDecision]
