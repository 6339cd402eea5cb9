"""VPN single sign-on logins (docs/sso.md): a pod registers a connection waiting for its
user's login, the user's browser opens the short login URL, is sent to the IdP with a fresh
state, nonce and PKCE verifier, comes back to the callback, and the decision goes back to
the pod, which admits or refuses the waiting connection.

Each step happens once: a login URL is opened once (a second visit is refused), a callback's
state finds its login once (a replayed callback finds it decided), and the claim from one
conditional UPDATE (`pending` -> `started`, `started` -> `exchanging`) decides which of two
concurrent requests goes on, on PostgreSQL and SQLite alike. Nothing secret reaches the audit
log: it records who logged in for which connection and the decision.

With a group claim configured (`groups_claim`, `group_map`), an admitted login also sets the
user's memberships of the mapped vpnfleet groups to what the ID token says, through the group
services and in the decision's own transaction: the membership events reach every agent with
the change log like any admin change, and the audit log names the `sso-callback` actor for
each. A claim that cannot be read refuses the login and changes nothing (core/groupclaim.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import Group, IdpConfig, Membership, SsoLogin, User, utcnow
from vpnfleet.controlplane.oidcprovider import (
    Connection,
    LoginSecrets,
    Provider,
    ProviderError,
    authorization_url,
    exchange_code,
)
from vpnfleet.controlplane.schemas import (
    IdpSettings,
    SsoDecision,
    SsoLoginIn,
    SsoLoginOut,
)
from vpnfleet.controlplane.services import groups
from vpnfleet.controlplane.services import idp as idpsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.core import groupclaim
from vpnfleet.core.idtoken import TokenRejected

LOGIN_PATH = "/sso/login/"
# Who the audit log names for a decision made at the callback (no token is involved).
CALLBACK_ACTOR = Principal(token_id=0, name="sso-callback", role="pod")
# Decided logins are kept this long for the audit of replays, then deleted.
KEEP_DECIDED = dt.timedelta(hours=1)


def _rows(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _settings(db: Session) -> tuple[IdpConfig, IdpSettings]:
    row = idpsvc.get_config(db)
    if row is None:
        raise Problem(
            409, "Single sign-on not configured", "no identity provider is configured (idp set)"
        )
    return row, idpsvc.settings_of(row)


_providers: dict[str, Provider] = {}
_providers_lock = threading.Lock()


def provider_for(settings: IdpSettings) -> Provider:
    """One Provider per settings per process: its discovery document and JWKS are cached."""
    key = json.dumps(settings.model_dump(), sort_keys=True)
    with _providers_lock:
        prov = _providers.get(key)
        if prov is None:
            conn = Connection(
                timeout=settings.timeout_seconds,
                ca_file=settings.ca_file,
                allow_http=settings.allow_http,
            )
            prov = Provider(settings.issuer, settings.client_id, conn, settings.clock_skew_seconds)
            _providers.clear()  # settings changed: forget the old IdP
            _providers[key] = prov
        return prov


def redeem_code(
    row: IdpConfig, settings: IdpSettings, sealer: pki.Sealer, code: str, verifier: str, nonce: str
) -> dict[str, Any]:
    """Redeem an authorization code at the IdP and check its ID token: the claims.
    ProviderError / TokenRejected with one sentence (VPN and console logins alike)."""
    prov = provider_for(settings)
    token = exchange_code(
        prov.metadata(),
        prov.conn,
        client_id=settings.client_id,
        client_secret=idpsvc.client_secret(row, sealer),
        code=code,
        verifier=verifier,
        redirect_uri=idpsvc.redirect_uri(settings),
    )
    return prov.validate_id_token(token, nonce)


def register(db: Session, who: Principal, body: SsoLoginIn) -> SsoLoginOut:
    """A pod's connection `body` waits for its user's login: the short URL to send it."""
    assert who.pod is not None
    _, settings = _settings(db)
    user = db.scalar(select(User).where(User.name == body.user))
    if user is None:
        raise Problem(404, "Not found", f"user {body.user!r} does not exist")
    now = utcnow()
    db.execute(delete(SsoLogin).where(SsoLogin.expires_at < now - KEEP_DECIDED))
    login = SsoLogin(
        id=secrets.token_urlsafe(16),
        pod=who.pod,
        server=body.server,
        cid=body.cid,
        kid=body.kid,
        user_name=user.name,
        real_ip=body.real_ip,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=settings.login_timeout_seconds),
        status="pending",
        delivered=False,
    )
    db.add(login)
    db.flush()
    return SsoLoginOut(
        id=login.id,
        url=settings.public_url.rstrip("/") + LOGIN_PATH + login.id,
        timeout_seconds=settings.login_timeout_seconds,
        expires_at=login.expires_at,
    )


class LoginRefused(Exception):
    """The browser's request cannot go on; the message is shown to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def start(db: Session, login_id: str) -> str:
    """The browser opened the login URL: the IdP's authorization URL to send it to (once)."""
    _, settings = _settings(db)
    login = db.get(SsoLogin, login_id)
    now = utcnow()
    if login is None:
        raise LoginRefused(404, "This login link is unknown or has expired.")
    if login.expires_at <= now:
        raise LoginRefused(410, "This login link has expired: connect again.")
    # Before the login is claimed: an IdP that cannot be reached now leaves it usable.
    try:
        meta = provider_for(settings).metadata()
    except ProviderError as exc:
        raise LoginRefused(502, f"The identity provider cannot be used: {exc}") from None
    secrets_ = LoginSecrets.new()
    result = db.execute(
        update(SsoLogin)
        .where(SsoLogin.id == login_id, SsoLogin.status == "pending")
        .values(
            status="started",
            state_hash=_hash(secrets_.state),
            nonce=secrets_.nonce,
            verifier=secrets_.verifier,
        )
    )
    if _rows(result) != 1:
        raise LoginRefused(409, "This login link was already used: connect again.")
    return authorization_url(
        meta, settings.client_id, idpsvc.redirect_uri(settings), settings.scopes, secrets_
    )


