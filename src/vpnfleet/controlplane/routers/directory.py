"""The LDAP/Active Directory sync: settings (admin), sync and status (operator).

Setting the directory decides who may use the VPN and holds a credential to the company
directory, so it is the admin's; running a sync only makes vpnfleet match what the directory
already says, so an operator may (and an auditor may read its status).
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane import directorysync
from vpnfleet.controlplane.errors import not_found
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import (
    DirectoryOut,
    DirectorySetIn,
    DirectoryStatusOut,
    DirectorySyncOut,
)
from vpnfleet.controlplane.services import directory as dirsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Admin, Auditor, Operator, State

router = APIRouter(
    route_class=WriteThroughRoute,
    prefix="/api/v1/directory",
    tags=["directory"],
    lifespan=directorysync.lifespan,
)


@router.get("", response_model=DirectoryOut)
def show_directory(db: DB, _who: Operator) -> DirectoryOut:
    """The directory settings (never the bind password) and the last sync's outcome."""
    row = dirsvc.get_config(db)
    if row is None:
        raise not_found("directory configuration", "directory")
    return DirectoryOut(
        **dirsvc.settings_of(row).model_dump(),
        updated_at=row.updated_at,
        updated_by=row.updated_by,
        status=dirsvc.status_out(row),
    )


@router.put("", response_model=DirectoryStatusOut)
def set_directory(body: DirectorySetIn, db: DB, who: Admin, state: State) -> DirectoryStatusOut:
    """Configure the directory sync; the bind password is sealed and never shown again
    (leave it out to keep the stored one)."""
    journal = Journal(db, who)
    dirsvc.set_config(db, journal, state.sealer, body)
    journal.commit()
    return dirsvc.status_out(dirsvc.get_config(db))


@router.get("/status", response_model=DirectoryStatusOut)
def directory_status(db: DB, _who: Auditor) -> DirectoryStatusOut:
    return dirsvc.status_out(dirsvc.get_config(db))


@router.post("/sync", response_model=DirectorySyncOut)
async def sync_directory(
    who: Operator,
    state: State,
    dry_run: bool = Query(default=False, description="show the diff, change nothing"),
    force: bool = Query(default=False, description="apply even a mass disable"),
) -> DirectorySyncOut:
    """Sync now: users created, disabled (their sessions killed) or enabled, memberships of
    the managed groups set. Nothing changes when the directory cannot be read (502) or the
    sync would disable too many users (409, unless `force`)."""
    req = directorysync.SyncRequest(who=who, dry_run=dry_run, force=force)
    return await run_in_threadpool(
        directorysync.run_sync, state.factory, state.sealer, req, state.settings.pod_lease
    )
