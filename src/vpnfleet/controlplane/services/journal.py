"""What one API call changed: change events for agents, in order, and its admin audit row(s).

Operations add to a journal; the caller commits it once, in the request's transaction, so an
API call appends its events and its audit row together or not at all.

A user's state depends on several tables (memberships, lease, certificate), and one call may
touch several of them: operations mark the user changed (`user_changed`) and the journal
emits one upsert per such user, with their final state, after every other event of the call.
A policy apply uses one journal for many operations (`itemized=False`): the operations' own
audit entries are dropped and the apply writes one summary row instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog, fleetstate
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.changelog import Delete, Key, Payload, Pending, Upsert
from vpnfleet.controlplane.models import User
from vpnfleet.wire import UserKey

AuditView = dict[str, Any] | None


@dataclass(frozen=True)
class _Entry:
    action: str
    target: str | None
    before: AuditView
    after: AuditView


class Journal:
    """The change events and audit entries of one API call, written by `commit`."""

    def __init__(self, db: Session, who: Principal, *, itemized: bool = True) -> None:
        self.db = db
        self.who = who
        self.itemized = itemized
        self._events: list[Pending] = []
        self._users: dict[str, User] = {}
        self._entries: list[_Entry] = []
        self.revision: int | None = None  # set by commit

    def upsert(self, obj: Payload) -> None:
        self._events.append(Upsert(obj))

    def delete(self, key: Key) -> None:
        self._events.append(Delete(key))
        if isinstance(key, UserKey):
            self._users.pop(key.name, None)

    def user_changed(self, user: User) -> None:
        """Agents must learn this user's final state (sent once, after the other events)."""
        self._users[user.name] = user

    def capture(self, view: Callable[[], AuditView]) -> AuditView:
        """An audit before/after view, computed only when it will be written."""
        return view() if self.itemized else None

    def audit(self, action: str, target: str | None, before: AuditView, after: AuditView) -> None:
        """One operation's audit entry (dropped in a journal that is not itemized)."""
        if self.itemized:
            self._entries.append(_Entry(action, target, before, after))

    def summarize(self, action: str, target: str | None, after: AuditView) -> None:
        """The one audit entry of a batch (e.g. a policy apply)."""
        self._entries.append(_Entry(action, target, None, after))

    def mark(self) -> tuple[int, dict[str, User], int]:
        """Where the journal stands, for `rewind` (one record of a batch that failed)."""
        return len(self._events), dict(self._users), len(self._entries)

    def rewind(self, mark: tuple[int, dict[str, User], int]) -> None:
        """Forget what was added since `mark` (its database savepoint was rolled back)."""
        events, users, entries = mark
        del self._events[events:]
        self._users = dict(users)
        del self._entries[entries:]

    def commit(self) -> int:
        """Append the events and audit rows; returns the revision after them."""
        events = list(self._events)
        if self._users:
            users = [self._users[name] for name in sorted(self._users)]
            events.extend(Upsert(s) for s in fleetstate.user_states(self.db, users))
        revision = changelog.append(self.db, events) if events else None
        for e in self._entries:
            changelog.audit(self.db, self.who, e.action, e.target, e.before, e.after, revision)
        self._events, self._users, self._entries = [], {}, []
        self.revision = revision if revision is not None else changelog.current_revision(self.db)
        return self.revision