@dataclass(frozen=True)
class Outcome:
    admitted: bool
    user: str
    message: str
    pod: str  # whose agent waits for this decision


def callback(
    db: Session,
    sealer: pki.Sealer,
    state: str | None,
    code: str | None,
    error: str | None,
    browser: str | None = None,
) -> Outcome:
    """The IdP sent the browser back: decide the login (once) and record the decision.
    `browser`: the address the callback came from (the same_address setting)."""
    if not state:
        raise LoginRefused(400, "The identity provider's answer has no state.")
    row, settings = _settings(db)
    login = db.scalar(select(SsoLogin).where(SsoLogin.state_hash == _hash(state)))
    if login is None:
        raise LoginRefused(400, "This login is unknown: connect again.")
    result = db.execute(
        update(SsoLogin)
        .where(SsoLogin.id == login.id, SsoLogin.status == "started")
        .values(status="exchanging")
    )
    if _rows(result) != 1:
        _audit_refusal(db, login, "replayed callback")
        raise LoginRefused(409, "This login was already completed: connect again.")
    db.refresh(login)
    # The claim is committed before the code is redeemed at the IdP, which can take seconds,
    # and nothing touches the database again until the exchange is over: meanwhile no lock is
    # held (on SQLite every transaction takes the database's write lock at BEGIN: every other
    # request, the pods' polls for decisions too, would wait for the IdP) and no pooled
    # connection. What the exchange needs is loaded (the session keeps it after the commit).
    # A process that stops now leaves the login `exchanging`: refused at its timeout.
    db.commit()
    nonce, verifier = login.nonce or "", login.verifier or ""
    if login.expires_at <= utcnow():
        return _decide(db, login, False, None, "the login took too long")
    if error or not code:
        reason = f"the identity provider refused the login ({(error or 'no code')[:60]})"
        return _decide(db, login, False, None, reason)
    if settings.same_address and not _same_address(login.real_ip, browser):
        reason = "the login came from another address than the VPN connection"
        return _decide(db, login, False, None, reason)
    try:
        claims = redeem_code(row, settings, sealer, code, verifier, nonce)
    except (ProviderError, TokenRejected) as exc:
        return _decide(db, login, False, None, f"single sign-on failed: {str(exc)[:200]}")
    # Seconds may have passed at the IdP: the login may have run out meanwhile (its agent
    # has refused it by now), and the settings (the group mapping) may have changed.
    if login.expires_at <= utcnow():
        return _decide(db, login, False, None, "the login took too long")
    row, settings = _settings(db)
    who = claims.get(settings.user_claim)
    if not isinstance(who, str) or not who:
        reason = f"the identity provider's token has no {settings.user_claim!r}"
        return _decide(db, login, False, None, reason)
    if settings.user_claim == "email" and claims.get("email_verified") is False:
        # Where people may type any address into their IdP profile, an unverified one says
        # nothing about who they are (an IdP that sends no email_verified is trusted).
        reason = "the identity provider has not verified that e-mail address"
        return _decide(db, login, False, who, reason)
    user = db.scalar(select(User).where(User.name == login.user_name))
    expected = None if user is None else (user.name if settings.match == "name" else user.email)
    if expected is None or who.strip().lower() != expected.strip().lower():
        return _decide(db, login, False, who, "signed in as another user than the certificate's")
    if user is None or not user.enabled:
        return _decide(db, login, False, who, "the user is disabled")
    journal = Journal(db, CALLBACK_ACTOR)
    change = None
    if settings.groups_claim is not None:
        try:
            claimed = groupclaim.read_claim(claims, settings.groups_claim)
        except groupclaim.ClaimRefused as exc:
            return _decide(db, login, False, who, str(exc))
        mark = journal.mark()
        try:
            with db.begin_nested():
                change = _set_memberships(db, journal, user, claimed, settings.group_map)
        except (Problem, IntegrityError):
            # Another transaction changed one of these memberships between this login's
            # reading them and changing them (rare: concurrent inserts wait at the user's
            # lock); its own changes are undone, and the user connects again.
            journal.rewind(mark)
            reason = "your group memberships could not be updated: connect again"
            return _decide(db, login, False, who, reason)
    return _decide(db, login, True, who, None, journal, change)


