"""Who is signed in to the console: password check, the session cookie, CSRF tokens.

A session is a random 256-bit cookie value whose SHA-256 is stored with the session's CSRF
token. The cookie is HttpOnly and SameSite=Strict, Secure (with the ``__Host-`` prefix) when
the page was served over HTTPS; it lives 12 hours at most and ends after 30 minutes without a
request. Every POST must carry the session's CSRF token in its form (``csrf``), and a request
a browser marks as cross-site (``Sec-Fetch-Site``) or whose ``Origin`` is another site is
refused before anything else. Disabling an account or changing its password ends its sessions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Depends, Request
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.controlplane import auth
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import ConsoleAccount, ConsoleSession
from vpnfleet.controlplane.state import CONSOLE_IDLE, DB, ReadDB, State
from vpnfleet.core import passwords
from vpnfleet.core.loginthrottle import LoginThrottle

LIFETIME = dt.timedelta(hours=12)
IDLE = CONSOLE_IDLE
TOUCH_EVERY = dt.timedelta(minutes=1)
COOKIE = "vpnfleet_console"
LOGIN_COOKIE = "vpnfleet_login"  # the login form's own CSRF value (double submit)
MAX_FIELDS = 200
CONSOLE_ROLES: tuple[auth.Role, ...] = ("admin", "operator", "auditor")
ACTOR_PREFIX = "console:"


@dataclass(frozen=True)
class Caller:
    """The signed-in person of one request."""

    account_id: int
    name: str
    role: auth.Role
    csrf: str
    session_id: int

    @property
    def principal(self) -> auth.Principal:
        """Who the services and the admin audit log see: ``console:NAME`` with the role."""
        return auth.Principal(token_id=0, name=ACTOR_PREFIX + self.name, role=self.role)

    def may(self, *roles: auth.Role) -> bool:
        return self.role == "admin" or self.role in roles


class NotSignedIn(Exception):
    """Raised by the page dependencies; answered with a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def secure(request: Request) -> bool:
    """Was this page served over HTTPS (directly, or by a proxy uvicorn trusts)?"""
    return request.url.scheme == "https"


def cookie_name(request: Request, base: str = COOKIE) -> str:
    # __Host- cookies must be Secure, Path=/ and without Domain: no sibling host can set one.
    return f"__Host-{base}" if secure(request) else base


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "-"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def current(
    db: Session, request: Request, writer: sessionmaker[Session] | None = None
) -> Caller | None:
    """The caller of this request from its cookie, or None (ended sessions are removed).

    The once-a-minute ``last_seen_at`` touch and the removal are written through ``db``, or,
    when ``db`` only reads (a page view, state.get_read_db), in a short transaction of their
    own from ``writer``."""
    token = request.cookies.get(cookie_name(request))
    if not token or len(token) > 200:
        return None
    row = db.execute(
        select(ConsoleSession, ConsoleAccount)
        .join(ConsoleAccount, ConsoleAccount.id == ConsoleSession.account_id)
        .where(ConsoleSession.token_hash == digest(token))
    ).first()
    if row is None:
        return None
    session, account = row
    now = _now()
    ended = (
        session.expires_at <= now
        or session.last_seen_at + IDLE <= now
        or account.disabled_at is not None
        or account.password_changed_at > session.created_at
        or account.role not in CONSOLE_ROLES
    )
    if ended or now - session.last_seen_at >= TOUCH_EVERY:
        change = (
            delete(ConsoleSession).where(ConsoleSession.id == session.id)
            if ended
            else update(ConsoleSession)
            .where(ConsoleSession.id == session.id)
            .values(last_seen_at=now)
        )
        if writer is None:
            db.execute(change)
        else:
            with writer() as w, w.begin():
                w.execute(change)
    if ended:
        return None
    return Caller(
        account_id=account.id,
        name=account.name,
        role=auth.parse_role(account.role),
        csrf=session.csrf,
        session_id=session.id,
    )


def same_site(request: Request) -> bool:
    """False when the browser says the request came from another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        return urlsplit(origin).netloc == host
    return origin != "null"


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (each field once; the last one wins)."""
    if request.method != "POST":
        return {}
    raw = await request.body()
    if not raw:
        return {}  # no fields at all: the CSRF check refuses it
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Problem(415, "Unsupported media type", "console forms are sent urlencoded")
    body = raw.decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise Problem(400, "Bad request", f"the form has more than {MAX_FIELDS} fields") from None
    if any("\x00" in k or "\x00" in v for k, v in pairs):
        raise Problem(400, "Bad request", "the form holds a NUL character")
    return dict(pairs)


Form = Annotated[dict[str, str], Depends(read_form)]


def viewer(request: Request, db: ReadDB, state: State) -> Caller:
    """A page's caller: anyone signed in (each page then checks the role it needs). Page views
    read through a read-only transaction (the page's own, shared with the handler)."""
    caller = current(db, request, state.factory)
    if caller is None:
        raise NotSignedIn(request.url.path)
    request.state.console_caller = caller  # the error page still shows who is signed in
    return caller


