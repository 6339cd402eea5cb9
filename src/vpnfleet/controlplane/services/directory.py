"""The directory sync's settings, its lease, its status, and applying a sync plan.

The settings live in one row (models.DirectoryConfig) with the bind password sealed by the
same Sealer as the private keys. Applying a plan (core/directory.py) goes through the same
services as the admin API, so agents learn every change from the change log like any other,
and a disabled user's live sessions are marked killed exactly as `vpnfleet user kill` does.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.errors import conflict
from vpnfleet.controlplane.ldapsource import LdapConfig
from vpnfleet.controlplane.models import (
    DirectoryAccount,
    DirectoryConfig,
    Group,
    Membership,
    User,
    utcnow,
)
from vpnfleet.controlplane.schemas import (
    DirectoryDiff,
    DirectorySetIn,
    DirectorySettings,
    DirectoryStatusOut,
)
from vpnfleet.controlplane.services import groups, sessions, users
from vpnfleet.controlplane.services import idp as idpsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.core import netparse
from vpnfleet.core.directory import LocalUser, LocalView, SyncPlan

CONFIG_ID = 1
DISABLED_REASON = "disabled in the directory"


def get_config(db: Session, *, lock: bool = False) -> DirectoryConfig | None:
    query = select(DirectoryConfig).where(DirectoryConfig.id == CONFIG_ID)
    return db.scalar(query.with_for_update() if lock else query)


def settings_of(row: DirectoryConfig) -> DirectorySettings:
    return DirectorySettings.model_validate(row.settings)


def set_config(db: Session, journal: Journal, sealer: pki.Sealer, body: DirectorySetIn) -> None:
    """Store the settings (one audit entry with before/after, never the password)."""
    settings = DirectorySettings.model_validate(body.model_dump(exclude={"bind_password"}))
    row = get_config(db, lock=True)
    # The IdP's row second, as `idp set` locks them (services/idp.py): one source per group.
    idp_row = idpsvc.get_config(db, lock=True)
    shared = idpsvc.shared_groups(
        set(settings.group_map.values()), idp_row.settings if idp_row else None
    )
    if shared:
        raise conflict(
            f"the IdP's group claim already manages {idpsvc.listed(shared)} (idp group_map): "
            "a group is managed by one source only"
        )
    before = None if row is None else dict(row.settings)
    if row is None:
        if body.bind_password is None:
            raise conflict("no directory is configured yet: give the bind password")
        row = DirectoryConfig(id=CONFIG_ID, bind_password_sealed="")
        db.add(row)
    if body.bind_password is not None:
        row.bind_password_sealed = sealer.seal(body.bind_password)
    row.settings = settings.model_dump()
    row.updated_at = utcnow()
    row.updated_by = journal.who.name
    db.flush()
    after = {**row.settings, "bind_password_changed": body.bind_password is not None}
    journal.audit("directory.set", "directory", before, after)


def reseal(db: Session, old: pki.Sealer, new: pki.Sealer) -> bool:
    """Seal the stored bind password with ``new`` (`vpnfleet db reseal`); False if none."""
    row = get_config(db)
    if row is None:
        return False
    row.bind_password_sealed = new.seal(old.unseal(row.bind_password_sealed))
    db.flush()
    return True


def ldap_config(row: DirectoryConfig, sealer: pki.Sealer) -> LdapConfig:
    s = settings_of(row)
    return LdapConfig(
        url=s.url,
        bind_dn=s.bind_dn,
        bind_password=sealer.unseal(row.bind_password_sealed),
        user_bases=tuple(s.user_bases),
        group_bases=tuple(s.group_bases),
        group_map=dict(s.group_map),
        flavor=s.flavor,
        start_tls=s.start_tls,
        ca_file=s.ca_file,
        user_filter=s.user_filter,
        group_filter=s.group_filter,
        name_attribute=s.name_attribute,
        email_attribute=s.email_attribute,
        group_name_attribute=s.group_name_attribute,
        member_attribute=s.member_attribute,
        disabled_attribute=s.disabled_attribute,
        disabled_value=s.disabled_value,
        nested=s.nested,
        timeout=s.timeout_seconds,
    )


def status_out(row: DirectoryConfig | None) -> DirectoryStatusOut:
    if row is None:
        return DirectoryStatusOut(configured=False)
    s = settings_of(row)
    leased = row.lease_until is not None and row.lease_until > utcnow()
    return DirectoryStatusOut(
        configured=True,
        enabled=s.enabled,
        interval_seconds=s.interval_seconds,
        last_attempt_at=row.last_attempt_at,
        last_success_at=row.last_success_at,
        last_status=row.last_status,
        last_error=row.last_error,
        last_actor=row.last_actor,
        last_counts=row.last_counts,
        syncing=row.lease_holder if leased else None,
    )


# --- the lease: one replica syncs at a time ---------------------------------------------


def claim_lease(
    db: Session, holder: str, ttl: dt.timedelta, *, due_before: dt.datetime | None = None
) -> bool:
    """Take the sync lease if nobody holds it (a conditional UPDATE: atomic on SQLite, whose
    writers are serialized, and on PostgreSQL, where the row lock makes a second replica wait
    and then see the lease taken). With `due_before`, only if the last attempt was before it
    (the periodic sync: a replica that just synced leaves the others nothing to do)."""
    now = utcnow()
    cond = [
        DirectoryConfig.id == CONFIG_ID,
        (DirectoryConfig.lease_until.is_(None)) | (DirectoryConfig.lease_until < now),
    ]
    if due_before is not None:
        cond.append(
            (DirectoryConfig.last_attempt_at.is_(None))
            | (DirectoryConfig.last_attempt_at < due_before)
        )
    result = db.execute(
        update(DirectoryConfig)
        .where(*cond)
        .values(lease_holder=holder, lease_until=now + ttl)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def release_lease(db: Session, holder: str) -> None:
    db.execute(
        update(DirectoryConfig)
        .where(DirectoryConfig.id == CONFIG_ID, DirectoryConfig.lease_holder == holder)
        .values(lease_holder=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def record_outcome(
    db: Session,
    *,
    actor: str,
    status: str,
    error: str | None,
    counts: dict[str, Any] | None,
    at: dt.datetime,
) -> None:
    """The last sync's outcome, shown by `vpnfleet directory status`."""
    row = get_config(db)
    if row is None:
        return
    row.last_attempt_at = at
    row.last_status = status
    row.last_error = error
    row.last_actor = actor
    if counts is not None:
        row.last_counts = counts
    if status == "ok":
        row.last_success_at = at
    db.flush()


