"""SQLAlchemy models: the control plane's whole state.

Every table is reachable from the admin API; the schema is created and changed only by the
Alembic migrations in `migrations/versions` (a test checks models and migrations agree).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql import text

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no zone, PostgreSQL would convert."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}


class Change(Base):
    """One entry of the change log; its id is the global revision."""

    __tablename__ = "changes"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    op: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[int | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    mode: Mapped[str] = mapped_column(String(16), default="nat")
    max_sessions: Mapped[int] = mapped_column(default=1)
    # "cert" or "cert+sso"; None: as the user's groups say (core/authpolicy.py).
    auth_policy: Mapped[str | None] = mapped_column(String(16), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(String(500))
    # "cert" or "cert+sso" asked of its members' connections; None: no requirement.
    auth_policy: Mapped[str | None] = mapped_column(String(16), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="group", cascade="all, delete-orphan"
    )
    rules: Mapped[list[Rule]] = relationship(back_populates="group", cascade="all, delete-orphan")


class Membership(Base):
    __tablename__ = "memberships"
    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    group: Mapped[Group] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship(back_populates="memberships")


class Rule(Base):
    """A grant: members of `group` may reach `destination` over `proto` on `ports`."""

    __tablename__ = "rules"
    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(18))
    proto: Mapped[str] = mapped_column(String(8))
    ports: Mapped[str | None] = mapped_column(String(1000))
    description: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    group: Mapped[Group] = relationship(back_populates="rules")
    __table_args__ = (UniqueConstraint("group_id", "destination", "proto", "ports"),)


class Pool(Base):
    """An address pool: `nat` (one per pod template, reused on every pod) or `gateway`."""

    __tablename__ = "pools"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    cidr: Mapped[str] = mapped_column(String(18))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class GatewayLease(Base):
    """A gateway user's stable tunnel address, unique across the fleet."""

    __tablename__ = "gateway_leases"
    id: Mapped[int] = mapped_column(primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    address: Mapped[str] = mapped_column(String(15))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("pool_id", "address"),)


class PKIState(Base):
    """The singleton CA and tls-crypt key (private parts sealed)."""

    __tablename__ = "pki_state"
    id: Mapped[int] = mapped_column(primary_key=True)
    ca_cert_pem: Mapped[str] = mapped_column(Text)
    ca_key_sealed: Mapped[str] = mapped_column(Text)
    tls_crypt_sealed: Mapped[str] = mapped_column(Text)
    # OpenVPN's auth-gen-token secret, shared by every pod (made at first use, certs.py).
    auth_token_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # The signed CRL every replica serves (certs.crl_pem): re-signed only when the set of
    # revoked certificates (its digest) changes or half its validity has passed.
    crl_pem: Mapped[str | None] = mapped_column(Text, default=None)
    crl_revoked_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    crl_next_update: Mapped[dt.datetime | None] = mapped_column(default=None)


class Certificate(Base):
    """A certificate the CA issued: one current client cert per user, one per pod, and the
    users' own devices (kind "device", each with its label, made on the self-service page)."""

    __tablename__ = "certificates"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    common_name: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    pod_id: Mapped[int | None] = mapped_column(ForeignKey("pods.id", ondelete="SET NULL"))
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_sealed: Mapped[str] = mapped_column(Text)
    not_after: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    revocation_reason: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))  # kind "device": the user's label


class Pod(Base):
    """A registered agent (one OpenVPN pod)."""

    __tablename__ = "pods"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    template: Mapped[str] = mapped_column(String(64), default="default")
    public_endpoint: Mapped[str | None] = mapped_column(String(300))
    pod_ip: Mapped[str | None] = mapped_column(String(15))
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[dt.datetime | None]
    applied_revision: Mapped[int] = mapped_column(BigInteger, default=0)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Set by `vpnfleet pod revoke`: the pod's credential and certificate are revoked, its
    # sessions closed, and its name may not enroll again until `vpnfleet pod forget`.
    revoked_at: Mapped[dt.datetime | None]
    # When the control plane closed this pod's sessions because it stopped heartbeating.
    lease_expired_at: Mapped[dt.datetime | None]


