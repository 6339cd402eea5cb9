"""API tokens: made and revoked by admins (the API and the console). The secret is shown once;
only its SHA-256 is kept."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import auth, changelog
from vpnfleet.controlplane.errors import conflict, not_found
from vpnfleet.controlplane.models import AdminToken, utcnow


def create(db: Session, who: auth.Principal, name: str, role: str) -> tuple[AdminToken, str]:
    """A new token row and its secret (the caller shows the secret once)."""
    if db.scalar(select(AdminToken.id).where(AdminToken.name == name)) is not None:
        raise conflict(f"token {name!r} already exists")
    secret = auth.new_token()
    row = AdminToken(
        name=name,
        role=role,
        token_hash=auth.hash_token(secret),
        prefix=auth.display_prefix(secret),
        created_by=who.name,
    )
    db.add(row)
    db.flush()
    changelog.record(
        db,
        who,
        "token.create",
        row.name,
        None,
        {"name": row.name, "role": row.role, "prefix": row.prefix},
        [],
    )
    return row, secret


def revoke(db: Session, who: auth.Principal, name: str) -> AdminToken:
    row = db.scalar(select(AdminToken).where(AdminToken.name == name))
    if row is None:
        raise not_found("token", name)
    if row.revoked_at is not None:
        raise conflict(f"token {name!r} is already revoked")
    if row.id == who.token_id:
        raise conflict("a token cannot revoke itself; use another admin token")
    row.revoked_at = utcnow()
    changelog.record(db, who, "token.revoke", name, {"name": name, "role": row.role}, None, [])
    return row