# --- plan and apply -----------------------------------------------------------------------


def local_view(db: Session, managed_groups: set[str]) -> LocalView:
    """What vpnfleet holds now, for the parts a sync may change (four queries)."""
    # Plain rows, not ORM objects: a steady-state sync reads every user and does nothing.
    by_sync: dict[int, bool] = {
        uid: flag
        for uid, flag in db.execute(
            select(DirectoryAccount.user_id, DirectoryAccount.disabled_by_sync)
        )
    }
    local: dict[str, LocalUser] = {}
    for uid, name, enabled, email in db.execute(
        select(User.id, User.name, User.enabled, User.email)
    ):
        local[name] = LocalUser(
            name=name,
            enabled=enabled,
            email=email,
            managed=uid in by_sync,
            disabled_by_sync=by_sync.get(uid, False),
        )
    existing = set(db.scalars(select(Group.name).where(Group.name.in_(sorted(managed_groups)))))
    members: dict[str, set[str]] = {g: set() for g in existing}
    for gname, uname in db.execute(
        select(Group.name, User.name)
        .select_from(Membership)
        .join(Group, Group.id == Membership.group_id)
        .join(User, User.id == Membership.user_id)
        .where(Group.name.in_(sorted(existing)))
    ):
        members[gname].add(uname)
    return LocalView(
        users=local,
        members={g: frozenset(m) for g, m in members.items()},
        existing_groups=frozenset(existing),
    )


