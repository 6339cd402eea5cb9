"""Pods and live sessions as operators see them."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select

from vpnfleet.controlplane.models import Pod
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import PodOut
from vpnfleet.controlplane.services import pods, sessions, users
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Admin, Operator, State

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1", tags=["fleet"])


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


@router.post("/pods/{name}/revoke")
def revoke_pod(name: str, db: DB, who: Admin) -> dict[str, int]:
    """Cut a pod off: its credentials and server certificate revoked, its sessions closed,
    its name refused at enrollment until `forget`."""
    journal = Journal(db, who)
    out = pods.revoke_pod(db, journal, name)
    out["revision"] = journal.commit()
    return out


@router.delete("/pods/{name}", status_code=204)
def forget_pod(name: str, db: DB, who: Admin, state: State) -> Response:
    """Remove a pod that is gone (revoked or out of its lease): its name may enroll again."""
    journal = Journal(db, who)
    pods.forget_pod(db, journal, name, state.settings.pod_lease)
    journal.commit()
    return Response(status_code=204)


@router.post("/users/{name}/kill")
def kill_sessions(name: str, db: DB, who: Operator, state: State) -> dict[str, int]:
    """Mark every live session of the user to end; their pods disconnect them and close them
    (a pod that is down now does it when it is back). Sessions on a pod that lost its lease
    are closed at once."""
    journal = Journal(db, who)
    user = users.get_user(db, name)
    count = sessions.kill_user_sessions(db, journal, user, state.settings.pod_lease)
    return {"sessions": count, "revision": journal.commit()}
