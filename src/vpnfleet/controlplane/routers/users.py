"""Users: CRUD, enable/disable, certificates and client profiles."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, changelog, pki
from vpnfleet.controlplane.changelog import ChangeSpec
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import Certificate, GatewayLease, Group, Membership, Pool, User
from vpnfleet.controlplane.schemas import CertOut, ReissueIn, UserCreate, UserOut, UserUpdate
from vpnfleet.controlplane.state import DB, Operator, State, jsonable
from vpnfleet.core import ipam, netparse, ovpn_config

router = APIRouter(prefix="/api/v1/users", tags=["users"])

LEASE_RETRIES = 8


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
        fingerprint_sha256=pki.cert_info(cert.cert_pem).fingerprint_sha256,
    )


def user_out(db: Session, user: User) -> UserOut:
    groups = db.scalars(
        select(Group.name)
        .join(Membership)
        .where(Membership.user_id == user.id)
        .order_by(Group.name)
    ).all()
    lease = db.scalar(select(GatewayLease).where(GatewayLease.user_id == user.id))
    return UserOut(
        id=user.id,
        name=user.name,
        email=user.email,
        mode=user.mode,
        enabled=user.enabled,
        max_sessions=user.max_sessions,
        groups=list(groups),
        gateway_address=lease.address if lease else None,
        certificate=cert_out(certs.current_user_cert(db, user.id)),
        created_at=user.created_at,
        updated_at=user.updated_at,
    )


def user_change(db: Session, user: User, op: str = "upsert") -> ChangeSpec:
    """What agents need to know about a user (no secrets)."""
    data: dict[str, Any] = {"name": user.name}
    if op != "delete":
        out = user_out(db, user)
        data.update(
            enabled=user.enabled,
            mode=user.mode,
            max_sessions=user.max_sessions,
            groups=out.groups,
            gateway_address=out.gateway_address,
            cert_serial=out.certificate.serial if out.certificate else None,
        )
    return ChangeSpec("user", op, user.id, data)


def ensure_gateway_lease(db: Session, user: User) -> GatewayLease:
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


def release_gateway_lease(db: Session, user: User) -> None:
    lease = db.scalar(select(GatewayLease).where(GatewayLease.user_id == user.id))
    if lease is not None:
        db.delete(lease)
        db.flush()


def set_groups(db: Session, user: User, names: list[str]) -> None:
    for name in sorted(set(names)):
        group = db.scalar(select(Group).where(Group.name == name))
        if group is None:
            raise not_found("group", name)
        db.add(Membership(group_id=group.id, user_id=user.id))
    db.flush()


@router.get("", response_model=list[UserOut])
def list_users(db: DB, _who: Operator) -> list[UserOut]:
    return [user_out(db, u) for u in db.scalars(select(User).order_by(User.name))]


@router.post("", response_model=UserOut, status_code=201)
def create_user(body: UserCreate, db: DB, who: Operator, state: State) -> UserOut:
    if db.scalar(select(User.id).where(User.name == body.name)) is not None:
        raise conflict(f"user {body.name!r} already exists")
    user = User(
        name=body.name,
        email=body.email,
        mode=body.mode,
        enabled=body.enabled,
        max_sessions=body.max_sessions,
    )
    db.add(user)
    db.flush()
    set_groups(db, user, body.groups)
    if user.mode == "gateway":
        ensure_gateway_lease(db, user)
    certs.issue(db, state.sealer, "client", user.name, user_id=user.id)
    out = user_out(db, user)
    changelog.record(
        db, who, "user.create", user.name, None, jsonable(out.model_dump()), [user_change(db, user)]
    )
    return out


@router.get("/{name}", response_model=UserOut)
def show_user(name: str, db: DB, _who: Operator) -> UserOut:
    return user_out(db, get_user(db, name))


def _update(db: Session, who: Any, user: User, changes: dict[str, Any], action: str) -> UserOut:
    before = jsonable(user_out(db, user).model_dump())
    for key, value in changes.items():
        setattr(user, key, value)
    db.flush()
    if user.mode == "gateway":
        ensure_gateway_lease(db, user)
    else:
        release_gateway_lease(db, user)
    out = user_out(db, user)
    changelog.record(
        db, who, action, user.name, before, jsonable(out.model_dump()), [user_change(db, user)]
    )
    return out


@router.patch("/{name}", response_model=UserOut)
def update_user(name: str, body: UserUpdate, db: DB, who: Operator) -> UserOut:
    user = get_user(db, name)
    changes = body.model_dump(exclude_unset=True)
    if "mode" in changes and changes["mode"] is None:
        raise Problem(422, "Invalid request", "mode: cannot be null")
    return _update(db, who, user, changes, "user.update")


@router.post("/{name}/disable", response_model=UserOut)
def disable_user(name: str, db: DB, who: Operator) -> UserOut:
    return _update(db, who, get_user(db, name), {"enabled": False}, "user.disable")


@router.post("/{name}/enable", response_model=UserOut)
def enable_user(name: str, db: DB, who: Operator) -> UserOut:
    return _update(db, who, get_user(db, name), {"enabled": True}, "user.enable")


@router.delete("/{name}", status_code=204)
def delete_user(name: str, db: DB, who: Operator) -> Response:
    user = get_user(db, name)
    before = jsonable(user_out(db, user).model_dump())
    revoked = certs.revoke_user_certs(db, user.id, "user deleted")
    spec = user_change(db, user, "delete")
    db.delete(user)
    db.flush()
    specs = [spec]
    if revoked:
        specs.append(ChangeSpec("crl", "upsert", None, {"revoked": [c.serial for c in revoked]}))
    changelog.record(db, who, "user.delete", name, before, None, specs)
    return Response(status_code=204)


def _record_revocation(
    db: Session, who: Any, action: str, user: User, before: dict[str, Any], revoked: list[Any]
) -> UserOut:
    """Audit a certificate change; agents get the CRL and the user's new current serial."""
    out = user_out(db, user)
    changelog.record(
        db,
        who,
        action,
        user.name,
        before,
        jsonable(out.model_dump()),
        [
            ChangeSpec("crl", "upsert", None, {"revoked": [c.serial for c in revoked]}),
            user_change(db, user),
        ],
    )
    return out


