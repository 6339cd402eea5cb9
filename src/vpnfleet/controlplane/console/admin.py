"""What only admins see and do: API tokens and pods' own credentials, pods (revoke, forget),
and address pools (operators may change pools too, as in the API)."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console.forms import validated
from vpnfleet.controlplane.console.render import page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need
from vpnfleet.controlplane.errors import Problem, not_found
from vpnfleet.controlplane.models import AdminToken, Pool
from vpnfleet.controlplane.routers.tokens import token_out
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import PoolSet, TokenCreate
from vpnfleet.controlplane.services import pods, pools, tokens
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, ReadDB, State
from vpnfleet.core import netparse

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

MAX_SHOWN = 2_000


@router.get("/tokens")
def token_list(request: Request, db: ReadDB, me: Viewer, notice: str | None = None) -> Response:
    need(me)
    rows = db.scalars(select(AdminToken).order_by(AdminToken.id.desc()).limit(MAX_SHOWN)).all()
    views = [token_out(t) for t in rows]
    pod_of = {t.id: t.pod_name for t in rows}
    return page(
        request,
        "tokens.html",
        me,
        people=[v for v in views if v.role != "pod"],
        pods=[(v, pod_of.get(v.id)) for v in views if v.role == "pod"],
        notice=notice,
        secret=None,
    )


@router.post("/tokens/new")
def create_token(request: Request, db: DB, me: Actor, form: Form) -> Response:
    """A new API token; its secret is on the answer page only."""
    need(me)
    body = validated(
        TokenCreate, {"name": form.get("name", "").strip(), "role": form.get("role", "")}
    )
    row, secret = tokens.create(db, me.principal, body.name, body.role)
    return page(
        request,
        "tokens.html",
        me,
        people=[],
        pods=[],
        notice=None,
        secret={"name": row.name, "role": row.role, "token": secret},
    )


@router.post("/tokens/{name}/revoke")
def revoke_token(name: str, db: DB, me: Actor) -> Response:
    need(me)
    tokens.revoke(db, me.principal, name)
    return redirect("/console/tokens", notice=f"token {name} revoked")


@router.post("/pods/{name}/{action}")
def pod_action(name: str, action: str, db: DB, me: Actor, state: State) -> Response:
    """revoke (cut a pod off: credentials, certificate, sessions) or forget (a gone pod)."""
    need(me)
    journal = Journal(db, me.principal)
    if action == "revoke":
        out = pods.revoke_pod(db, journal, name)
        notice = f"pod {name} revoked: {out.get('sessions', 0)} session(s) closed"
    elif action == "forget":
        pods.forget_pod(db, journal, name, state.settings.pod_lease)
        notice = f"pod {name} forgotten: the name may enroll again"
    else:
        raise not_found("action", action)
    journal.commit()
    return redirect("/console/", notice=notice)


@router.get("/pools")
def pool_list(request: Request, db: ReadDB, me: Viewer, notice: str | None = None) -> Response:
    need(me, "operator")
    rows = db.scalars(select(Pool).order_by(Pool.kind, Pool.name).limit(MAX_SHOWN)).all()
    return page(request, "pools.html", me, pools=pools.pools_out(db, rows), notice=notice)


@router.post("/pools")
def set_pool(db: DB, me: Actor, form: Form) -> Response:
    """Create or change a pool (shrinking below its gateway leases is refused)."""
    need(me, "operator")
    name = form.get("name", "").strip()
    try:
        netparse.validate_name(name, "pool name")
    except ValueError as exc:
        raise Problem(422, "Invalid input", f"name: {exc}") from None
    body = validated(
        PoolSet, {"cidr": form.get("cidr", "").strip(), "kind": form.get("kind") or None}
    )
    journal = Journal(db, me.principal)
    pool = pools.set_pool(db, journal, name, ipaddress.IPv4Network(body.cidr), body.kind)
    journal.commit()
    return redirect("/console/pools", notice=f"pool {pool.name} is {pool.cidr}")
