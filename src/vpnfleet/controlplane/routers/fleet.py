"""Pods and live sessions as operators see them."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from vpnfleet.controlplane.models import Pod
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.schemas import PodOut
from vpnfleet.controlplane.services import sessions, users
from vpnfleet.controlplane.services.journal import Journal
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


PODS = Keyset("pods", (Pod.name,), ("str",))


@router.get("/pods", response_model=list[PodOut], responses=LINK_HEADER)
def list_pods(db: DB, _who: Operator, page: PageParams) -> list[PodOut]:
    """Pods by name, a page at a time."""
    found = db.scalars(page.query(PODS, select(Pod))).all()
    return [pod_out(p) for p in page.rows(PODS, found, lambda p: (p.name,))]


@router.post("/users/{name}/kill")
def kill_sessions(name: str, db: DB, who: Operator) -> dict[str, int]:
    """Mark every live session of the user to end; their pods disconnect them and close them
    (a pod that is down now does it when it is back)."""
    journal = Journal(db, who)
    count = sessions.kill_user_sessions(db, journal, users.get_user(db, name))
    return {"sessions": count, "revision": journal.commit()}
