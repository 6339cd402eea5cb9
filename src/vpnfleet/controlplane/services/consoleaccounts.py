"""Console accounts: made, re-passworded, disabled and removed by admins (API and console).

Every change is in the admin audit log; no view of an account ever holds its password hash.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import ConsoleAccount, ConsoleSession
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.core import netparse, passwords

ROLES = ("admin", "operator", "auditor")


def view(account: ConsoleAccount) -> dict[str, Any]:
    return {
        "name": account.name,
        "role": account.role,
        "disabled": account.disabled_at is not None,
        "created_at": account.created_at,
        "created_by": account.created_by,
        "password_changed_at": account.password_changed_at,
        "last_login_at": account.last_login_at,
    }


def _audit(account: ConsoleAccount) -> dict[str, Any]:
    out = view(account)
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in out.items()}


def check_password(password: str, name: str) -> None:
    reason = passwords.weakness(password, name)
    if reason is not None:
        raise Problem(422, "Invalid input", f"password: {reason}")


def check_role(role: str) -> str:
    if role not in ROLES:
        raise Problem(422, "Invalid input", f"role: use one of {', '.join(ROLES)}")
    return role


def get_account(db: Session, name: str) -> ConsoleAccount:
    account = db.scalar(select(ConsoleAccount).where(ConsoleAccount.name == name))
    if account is None:
        raise not_found("console account", name)
    return account


def create(db: Session, journal: Journal, name: str, role: str, password: str) -> ConsoleAccount:
    try:
        netparse.validate_name(name, "account name")
    except ValueError as exc:
        raise Problem(422, "Invalid input", f"name: {exc}") from None
    check_role(role)
    check_password(password, name)
    if db.scalar(select(ConsoleAccount.id).where(ConsoleAccount.name == name)) is not None:
        raise conflict(f"console account {name!r} already exists")
    account = ConsoleAccount(
        name=name,
        role=role,
        password_hash=passwords.hash_password(password),
        created_by=journal.who.name,
    )
    db.add(account)
    db.flush()
    journal.audit("console-account.create", name, None, _audit(account))
    return account


def set_password(db: Session, journal: Journal, account: ConsoleAccount, password: str) -> None:
    """A new password; the account's signed-in sessions end."""
    check_password(password, account.name)
    account.password_hash = passwords.hash_password(password)
    account.password_changed_at = dt.datetime.now(dt.UTC)
    db.execute(delete(ConsoleSession).where(ConsoleSession.account_id == account.id))
    db.flush()
    journal.audit("console-account.password", account.name, None, None)


def set_role(db: Session, journal: Journal, account: ConsoleAccount, role: str) -> None:
    before = _audit(account)
    account.role = check_role(role)
    db.flush()
    journal.audit("console-account.role", account.name, before, _audit(account))


def set_disabled(db: Session, journal: Journal, account: ConsoleAccount, disabled: bool) -> None:
    """Disable (its sessions end at once) or enable an account."""
    before = _audit(account)
    if disabled and account.disabled_at is None:
        account.disabled_at = dt.datetime.now(dt.UTC)
        db.execute(delete(ConsoleSession).where(ConsoleSession.account_id == account.id))
    elif not disabled:
        account.disabled_at = None
    db.flush()
    action = "console-account.disable" if disabled else "console-account.enable"
    journal.audit(action, account.name, before, _audit(account))


def remove(db: Session, journal: Journal, account: ConsoleAccount) -> None:
    before = _audit(account)
    db.delete(account)  # its sessions go with it (ON DELETE CASCADE)
    db.flush()
    journal.audit("console-account.delete", account.name, before, None)
