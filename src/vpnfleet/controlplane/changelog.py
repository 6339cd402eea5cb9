"""The change log: every change bumps the global revision and leaves an admin audit row.

Writers take a lock before inserting change rows so that revisions become visible in commit
order (PostgreSQL: a transaction-scoped advisory lock; SQLite serializes writers already).
Without it a watcher could read revision 11 before revision 10 commits and miss 10 forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.models import AdminAudit, Change

_ADVISORY_KEY = 0x7670_6E66  # "vpnf"


@dataclass(frozen=True)
class ChangeSpec:
    """One change an agent may care about: `kind` names the object type, `op` upsert/delete."""

    kind: str
    op: str
    object_id: int | None
    data: dict[str, Any]


def lock(db: Session) -> None:
    """Serialize change-log writers (and consistent readers) until the transaction ends."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})


def append(db: Session, changes: list[ChangeSpec]) -> int:
    """Append changes to the log in this transaction; returns the new revision."""
    lock(db)
    rows = [Change(kind=c.kind, op=c.op, object_id=c.object_id, data=c.data) for c in changes]
    db.add_all(rows)
    db.flush()
    db.info["changed"] = True
    return rows[-1].id if rows else current_revision(db)


def record(
    db: Session,
    who: Principal,
    action: str,
    target: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    changes: list[ChangeSpec],
) -> int:
    """Append `changes` and the admin audit row for one mutating API call."""
    revision = append(db, changes) if changes else None
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
    return revision if revision is not None else current_revision(db)


def current_revision(db: Session) -> int:
    return int(db.scalar(select(func.coalesce(func.max(Change.id), 0))) or 0)
