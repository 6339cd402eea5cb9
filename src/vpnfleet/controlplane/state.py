"""The control plane's process-wide state and the FastAPI dependencies built on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from vpnfleet.controlplane import auth, changelog
from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import AdminToken, ConsoleAccount, ConsoleSession
from vpnfleet.controlplane.pki import Sealer
from vpnfleet.controlplane.servertls import ServerTLS
from vpnfleet.controlplane.settings import ServerSettings
from vpnfleet.controlplane.snapshotcache import SnapshotBody, SnapshotCache, read_snapshot
from vpnfleet.controlplane.ssobell import DecisionBell
from vpnfleet.controlplane.watch import ChangeHub
from vpnfleet.core.loginthrottle import LoginThrottle

KNOWN_TOKEN_TTL = 10.0
KNOWN_TOKENS_MAX = 20_000
CONSOLE_IDLE = dt.timedelta(minutes=30)  # console/signin.py IDLE (which imports this module)

T = TypeVar("T")


@dataclass
class AppState:
    settings: ServerSettings
    engine: Engine
    factory: sessionmaker[Session]
    sealer: Sealer
    hub: ChangeHub
    # Wakes agents' long polls for single sign-on decisions (controlplane/ssobell.py).
    bell: DecisionBell
    # What the server serves over HTTPS (None: plain HTTP); see controlplane/servertls.py.
    tls: ServerTLS | None = None
    # Failed console sign-ins per name and address (core/loginthrottle.py).
    console_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    # The gate of requests holding a database session (db_slot below), per event loop (a
    # server has one; test clients may start several).
    _db_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False
    )

    _read_factory: sessionmaker[Session] | None = field(default=None, init=False, repr=False)
    # The fleet snapshot agents start from, shared by those that ask at once.
    snapshots: SnapshotCache[SnapshotBody] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.snapshots = SnapshotCache(self._build_snapshot)

    async def _build_snapshot(self) -> SnapshotBody:
        async with self.db_slots():
            snap = await anyio.to_thread.run_sync(read_snapshot, self.read_factory())
        # Serialized and compressed without holding a request slot: the database is done.
        return await anyio.to_thread.run_sync(SnapshotBody.of, snap)

    def read_factory(self) -> sessionmaker[Session]:
        """Sessions that only read (on SQLite a deferred BEGIN: see db.READ_ONLY)."""
        if self._read_factory is None:
            bound = self.engine.execution_options(**{dbmod.READ_ONLY: True})
            self._read_factory = sessionmaker(bound, expire_on_commit=False)
        return self._read_factory

    def db_slots(self) -> asyncio.Semaphore:
        """This event loop's gate (made on first use: the thread limit is the loop's)."""
        loop = asyncio.get_running_loop()
        gate = self._db_slots.get(loop)
        if gate is None:
            gate = self._db_slots[loop] = asyncio.Semaphore(request_sessions(self.engine))
        return gate

    # Tokens the intake found known recently: digest -> until when (monotonic seconds).
    _known: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def known_token(self, token: str) -> bool:
        """Is ``token`` a known, unrevoked API token? (The intake's check before a body.)

        A token found known is believed for KNOWN_TOKEN_TTL seconds without asking the
        database again: the intake only decides whether a body is read at all (agents post
        several times a second). Every request still passes the authoritative check
        (``_authenticate``), so a revoked token is refused at once either way."""
        digest = auth.hash_token(token)
        now = time.monotonic()
        if self._known.get(digest, 0.0) > now:
            return True
        with self.factory() as db:
            row = db.execute(
                select(AdminToken.id, AdminToken.revoked_at).where(AdminToken.token_hash == digest)
            ).first()
        known = row is not None and row.revoked_at is None
        if known:
            if len(self._known) >= KNOWN_TOKENS_MAX:
                self._known.clear()  # bounded: at worst every token is looked up once more
            self._known[digest] = now + KNOWN_TOKEN_TTL
        return known

    def recently_known(self, token: str) -> bool:
        """Was ``token`` found known within KNOWN_TOKEN_TTL? Memory only: the intake asks this
        in the event loop and goes to a worker thread (`known_token`) only when it was not."""
        return self._known.get(auth.hash_token(token), 0.0) > time.monotonic()

    def known_console_session(self, cookie: str) -> bool:
        """Is ``cookie`` a live operator session of the console? (The intake's check before it
        reads a large body: a policy file posted from the console.) The console's own check
        (console/signin.py) still runs on the request."""
        digest = auth.hash_token(cookie)
        now = dt.datetime.now(dt.UTC)
        with self.factory() as db:
            row = db.execute(
                select(ConsoleSession.expires_at, ConsoleSession.last_seen_at)
                .join(ConsoleAccount, ConsoleAccount.id == ConsoleSession.account_id)
                .where(ConsoleSession.token_hash == digest, ConsoleAccount.disabled_at.is_(None))
            ).first()
        return row is not None and row.expires_at > now and row.last_seen_at + CONSOLE_IDLE > now

    def install_commit_hook(self) -> None:
        """Wake the local watch hub right after a transaction that changed the log commits."""

        @event.listens_for(self.factory, "after_commit")
        def _after_commit(session: Session) -> None:
            if session.info.pop("changed", False):
                self.hub.poke()


async def app_state(request: Request) -> AppState:  # async: no worker-thread call for it
    state: AppState = request.app.state.vpnfleet
    return state


# Connections and worker threads kept for what runs outside requests: the watch hub's reads,
# the lease sweep, retention, the directory sync, the intake's token check.
RESERVED_SESSIONS = 4


def request_sessions(engine: Engine) -> int:
    """How many requests may hold a database session at once: fewer than the pool's kept
    connections (not its burst ones: db.make_engine) and the worker threads, less a reserve
    (see db_slot)."""
    threads = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    pool = engine.pool
    connections = pool.size() if isinstance(pool, QueuePool) else 1
    return max(1, min(connections, threads) - RESERVED_SESSIONS)


async def db_slot(state: Annotated[AppState, Depends(app_state)]) -> AsyncIterator[None]:
    """Wait, in the event loop, for one of the request-session slots.

    A plain (``def``) handler and the exit of its ``get_db`` run in two separate worker-thread
    calls, and the request keeps its pooled connection (and on SQLite the database lock, on
    PostgreSQL any row locks) in between. When more requests than the pool has connections
    arrive at once, every worker thread can be blocked waiting for a connection that only
    such an in-between request can give back, and it needs a thread to do so: nothing moves
    until the pool's 30 s timeout fails requests (200 agents heartbeating: whole minutes). With
    this gate the surplus requests wait here, holding neither a thread nor a connection."""
    async with state.db_slots():
        yield


# The token check takes the same slot (FastAPI resolves a dependency once per request): on
# SQLite its transaction needs the database lock, which a gated request may hold.
Slot = Annotated[None, Depends(db_slot, scope="function")]


@contextmanager
def _transaction(state: AppState) -> Iterator[Session]:
    with state.factory() as db:
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.info.pop(changelog.LOCKED, None)
        db.commit()


def get_db(state: Annotated[AppState, Depends(app_state)], _slot: Slot) -> Iterator[Session]:
    """One transaction per request: committed if the handler returns, rolled back otherwise.

    A handler that wrote to the change log has committed already, in its own thread, right
    after it returned (controlplane/routing.py); what it did after that is committed here."""
    with _transaction(state) as db:
        yield db


def get_read_db(state: Annotated[AppState, Depends(app_state)], _slot: Slot) -> Iterator[Session]:
    """A request's read-only transaction (the console's page views), rolled back at the end.

    On SQLite it begins deferred, so page views read side by side instead of taking the
    write lock one after the other (4 concurrent viewers: p99 140-550 ms with it). Nothing
    may be written through it: a deferred SQLite transaction that writes after another
    connection committed fails instead of waiting."""
    with state.read_factory()() as db:
        try:
            yield db
        finally:
            db.rollback()


# scope="function": commit before the response is sent, so a 200 means the write is durable
# and visible to the caller's next request (the default would commit after responding).
DB = Annotated[Session, Depends(get_db, scope="function")]
ReadDB = Annotated[Session, Depends(get_read_db, scope="function")]
State = Annotated[AppState, Depends(app_state)]

_bearer = HTTPBearer(auto_error=False)


def _bearer_token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Problem(
            401,
            "Unauthorized",
            "missing bearer token: set VPNFLEET_TOKEN or pass --token",
        )
    return creds.credentials


def _principal(
    db: Session, creds: HTTPAuthorizationCredentials | None
) -> tuple[auth.Principal, bool]:
    """Who `creds` are, read in `db`'s transaction (nothing written), and whether the token's
    last use is due to be recorded (`_touch`)."""
    digest = auth.hash_token(_bearer_token(creds))
    row = db.scalar(select(AdminToken).where(AdminToken.token_hash == digest))
    if row is None or row.revoked_at is not None:
        raise Problem(401, "Unauthorized", "the token is unknown or revoked")
    who = auth.Principal(
        token_id=row.id, name=row.name, role=auth.parse_role(row.role), pod=row.pod_name
    )
    return who, auth.touch_due(row.last_used_at, dt.datetime.now(dt.UTC))


def _touch(db: Session, who: auth.Principal) -> None:
    """Record the token's use (at most once a minute: auth.touch_due)."""
    db.execute(
        update(AdminToken)
        .where(AdminToken.id == who.token_id)
        .values(last_used_at=dt.datetime.now(dt.UTC))
    )


