"""Running a directory sync: on demand (`vpnfleet directory sync`) and every interval.

One sync: take the lease (services/directory.py: one replica at a time, whatever the
database), read the directory with no database transaction open (controlplane/ldapsource.py),
then in one transaction plan the diff (core/directory.py), refuse a mass disable, apply it and
record the outcome. Any failure before the apply (directory unreachable, wrong credentials,
a mapped group missing, a refused mass disable) changes nothing but the recorded status.

Every replica runs the periodic loop; it wakes every few seconds and syncs when the last
attempt (by any replica) is older than the interval and it wins the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.errors import Problem, conflict
from vpnfleet.controlplane.ldapsource import (
    DirectoryError,
    LdapConfig,
    ReadResult,
    read_directory,
)
from vpnfleet.controlplane.models import utcnow
from vpnfleet.controlplane.schemas import DirectorySettings, DirectorySyncOut
from vpnfleet.controlplane.services import directory as dirsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.core.directory import (
    MassDisableRefused,
    SyncPlan,
    check_mass_disable,
    plan_sync,
    split_plan,
)

log = logging.getLogger("vpnfleet.directory")

SYNC_ACTOR = Principal(token_id=0, name="directory-sync", role="admin")
TICK = 5.0  # seconds between the loop's checks whether a sync is due
LEASE_TTL = dt.timedelta(minutes=10)
# New users per transaction in a large import (each gets a certificate: about 10-25 ms each).
CREATE_BATCH = 200  # a replica that dies mid-sync blocks others this long


@dataclass(frozen=True)
class SyncRequest:
    who: Principal
    dry_run: bool = False
    force: bool = False
    periodic: bool = False  # only when due and enabled; a held lease is not an error


class NotDue(Exception):
    """The periodic sync has nothing to do now (not due, disabled, or another replica runs)."""


def _holder() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def run_sync(
    factory: sessionmaker[Session],
    sealer: pki.Sealer,
    req: SyncRequest,
    pod_lease: dt.timedelta,
) -> DirectorySyncOut:
    """One sync (or a dry run); raises Problem with one clear sentence when it cannot."""
    started = time.monotonic()
    holder = _holder()
    with factory() as db, db.begin():
        row = dirsvc.get_config(db)
        if row is None:
            raise conflict("no directory is configured: run 'vpnfleet directory set' first")
        settings = dirsvc.settings_of(row)
        cfg = dirsvc.ldap_config(row, sealer)
        if req.periodic and not settings.enabled:
            raise NotDue()
        if not req.dry_run:
            due = utcnow() - dt.timedelta(seconds=settings.interval_seconds)
            if not dirsvc.claim_lease(
                db, holder, LEASE_TTL, due_before=due if req.periodic else None
            ):
                if req.periodic:
                    raise NotDue()
                raise conflict(
                    f"a directory sync is already running ({row.lease_holder}); "
                    "try again when it has finished"
                )
    try:
        return _sync_leased(factory, sealer, req, pod_lease, cfg, settings, holder, started)
    finally:
        if not req.dry_run:
            with factory() as db, db.begin():
                dirsvc.release_lease(db, holder)


def _sync_leased(
    factory: sessionmaker[Session],
    sealer: pki.Sealer,
    req: SyncRequest,
    pod_lease: dt.timedelta,
    cfg: LdapConfig,
    settings: DirectorySettings,
    holder: str,
    started: float,
) -> DirectorySyncOut:
    at = utcnow()
    reading = time.monotonic()
    try:
        read: ReadResult = read_directory(cfg)
        read_seconds = round(time.monotonic() - reading, 3)
    except DirectoryError as exc:
        _fail(factory, req, "error", str(exc), at)
        raise Problem(502, "Directory unavailable", f"{exc}; nothing was changed") from None
    counts: dict[str, int] = {}
    parts: list[SyncPlan] = []
    try:
        with factory() as db, db.begin():
            if not req.dry_run:
                _check_lease(db, holder)
            local = dirsvc.local_view(db, set(read.view.members))
            plan = plan_sync(read.view, local)
            counts = plan.counts()
            if not req.force:
                check_mass_disable(plan, local, settings.max_disable_fraction)
            out = DirectorySyncOut(
                dry_run=req.dry_run,
                applied=False,
                counts=counts,
                diff=dirsvc.diff_out(plan),
                directory_users=len(read.view.users),
                queries=read.queries,
                seconds=0.0,
                read_seconds=read_seconds,
                skipped=read.skipped[:100],
                sessions_killed=0,
                revision=None,
            )
            if req.dry_run:
                db.rollback()
                out.seconds = round(time.monotonic() - started, 3)
                return out
            parts = split_plan(plan, CREATE_BATCH)
            if len(parts) == 1:  # the usual case: planned and applied in one transaction
                _apply_part(db, _Run(req, sealer, settings, pod_lease, read, out, at), plan, "")
                parts = []
    except MassDisableRefused as exc:
        # The transaction is rolled back; the refusal is recorded in one of its own.
        _fail(factory, req, "refused", str(exc), at, counts)
        raise Problem(409, "Conflict", f"{exc}; nothing was changed", counts=counts) from None
    run = _Run(req, sealer, settings, pod_lease, read, out, at)
    for i, part in enumerate(parts):
        try:
            with factory() as db, db.begin():
                _check_lease(db, holder)
                _apply_part(db, run, part, f"{i + 1}/{len(parts)}", last=i == len(parts) - 1)
        except Problem as exc:
            _fail(factory, req, "error", f"stopped after {i} of {len(parts)} steps: {exc}", at)
            raise
    out.seconds = round(time.monotonic() - started, 3)
    if not plan.empty:
        log.info(
            "directory sync by %s: %s",
            req.who.name,
            {**counts, "sessions_killed": out.sessions_killed},
        )
    return out


@dataclass
class _Run:
    """What every transaction of one applied sync needs."""

    req: SyncRequest
    sealer: pki.Sealer
    settings: DirectorySettings
    pod_lease: dt.timedelta
    read: ReadResult
    out: DirectorySyncOut
    at: dt.datetime


def _check_lease(db: Session, holder: str) -> None:
    row = dirsvc.get_config(db, lock=True)
    if row is None or row.lease_holder != holder:
        # The lease ran out while the directory was read and another replica took it.
        raise conflict("the directory sync lease was lost during the sync; try again")


def _apply_part(db: Session, run: _Run, part: SyncPlan, label: str, last: bool = True) -> None:
    """Apply one part of the plan in `db`'s transaction with its own audit entry (naming the
    part, e.g. "2/21", when the plan was split); the last part records the outcome."""
    journal = Journal(db, run.req.who, itemized=False)
    killed = dirsvc.apply_plan(
        db, journal, run.sealer, part, run.settings.new_user_mode, run.pod_lease
    )
    run.out.sessions_killed += killed
    if not part.empty:
        after: dict[str, object] = {
            "counts": {**part.counts(), "sessions_killed": killed},
            "diff": dirsvc.diff_out(part).model_dump(),
            "forced": run.req.force,
        }
        if label:
            after["part"] = label
        journal.summarize("directory.sync", "directory", after)
    if last:
        summary = {
            **run.out.counts,
            "sessions_killed": run.out.sessions_killed,
            "directory_users": len(run.read.view.users),
            "queries": run.read.queries,
            "skipped": len(run.read.skipped),
        }
        dirsvc.record_outcome(
            db, actor=run.req.who.name, status="ok", error=None, counts=summary, at=run.at
        )
    run.out.revision = journal.commit()
    run.out.applied = True


def _fail(
    factory: sessionmaker[Session],
    req: SyncRequest,
    status: str,
    error: str,
    at: dt.datetime,
    counts: dict[str, int] | None = None,
) -> None:
    log.warning("directory sync by %s failed: %s", req.who.name, error)
    if req.dry_run:
        return
    with factory() as db, db.begin():
        dirsvc.record_outcome(
            db, actor=req.who.name, status=status, error=error, counts=counts, at=at
        )


async def run(factory: sessionmaker[Session], sealer: pki.Sealer, pod_lease: dt.timedelta) -> None:
    req = SyncRequest(who=SYNC_ACTOR, periodic=True)
    while True:
        await asyncio.sleep(TICK)
        try:
            await run_in_threadpool(run_sync, factory, sealer, req, pod_lease)
        except NotDue:
            continue
        except Problem:
            continue  # recorded in the status and logged
        except Exception:  # the database away: retried at the next tick
            log.exception("directory sync failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the periodic directory sync while the app serves."""
    state = app.state.vpnfleet
    task = asyncio.create_task(
        run(state.factory, state.sealer, state.settings.pod_lease), name="directory-sync"
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
