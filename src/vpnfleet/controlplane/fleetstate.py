"""The fleet state agents replicate, read from the database: one builder per object.

The snapshot (`GET /api/v1/agent/snapshot`) and every change event come from these functions,
so an object has one shape whichever way it reaches an agent: the watch stream can never
describe a user, rule or session differently from the snapshot an agent resyncs from.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, changelog, pki
from vpnfleet.controlplane.models import (
    Certificate,
    GatewayLease,
    Group,
    Membership,
    Pod,
    Pool,
    Rule,
    User,
    VpnSession,
)
from vpnfleet.core import authpolicy
from vpnfleet.wire import (
    CrlUpdate,
    GroupKey,
    GroupState,
    LiveSession,
    MembershipState,
    PkiState,
    PodState,
    PoolState,
    RuleKey,
    RuleState,
    SessionKey,
    Snapshot,
    UserKey,
    UserState,
)


def user_states(db: Session, users: Sequence[User] | None = None) -> list[UserState]:
    """`users` (every user when None, by id) as agents see them, in three queries."""
    rows = list(db.scalars(select(User).order_by(User.id))) if users is None else list(users)
    ids = [u.id for u in rows]
    groups_of: dict[int, list[str]] = {}
    group_policies: dict[int, list[str | None]] = {}
    query = (
        select(Membership.user_id, Group.name, Group.auth_policy).join(Group).order_by(Group.name)
    )
    if users is not None:
        query = query.where(Membership.user_id.in_(ids))
    for user_id, gname, policy in db.execute(query):
        groups_of.setdefault(user_id, []).append(gname)
        group_policies.setdefault(user_id, []).append(policy)
    lease_query = select(GatewayLease.user_id, GatewayLease.address)
    cert_query = (
        select(Certificate.user_id, Certificate.serial)
        .where(Certificate.kind == "client", Certificate.revoked_at.is_(None))
        .order_by(Certificate.id)
    )
    if users is not None:
        lease_query = lease_query.where(GatewayLease.user_id.in_(ids))
        cert_query = cert_query.where(Certificate.user_id.in_(ids))
    device_query = select(Certificate.user_id, Certificate.serial).where(
        Certificate.kind == "device", Certificate.revoked_at.is_(None)
    )
    if users is not None:
        device_query = device_query.where(Certificate.user_id.in_(ids))
    devices: dict[int | None, list[str]] = {}
    for uid, serial in db.execute(device_query):
        devices.setdefault(uid, []).append(serial)
    leases: dict[int, str] = {uid: addr for uid, addr in db.execute(lease_query)}
    # A user has one valid client certificate at a time; should there be more, the newest
    # counts, as in certs.current_user_cert.
    serials: dict[int | None, str] = {uid: serial for uid, serial in db.execute(cert_query)}
    return [
        UserState(
            id=u.id,
            name=u.name,
            enabled=u.enabled,
            mode=u.mode,
            max_sessions=u.max_sessions,
            groups=groups_of.get(u.id, []),
            gateway_address=leases.get(u.id),
            cert_serial=serials.get(u.id),
            auth=authpolicy.effective(u.auth_policy, group_policies.get(u.id, ())),
            device_serials=sorted(devices.get(u.id, [])),
        )
        for u in rows
    ]


def user_state(db: Session, user: User) -> UserState:
    return user_states(db, [user])[0]


def user_key(user: User) -> UserKey:
    return UserKey(id=user.id, name=user.name)


def group_state(group: Group) -> GroupState:
    return GroupState(id=group.id, name=group.name)


def group_key(group: Group) -> GroupKey:
    return GroupKey(id=group.id, name=group.name)


def membership_state(group: Group, user: User) -> MembershipState:
    return MembershipState(group_id=group.id, group=group.name, user_id=user.id, user=user.name)


def rule_state(rule: Rule) -> RuleState:
    return RuleState(
        id=rule.id,
        group_id=rule.group_id,
        destination=rule.destination,
        proto=rule.proto,
        ports=rule.ports,
    )


def rule_key(rule: Rule) -> RuleKey:
    return RuleKey(id=rule.id, group_id=rule.group_id)


def pool_state(pool: Pool) -> PoolState:
    return PoolState(id=pool.id, name=pool.name, kind=pool.kind, cidr=pool.cidr)


def pod_state(pod: Pod) -> PodState:
    return PodState(id=pod.id, name=pod.name, pod_ip=pod.pod_ip)


def session_state(row: VpnSession) -> LiveSession:
    """A live session (its row has no end yet)."""
    return LiveSession(
        uid=row.uid,
        user=row.user_name,
        pod=row.pod_name,
        tunnel_ip=row.tunnel_ip,
        mode=row.mode,
        real_ip=row.real_ip,
        kill=row.kill_reason,
    )


def session_key(row: VpnSession) -> SessionKey:
    return SessionKey(uid=row.uid)


def crl_update(revoked: Sequence[Certificate]) -> CrlUpdate:
    return CrlUpdate(revoked=[c.serial for c in revoked])


def pki_state(db: Session) -> PkiState:
    return PkiState(ca_fingerprint_sha256=pki.cert_info(certs.ca_cert_pem(db)).fingerprint_sha256)


def build_snapshot(db: Session) -> Snapshot:
    """Everything an agent decides from, read in one transaction."""
    return Snapshot(
        revision=changelog.current_revision(db),
        users=user_states(db),
        groups=[group_state(g) for g in db.scalars(select(Group).order_by(Group.id))],
        rules=[rule_state(r) for r in db.scalars(select(Rule).order_by(Rule.id))],
        pools=[pool_state(p) for p in db.scalars(select(Pool).order_by(Pool.id))],
        sessions=[
            session_state(s)
            for s in db.scalars(
                select(VpnSession).where(VpnSession.ended_at.is_(None)).order_by(VpnSession.id)
            )
        ],
        pods=[pod_state(p) for p in db.scalars(select(Pod).order_by(Pod.id))],
    )
