"""Users: create, change, enable/disable, delete, certificates, gateway leases, profiles."""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, fleetstate, pki
from vpnfleet.controlplane.errors import conflict, not_found
from vpnfleet.controlplane.models import Certificate, GatewayLease, Group, Membership, Pool, User
from vpnfleet.controlplane.schemas import CertOut, UserOut
from vpnfleet.controlplane.services.journal import AuditView, Journal
from vpnfleet.controlplane.state import jsonable
from vpnfleet.core import authpolicy, ipam, netparse, ovpn_config
from vpnfleet.wire import SERVER_CN_PREFIX

LEASE_RETRIES = 8

# What PATCH /users/{name} and a policy may change on a user.
UPDATABLE = frozenset({"email", "mode", "enabled", "max_sessions", "auth_policy"})


def get_user(db: Session, name: str) -> User:
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise not_found("user", name)
    return user


def cert_out(cert: Certificate | None) -> CertOut | None:
    if cert is None:
        return None
    return CertOut(
        serial=cert.serial,
        common_name=cert.common_name,
        not_after=cert.not_after,
        created_at=cert.created_at,
        revoked_at=cert.revoked_at,
        revocation_reason=cert.revocation_reason,
        fingerprint_sha256=_fingerprint(cert.cert_pem),
    )


def _fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER: the PEM decoded, not parsed (a list shows thousands)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest()


def user_out(db: Session, user: User) -> UserOut:
    """The user as the admin API shows it (and the audit log records it)."""
    return users_out(db, [user])[0]


ID_CHUNK = 1_000  # ids per IN list (SQLite binds each as a parameter)


def users_out(db: Session, rows: Sequence[User]) -> list[UserOut]:
    """Many users as the API shows them, in three queries per 1,000 users (not three each)."""
    groups: dict[int, list[str]] = {u.id: [] for u in rows}
    group_policies: dict[int, list[str | None]] = {u.id: [] for u in rows}
    leases: dict[int, str] = {}
    current: dict[int, Certificate] = {}
    ids = list(groups)
    for first in range(0, len(ids), ID_CHUNK):
        chunk = ids[first : first + ID_CHUNK]
        for user_id, group, policy in db.execute(
            select(Membership.user_id, Group.name, Group.auth_policy)
            .join(Group)
            .where(Membership.user_id.in_(chunk))
            .order_by(Group.name)
        ):
            groups[user_id].append(group)
            group_policies[user_id].append(policy)
        leases.update(
            db.execute(
                select(GatewayLease.user_id, GatewayLease.address).where(
                    GatewayLease.user_id.in_(chunk)
                )
            ).all()
        )
        # The newest unrevoked client certificate of each (ascending ids: the last one wins).
        for cert in db.scalars(
            select(Certificate)
            .where(
                Certificate.user_id.in_(chunk),
                Certificate.kind == "client",
                Certificate.revoked_at.is_(None),
            )
            .order_by(Certificate.id)
        ):
            current[cert.user_id or 0] = cert
    return [
        UserOut(
            id=user.id,
            name=user.name,
            email=user.email,
            mode=user.mode,
            enabled=user.enabled,
            max_sessions=user.max_sessions,
            groups=groups[user.id],
            gateway_address=leases.get(user.id),
            certificate=cert_out(current.get(user.id)),
            auth_policy=user.auth_policy,
            auth=authpolicy.effective(user.auth_policy, group_policies[user.id]),
            created_at=user.created_at,
            updated_at=user.updated_at,
        )
        for user in rows
    ]


def _audit_view(db: Session, user: User) -> AuditView:
    return dict(jsonable(user_out(db, user).model_dump()))


def _ensure_gateway_lease(db: Session, user: User) -> GatewayLease:
    """Give a gateway user a stable, fleet-unique address (race-safe via a unique index)."""
    existing = db.scalar(select(GatewayLease).where(GatewayLease.user_id == user.id))
    if existing is not None:
        return existing
    # Lock the pool row so concurrent leases queue here instead of colliding on the unique
    # index over and over (PostgreSQL; SQLite serializes writers already).
    pool = db.scalar(
        select(Pool).where(Pool.kind == "gateway").order_by(Pool.id).limit(1).with_for_update()
    )
    if pool is None:
        raise conflict("no gateway pool is configured: run 'vpnfleet pool set gateway --cidr ...'")
    net = ipaddress.IPv4Network(pool.cidr)
    skip: set[ipaddress.IPv4Address] = set()
    for _ in range(LEASE_RETRIES):
        used = {
            ipaddress.IPv4Address(a)
            for a in db.scalars(select(GatewayLease.address).where(GatewayLease.pool_id == pool.id))
        }
        try:
            addr = ipam.allocate(net, used | skip)
        except ipam.PoolExhausted as exc:
            raise conflict(str(exc)) from None
        lease = GatewayLease(pool_id=pool.id, user_id=user.id, address=str(addr))
        try:
            with db.begin_nested():
                db.add(lease)
                db.flush()
            return lease
        except IntegrityError:
            # Another request took this address first: try the next one.
            skip.add(addr)
    raise conflict("could not lease a gateway address under contention; try again")