@router.post("/{name}/reissue", response_model=UserOut)
def reissue_cert(
    name: str, db: DB, who: Operator, state: State, body: ReissueIn | None = None
) -> UserOut:
    """Revoke the user's current certificate and issue a new one."""
    user = get_user(db, name)
    before = jsonable(user_out(db, user).model_dump())
    revoked = certs.revoke_user_certs(db, user.id, (body.reason if body else None) or "reissued")
    certs.issue(db, state.sealer, "client", user.name, user_id=user.id)
    return _record_revocation(db, who, "user.reissue", user, before, revoked)


@router.post("/{name}/revoke", response_model=UserOut)
def revoke_cert(name: str, db: DB, who: Operator, body: ReissueIn | None = None) -> UserOut:
    """Revoke the user's certificate without issuing a new one."""
    user = get_user(db, name)
    before = jsonable(user_out(db, user).model_dump())
    revoked = certs.revoke_user_certs(db, user.id, (body.reason if body else None) or "revoked")
    if not revoked:
        raise conflict(f"user {name!r} has no valid certificate to revoke")
    return _record_revocation(db, who, "user.revoke", user, before, revoked)


@router.get("/{name}/profile", response_class=Response)
def download_profile(name: str, db: DB, who: Operator, state: State) -> Response:
    user = get_user(db, name)
    cert = certs.current_user_cert(db, user.id)
    if cert is None:
        raise conflict(
            f"user {name!r} has no valid certificate: run 'vpnfleet user reissue {name}'"
        )
    endpoints = state.settings.public_endpoints
    if not endpoints:
        raise conflict(
            "no public endpoint is configured: start the server with --public-endpoint HOST:PORT"
        )
    profile = ovpn_config.render_client_profile(
        remotes=[netparse.parse_endpoint(e) for e in endpoints],
        ca_pem=certs.ca_cert_pem(db),
        cert_pem=cert.cert_pem,
        key_pem=state.sealer.unseal(cert.key_sealed),
        tls_crypt_key=certs.tls_crypt_key(db, state.sealer),
    )
    changelog.record(db, who, "user.profile", name, None, {"serial": cert.serial}, [])
    return Response(
        profile,
        media_type="application/x-openvpn-profile",
        headers={"Content-Disposition": f'attachment; filename="{name}.ovpn"'},
    )