def diff_out(plan: SyncPlan) -> DirectoryDiff:
    return DirectoryDiff(
        groups_created=plan.create_groups,
        users_created=[u.name for u in plan.create_users],
        users_adopted=[name for name, _ in plan.adopt_users],
        users_disabled=[f"{name}: {why}" for name, why in plan.disable_users],
        users_enabled=plan.enable_users,
        emails_updated=[name for name, _ in plan.update_emails],
        members_added=[f"{g}/{u}" for g, u in plan.add_members],
        members_removed=[f"{g}/{u}" for g, u in plan.remove_members],
    )


def apply_plan(
    db: Session,
    journal: Journal,
    sealer: pki.Sealer,
    plan: SyncPlan,
    new_user_mode: str,
    pod_lease: dt.timedelta,
) -> int:
    """Apply `plan` through the regular services; returns how many sessions were marked to
    end (those of users it disabled)."""
    mode = netparse.parse_mode(new_user_mode)
    by_name: dict[str, User] = {}

    def user(name: str) -> User:
        if name not in by_name:
            by_name[name] = users.get_user(db, name)
        return by_name[name]

    group_rows: dict[str, Group] = {}

    def group(name: str) -> Group:
        if name not in group_rows:
            group_rows[name] = groups.get_group(db, name)
        return group_rows[name]

    for gname in plan.create_groups:
        group_rows[gname] = groups.create_group(db, journal, gname, "managed by the directory sync")
    # A new user is created with their groups: one event with the user's whole state, and
    # no membership event each (what `vpnfleet user create --group` does too).
    new_names = {u.name for u in plan.create_users}
    groups_of: dict[str, list[str]] = {}
    for gname, uname in plan.add_members:
        if uname in new_names:
            groups_of.setdefault(uname, []).append(gname)
    if mode == "nat":
        created = users.create_nat_users(
            db,
            journal,
            sealer,
            [
                users.NewNatUser(u.name, u.email, u.enabled, groups_of.get(u.name, ()))
                for u in plan.create_users
            ],
        )
        by_name.update((row.name, row) for row in created)
    else:  # a gateway user needs a lease each: the one-by-one path takes it
        for new in plan.create_users:
            by_name[new.name] = users.create_user(
                db,
                journal,
                sealer,
                name=new.name,
                email=new.email,
                mode=mode,
                enabled=new.enabled,
                max_sessions=1,
                groups=groups_of.get(new.name, ()),
            )
    for new in plan.create_users:
        db.add(
            DirectoryAccount(
                user_id=by_name[new.name].id, dn=new.dn, disabled_by_sync=not new.enabled
            )
        )
    for name, dn in plan.adopt_users:
        db.add(DirectoryAccount(user_id=user(name).id, dn=dn, disabled_by_sync=False))
    db.flush()
    killed = 0
    for name, _why in plan.disable_users:
        row = user(name)
        users.set_enabled(db, journal, row, False)
        account = db.get(DirectoryAccount, row.id)
        if account is not None:
            account.disabled_by_sync = True
        killed += sessions.kill_user_sessions(db, journal, row, pod_lease, DISABLED_REASON)
    for name in plan.enable_users:
        row = user(name)
        users.set_enabled(db, journal, row, True)
        account = db.get(DirectoryAccount, row.id)
        if account is not None:
            account.disabled_by_sync = False
    for name, email in plan.update_emails:
        users.update_user(db, journal, user(name), {"email": email})
    for gname, uname in plan.remove_members:
        groups.remove_member(db, journal, group(gname), user(uname))
    for gname, uname in plan.add_members:
        if uname not in new_names:
            groups.add_member(db, journal, group(gname), user(uname))
    db.flush()
    return killed
