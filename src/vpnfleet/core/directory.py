"""Directory sync as a plan: what the directory says, what vpnfleet holds, and the diff.

Pure logic, no I/O: the LDAP reader (controlplane/ldapsource.py) builds a `DirectoryView`,
the control plane builds a `LocalView` from its tables, `plan_sync` compares them, and
services/directory.py applies the plan in one transaction. The rules:

- Only the vpnfleet groups named in the group mapping are managed: their members are exactly
  the directory users found in the mapped directory groups. Other groups are never touched.
- A directory user found in a managed group is created here if missing (mode from the
  config, enabled unless the directory disables them) and becomes *directory-managed*; a
  local user of the same name is adopted.
- A directory-managed user the directory disables, or who is no longer in any mapped
  directory group (deleted, moved out of the search base, removed from the groups), is
  disabled here. Users the directory never managed are never enabled or disabled.
- A user the sync disabled is enabled again when the directory has them enabled and in a
  mapped group; a user an administrator disabled by hand stays disabled.
- Mass-disable guard: when more than `max_disable_fraction` of the enabled
  directory-managed users would be disabled in one sync, nothing is applied
  (`MassDisableRefused`) unless forced. Disabling every managed user (a search that returns
  nobody) is always a mass disable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DirectoryUser:
    """A user as the directory describes them."""

    name: str
    dn: str
    email: str | None
    disabled: bool


@dataclass(frozen=True)
class DirectoryView:
    """What one read of the directory found: users by vpnfleet name, and for each managed
    vpnfleet group the names of its members (nesting already resolved)."""

    users: Mapping[str, DirectoryUser]
    members: Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class LocalUser:
    name: str
    enabled: bool
    email: str | None
    managed: bool  # recorded as directory-managed (created or adopted by a sync)
    disabled_by_sync: bool


@dataclass(frozen=True)
class LocalView:
    users: Mapping[str, LocalUser]
    members: Mapping[str, frozenset[str]]  # current members of each managed group
    existing_groups: frozenset[str]


@dataclass(frozen=True)
class NewUser:
    name: str
    dn: str
    email: str | None
    enabled: bool


@dataclass
class SyncPlan:
    """The diff one sync applies. Lists are sorted so that a dry run reads the same twice."""

    create_groups: list[str] = field(default_factory=list)
    create_users: list[NewUser] = field(default_factory=list)
    adopt_users: list[tuple[str, str]] = field(default_factory=list)  # (name, dn)
    disable_users: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    enable_users: list[str] = field(default_factory=list)
    update_emails: list[tuple[str, str | None]] = field(default_factory=list)
    add_members: list[tuple[str, str]] = field(default_factory=list)  # (group, user)
    remove_members: list[tuple[str, str]] = field(default_factory=list)  # (group, user)

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.create_groups,
                self.create_users,
                self.adopt_users,
                self.disable_users,
                self.enable_users,
                self.update_emails,
                self.add_members,
                self.remove_members,
            )
        )

    def counts(self) -> dict[str, int]:
        return {
            "groups_created": len(self.create_groups),
            "users_created": len(self.create_users),
            "users_adopted": len(self.adopt_users),
            "users_disabled": len(self.disable_users),
            "users_enabled": len(self.enable_users),
            "emails_updated": len(self.update_emails),
            "members_added": len(self.add_members),
            "members_removed": len(self.remove_members),
        }


def split_plan(plan: SyncPlan, batch: int) -> list[SyncPlan]:
    """The plan as consecutive transactions: new users `batch` at a time (the first part also
    creates the groups; each new user comes with their memberships), then everything else.
    One part when there are at most `batch` new users. A first import of thousands of users
    then never holds the database's write lock for minutes (SQLite has one writer)."""
    if len(plan.create_users) <= batch:
        return [plan]
    new = {u.name for u in plan.create_users}
    parts: list[SyncPlan] = []
    for first in range(0, len(plan.create_users), batch):
        chunk = plan.create_users[first : first + batch]
        names = {u.name for u in chunk}
        parts.append(
            SyncPlan(
                create_groups=plan.create_groups if first == 0 else [],
                create_users=chunk,
                add_members=[m for m in plan.add_members if m[1] in names],
            )
        )
    parts.append(
        SyncPlan(
            adopt_users=plan.adopt_users,
            disable_users=plan.disable_users,
            enable_users=plan.enable_users,
            update_emails=plan.update_emails,
            add_members=[m for m in plan.add_members if m[1] not in new],
            remove_members=plan.remove_members,
        )
    )
    return parts


class MassDisableRefused(Exception):
    """Applying the plan would disable too many directory-managed users at once."""

    def __init__(self, would_disable: int, managed_enabled: int, fraction: float) -> None:
        self.would_disable = would_disable
        self.managed_enabled = managed_enabled
        self.fraction = fraction
        super().__init__(
            f"refusing to disable {would_disable} of {managed_enabled} enabled "
            f"directory-managed users in one sync (the limit is {fraction:.0%}): check the "
            "directory, the search bases and the filters; run the sync with --force if this "
            "is intended"
        )


def plan_sync(directory: DirectoryView, local: LocalView) -> SyncPlan:
    """The changes that make the managed part of vpnfleet match the directory."""
    plan = SyncPlan()
    in_groups: set[str] = set()
    for members in directory.members.values():
        in_groups |= members
    plan.create_groups = sorted(set(directory.members) - local.existing_groups)

    for name in sorted(in_groups):
        entry = directory.users[name]
        have = local.users.get(name)
        if have is None:
            plan.create_users.append(NewUser(name, entry.dn, entry.email, not entry.disabled))
            continue
        if not have.managed:
            plan.adopt_users.append((name, entry.dn))
        if entry.disabled and have.enabled:
            plan.disable_users.append((name, "disabled in the directory"))
        elif not entry.disabled and not have.enabled and have.managed and have.disabled_by_sync:
            plan.enable_users.append(name)
        if entry.email is not None and entry.email != have.email:
            plan.update_emails.append((name, entry.email))

    for name in sorted(local.users):
        have = local.users[name]
        if have.managed and have.enabled and name not in in_groups:
            plan.disable_users.append((name, "no longer in a mapped directory group"))
    plan.disable_users.sort()

    for group in sorted(directory.members):
        want = directory.members[group]
        now = local.members.get(group, frozenset())
        plan.add_members += [(group, u) for u in sorted(want - now)]
        plan.remove_members += [(group, u) for u in sorted(now - want)]
    return plan


def check_mass_disable(plan: SyncPlan, local: LocalView, fraction: float) -> None:
    """Raise MassDisableRefused when the plan disables more than `fraction` of the enabled
    directory-managed users, or every one of them whatever `fraction` (users created by this
    very plan do not count)."""
    managed_enabled = sum(1 for u in local.users.values() if u.managed and u.enabled)
    would = sum(1 for name, _ in plan.disable_users if local.users[name].managed)
    if would and (would > fraction * managed_enabled or would == managed_enabled):
        raise MassDisableRefused(would, managed_enabled, fraction)
