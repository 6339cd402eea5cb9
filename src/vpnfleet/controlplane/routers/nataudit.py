"""NAT audit reads: who was POD_IP:PORT at time T, and the flow records themselves.

Also owns the audit retention task (its lifespan runs it when a retention is configured).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, select

from vpnfleet.controlplane import retention
from vpnfleet.controlplane.errors import Problem, bad_request
from vpnfleet.controlplane.models import Flow
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.reverse_lookup import (
    FLOW_COLUMNS,
    AttributionOut,
    FlowOut,
    flow_out,
    lookup,
)
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import DB, AppState, Auditor, State
from vpnfleet.core import attribution as core
from vpnfleet.core import netparse
from vpnfleet.core.accesslog import parse_instant
from vpnfleet.wire import Storable

router = APIRouter(
    route_class=WriteThroughRoute, prefix="/api/v1", tags=["audit"], lifespan=retention.lifespan
)

MAX_QUERIES = 10_000
BATCH_TRANSACTION = 500  # lookups per read transaction of a batch (~0.3 s)
FLOWS = Keyset("audit-flows", (Flow.start_at, Flow.id), ("time", "int"), descending=True)


def _time(text: str, name: str) -> dt.datetime:
    try:
        return parse_instant(text)[0]
    except ValueError as exc:
        raise bad_request(f"{name}: {exc}") from None


def attribution_query(
    ip: str, port: int, proto: str, at: str, window: float, dst: str | None
) -> core.Query:
    when = _time(at, "at")
    try:
        return core.parse_query(ip, port, proto, when, window, dst)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def retention_horizon(state: AppState) -> tuple[dt.datetime | None, int | None]:
    days = state.settings.audit_retention_days
    return (retention.horizon(days), days) if days else (None, None)


@router.get("/audit/attribution", response_model=AttributionOut)
def attribution(
    db: DB,
    _who: Auditor,
    state: State,
    ip: str,
    port: int,
    at: str,
    proto: str = "tcp",
    window: float = 0.0,
    dst: str | None = None,
) -> AttributionOut:
    """Who was `ip:port` (`proto`) at `at`: the covering flow, its user and session.

    `window` (seconds): the connection was seen somewhere in `[at, at + window]` (use 1 for
    log times with whole seconds). `dst` (`IP` or `IP:PORT`, the backend's own address) tells
    apart flows that share the NAT address and port towards different destinations.
    A time before the retention horizon with nothing left to cover it is a 404.
    """
    q = attribution_query(ip, port, proto, at, window, dst)
    horizon, days = retention_horizon(state)
    out = lookup(db, q, horizon=horizon, retention_days=days)
    if out.status == "expired":
        raise Problem(404, "Not found", out.message)
    return out


class AttributionQueryIn(Storable):
    """One lookup of a batch (same meaning as the GET parameters)."""

    model_config = ConfigDict(extra="forbid")
    ip: str
    port: int
    proto: str = "tcp"
    at: str
    window: float = 0.0
    dst: str | None = None


class AttributionBatchIn(BaseModel):  # each query checks its own text (Storable)
    """Up to 10,000 lookups answered in one response (what `audit annotate` sends)."""

    model_config = ConfigDict(extra="forbid")
    queries: list[AttributionQueryIn] = Field(max_length=MAX_QUERIES)
    candidates: bool = True


class AttributionBatchOut(BaseModel):
    """One result per query, in the order asked; `status` `expired` instead of a 404."""

    results: list[AttributionOut]


@router.post("/audit/attribution", response_model=AttributionBatchOut)
def attribution_batch(body: AttributionBatchIn, _who: Auditor, state: State) -> AttributionBatchOut:
    """Many lookups in one request; a malformed query fails the batch, naming its index."""
    queries = []
    for i, item in enumerate(body.queries):
        try:
            queries.append(
                attribution_query(item.ip, item.port, item.proto, item.at, item.window, item.dst)
            )
        except Problem as exc:
            raise bad_request(f"queries[{i}]: {exc.detail}") from None
    horizon, days = retention_horizon(state)
    results = []
    # Short read transactions, not one per request: on SQLite every transaction takes the
    # write lock (BEGIN IMMEDIATE), and 10,000 lookups take seconds that agents would wait.
    for first in range(0, len(queries), BATCH_TRANSACTION):
        with state.factory() as db, db.begin():
            results += [
                lookup(db, q, horizon=horizon, retention_days=days, candidates=body.candidates)
                for q in queries[first : first + BATCH_TRANSACTION]
            ]
    return AttributionBatchOut(results=results)


@router.get("/audit/flows", response_model=list[FlowOut], responses=LINK_HEADER)
def list_flows(
    db: DB,
    _who: Auditor,
    page: PageParams,
    user: str | None = None,
    pod: str | None = None,
    since: str | None = None,
    until: str | None = None,
    dst: str | None = None,
) -> list[FlowOut]:
    """Flows that started between `since` and `until`, newest first, a page at a time; `dst` is
    an IP or CIDR."""
    query = flows_query(user, pod, since, until, dst)
    found = db.execute(page.query(FLOWS, query)).all()
    return [flow_out(row) for row in page.rows(FLOWS, found, lambda r: (r.start_at, r.id))]


def flows_query(
    user: str | None, pod: str | None, since: str | None, until: str | None, dst: str | None
) -> Select[*tuple[Any, ...]]:
    """The stored flows matching the filters (the API's list and the console's pages)."""
    query: Select[*tuple[Any, ...]] = select(*FLOW_COLUMNS)
    if user:
        query = query.where(Flow.user_name == user)
    if pod:
        query = query.where(Flow.pod_name == pod)
    if since:
        query = query.where(Flow.start_at >= _time(since, "since"))
    if until:
        query = query.where(Flow.start_at <= _time(until, "until"))
    if dst:
        try:
            net = netparse.parse_destination(dst)
        except ValueError as exc:
            raise bad_request(f"dst: {exc}") from None
        first, last = int(net.network_address), int(net.broadcast_address)
        query = query.where(Flow.dst_num >= first, Flow.dst_num <= last)
    return query
