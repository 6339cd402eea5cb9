"""VPN users sign in to their self-service page with the company's IdP (the one configured for
VPN single sign-on, docs/sso.md): the authorization-code flow with PKCE, state and nonce, the
ID token checked as for a VPN login, and the same rule mapping its claim to a vpnfleet user
(``user_claim`` and ``match``). The IdP's registered redirect URI is reused: the callback
tells a console login from a VPN login by its state."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import ConsoleLogin, User
from vpnfleet.controlplane.oidcprovider import (
    LoginSecrets,
    ProviderError,
    authorization_url,
)
from vpnfleet.controlplane.services import idp as idpsvc
from vpnfleet.controlplane.services.sso import provider_for, redeem_code
from vpnfleet.core.idtoken import TokenRejected

LIFETIME = dt.timedelta(minutes=10)


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def configured(db: Session) -> bool:
    return idpsvc.get_config(db) is not None


def start(db: Session, browser: str) -> str:
    """A new login bound to ``browser`` (a random value the caller sets as a cookie): the
    IdP's authorization URL to send the browser to."""
    row = idpsvc.get_config(db)
    if row is None:
        raise Problem(409, "Single sign-on not configured", "no identity provider is configured")
    settings = idpsvc.settings_of(row)
    try:
        meta = provider_for(settings).metadata()
    except ProviderError as exc:
        raise Problem(502, "Identity provider unavailable", str(exc)) from None
    login = LoginSecrets.new()
    now = dt.datetime.now(dt.UTC)
    db.execute(delete(ConsoleLogin).where(ConsoleLogin.expires_at < now - LIFETIME))
    db.add(
        ConsoleLogin(
            state_hash=_hash(login.state),
            browser_hash=_hash(browser),
            nonce=login.nonce,
            verifier=login.verifier,
            created_at=now,
            expires_at=now + LIFETIME,
        )
    )
    db.flush()
    return authorization_url(
        meta, settings.client_id, idpsvc.redirect_uri(settings), settings.scopes, login
    )


def owns(db: Session, state: str | None) -> bool:
    """Is this callback's state one of a console login's (not a VPN connection's)?"""
    if not state or len(state) > 200:
        return False
    return (
        db.scalar(select(ConsoleLogin.id).where(ConsoleLogin.state_hash == _hash(state)))
        is not None
    )


def finish(
    db: Session,
    sealer: pki.Sealer,
    state: str,
    code: str | None,
    error: str | None,
    browser: str | None,
) -> User:
    """Decide the login (once): the VPN user it signs in, or a Problem with one sentence.

    The login is claimed and committed before the code is redeemed at the IdP, so no database
    connection or lock is held during that round trip (as for VPN logins)."""
    login = db.scalar(select(ConsoleLogin).where(ConsoleLogin.state_hash == _hash(state)))
    now = dt.datetime.now(dt.UTC)
    if login is None:
        raise Problem(400, "Sign-in failed", "this sign-in is unknown: start again")
    if not browser or not hmac.compare_digest(_hash(browser), login.browser_hash):
        # Checked before the login is claimed: the right browser can still finish it.
        raise Problem(
            403, "Sign-in failed", "this sign-in was started in another browser: start again"
        )
    # Read before the claim: the ORM's UPDATE also clears them on the loaded row.
    nonce, verifier, expires = login.nonce or "", login.verifier or "", login.expires_at
    claimed = db.execute(
        update(ConsoleLogin)
        .where(ConsoleLogin.id == login.id, ConsoleLogin.used_at.is_(None))
        .values(used_at=now, nonce=None, verifier=None)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        raise Problem(409, "Sign-in failed", "this sign-in was already completed: start again")
    db.commit()
    if expires <= now:
        raise Problem(410, "Sign-in failed", "the sign-in took too long: start again")
    if error or not code:
        raise Problem(
            403, "Sign-in failed", f"the identity provider refused: {(error or 'no code')[:60]}"
        )
    row = idpsvc.get_config(db)
    if row is None:
        raise Problem(409, "Single sign-on not configured", "no identity provider is configured")
    settings = idpsvc.settings_of(row)
    try:
        claims = redeem_code(row, settings, sealer, code, verifier, nonce)
    except (ProviderError, TokenRejected) as exc:
        raise Problem(403, "Sign-in failed", f"single sign-on failed: {str(exc)[:200]}") from None
    who = claims.get(settings.user_claim)
    if not isinstance(who, str) or not who.strip():
        raise Problem(403, "Sign-in failed", f"the IdP's token has no {settings.user_claim!r}")
    if settings.user_claim == "email" and claims.get("email_verified") is False:
        raise Problem(403, "Sign-in failed", "the IdP has not verified that e-mail address")
    wanted = who.strip().lower()
    # As for VPN logins: the user's name, or their e-mail address compared without case.
    column = User.name if settings.match == "name" else func.lower(User.email)
    found = db.scalars(select(User).where(column == wanted).limit(2)).all()
    if len(found) > 1:
        # Two users share the address: signing in as either would be a guess.
        raise Problem(403, "Sign-in failed", f"{who!r} matches more than one VPN account")
    user = found[0] if found else None
    if user is None:
        raise Problem(403, "Sign-in failed", f"{who!r} has no VPN account here")
    if not user.enabled:
        raise Problem(403, "Sign-in failed", "this VPN account is disabled")
    return user
