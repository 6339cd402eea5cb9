"""Policy as code against the database: read the current policy, plan, apply, explain access.

The plan is `core.policyfile.diff` (pure); this module reads the database into a `Policy` and
carries a diff out through the same service functions (controlplane/services) as the
individual user/group/rule endpoints, so an apply writes the same rows and change events they
would. The caller's transaction makes an apply all or nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import Change, Group, Membership, Pod, Rule, User
from vpnfleet.controlplane.pki import Sealer
from vpnfleet.controlplane.services import groups as group_service
from vpnfleet.controlplane.services import rules as rule_service
from vpnfleet.controlplane.services import users as user_service
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import jsonable
from vpnfleet.core import fwlimits, netparse, policyfile
from vpnfleet.core.policyfile import GrantSpec, GroupSpec, Policy, PolicyDiff, UserSpec


def settle(db: Session) -> None:
    """Wait for in-flight writers, and hold new ones off until this transaction ends.

    Every request that appends to the change log holds this lock until it commits, so after
    it the reads below see every such change already answered, and none lands halfway
    through them (under READ COMMITTED each statement could otherwise see a different state).
    On SQLite it is a no-op: transactions begin IMMEDIATE and serialize already.
    """
    changelog.lock(db)


def current_policy(db: Session) -> Policy:
    """The database's users, groups, memberships and rules as a Policy."""
    groups_of: dict[int, list[str]] = {}
    for user_id, gname in db.execute(select(Membership.user_id, Group.name).join(Group)):
        groups_of.setdefault(user_id, []).append(gname)
    users = {
        u.name: UserSpec(
            name=u.name,
            email=u.email,
            mode=netparse.parse_mode(u.mode),
            max_sessions=u.max_sessions,
            enabled=u.enabled,
            groups=tuple(sorted(groups_of.get(u.id, []))),
            auth_policy=u.auth_policy or "inherit",
        )
        for u in db.scalars(select(User).order_by(User.name))
    }
    grants: dict[int, list[GrantSpec]] = {}
    for r in db.scalars(select(Rule).order_by(Rule.id)):
        grants.setdefault(r.group_id, []).append(
            GrantSpec(
                destination=r.destination,
                proto=netparse.parse_protocol(r.proto),
                ports=r.ports,
                description=r.description,
                rule_id=r.id,
            )
        )
    groups = {
        g.name: GroupSpec(
            name=g.name,
            description=g.description,
            grants=tuple(grants.get(g.id, [])),
            auth_policy=g.auth_policy or "none",
        )
        for g in db.scalars(select(Group).order_by(Group.name))
    }
    return Policy(users=users, groups=groups)


def plan(db: Session, desired: Policy, prune: bool, filename: str = "policy.yaml") -> PolicyDiff:
    """What applying `desired` would change; reads only. Raises Problem (422) when the
    result would put the pods' firewall over its element limit."""
    settle(db)
    current = current_policy(db)
    check_firewall_limit(current, desired, prune, filename)
    return policyfile.diff(current, desired, prune)


def _sizes(groups: Iterable[GroupSpec]) -> dict[str, int]:
    return rule_service.firewall_sizes(
        {g.name: [(r.destination, r.proto, r.ports) for r in g.grants] for g in groups}
    )


def check_firewall_limit(current: Policy, desired: Policy, prune: bool, filename: str) -> None:
    """Refuse (422, naming the group) an apply whose result needs more firewall set elements
    than :data:`fwlimits.MAX_FIREWALL_ELEMENTS` and more than the fleet holds now."""
    now = _sizes(current.groups.values())
    after = {} if prune else dict(now)
    after.update(_sizes(desired.groups.values()))
    grown = [g for g in desired.groups if after[g] > now.get(g, 0)]
    overflow = fwlimits.check(after, grown or desired.groups, before=sum(now.values()))
    if overflow is None:
        return
    issue = policyfile.Issue(
        desired.groups[overflow.group].line if overflow.group in desired.groups else None,
        f"groups.{overflow.group}.grants",
        overflow.message(),
    )
    raise Problem(
        422,
        "Invalid policy",
        f"{issue.format(filename)}; nothing was written",
        errors=[dataclasses.asdict(issue)],
    )


def export(db: Session) -> str:
    """The current state as a policy file."""
    settle(db)
    revision = changelog.current_revision(db)
    header = f"# vpnfleet policy exported at revision {revision}\n"
    return header + policyfile.render(current_policy(db))