class VpnSession(Base):
    """One VPN connection of a user to a pod."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    user_name: Mapped[str] = mapped_column(String(64))
    pod_name: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))
    tunnel_ip: Mapped[str] = mapped_column(String(15))
    real_ip: Mapped[str | None] = mapped_column(String(45))
    real_port: Mapped[int | None]
    client_id: Mapped[int | None]
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    end_reason: Mapped[str | None] = mapped_column(String(200))
    # Set when the control plane asks the session to end (an administrator's kill, the same
    # device reconnecting). The session stays live until its pod closes it, so the bytes and
    # the real end time are kept; meanwhile it no longer counts toward session limits.
    kill_reason: Mapped[str | None] = mapped_column(String(200))
    kill_requested_at: Mapped[dt.datetime | None]
    __table_args__ = (
        Index("ix_sessions_pod_open", "pod_name", "ended_at"),
        Index("ix_sessions_tunnel", "pod_name", "tunnel_ip", "started_at"),
        # The live sessions, newest first (the console's list): ended ones, which retention
        # keeps by the hundred thousand, are not in this index at all.
        Index(
            "ix_sessions_live",
            "started_at",
            "id",
            postgresql_where=text("ended_at IS NULL"),
            sqlite_where=text("ended_at IS NULL"),
        ),
        # One user's sessions, newest first (a user's page, the list filtered by user).
        Index("ix_sessions_user_started", "user_name", "started_at", "id"),
    )


class AdminToken(Base):
    """An API bearer token. Only its SHA-256 is stored."""

    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]
    # Role "pod": the one pod this credential may act as (set at enrollment).
    pod_name: Mapped[str | None] = mapped_column(String(64), index=True)


class AdminAudit(Base):
    """Who changed what, when: one row per mutating API call."""

    __tablename__ = "admin_audit"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    revision: Mapped[int | None] = mapped_column(BigInteger)


class DeniedAttempt(Base):
    """Traffic from a VPN user that no grant allowed (aggregated per window by the agent)."""

    __tablename__ = "denied_attempts"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    pod_name: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str | None] = mapped_column(String(64))
    session_uid: Mapped[str | None] = mapped_column(String(64))
    src: Mapped[str] = mapped_column(String(15))
    dst: Mapped[str | None] = mapped_column(String(15))
    proto: Mapped[str] = mapped_column(String(8))
    dport: Mapped[int | None]
    first_at: Mapped[dt.datetime]
    last_at: Mapped[dt.datetime]
    count: Mapped[int] = mapped_column(default=1)
    overflow: Mapped[bool] = mapped_column(Boolean, default=False)
    __table_args__ = (
        Index("ix_denied_user_time", "user_name", "first_at"),
        Index("ix_denied_time", "first_at"),
    )


class Flow(Base):
    """One NAT'd connection (a conntrack flow) and the user who owned its tunnel address.

    `flow_id` is the agent's idempotency key (start and end records of a flow share it).
    `nat_ip:nat_port` is the source a backend saw; the reverse lookup searches it by time.
    `dst_*` are None when the pod does not record destinations (privacy option); `dst_num`
    is `dst_ip` as a number so that CIDR filters are range scans on both dialects.
    Counters are None until the flow ends (and stay None when the agent could not read them).
    `duration_class` buckets the lifetime (see core.attribution.duration_class) so that the
    reverse lookup only reads flows that could still be alive at the asked time.
    """

    __tablename__ = "flows"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    flow_id: Mapped[str] = mapped_column(String(128), unique=True)
    pod_name: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str | None] = mapped_column(String(64))
    session_uid: Mapped[str | None] = mapped_column(String(64))
    proto: Mapped[str] = mapped_column(String(8))
    tunnel_ip: Mapped[str] = mapped_column(String(15))
    tunnel_port: Mapped[int]
    nat_ip: Mapped[str] = mapped_column(String(15))
    nat_port: Mapped[int]
    dst_ip: Mapped[str | None] = mapped_column(String(15))
    dst_num: Mapped[int | None] = mapped_column(BigInteger)
    dst_port: Mapped[int | None]
    start_at: Mapped[dt.datetime]
    end_at: Mapped[dt.datetime | None]
    duration_class: Mapped[int]
    end_inferred: Mapped[bool] = mapped_column(Boolean, default=False)
    packets_out: Mapped[int | None] = mapped_column(BigInteger)
    bytes_out: Mapped[int | None] = mapped_column(BigInteger)
    packets_in: Mapped[int | None] = mapped_column(BigInteger)
    bytes_in: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        # Per duration class, flows that may cover T started within one class bound before
        # it: a bounded range of this index. end_at trails so that "still alive at T" is
        # checked in the index, without reading a table row per candidate.
        Index(
            "ix_flows_nat", "nat_ip", "nat_port", "proto", "duration_class", "start_at", "end_at"
        ),
        Index("ix_flows_user_time", "user_name", "start_at"),
        Index("ix_flows_time", "start_at"),
    )


class DirectoryConfig(Base):
    """The singleton LDAP/AD directory sync: its settings, sealed bind password, the lease that
    lets one replica sync at a time, and the outcome of the last sync (controlplane/ldapsync)."""

    __tablename__ = "directory_config"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Everything but the password, as schemas.DirectorySettings validates it.
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    bind_password_sealed: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))
    # Held while one replica syncs (taken with a conditional UPDATE, so it works the same on
    # SQLite and PostgreSQL); it expires on its own if that replica dies mid-sync.
    lease_holder: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None]
    last_attempt_at: Mapped[dt.datetime | None]
    last_success_at: Mapped[dt.datetime | None]
    last_status: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_actor: Mapped[str | None] = mapped_column(String(64))
    last_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class DirectoryAccount(Base):
    """A user the directory sync manages (created or adopted by a sync) and their entry."""

    __tablename__ = "directory_users"
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    dn: Mapped[str] = mapped_column(String(1000))
    # True when the sync disabled the user: only then does it enable them again.
    disabled_by_sync: Mapped[bool] = mapped_column(Boolean, default=False)


class IdpConfig(Base):
    """The singleton OpenID provider for VPN single sign-on (docs/sso.md)."""

    __tablename__ = "idp_config"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Everything but the client secret, as schemas.IdpSettings validates it.
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    client_secret_sealed: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class SsoLogin(Base):
    """One pending VPN single sign-on login (docs/sso.md): registered by the pod holding the
    waiting connection, opened once in the user's browser, decided once by the callback.

    `id` is the random part of the short login URL; `state_hash` is SHA-256 of the OAuth
    state sent to the IdP (the callback finds its login by it); `nonce` and `verifier` live
    only between the browser's visit and the callback and are cleared when it decides."""

    __tablename__ = "sso_logins"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pod: Mapped[str] = mapped_column(String(64), index=True)
    server: Mapped[str] = mapped_column(String(64))
    cid: Mapped[int] = mapped_column(BigInteger)
    kid: Mapped[int] = mapped_column(BigInteger)
    user_name: Mapped[str] = mapped_column(String(64))
    real_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
    # pending -> started (browser sent to the IdP) -> admitted | denied
    status: Mapped[str] = mapped_column(String(16), default="pending")
    state_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    nonce: Mapped[str | None] = mapped_column(String(100))
    verifier: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(String(300))
    decided_at: Mapped[dt.datetime | None] = mapped_column()
    delivered: Mapped[bool] = mapped_column(default=False)