def _posted_by(
    request: Request, db: Session, form: dict[str, str], writer: sessionmaker[Session] | None
) -> Caller:
    if not same_site(request):
        raise Problem(403, "Forbidden", "cross-site form posts are refused")
    caller = current(db, request, writer)
    if caller is None:
        raise NotSignedIn("/console/")
    if not hmac.compare_digest(form.get("csrf", "").encode(), caller.csrf.encode()):
        raise Problem(403, "Forbidden", "the form's CSRF token is missing or wrong: reload")
    request.state.console_caller = caller
    return caller


def actor(request: Request, db: DB, form: Form) -> Caller:
    """An action's caller: signed in, same site, and the form's CSRF token matches."""
    return _posted_by(request, db, form, None)


def reading_actor(request: Request, db: ReadDB, form: Form, state: State) -> Caller:
    """`actor` for a form that only reads (a lookup posted to keep it out of URLs)."""
    return _posted_by(request, db, form, state.factory)


Viewer = Annotated[Caller, Depends(viewer)]
ReadingActor = Annotated[Caller, Depends(reading_actor)]
Actor = Annotated[Caller, Depends(actor)]


def safe_next(value: str | None, default: str = "/console/") -> str:
    """A path of this console to go to next, never another site (no open redirect)."""
    if (
        value
        and value.startswith("/console/")
        and not value.startswith("/console//")
        and not any(c in value for c in "\\\r\n")
    ):
        return value
    return default


def need(caller: Caller, *roles: auth.Role) -> None:
    """Refuse (403) a caller whose role is not one of ``roles`` (admin always passes)."""
    if not caller.may(*roles):
        raise Problem(
            403,
            "Forbidden",
            f"your role {caller.role!r} may not open this page or do this "
            f"(needs {' or '.join(sorted({*roles, 'admin'}))})",
        )


def check_login_form(request: Request, form: dict[str, str]) -> None:
    """The sign-in form's own CSRF check (no session exists yet): double submit."""
    if not same_site(request):
        raise Problem(403, "Forbidden", "cross-site form posts are refused")
    expected = request.cookies.get(cookie_name(request, LOGIN_COOKIE), "")
    given = form.get("csrf", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Problem(403, "Forbidden", "the sign-in form expired: reload the page")


@dataclass(frozen=True)
class SignIn:
    """A successful sign-in: the cookie value to set (shown once, only its hash is kept)."""

    token: str
    caller: Caller


def sign_in(db: Session, throttle: LoginThrottle, name: str, password: str, ip: str) -> SignIn:
    """Check a name and password; a new session on success, a Problem otherwise.

    Failures are counted per name and address (core/loginthrottle.py), checked before the
    password, so a throttled guess costs no KDF run; an unknown name costs the same KDF run
    as a wrong password, so names cannot be told apart by time."""
    wait = throttle.wait(name, ip)
    if wait > 0:
        raise Problem(
            429,
            "Too many attempts",
            f"too many failed sign-ins: try again in {int(wait) + 1} s",
            retry_after=int(wait) + 1,
        )
    found = db.execute(
        select(ConsoleAccount.id, ConsoleAccount.password_hash, ConsoleAccount.disabled_at).where(
            ConsoleAccount.name == name
        )
    ).first()
    # The slow KDF runs outside any transaction: on SQLite the read above holds the database
    # lock until the transaction ends, and every other write would wait for the KDF.
    db.rollback()
    stored = found.password_hash if found is not None else None
    # Counted as a failure before the KDF: concurrent guesses cannot all slip through before
    # the first is recorded. A success takes its mark back.
    mark = throttle.failed(name, ip)
    ok = passwords.verify(password, stored)
    if not ok or found is None or found.disabled_at is not None:
        raise Problem(401, "Unauthorized", "wrong name or password, or the account is disabled")
    account = db.get(ConsoleAccount, found.id)
    if account is None or account.disabled_at is not None or account.password_hash != stored:
        raise Problem(401, "Unauthorized", "wrong name or password, or the account is disabled")
    throttle.succeeded(name, ip, mark)
    now = _now()
    if passwords.needs_rehash(account.password_hash):
        account.password_hash = passwords.hash_password(password)
    account.last_login_at = now
    token = secrets.token_urlsafe(32)
    session = ConsoleSession(
        token_hash=digest(token),
        account_id=account.id,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + LIFETIME,
        last_seen_at=now,
        client_ip=ip[:64],
    )
    db.add(session)
    # Sessions that ended long ago go with any sign-in: the table stays small without a sweep.
    db.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now - LIFETIME))
    db.flush()
    caller = Caller(
        account_id=account.id,
        name=account.name,
        role=auth.parse_role(account.role),
        csrf=session.csrf,
        session_id=session.id,
    )
    return SignIn(token, caller)


def sign_out(db: Session, caller: Caller) -> None:
    db.execute(delete(ConsoleSession).where(ConsoleSession.id == caller.session_id))
