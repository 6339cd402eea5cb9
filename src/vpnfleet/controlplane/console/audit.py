"""The auditor's pages: "who was this?" from an address and time or a whole log line, and
the admin audit log."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console import paging
from vpnfleet.controlplane.console.render import page
from vpnfleet.controlplane.console.signin import Form, ReadingActor, Viewer, need
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import AdminAudit
from vpnfleet.controlplane.reverse_lookup import AttributionOut, flow_out, lookup
from vpnfleet.controlplane.routers.audit import ADMIN_LOG, DENIED, denied_out, denied_query
from vpnfleet.controlplane.routers.nataudit import (
    FLOWS,
    attribution_query,
    flows_query,
    retention_horizon,
)
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import ReadDB, State
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
def who(request: Request, db: ReadDB, me: ReadingActor, form: Form, state: State) -> Response:
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
    db: ReadDB,
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


MAX_EXPORT = 50_000  # rows in one CSV export (the API's pages go further)
FLOW_FIELDS = (
    "start_at", "end_at", "user", "pod", "session_uid", "proto", "tunnel_ip", "tunnel_port",
    "nat_ip", "nat_port", "dst_ip", "dst_port", "bytes_out", "bytes_in",
)  # fmt: skip
DENIED_FIELDS = (
    "first_at", "last_at", "user", "pod", "session_uid", "src", "dst", "proto", "dport",
    "count", "overflow",
)  # fmt: skip


def _when(text: str | None, name: str) -> dt.datetime | None:
    if not text or not text.strip():
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise Problem(422, "Invalid input", f"{name}: use a time like 2026-12-04T10:00") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _csv(rows: Iterable[dict[str, Any]], fields: tuple[str, ...], name: str, cut: bool) -> Response:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
        )
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if cut:
        headers["X-Vpnfleet-Truncated"] = f"first {MAX_EXPORT} rows"
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/audit/flows")
def flows(
    request: Request,
    db: ReadDB,
    me: Viewer,
    user: str | None = None,
    pod: str | None = None,
    dst: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
    export: bool = False,
) -> Response:
    """A user's (or anyone's) NAT'd connections, newest first; ``export=true``: CSV."""
    need(me, "auditor", "operator")
    start, end = _when(since, "since"), _when(until, "until")
    query = flows_query(
        (user or "").strip() or None,
        (pod or "").strip() or None,
        start.isoformat() if start else None,
        end.isoformat() if end else None,
        (dst or "").strip() or None,
    )
    if export:
        found = db.execute(query.order_by(*FLOWS.order_by()).limit(MAX_EXPORT + 1)).all()
        rows = [flow_out(r).model_dump() for r in found[:MAX_EXPORT]]
        return _csv(rows, FLOW_FIELDS, "flows.csv", len(found) > MAX_EXPORT)
    found = db.execute(paging.query(FLOWS, query, cursor)).all()
    filters = {"user": user, "pod": pod, "dst": dst, "since": since, "until": until}
    listing = paging.listing(FLOWS, found, lambda r: (r.start_at, r.id), request.url.path, filters)
    return page(
        request,
        "flows.html",
        me,
        listing=listing,
        views=[flow_out(r) for r in listing.rows],
        filters={k: v or "" for k, v in filters.items()},
        export_url=_export_url(request),
    )


def _export_url(request: Request) -> str:
    params = [
        (k, v) for k, v in request.query_params.multi_items() if k not in ("cursor", "export")
    ]
    return str(request.url.path) + "?" + urlencode([*params, ("export", "true")])


@router.get("/audit/denied")
def denied(
    request: Request,
    db: ReadDB,
    me: Viewer,
    user: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
    export: bool = False,
) -> Response:
    """Traffic no grant allowed (per user, window and destination); ``export=true``: CSV."""
    need(me, "auditor", "operator")
    query = denied_query((user or "").strip() or None, _when(since, "since"), _when(until, "until"))
    if export:
        found = db.scalars(query.order_by(*DENIED.order_by()).limit(MAX_EXPORT + 1)).all()
        rows = [denied_out(r) for r in found[:MAX_EXPORT]]
        return _csv(rows, DENIED_FIELDS, "denied.csv", len(found) > MAX_EXPORT)
    found = db.scalars(paging.query(DENIED, query, cursor)).all()
    filters = {"user": user, "since": since, "until": until}
    listing = paging.listing(DENIED, found, lambda r: (r.first_at, r.id), request.url.path, filters)
    return page(
        request,
        "denied.html",
        me,
        listing=listing,
        views=[denied_out(r) for r in listing.rows],
        filters={k: v or "" for k, v in filters.items()},
        export_url=_export_url(request),
    )
