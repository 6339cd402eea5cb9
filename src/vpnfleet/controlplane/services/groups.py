"""Groups and their members."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import fleetstate
from vpnfleet.controlplane.errors import conflict, not_found
from vpnfleet.controlplane.models import Group, Membership, Rule, User
from vpnfleet.controlplane.schemas import GroupOut
from vpnfleet.controlplane.services.journal import AuditView, Journal
from vpnfleet.controlplane.state import jsonable


def get_group(db: Session, name: str) -> Group:
    group = db.scalar(select(Group).where(Group.name == name))
    if group is None:
        raise not_found("group", name)
    return group


def group_out(db: Session, group: Group) -> GroupOut:
    """The group as the admin API shows it (and the audit log records it)."""
    return groups_out(db, [group])[0]


ID_CHUNK = 1_000  # ids per IN list (SQLite binds each as a parameter)


def counts(db: Session, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Members and rules of each group, counted in the database (a list page shows numbers,
    not the members: a group holding every user would load them all)."""
    members = dict(
        db.execute(
            select(Membership.group_id, func.count())
            .where(Membership.group_id.in_(ids))
            .group_by(Membership.group_id)
        ).all()
    )
    rules = dict(
        db.execute(
            select(Rule.group_id, func.count())
            .where(Rule.group_id.in_(ids))
            .group_by(Rule.group_id)
        ).all()
    )
    return {i: (members.get(i, 0), rules.get(i, 0)) for i in ids}


def groups_out(db: Session, rows: Sequence[Group]) -> list[GroupOut]:
    """Many groups as the API shows them, in two queries per 1,000 groups (not two each)."""
    members: dict[int, list[str]] = {g.id: [] for g in rows}
    rules: dict[int, int] = {}
    ids = list(members)
    for first in range(0, len(ids), ID_CHUNK):
        chunk = ids[first : first + ID_CHUNK]
        for group_id, user in db.execute(
            select(Membership.group_id, User.name)
            .join(User)
            .where(Membership.group_id.in_(chunk))
            .order_by(User.name)
        ):
            members[group_id].append(user)
        rules.update(
            db.execute(
                select(Rule.group_id, func.count())
                .where(Rule.group_id.in_(chunk))
                .group_by(Rule.group_id)
            ).all()
        )
    return [
        GroupOut(
            id=group.id,
            name=group.name,
            description=group.description,
            auth_policy=group.auth_policy,
            members=members[group.id],
            rules=rules.get(group.id, 0),
            created_at=group.created_at,
        )
        for group in rows
    ]


def _audit_view(db: Session, group: Group) -> AuditView:
    return dict(jsonable(group_out(db, group).model_dump()))


def create_group(db: Session, journal: Journal, name: str, description: str | None) -> Group:
    if db.scalar(select(Group.id).where(Group.name == name)) is not None:
        raise conflict(f"group {name!r} already exists")
    group = Group(name=name, description=description)
    db.add(group)
    db.flush()
    journal.upsert(fleetstate.group_state(group))
    journal.audit("group.create", name, None, journal.capture(lambda: _audit_view(db, group)))
    return group


def update_group(db: Session, journal: Journal, group: Group, description: str | None) -> Group:
    """Change a group's description (agents see the group again; nothing else changes)."""
    before = journal.capture(lambda: _audit_view(db, group))
    group.description = description
    db.flush()
    journal.upsert(fleetstate.group_state(group))
    journal.audit(
        "group.update", group.name, before, journal.capture(lambda: _audit_view(db, group))
    )
    return group


def set_auth_policy(db: Session, journal: Journal, group: Group, policy: str | None) -> Group:
    """Ask `policy` of the members' connections (None: no requirement); every member's
    resolved policy is sent to the agents again."""
    before = journal.capture(lambda: _audit_view(db, group))
    group.auth_policy = policy
    db.flush()
    for user in db.scalars(select(User).join(Membership).where(Membership.group_id == group.id)):
        journal.user_changed(user)
    journal.audit(
        "group.auth_policy", group.name, before, journal.capture(lambda: _audit_view(db, group))
    )
    return group


def delete_group(db: Session, journal: Journal, group: Group) -> None:
    """Delete a group with its rules and memberships; its members' new state follows."""
    before = journal.capture(lambda: _audit_view(db, group))
    members = list(db.scalars(select(User).join(Membership).where(Membership.group_id == group.id)))
    key = fleetstate.group_key(group)
    db.delete(group)
    db.flush()
    journal.delete(key)
    for user in members:
        journal.user_changed(user)
    journal.audit("group.delete", key.name, before, None)


def add_member(db: Session, journal: Journal, group: Group, user: User) -> None:
    if db.get(Membership, (group.id, user.id)) is not None:
        raise conflict(f"user {user.name!r} is already a member of group {group.name!r}")
    before = journal.capture(lambda: _audit_view(db, group))
    db.add(Membership(group_id=group.id, user_id=user.id))
    db.flush()
    journal.upsert(fleetstate.membership_state(group, user))
    journal.user_changed(user)
    journal.audit(
        "group.add_member",
        f"{group.name}/{user.name}",
        before,
        journal.capture(lambda: _audit_view(db, group)),
    )


def remove_member(db: Session, journal: Journal, group: Group, user: User) -> None:
    membership = db.get(Membership, (group.id, user.id))
    if membership is None:
        raise not_found(f"membership of user {user.name!r} in group", group.name)
    before = journal.capture(lambda: _audit_view(db, group))
    db.delete(membership)
    db.flush()
    journal.delete(fleetstate.membership_state(group, user))
    journal.user_changed(user)
    journal.audit(
        "group.remove_member",
        f"{group.name}/{user.name}",
        before,
        journal.capture(lambda: _audit_view(db, group)),
    )