def _sync_gateway_lease(db: Session, user: User) -> None:
    """A gateway user holds a lease; a NAT user none (their address comes from the pod)."""
    if user.mode == "gateway":
        _ensure_gateway_lease(db, user)
        return
    lease = db.scalar(select(GatewayLease).where(GatewayLease.user_id == user.id))
    if lease is not None:
        db.delete(lease)
        db.flush()


def create_user(
    db: Session,
    journal: Journal,
    sealer: pki.Sealer,
    *,
    name: str,
    email: str | None,
    mode: netparse.Mode,
    enabled: bool,
    max_sessions: int,
    groups: Iterable[str],
) -> User:
    """A new user with its groups, a gateway lease if it needs one, and a client certificate."""
    if db.scalar(select(User.id).where(User.name == name)) is not None:
        raise conflict(f"user {name!r} already exists")
    user = User(name=name, email=email, mode=mode, enabled=enabled, max_sessions=max_sessions)
    db.add(user)
    db.flush()
    for gname in sorted(set(groups)):
        group = db.scalar(select(Group).where(Group.name == gname))
        if group is None:
            raise not_found("group", gname)
        db.add(Membership(group_id=group.id, user_id=user.id))
    db.flush()
    _sync_gateway_lease(db, user)
    certs.issue(db, sealer, "client", user.name, user_id=user.id)
    # Sent at once, groups included (no membership events): a policy apply keeps the order
    # of its plan, new users before the membership changes of existing ones.
    journal.upsert(fleetstate.user_state(db, user))
    journal.audit("user.create", user.name, None, journal.capture(lambda: _audit_view(db, user)))
    return user


@dataclass(frozen=True)
class NewNatUser:
    name: str
    email: str | None
    enabled: bool
    groups: Sequence[str]


def create_nat_users(
    db: Session, journal: Journal, sealer: pki.Sealer, new: Sequence[NewNatUser]
) -> list[User]:
    """Many new NAT users at once (the directory sync's import): what `create_user` does for
    each (groups, a client certificate, one event with the user's whole state), with the CA
    loaded once and one flush per table instead of several round trips per user."""
    names = [u.name for u in new]
    taken = db.scalars(select(User.name).where(User.name.in_(names))).all()
    if taken:
        raise conflict(f"user {sorted(taken)[0]!r} already exists")
    wanted = sorted({g for u in new for g in u.groups})
    group_ids = dict(db.execute(select(Group.name, Group.id).where(Group.name.in_(wanted))).all())
    for gname in wanted:
        if gname not in group_ids:
            raise not_found("group", gname)
    rows = [User(name=u.name, email=u.email, mode="nat", enabled=u.enabled, max_sessions=1)
            for u in new]  # fmt: skip
    db.add_all(rows)
    db.flush()
    ca = certs.load_ca(db, sealer)
    for spec, row in zip(new, rows, strict=True):
        db.add_all(
            Membership(group_id=group_ids[g], user_id=row.id) for g in sorted(set(spec.groups))
        )
        db.add(certs.new_certificate(ca, sealer, "client", row.name, user_id=row.id))
    db.flush()
    for state in fleetstate.user_states(db, rows):
        journal.upsert(state)
    if journal.itemized:  # (the directory sync writes one summary entry instead)
        for row in rows:
            journal.audit("user.create", row.name, None, _audit_view(db, row))
    return rows


def update_user(
    db: Session,
    journal: Journal,
    user: User,
    changes: Mapping[str, object],
    action: str = "user.update",
) -> User:
    """Change fields of UPDATABLE; switching mode takes or releases the gateway lease."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"not a user field one may change: {', '.join(sorted(unknown))}")
    before = journal.capture(lambda: _audit_view(db, user))
    for key, value in changes.items():
        setattr(user, key, value)
    db.flush()
    _sync_gateway_lease(db, user)
    journal.user_changed(user)
    journal.audit(action, user.name, before, journal.capture(lambda: _audit_view(db, user)))
    return user


def set_enabled(db: Session, journal: Journal, user: User, enabled: bool) -> User:
    """Enable or disable a user; agents disconnect a disabled user's sessions."""
    action = "user.enable" if enabled else "user.disable"
    return update_user(db, journal, user, {"enabled": enabled}, action)