def apply(
    db: Session,
    who: Principal,
    sealer: Sealer,
    desired: Policy,
    prune: bool,
    filename: str,
) -> tuple[PolicyDiff, int]:
    """Make the database match `desired` in the caller's transaction; returns the diff and the
    revision after it. Raises Problem (e.g. an exhausted gateway pool) with nothing kept."""
    # plan() settles first: the diff is computed against committed state, and a concurrent
    # apply waits for this one instead of creating the same objects.
    diff = plan(db, desired, prune, filename)
    # One audit row for the whole apply (below), not one per object; users whose groups or
    # fields change get one upsert each, with their final state, after everything else.
    journal = Journal(db, who, itemized=False)
    groups = {g.name: g for g in db.scalars(select(Group))}
    users = {u.name: u for u in db.scalars(select(User))}

    # Additions first and removals last: replacing a grant never opens a gap in access.
    for ref in diff.groups_created:
        groups[ref.name] = group_service.create_group(db, journal, ref.name, ref.description)
        if ref.auth_policy not in (None, "none"):
            group_service.set_auth_policy(db, journal, groups[ref.name], ref.auth_policy)
    for upd in diff.groups_updated:
        fields = {c.field: c.new for c in upd.changes}
        if "description" in fields:
            group_service.update_group(db, journal, groups[upd.name], fields["description"])
        if "auth_policy" in fields:
            policy = fields["auth_policy"]
            group_service.set_auth_policy(
                db, journal, groups[upd.name], None if policy == "none" else policy
            )
    for gref in diff.grants_added:
        rule_service.create_rule(
            db,
            journal,
            groups[gref.group],
            destination=gref.destination,
            proto=netparse.parse_protocol(gref.proto),
            ports=gref.ports,
            description=gref.description,
        )
    for gref in diff.grants_updated:
        rule = db.get_one(Rule, gref.rule_id)
        rule_service.update_rule(db, journal, rule, gref.description)

    for spec in diff.users_created:
        # Created with their groups (one user event, no membership events), like POST /users.
        users[spec.name] = user_service.create_user(
            db,
            journal,
            sealer,
            name=spec.name,
            email=spec.email,
            mode=spec.mode,
            enabled=spec.enabled,
            max_sessions=spec.max_sessions,
            groups=spec.groups,
        )
    created = {u.name for u in diff.users_created}
    for spec in diff.users_created:
        if spec.auth_policy not in (None, "inherit"):
            user_service.update_user(
                db, journal, users[spec.name], {"auth_policy": spec.auth_policy}
            )

    for upd in diff.users_updated:
        changes = {c.field: c.new for c in upd.changes}
        if changes.get("auth_policy") == "inherit":
            changes["auth_policy"] = None
        user_service.update_user(db, journal, users[upd.name], changes)
    for m in diff.memberships_added:
        if m.user not in created:
            group_service.add_member(db, journal, groups[m.group], users[m.user])
    for m in diff.memberships_removed:
        group_service.remove_member(db, journal, groups[m.group], users[m.user])
    for gref in diff.grants_removed:
        rule_service.delete_rule(db, journal, db.get_one(Rule, gref.rule_id))

    for name in diff.users_deleted:
        user_service.delete_user(db, journal, users[name], "user deleted (policy prune)")
    for name in diff.groups_deleted:
        group_service.delete_group(db, journal, groups[name])

    audit = {
        "filename": filename,
        "prune": prune,
        "summary": diff.summary(),
        "counts": diff.counts(),
        "diff": jsonable(dataclasses.asdict(diff)),
    }
    journal.summarize("policy.apply", filename, audit)
    return diff, journal.commit()


# --- user access ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessGrant:
    group: str
    rule_id: int
    destination: str
    proto: str
    ports: str | None
    description: str | None


@dataclass(frozen=True)
class PodEnforcement:
    pod: str
    ready: bool
    applied_revision: int
    last_heartbeat: dt.datetime | None
    enforced: bool


@dataclass(frozen=True)
class UserAccess:
    user: str
    mode: str
    enabled: bool
    groups: list[str]
    grants: list[AccessGrant]
    revision: int  # the newest change that affected this user's access
    current_revision: int
    pods: list[PodEnforcement] = field(default_factory=list)

    @property
    def enforced_everywhere(self) -> bool:
        return all(p.enforced for p in self.pods)


def affecting_revision(db: Session, user: User, group_ids: list[int]) -> int:
    """The revision of the newest change to this user's access.

    User events (every membership change is followed by one), and rule or group events of
    the user's current groups. If the log has been pruned past all of them, the revision
    just before the oldest kept row is a safe upper bound.
    """
    conds = [and_(Change.kind == "user", Change.object_id == user.id)]
    if group_ids:
        conds.append(and_(Change.kind == "group", Change.object_id.in_(group_ids)))
        conds.append(
            and_(Change.kind == "rule", Change.data["group_id"].as_integer().in_(group_ids))
        )
    found = db.scalar(select(func.max(Change.id)).where(or_(*conds)))
    if found is not None:
        return int(found)
    oldest = db.scalar(select(func.min(Change.id)))
    return max(0, int(oldest or 1) - 1)


def user_access(db: Session, name: str) -> UserAccess:
    """What `name` may reach, through which group, and which pods enforce it yet."""
    settle(db)
    user = user_service.get_user(db, name)
    rows = db.execute(
        select(Group, Rule)
        .join(Membership, Membership.group_id == Group.id)
        .outerjoin(Rule, Rule.group_id == Group.id)
        .where(Membership.user_id == user.id)
        .order_by(Group.name, Rule.id)
    ).all()
    group_ids: dict[str, int] = {}
    grants: list[AccessGrant] = []
    for group, rule in rows:
        group_ids[group.name] = group.id
        if rule is not None:
            grants.append(
                AccessGrant(
                    group=group.name,
                    rule_id=rule.id,
                    destination=rule.destination,
                    proto=rule.proto,
                    ports=rule.ports,
                    description=rule.description,
                )
            )
    revision = affecting_revision(db, user, sorted(group_ids.values()))
    pods = [
        PodEnforcement(
            pod=p.name,
            ready=p.ready,
            applied_revision=p.applied_revision,
            last_heartbeat=p.last_heartbeat,
            enforced=p.applied_revision >= revision,
        )
        for p in db.scalars(select(Pod).order_by(Pod.name))
    ]
    return UserAccess(
        user=user.name,
        mode=user.mode,
        enabled=user.enabled,
        groups=sorted(group_ids),
        grants=grants,
        revision=revision,
        current_revision=changelog.current_revision(db),
        pods=pods,
    )
