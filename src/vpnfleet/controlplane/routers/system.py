"""Liveness, revision and identity."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy import text

from vpnfleet import __version__
from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import RevisionOut
from vpnfleet.controlplane.state import DB, State, Watcher, require

router = APIRouter(route_class=WriteThroughRoute, tags=["system"])

AnyRole = Annotated[Principal, Depends(require("operator", "auditor", "agent"))]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/readyz")
def readyz(state: State) -> dict[str, Any]:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise Problem(503, "Not ready", f"database unreachable ({type(exc).__name__})") from None
    return {"status": "ready", "revision": state.hub.head}


@router.get("/api/v1/revision", response_model=RevisionOut)
def revision(db: DB, _who: Watcher) -> RevisionOut:
    return RevisionOut(revision=changelog.current_revision(db))


@router.get("/api/v1/whoami")
def whoami(who: AnyRole) -> dict[str, Any]:
    return {"name": who.name, "role": who.role}