def _set_memberships(
    db: Session, journal: Journal, user: User, claimed: frozenset[str], group_map: dict[str, str]
) -> groupclaim.MembershipPlan:
    """Join and leave the managed groups so that they match the claim (`journal` records each
    change: its event for the agents and its audit entry)."""
    # Two logins of one user at once (two devices) would change the same memberships: the
    # second waits here for the first to commit (PostgreSQL; SQLite has one writer anyway).
    db.execute(select(User.id).where(User.id == user.id).with_for_update())
    managed = sorted(groupclaim.managed_groups(group_map))
    rows = {g.name: g for g in db.scalars(select(Group).where(Group.name.in_(managed)))}
    current = set(
        db.scalars(
            select(Group.name)
            .join(Membership, Membership.group_id == Group.id)
            .where(Membership.user_id == user.id, Group.name.in_(managed))
        )
    )
    change = groupclaim.plan(claimed, group_map, set(rows), current)
    for name in change.remove:
        groups.remove_member(db, journal, rows[name], user)
    for name in change.add:
        groups.add_member(db, journal, rows[name], user)
    return change


def _same_address(vpn: str | None, browser: str | None) -> bool:
    """The VPN client's public address and the browser's are the same host (an IPv4 address
    seen as IPv4-mapped IPv6 on a dual-stack listener counts as itself)."""
    if vpn is None or browser is None:
        return False
    try:
        a, b = ipaddress.ip_address(vpn), ipaddress.ip_address(browser)
    except ValueError:
        return False
    a = a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a
    b = b.ipv4_mapped or b if isinstance(b, ipaddress.IPv6Address) else b
    return a == b


def _decide(
    db: Session,
    login: SsoLogin,
    admitted: bool,
    idp_user: str | None,
    reason: str | None,
    journal: Journal | None = None,
    groups_changed: groupclaim.MembershipPlan | None = None,
) -> Outcome:
    """Record the decision, with what `journal` already holds (the memberships the login
    changed), in one commit."""
    login.status = "admitted" if admitted else "denied"
    login.reason = reason
    login.decided_at = utcnow()
    login.nonce = login.verifier = None
    journal = journal or Journal(db, CALLBACK_ACTOR)
    after: dict[str, object] = {
        "pod": login.pod,
        "server": login.server,
        "cid": login.cid,
        "real_ip": login.real_ip,
        "idp_user": idp_user[:200] if idp_user else None,
        "admitted": admitted,
        "reason": reason,
    }
    if groups_changed is not None:
        after["groups_added"] = list(groups_changed.add)
        after["groups_removed"] = list(groups_changed.remove)
    journal.audit("sso.login", login.user_name, None, after)
    journal.commit()
    if admitted:
        return Outcome(
            True, login.user_name, "Signed in: your VPN connection is coming up.", login.pod
        )
    return Outcome(False, login.user_name, f"VPN login refused: {reason}.", login.pod)


def _audit_refusal(db: Session, login: SsoLogin, why: str) -> None:
    journal = Journal(db, CALLBACK_ACTOR)
    journal.audit(
        "sso.refused", login.user_name, None, {"pod": login.pod, "cid": login.cid, "why": why}
    )
    journal.commit()


def decisions(db: Session, who: Principal) -> list[SsoDecision]:
    """The pod's logins decided since it last asked (each handed out once)."""
    rows = db.scalars(
        select(SsoLogin)
        .where(
            SsoLogin.pod == who.pod,
            SsoLogin.status.in_(("admitted", "denied")),
            SsoLogin.delivered.is_(False),
        )
        .order_by(SsoLogin.decided_at)
        .limit(500)
    ).all()
    out = []
    for login in rows:
        login.delivered = True
        out.append(
            SsoDecision(
                id=login.id,
                server=login.server,
                cid=login.cid,
                kid=login.kid,
                user=login.user_name,
                admitted=login.status == "admitted",
                reason=login.reason,
            )
        )
    db.flush()
    return out