class ConsoleAccount(Base):
    """A person who signs in to the web console (docs/console.md) with a password.

    Only the scrypt hash of the password is kept (core/passwords.py). The role is one of the
    API's operator roles (admin, operator, auditor) and is checked on the server for every
    page and action; what an account does is written to the admin audit log as
    ``console:NAME``."""

    __tablename__ = "console_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))
    disabled_at: Mapped[dt.datetime | None] = mapped_column()
    password_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column()


class ConsoleSession(Base):
    """One signed-in browser: the cookie's SHA-256, its CSRF token, when it ends.

    Either an operator's (``account_id``) or a VPN user's on the self-service pages
    (``user_id``). Deleted at sign-out, and with the account or user; a disabled account or
    user, or a changed password, ends the sessions (the check happens on each request)."""

    __tablename__ = "console_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("console_accounts.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    client_ip: Mapped[str | None] = mapped_column(String(64))


class UserLink(Base):
    """A one-time link handed to a VPN user: ``sign-in`` to the self-service pages (made by an
    operator), or ``profile``: one download of a device's profile (the import link of
    OpenVPN Connect). Only the token's SHA-256 is kept; ``used_at`` is set on first use."""

    __tablename__ = "user_links"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    certificate_id: Mapped[int | None] = mapped_column(
        ForeignKey("certificates.id", ondelete="CASCADE")
    )
    created_by: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column()


class ConsoleLogin(Base):
    """A VPN user's single sign-on to the self-service pages, between the redirect to the IdP
    and its callback (the IdP's one registered redirect URI, /sso/callback, serves both kinds
    of login: the state tells them apart). Used once; `nonce` and `verifier` are cleared then."""

    __tablename__ = "console_logins"
    id: Mapped[int] = mapped_column(primary_key=True)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # SHA-256 of a cookie set on the browser that started the login: only that browser may
    # finish it (a callback URL sent to someone else signs nobody in).
    browser_hash: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str | None] = mapped_column(String(100))
    verifier: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column()
