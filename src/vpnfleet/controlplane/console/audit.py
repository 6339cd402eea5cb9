"""The auditor's pages: "who was this?" from an address and time or a whole log line, and
the admin audit log."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console import paging
from vpnfleet.controlplane.console.render import page
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import AdminAudit
from vpnfleet.controlplane.reverse_lookup import AttributionOut, lookup
from vpnfleet.controlplane.routers.audit import ADMIN_LOG
from vpnfleet.controlplane.routers.nataudit import attribution_query, retention_horizon
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import DB, State
from vpnfleet.core import accesslog, logformat

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

MAX_LINE = 16_384
# Tried in this order when the auditor does not say which format a pasted line is in.
AUTO_FORMATS: tuple[accesslog.LogFormat, ...] = ("nginx", "combined-with-port", "json")


def _read_line(form: dict[str, str]) -> tuple[accesslog.LogHit, str]:
    """The address, port and time of a pasted log line, and the format that read it."""
    line = form.get("line", "").strip()
    if len(line) > MAX_LINE:
        raise Problem(422, "Invalid input", f"line: longer than {MAX_LINE} characters")
    custom = form.get("log_format", "").strip()
    kind = form.get("format", "auto")
    if custom:
        dialect: logformat.Dialect = "apache" if kind == "apache" else "nginx"
        try:
            parser = logformat.compile_format(dialect, custom)
        except logformat.LogFormatError as exc:
            raise Problem(422, "Invalid input", f"log format: {exc}") from None
        try:
            return accesslog.parse_line(parser, line), f"your {dialect} format"
        except ValueError as exc:
            raise Problem(422, "Invalid input", f"line: {exc}") from None
    tried = AUTO_FORMATS if kind == "auto" else tuple(f for f in AUTO_FORMATS if f == kind)
    if not tried:
        raise Problem(422, "Invalid input", f"format: {kind!r} is not a known log format")
    reasons = []
    for fmt in tried:
        try:
            return accesslog.parse_line(fmt, line), fmt
        except ValueError as exc:
            reasons.append(f"{fmt}: {exc}")
    raise Problem(422, "Invalid input", "the line could not be read; " + "; ".join(reasons))


STATUS_LABELS = {
    "match": "Found",
    "ambiguous": "More than one owner",
    "no_match": "Nobody found",
    "expired": "Older than the audit retention",
}


@router.get("/audit/who")
def who_form(request: Request, me: Viewer) -> Response:
    need(me, "auditor", "operator")
    return page(
        request, "who.html", me, answer=None, form={}, read_as=None, status_labels=STATUS_LABELS
    )


@router.post("/audit/who")
def who(request: Request, db: DB, me: Actor, form: Form, state: State) -> Response:
    """Who was POD_IP:PORT at T (typed in, or read from a backend's access-log line)?"""
    need(me, "auditor", "operator")
    proto = form.get("proto", "tcp") or "tcp"
    dst = form.get("dst", "").strip() or None
    read_as = None
    if form.get("line", "").strip():
        hit, read_as = _read_line(form)
        q = attribution_query(hit.addr, hit.port, proto, hit.at.isoformat(), hit.window, dst)
    else:
        port_text = form.get("port", "").strip()
        if not port_text.isdigit():
            raise Problem(422, "Invalid input", "port: give the connection's source port")
        at = form.get("at", "").strip() or dt.datetime.now(dt.UTC).isoformat()
        window = 1.0 if form.get("whole_second") else 0.0
        q = attribution_query(form.get("ip", "").strip(), int(port_text), proto, at, window, dst)
    horizon, days = retention_horizon(state)
    answer: AttributionOut = lookup(db, q, horizon=horizon, retention_days=days)
    shown = {k: v for k, v in form.items() if k != "csrf"}
    return page(
        request,
        "who.html",
        me,
        answer=answer,
        form=shown,
        read_as=read_as,
        status_labels=STATUS_LABELS,
    )


@router.get("/audit/log")
def admin_log(
    request: Request,
    db: DB,
    me: Viewer,
    actor: str | None = None,
    action: str | None = None,
    cursor: str | None = None,
) -> Response:
    need(me, "auditor", "operator")
    query = select(AdminAudit)
    if actor:
        query = query.where(AdminAudit.actor == actor.strip()[:64])
    if action:
        query = query.where(AdminAudit.action.startswith(action.strip()[:64], autoescape=True))
    rows = db.scalars(paging.query(ADMIN_LOG, query, cursor)).all()
    listing = paging.listing(
        ADMIN_LOG, rows, lambda r: (r.id,), request.url.path, {"actor": actor, "action": action}
    )
    return page(
        request, "audit_log.html", me, listing=listing, actor=actor or "", action=action or ""
    )
