"""The change log: every change bumps the global revision; admin actions leave an audit row.

A change is a typed object (vpnfleet.wire) that was upserted, or the key of one that was
deleted; its kind follows from its type, so a row's kind and data cannot disagree. Rows store
the object as JSON and are read back through the same parser agents use (`event_from_row`),
on the way in too: what the log accepts, every watcher can read.

Writers take a lock before inserting change rows so that revisions become visible in commit
order (PostgreSQL: a transaction-scoped advisory lock; SQLite serializes writers already).
Without it a watcher could read revision 11 before revision 10 commits and miss 10 forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.models import AdminAudit, Change
from vpnfleet.wire import (
    ChangeEvent,
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
    UserKey,
    UserState,
    parse_change_event,
)

_ADVISORY_KEY = 0x7670_6E66  # "vpnf"

Payload = (
    UserState
    | GroupState
    | MembershipState
    | RuleState
    | PoolState
    | PodState
    | LiveSession
    | CrlUpdate
    | PkiState
)
Key = UserKey | GroupKey | MembershipState | RuleKey | SessionKey

_KIND: dict[type[Any], str] = {
    UserState: "user",
    UserKey: "user",
    GroupState: "group",
    GroupKey: "group",
    MembershipState: "membership",
    RuleState: "rule",
    RuleKey: "rule",
    PoolState: "pool",
    PodState: "pod",
    LiveSession: "session",
    SessionKey: "session",
    CrlUpdate: "crl",
    PkiState: "pki",
}


@dataclass(frozen=True)
class Upsert:
    """An object that was created or changed, as agents see it now."""

    object: Payload


@dataclass(frozen=True)
class Delete:
    """The key of an object that was deleted."""

    key: Key


Pending = Upsert | Delete


def _object_id(value: Payload | Key) -> int | None:
    # Kept in its own column so that "changes to this user/group" is an indexed lookup
    # (see policy.affecting_revision); a membership is filed under its group.
    if isinstance(value, MembershipState):
        return value.group_id
    if isinstance(value, LiveSession | SessionKey | CrlUpdate | PkiState):
        return None
    return value.id


def _row(change: Pending) -> Change:
    value: Payload | Key = change.object if isinstance(change, Upsert) else change.key
    return Change(
        kind=_KIND[type(value)],
        op="upsert" if isinstance(change, Upsert) else "delete",
        object_id=_object_id(value),
        data=value.model_dump(mode="json"),
    )


def event_from_row(row: Change) -> ChangeEvent:
    """The typed event a stored row stands for; ValueError if it is not one (a row written by
    another version, or by hand)."""
    body = "object" if row.op == "upsert" else "key"
    return parse_change_event(
        {
            "type": "change",
            "revision": row.id,
            "at": row.at,
            "kind": row.kind,
            "op": row.op,
            body: row.data,
        }
    )


# Set in a session's info while its transaction holds the change-log lock (PostgreSQL) or has
# written (SQLite's database lock): a request commits it in the handler's own thread, at once
# (controlplane/routing.py), instead of holding the lock across another threadpool hop.
LOCKED = "changelog_locked"


def lock(db: Session) -> None:
    """Serialize change-log writers (and consistent readers) until the transaction ends."""
    db.info[LOCKED] = True
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})


def append(db: Session, changes: Sequence[Pending]) -> int:
    """Append changes to the log in this transaction; returns the new revision."""
    lock(db)
    rows = [_row(c) for c in changes]
    db.add_all(rows)
    db.flush()
    for row in rows:
        event_from_row(row)  # a row no watcher could read must not be committed
    db.info["changed"] = True
    return rows[-1].id if rows else current_revision(db)


def audit(
    db: Session,
    who: Principal,
    action: str,
    target: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    revision: int | None,
) -> None:
    """Write one admin audit row (who changed what; `revision` is the change it made)."""
    db.add(
        AdminAudit(
            actor=who.name,
            role=who.role,
            action=action,
            target=target,
            before=before,
            after=after,
            revision=revision,
        )
    )
    db.flush()


def record(
    db: Session,
    who: Principal,
    action: str,
    target: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    changes: Sequence[Pending] = (),
) -> int:
    """Append `changes` and the admin audit row for one mutating API call."""
    revision = append(db, changes) if changes else None
    audit(db, who, action, target, before, after, revision)
    return revision if revision is not None else current_revision(db)


def current_revision(db: Session) -> int:
    return int(db.scalar(select(func.coalesce(func.max(Change.id), 0))) or 0)