def delete_user(db: Session, journal: Journal, user: User, reason: str = "user deleted") -> None:
    """Delete a user and revoke their certificates (`reason` goes into the CRL records)."""
    before = journal.capture(lambda: _audit_view(db, user))
    name = user.name
    revoked = certs.revoke_user_certs(db, user.id, reason, kinds=("client", "device"))
    key = fleetstate.user_key(user)
    db.delete(user)
    db.flush()
    journal.delete(key)
    if revoked:
        journal.upsert(fleetstate.crl_update(revoked))
    journal.audit("user.delete", name, before, None)


def _revoked(
    db: Session,
    journal: Journal,
    action: str,
    user: User,
    before: AuditView,
    revoked: Sequence[Certificate],
) -> User:
    """Agents get the CRL and the user's new current serial."""
    journal.upsert(fleetstate.crl_update(revoked))
    journal.user_changed(user)
    journal.audit(action, user.name, before, journal.capture(lambda: _audit_view(db, user)))
    return user


def reissue_cert(
    db: Session, journal: Journal, sealer: pki.Sealer, user: User, reason: str = "reissued"
) -> User:
    """Revoke the user's current certificate and issue a new one."""
    before = journal.capture(lambda: _audit_view(db, user))
    revoked = certs.revoke_user_certs(db, user.id, reason)
    certs.issue(db, sealer, "client", user.name, user_id=user.id)
    return _revoked(db, journal, "user.reissue", user, before, revoked)


def revoke_cert(db: Session, journal: Journal, user: User, reason: str = "revoked") -> User:
    """Revoke the user's certificate without issuing a new one, and their own devices' (the
    answer to a compromise: nothing of theirs connects until an operator reissues)."""
    before = journal.capture(lambda: _audit_view(db, user))
    revoked = certs.revoke_user_certs(db, user.id, reason, kinds=("client", "device"))
    if not revoked:
        raise conflict(f"user {user.name!r} has no valid certificate to revoke")
    return _revoked(db, journal, "user.revoke", user, before, revoked)


def client_profile(
    db: Session,
    journal: Journal,
    sealer: pki.Sealer,
    user: User,
    endpoints: Sequence[str],
    tcp_endpoints: Sequence[tuple[str, int]] = (),
    cert: Certificate | None = None,
) -> str:
    """The user's complete .ovpn profile (with `cert`: that device's); handing out a private
    key is audited.

    With ``tcp_endpoints`` the profile tries every UDP endpoint first and then TCP. It cannot
    use ``remote-random`` then (that would shuffle TCP entries ahead of UDP ones), so the UDP
    endpoints are rotated by a hash of the user name: users still spread over them.
    """
    if cert is None:
        cert = certs.current_user_cert(db, user.id)
    elif cert.revoked_at is not None or cert.user_id != user.id:
        raise conflict("this device's certificate was revoked: add the device again")
    if cert is None:
        raise conflict(
            f"user {user.name!r} has no valid certificate: run 'vpnfleet user reissue {user.name}'"
        )
    if not endpoints:
        raise conflict(
            "no public endpoint is configured: start the server with --public-endpoint HOST:PORT"
        )
    remotes = [netparse.parse_endpoint(e) for e in endpoints]
    if tcp_endpoints and len(remotes) > 1:
        turn = int.from_bytes(hashlib.sha256(user.name.encode()).digest()[:4], "big")
        remotes = remotes[turn % len(remotes) :] + remotes[: turn % len(remotes)]
    profile = ovpn_config.render_client_profile(
        remotes=remotes,
        tcp_remotes=list(tcp_endpoints),
        ca_pem=certs.ca_cert_pem(db),
        cert_pem=cert.cert_pem,
        key_pem=sealer.unseal(cert.key_sealed),
        tls_crypt_key=certs.tls_crypt_key(db, sealer),
        server_name_prefix=SERVER_CN_PREFIX,
        username=user.name,
    )
    handed = {"serial": cert.serial} | ({"device": cert.device} if cert.device else {})
    journal.audit("user.profile", user.name, None, handed)
    return profile
