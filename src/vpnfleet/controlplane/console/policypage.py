"""Permissions as code in the browser: paste or load a policy file, see what applying it would
change (a dry run), then apply it, in one transaction (docs/policy.md)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane import policy as service
from vpnfleet.controlplane.console.render import page
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.routers.policy import PolicyIn, diff_out, parse_policy
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import DB, ReadDB, State

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

FILENAME = "console"


@router.get("/policy")
def policy_form(request: Request, db: ReadDB, me: Viewer, current: bool = False) -> Response:
    need(me, "operator")
    text = service.export(db) if current else ""
    return page(request, "policy.html", me, text=text, diff=None, prune=False, applied=False)


@router.post("/policy")
def policy_preview_or_apply(
    request: Request, db: DB, me: Actor, form: Form, state: State
) -> Response:
    """``action=preview``: the diff of a dry run; ``action=apply``: apply and show the diff."""
    need(me, "operator")
    text = form.get("yaml", "")
    prune = form.get("prune") == "on"
    body = PolicyIn(yaml=text, filename=FILENAME)
    try:
        desired = parse_policy(body)
    except Problem as problem:
        return page(
            request,
            "policy.html",
            me,
            status=422,
            text=text,
            diff=None,
            prune=prune,
            applied=False,
            error=problem.detail,
        )
    try:
        if form.get("action") == "apply":
            diff, revision = service.apply(db, me.principal, state.sealer, desired, prune, FILENAME)
            applied = True
        else:
            diff = service.plan(db, desired, prune, FILENAME)
            revision = changelog.current_revision(db)
            applied = False
    except Problem as problem:
        # e.g. a pod's firewall could not hold it: nothing was written; keep the text.
        db.rollback()
        return page(
            request,
            "policy.html",
            me,
            status=problem.status,
            text=text,
            diff=None,
            prune=prune,
            applied=False,
            error=problem.detail,
        )
    out = diff_out(diff, desired, body, not applied, prune, revision)
    return page(
        request, "policy.html", me, text=text, diff=out, prune=prune, applied=applied, error=None
    )
