"""One-time links for VPN users: a sign-in to the self-service pages made by an operator, and
one download of a device's profile (what OpenVPN Connect's import link fetches).

The token is 256 random bits; only its SHA-256 is stored. A link works once and until it
expires (sign-in: 7 days; profile: 10 minutes), and only while the user is enabled."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import Certificate, User, UserLink
from vpnfleet.controlplane.services.journal import Journal

SIGN_IN = "sign-in"
PROFILE = "profile"
LIFETIMES = {SIGN_IN: dt.timedelta(days=7), PROFILE: dt.timedelta(minutes=10)}
MAX_TOKEN = 100


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make(
    db: Session,
    journal: Journal,
    user: User,
    purpose: str,
    certificate: Certificate | None = None,
) -> tuple[str, dt.datetime]:
    """A new link's token (shown once) and when it expires."""
    now = dt.datetime.now(dt.UTC)
    token = secrets.token_urlsafe(32)
    expires = now + LIFETIMES[purpose]
    db.add(
        UserLink(
            token_hash=_digest(token),
            purpose=purpose,
            user_id=user.id,
            certificate_id=certificate.id if certificate else None,
            created_by=journal.who.name,
            created_at=now,
            expires_at=expires,
        )
    )
    # Links that ended a day ago go with any new one: the table stays small without a sweep.
    db.execute(delete(UserLink).where(UserLink.expires_at < now - dt.timedelta(days=1)))
    db.flush()
    if purpose == SIGN_IN:
        journal.audit("user.sign-in-link", user.name, None, {"expires_at": expires.isoformat()})
    return token, expires


GONE = "this link was already used, has expired or is not valid: ask for a new one"


def redeem(db: Session, token: str, purpose: str) -> tuple[User, UserLink]:
    """Use a link once: its user (and the link); a 410 when it is spent, expired or unknown.

    The link is marked used by a conditional UPDATE, so two requests racing with the same
    token cannot both succeed."""
    if not token or len(token) > MAX_TOKEN:
        raise Problem(410, "Gone", GONE)
    now = dt.datetime.now(dt.UTC)
    link = db.scalar(
        select(UserLink).where(UserLink.token_hash == _digest(token), UserLink.purpose == purpose)
    )
    if link is None or link.used_at is not None or link.expires_at <= now:
        raise Problem(410, "Gone", GONE)
    taken = db.execute(
        update(UserLink)
        .where(UserLink.id == link.id, UserLink.used_at.is_(None))
        .values(used_at=now)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise Problem(410, "Gone", GONE)
    user = db.get(User, link.user_id)
    if user is None or not user.enabled:
        raise Problem(403, "Forbidden", "this VPN account is disabled")
    db.refresh(link)
    return user, link


def peek(db: Session, token: str, purpose: str) -> bool:
    """Would `redeem` accept this token now? (The sign-in page asks before offering to go on.)"""
    if not token or len(token) > MAX_TOKEN:
        return False
    link = db.scalar(
        select(UserLink).where(UserLink.token_hash == _digest(token), UserLink.purpose == purpose)
    )
    now = dt.datetime.now(dt.UTC)
    return link is not None and link.used_at is None and link.expires_at > now
