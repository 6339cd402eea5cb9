"""Reverse lookup over the flows table: the queries and the answer the API gives.

The decision itself (which flow covers the time, what is ambiguous) is pure and lives in
:mod:`vpnfleet.core.attribution`; this module fetches the few rows it needs through the
``ix_flows_nat`` index. Used by the API and, unchanged, by ``bench/attribution_lookup.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Select,
    bindparam,
    func,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from vpnfleet.controlplane.models import Flow, VpnSession
from vpnfleet.core.attribution import (
    CLASS_BOUNDS,
    LONG_CLASS,
    OPEN_CLASS,
    Decision,
    FlowSpan,
    Query,
    Status,
    decide,
    human_duration,
    iso,
)

# More than two flows covering one instant is already a story; listing 10 is plenty.
MAX_MATCHES = 10
MAX_CANDIDATES = 5
CLASSES = range(OPEN_CLASS + 1)


class SessionBrief(BaseModel):
    """The VPN session a flow belonged to."""

    id: int
    uid: str
    pod: str
    real_ip: str | None
    real_port: int | None
    tunnel_ip: str
    started_at: dt.datetime
    ended_at: dt.datetime | None


class FlowOut(BaseModel):
    """One stored flow."""

    flow_id: str
    pod: str
    user: str | None
    session_uid: str | None
    proto: str
    tunnel_ip: str
    tunnel_port: int
    nat_ip: str
    nat_port: int
    dst_ip: str | None
    dst_port: int | None
    start_at: dt.datetime
    end_at: dt.datetime | None
    end_inferred: bool
    packets_out: int | None
    bytes_out: int | None
    packets_in: int | None
    bytes_in: int | None


class Attributed(BaseModel):
    """A flow with its owner and session."""

    user: str | None
    session: SessionBrief | None
    flow: FlowOut


class Candidate(Attributed):
    """A flow near the asked time that does not cover it."""

    distance_seconds: float
    relation: Literal["before", "after"]


class QueryOut(BaseModel):
    """The question as understood (normalized)."""

    ip: str
    port: int
    proto: str
    at: dt.datetime
    window_seconds: float
    dst_ip: str | None
    dst_port: int | None


class AttributionOut(BaseModel):
    """The answer: `user`/`session`/`flow` are set when exactly one owner is known."""

    status: Status
    message: str
    query: QueryOut
    user: str | None = None
    session: SessionBrief | None = None
    flow: FlowOut | None = None
    matches: list[Attributed] = []
    candidates: list[Candidate] = []


FLOW_COLUMNS = (
    Flow.id, Flow.flow_id, Flow.pod_name, Flow.user_name, Flow.session_uid, Flow.proto,
    Flow.tunnel_ip, Flow.tunnel_port, Flow.nat_ip, Flow.nat_port, Flow.dst_ip, Flow.dst_port,
    Flow.start_at, Flow.end_at, Flow.end_inferred, Flow.packets_out, Flow.bytes_out,
    Flow.packets_in, Flow.bytes_in,
)  # fmt: skip
_SESSION_COLUMNS = (
    VpnSession.id.label("s_id"), VpnSession.pod_name.label("s_pod"), VpnSession.real_ip,
    VpnSession.real_port, VpnSession.tunnel_ip.label("s_tunnel_ip"), VpnSession.started_at,
    VpnSession.ended_at,
)  # fmt: skip


# The statements are built once with bound parameters: building and caching a statement
# costs about as much as running it on an indexed table.
Variant = tuple[bool, bool]  # (the query names a destination IP, ... a destination port)


def _where(c: int, variant: Variant) -> list[ColumnElement[bool]]:
    """Same address, port, protocol and lifetime class (and destination, if asked)."""
    cond = [
        Flow.nat_ip == bindparam("ip"),
        Flow.nat_port == bindparam("port"),
        Flow.proto == bindparam("proto"),
        Flow.duration_class == c,
    ]
    # Flows recorded without destination (privacy option) cannot be ruled out by one.
    if variant[0]:
        cond.append(or_(Flow.dst_ip.is_(None), Flow.dst_ip == bindparam("dst_ip")))
    if variant[1]:
        cond.append(or_(Flow.dst_port.is_(None), Flow.dst_port == bindparam("dst_port")))
    return cond


def _details(ids: CompoundSelect[Any]) -> Select[*tuple[Any, ...]]:
    found = ids.subquery()
    return (
        select(*FLOW_COLUMNS, *_SESSION_COLUMNS)
        .select_from(found)
        .join(Flow, Flow.id == found.c.id)
        .outerjoin(VpnSession, VpnSession.uid == Flow.session_uid)
    )


def _covering(variant: Variant) -> Select[*tuple[Any, ...]]:
    """Flows alive at some instant of [at, latest], one bounded index range per class."""
    branches = []
    for c in CLASSES:
        cond = [*_where(c, variant), Flow.start_at <= bindparam("latest")]
        if c < LONG_CLASS:
            cond.append(Flow.start_at >= bindparam(f"since{c}"))
        if c != OPEN_CLASS:
            cond.append(Flow.end_at >= bindparam("at"))
        branches.append(select(Flow.id).where(*cond))
    # Ruling out open flows happens after the fetch, so fetch more than are listed.
    return _details(union_all(*branches)).order_by(Flow.start_at.desc()).limit(5 * MAX_MATCHES)


def _nearby(variant: Variant) -> Select[*tuple[Any, ...]]:
    """The latest flows started before and the first started after, per class."""
    branches = []
    for c in CLASSES:
        before = (
            select(Flow.id)
            .where(*_where(c, variant), Flow.start_at <= bindparam("latest"))
            .order_by(Flow.start_at.desc())
            .limit(MAX_CANDIDATES)
            .subquery()
        )
        after = (
            select(Flow.id)
            .where(*_where(c, variant), Flow.start_at > bindparam("latest"))
            .order_by(Flow.start_at)
            .limit(MAX_CANDIDATES)
            .subquery()
        )
        branches += [select(before.c.id), select(after.c.id)]
    return _details(union_all(*branches))


def _reused() -> Select[*tuple[Any, ...]]:
    """The first later flow with the same NAT tuple and destination, started by `latest`."""
    branches = []
    for c in CLASSES:
        first = (
            select(Flow.start_at.label("start_at"))
            .where(
                *_where(c, (False, False)),
                Flow.start_at > bindparam("after"),
                Flow.start_at <= bindparam("latest"),
                Flow.dst_ip == bindparam("same_dst_ip"),
                Flow.dst_port == bindparam("same_dst_port"),
            )
            .order_by(Flow.start_at)
            .limit(1)
            .subquery()
        )
        branches.append(select(first.c.start_at))
    every = union_all(*branches).subquery()
    return select(func.min(every.c.start_at))


_COVERING = {v: _covering(v) for v in ((False, False), (True, False), (False, True), (True, True))}
_NEARBY = {v: _nearby(v) for v in _COVERING}
_REUSED = _reused()


def _params(q: Query) -> dict[str, Any]:
    params: dict[str, Any] = {
        "ip": q.ip,
        "port": q.port,
        "proto": q.proto,
        "at": q.at,
        "latest": q.latest,
        "dst_ip": q.dst_ip,
        "dst_port": q.dst_port,
    }
    for c, bound in enumerate(CLASS_BOUNDS):
        params[f"since{c}"] = q.at - bound
    return params


def flow_out(row: Row[*tuple[Any, ...]]) -> FlowOut:
    """A flows row (any select with the Flow columns) as the API shows it."""
    return FlowOut(
        flow_id=row.flow_id,
        pod=row.pod_name,
        user=row.user_name,
        session_uid=row.session_uid,
        proto=row.proto,
        tunnel_ip=row.tunnel_ip,
        tunnel_port=row.tunnel_port,
        nat_ip=row.nat_ip,
        nat_port=row.nat_port,
        dst_ip=row.dst_ip,
        dst_port=row.dst_port,
        start_at=row.start_at,
        end_at=row.end_at,
        end_inferred=bool(row.end_inferred),
        packets_out=row.packets_out,
        bytes_out=row.bytes_out,
        packets_in=row.packets_in,
        bytes_in=row.bytes_in,
    )


def _attributed(row: Row[*tuple[Any, ...]]) -> Attributed:
    session = None
    if row.s_id is not None:
        session = SessionBrief(
            id=row.s_id,
            uid=row.session_uid,
            pod=row.s_pod,
            real_ip=row.real_ip,
            real_port=row.real_port,
            tunnel_ip=row.s_tunnel_ip,
            started_at=row.started_at,
            ended_at=row.ended_at,
        )
    return Attributed(user=row.user_name, session=session, flow=flow_out(row))


def _span(row: Row[*tuple[Any, ...]], reused_at: dt.datetime | None = None) -> FlowSpan:
    return FlowSpan(
        row_id=row.id,
        start=row.start_at,
        end=row.end_at,
        user=row.user_name,
        dst_ip=row.dst_ip,
        dst_port=row.dst_port,
        session_end=row.ended_at,
        reused_at=reused_at,
    )


def _reuse(db: Session, q: Query, row: Row[*tuple[Any, ...]]) -> dt.datetime | None:
    """When a later flow took the same NAT tuple (same destination) before the asked range
    ends: an open flow's end record may be late or lost, but the tuple's reuse proves it ended.
    """
    if row.dst_ip is None or row.dst_port is None:
        return None
    params = {
        "ip": q.ip,
        "port": q.port,
        "proto": q.proto,
        "after": row.start_at,
        "latest": q.latest,
        "same_dst_ip": row.dst_ip,
        "same_dst_port": row.dst_port,
    }
    reused: dt.datetime | None = db.connection().execute(_REUSED, params).scalar()
    return reused


def lookup(
    db: Session,
    q: Query,
    *,
    horizon: dt.datetime | None = None,
    retention_days: int | None = None,
    candidates: bool = True,
) -> AttributionOut:
    """Answer one reverse lookup: one statement for a match, two when nothing covers."""
    variant = (q.dst_ip is not None, q.dst_port is not None)
    params = _params(q)
    # Core execution on the session's connection: these are plain selects, and the ORM
    # layer would cost as much again as the query itself.
    conn = db.connection()
    found = conn.execute(_COVERING[variant], params).all()
    rows = {r.id: r for r in found}
    spans = [_span(r, _reuse(db, q, r)) if r.end_at is None else _span(r) for r in found]
    decision = decide(q, spans, horizon=horizon, max_candidates=MAX_CANDIDATES)
    if decision.status == "no_match" and candidates:
        near = conn.execute(_NEARBY[variant], params).all()
        rows.update({r.id: r for r in near})
        nearby = [_span(r) for r in near]
        decision = decide(q, spans, nearby, horizon=horizon, max_candidates=MAX_CANDIDATES)
    decision.matches = decision.matches[:MAX_MATCHES]
    return _answer(q, decision, rows, retention_days, horizon)


def _answer(
    q: Query,
    decision: Decision,
    rows: dict[int, Row[*tuple[Any, ...]]],
    retention_days: int | None,
    horizon: dt.datetime | None,
) -> AttributionOut:
    matches = [_attributed(rows[f.row_id]) for f in decision.matches]
    cands = [
        Candidate(
            user=(a := _attributed(rows[f.row_id])).user,
            session=a.session,
            flow=a.flow,
            distance_seconds=round(dist.total_seconds(), 3),
            relation="after" if f.start > q.latest else "before",
        )
        for f, dist in decision.candidates
    ]
    out = AttributionOut(
        status=decision.status,
        message="",
        query=QueryOut(
            ip=q.ip,
            port=q.port,
            proto=q.proto,
            at=q.at,
            window_seconds=q.window.total_seconds(),
            dst_ip=q.dst_ip,
            dst_port=q.dst_port,
        ),
        matches=matches,
        candidates=cands,
    )
    users = decision.users
    if matches and len(users) == 1:
        # One owner for every covering flow: the person is known even if the flow is not.
        out.user = users[0]
        out.session = matches[0].session if len(matches) == 1 else None
        out.flow = matches[0].flow if len(matches) == 1 else None
    out.message = _message(q, out, users, retention_days, horizon)
    return out


def _message(
    q: Query,
    out: AttributionOut,
    users: list[str | None],
    retention_days: int | None,
    horizon: dt.datetime | None,
) -> str:
    what = q.describe()
    if out.status == "match":
        f = out.matches[0].flow
        if out.user is None:
            return (
                f"{what} was a flow from tunnel address {f.tunnel_ip} that no session owned "
                f"(pod {f.pod})"
            )
        s = out.session
        where = f"session {s.id} from {s.real_ip or 'unknown address'}" if s else "no session"
        return f"{what} was {out.user} ({where}, tunnel {f.tunnel_ip}:{f.tunnel_port}, pod {f.pod})"
    if out.status == "ambiguous":
        n = len(out.matches)
        if out.user is not None:
            return f"{n} flows of {out.user} cover {what}"
        names = ", ".join(u or "nobody" for u in users)
        return (
            f"{n} flows cover {what} (users: {names}); give the destination the backend "
            "listens on (dst) to tell them apart"
        )
    if out.status == "expired":
        since = f" before {iso(horizon)}" if horizon else ""
        return (
            f"{iso(q.at)} is older than the {retention_days}-day retention: flows that "
            f"ended{since} have been deleted"
        )
    if not out.candidates:
        return f"no flow covers {what}, and no flow of that address, port and protocol is kept"
    nearest = human_duration(dt.timedelta(seconds=out.candidates[0].distance_seconds))
    return (
        f"no flow covers {what}; the nearest of {len(out.candidates)} candidate(s) is "
        f"{nearest} away"
    )