def _authenticate(state: AppState, creds: HTTPAuthorizationCredentials | None) -> auth.Principal:
    with state.factory() as db, db.begin():
        who, due = _principal(db, creds)
        if due:
            _touch(db, who)
        return who


def require(*roles: auth.Role) -> Callable[..., auth.Principal]:
    """A dependency that admits only tokens with one of `roles` (admin always passes)."""
    allowed = set(roles) | {"admin"}

    def _dep(
        state: State,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        _slot: Slot,
    ) -> auth.Principal:
        return _admit(state, creds, allowed)

    _dep.roles = frozenset(allowed)  # type: ignore[attr-defined]  # read by openapi.roles_of
    return _dep


def _admit(
    state: AppState, creds: HTTPAuthorizationCredentials | None, allowed: set[str]
) -> auth.Principal:
    who = _authenticate(state, creds)
    if who.role not in allowed:
        raise Problem(
            403,
            "Forbidden",
            f"role {who.role!r} may not do this (needs {' or '.join(sorted(allowed))})",
        )
    return who


def require_briefly(*roles: auth.Role) -> Callable[..., Awaitable[auth.Principal]]:
    """Like `require`, but the request slot is held only for the token check: for a handler
    that then waits for something else, such as a snapshot being built (which takes a slot of
    its own: waiters holding them all would leave none for it)."""
    allowed = set(roles) | {"admin"}

    async def _dep(
        state: State,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> auth.Principal:
        return await _briefly(state, _admit, creds, allowed)

    _dep.roles = frozenset(allowed)  # type: ignore[attr-defined]  # read by openapi.roles_of
    return _dep


def require_for_watch(*roles: auth.Role) -> Callable[..., Awaitable[auth.Principal]]:
    """Like `require`, but the token check runs under the change hub's admission limiter
    instead of the request threadpool's: a storm of (re)connecting watch streams then queues
    there, not in front of every other request (controlplane/watch.py)."""
    allowed = set(roles) | {"admin"}

    async def _dep(
        state: State,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> auth.Principal:
        return await anyio.to_thread.run_sync(
            _admit, state, creds, allowed, limiter=state.hub.admission
        )

    _dep.roles = frozenset(allowed)  # type: ignore[attr-defined]  # read by openapi.roles_of
    return _dep


def _pod_caller(
    state: State,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _slot: Slot,
) -> auth.Principal:
    """Only a pod's own credential (not even an admin token) may speak for a pod."""
    return _admit_pod(state, creds)


async def _pod_caller_briefly(
    state: State,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> auth.Principal:
    """Like `PodCaller`, but the request slot is held only for the token check: for a
    handler that then waits without the database (a long poll)."""
    return await _briefly(state, _admit_pod, creds)


async def _briefly(
    state: AppState, check: Callable[..., auth.Principal], *args: Any
) -> auth.Principal:
    """`check(state, *args)`, a token check, in a worker thread, holding a request slot only
    meanwhile (`_pod_caller_briefly`, `require_briefly`, `refused_pod_token`)."""
    async with state.db_slots():
        return await anyio.to_thread.run_sync(check, state, *args)


def _admit_pod(state: AppState, creds: HTTPAuthorizationCredentials | None) -> auth.Principal:
    return _pod_only(_authenticate(state, creds))


def _pod_only(who: auth.Principal) -> auth.Principal:
    if who.role != "pod" or not who.pod:
        raise Problem(
            403,
            "Forbidden",
            f"role {who.role!r} may not do this: agent endpoints need a pod credential "
            "(agents enroll with the enrollment token and then use their own)",
        )
    return who


async def _pod_credentials(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _slot: Slot,
) -> HTTPAuthorizationCredentials | None:
    """A pod's bearer credentials, checked by `pod_transaction` in the handler's thread. A
    request with none is refused here, before its body is looked at (401, not 422).

    Should its body then be invalid, the handler never runs: the 422 answer checks the token
    first (`refused_pod_token`), so a revoked or wrong-role token still gets its 401/403, as
    on every other endpoint."""
    _bearer_token(creds)
    return creds


async def refused_pod_token(request: Request) -> Problem | None:
    """The refusal (401/403) a request's token earns, if the request is for an endpoint that
    checks a pod's token in its handler (`PodCredentials`, `pod_transaction`); None otherwise.

    Asked by the answer to an invalid request (errors.py), which comes before that handler
    runs: a malformed body must not hide a refused token behind a 422."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not any(d.call is _pod_credentials for d in dependant.dependencies):
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
    state: AppState = request.app.state.vpnfleet
    try:
        _bearer_token(creds)  # none: refused without asking the database
        await _briefly(state, _admit_pod, creds)
    except Problem as refused:
        return refused
    return None


async def pod_transaction(
    state: AppState,
    creds: HTTPAuthorizationCredentials | None,
    work: Callable[[Session, auth.Principal], T],
) -> T:
    """The token check (`PodCaller`'s), `work` in one transaction and its commit, in one call
    to a worker thread: for the endpoints every pod calls every few seconds.

    A plain handler with `DB` and `PodCaller` costs five worker-thread calls (the token check,
    opening the session, the handler, validating its answer, the commit), and each one waits
    its turn in the event loop on the way back; with 200 pods that loop is the replica's
    busiest part (docs/performance.md). Written as an ``async def`` handler with
    `PodCredentials`, it costs one, with the same transaction and the same answers."""

    def run() -> T:
        # The token is read in the work's own transaction: one connection checkout and one
        # commit per request instead of two (a refused token: nothing was written). Its use
        # is recorded after the work, so this transaction locks the pod's row before the
        # token's, in the order revoking a pod does (services/pods.py): never a deadlock.
        with _transaction(state) as db:
            who, due = _principal(db, creds)
            out = work(db, _pod_only(who))
            if due:
                _touch(db, who)
            return out

    return await anyio.to_thread.run_sync(run)


_pod_caller.roles = frozenset({"pod"})  # type: ignore[attr-defined]  # read by openapi.roles_of
_pod_caller_briefly.roles = frozenset({"pod"})  # type: ignore[attr-defined]
_pod_credentials.roles = frozenset({"pod"})  # type: ignore[attr-defined]


Admin = Annotated[auth.Principal, Depends(require("admin"))]
Operator = Annotated[auth.Principal, Depends(require("operator"))]
Reader = Annotated[auth.Principal, Depends(require("operator", "auditor"))]
Auditor = Annotated[auth.Principal, Depends(require("auditor", "operator"))]
Enroller = Annotated[auth.Principal, Depends(require("agent"))]
PodCaller = Annotated[auth.Principal, Depends(_pod_caller)]
PodPoller = Annotated[auth.Principal, Depends(_pod_caller_briefly)]
PodCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_pod_credentials)]
# The fleet view (snapshot + watch): pods, and read-only followers such as gateway-routes
# (an auditor token), never the enrollment token.
Watcher = Annotated[auth.Principal, Depends(require("pod", "operator", "auditor"))]
StreamWatcher = Annotated[auth.Principal, Depends(require_for_watch("pod", "operator", "auditor"))]
SnapshotReader = Annotated[auth.Principal, Depends(require_briefly("pod", "operator", "auditor"))]


def jsonable(obj: Any) -> Any:
    """Make a value JSON-safe for audit before/after snapshots."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    return obj
