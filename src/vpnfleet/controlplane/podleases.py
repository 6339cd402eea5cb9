"""Pod leases: a pod that stops heartbeating has its sessions closed.

A pod that vanishes without SIGTERM (node lost, SIGKILL, network cut) never closes its
sessions; left open they would count against their users' session limits, hold gateway
routes towards a dead address and survive `user kill`. Each control-plane replica runs this
sweep every few seconds: a pod not heard from for the lease time (``pod_lease_seconds``,
default 90 s; agents heartbeat every 5 s) has its live sessions closed with the reason
"pod lease expired", is marked not ready, and its name may enroll again. The sweep is
idempotent, so replicas running it at once only repeat each other. Opening a session and
`user kill` apply the same rule at once (services/sessions.py), without waiting for a sweep.

A pod that comes back after its lease ran out learns it from its next session report: the
control plane names the sessions it still has that were closed, and the pod disconnects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.models import Pod, utcnow
from vpnfleet.controlplane.services import pods, sessions
from vpnfleet.controlplane.services.journal import Journal

log = logging.getLogger("vpnfleet.leases")

SWEEP_EVERY = 5.0  # seconds between sweeps
SYSTEM = Principal(token_id=0, name="control-plane", role="admin")


def sweep(factory: sessionmaker[Session], lease: dt.timedelta) -> dict[str, int]:
    """Close the sessions of every pod whose lease ran out; returns {pod: sessions closed}."""
    now = utcnow()
    with factory() as db, db.begin():
        candidates = db.scalars(
            select(Pod).where(Pod.revoked_at.is_(None), Pod.lease_expired_at.is_(None))
        ).all()
        expired = [p for p in candidates if not pods.alive(p, lease, now)]
        if not expired:
            return {}
        journal = Journal(db, SYSTEM)
        out: dict[str, int] = {}
        for pod in expired:
            locked = db.scalar(select(Pod).where(Pod.id == pod.id).with_for_update())
            if locked is None or locked.lease_expired_at is not None or pods.alive(locked, lease):
                continue  # another replica got there first, or it just came back
            locked.lease_expired_at = now
            locked.ready = False
            closed = pods.close_pod_sessions(db, journal, locked.name, sessions.LEASE_EXPIRED)
            journal.audit(
                "pod.lease_expired",
                locked.name,
                None,
                {
                    "pod": locked.name,
                    "last_seen": pods.last_seen(locked).isoformat(),
                    "sessions_closed": closed,
                },
            )
            out[locked.name] = closed
        journal.commit()
    for name, closed in out.items():
        log.warning(
            "pod %s lost its lease (no heartbeat for %d s): %d session(s) closed",
            name,
            int(lease.total_seconds()),
            closed,
        )
    return out


async def run(factory: sessionmaker[Session], lease: dt.timedelta) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        try:
            await run_in_threadpool(sweep, factory, lease)
        except Exception:  # a failed sweep (database away) is retried at the next one
            log.exception("pod lease sweep failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the lease sweep while the app serves."""
    state = app.state.vpnfleet
    task = asyncio.create_task(run(state.factory, state.settings.pod_lease), name="pod-leases")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
