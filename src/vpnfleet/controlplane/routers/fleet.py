"""Pods and live sessions as operators see them."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.changelog import ChangeSpec
from vpnfleet.controlplane.models import Pod, VpnSession
from vpnfleet.controlplane.routers.users import get_user
from vpnfleet.controlplane.schemas import PodOut
from vpnfleet.controlplane.state import DB, Operator

router = APIRouter(prefix="/api/v1", tags=["fleet"])


def pod_out(p: Pod) -> PodOut:
    return PodOut(
        id=p.id,
        name=p.name,
        template=p.template,
        public_endpoint=p.public_endpoint,
        pod_ip=p.pod_ip,
        registered_at=p.registered_at,
        last_heartbeat=p.last_heartbeat,
        applied_revision=p.applied_revision,
        ready=p.ready,
        status=p.status,
    )


@router.get("/pods", response_model=list[PodOut])
def list_pods(db: DB, _who: Operator) -> list[PodOut]:
    return [pod_out(p) for p in db.scalars(select(Pod).order_by(Pod.name))]


@router.post("/users/{name}/kill")
def kill_sessions(name: str, db: DB, who: Operator) -> dict[str, int]:
    """Ask every pod to disconnect the user's live sessions now."""
    user = get_user(db, name)
    live = db.scalars(
        select(VpnSession).where(VpnSession.user_id == user.id, VpnSession.ended_at.is_(None))
    ).all()
    revision = changelog.record(
        db,
        who,
        "session.kill",
        name,
        None,
        {"sessions": [s.id for s in live]},
        [ChangeSpec("kill", "upsert", user.id, {"user": name, "sessions": [s.uid for s in live]})],
    )
    return {"sessions": len(live), "revision": revision}
