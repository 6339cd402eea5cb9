"""Storing agents' flow records: idempotent, a few statements per batch whatever its size.

Agents deliver at least once (their spool resends after an outage), so a record may arrive
twice, an end may arrive without its start, and a start may arrive after its end. Every case
is one upsert keyed by ``flow_id``:

- start: ``INSERT ... ON CONFLICT (flow_id) DO NOTHING`` (a redelivered start, or one that
  arrives after its end, changes nothing);
- end: ``INSERT ... ON CONFLICT (flow_id) DO UPDATE`` of the end time and counters (a lost
  start leaves a complete row). An inferred end (the agent noticed the flow gone but never saw
  its DESTROY) never overwrites a real one.

SQLite and PostgreSQL share that syntax; SQLAlchemy's dialect ``insert`` constructs render it.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import false, or_, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from vpnfleet.controlplane.models import Flow
from vpnfleet.core.attribution import duration_class_ms
from vpnfleet.wire import FlowBatch, FlowReport

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
FLOWS = Flow.__table__


def from_ms(ms: int) -> dt.datetime:
    """Epoch milliseconds as an aware UTC datetime (exact: no float rounding)."""
    return EPOCH + dt.timedelta(milliseconds=ms)


def _row(pod: str, r: FlowReport) -> dict[str, Any]:
    # A clock step on the pod can make the end precede the start; keep the interval valid.
    end_ms = None if r.end_ms is None else max(r.end_ms, r.start_ms)
    start = from_ms(r.start_ms)
    end = None if end_ms is None else from_ms(end_ms)
    return {
        "flow_id": r.flow_id,
        "pod_name": pod,
        "user_name": r.user,
        "session_uid": r.session_uid,
        "proto": r.proto,
        "tunnel_ip": r.tunnel_ip,
        "tunnel_port": r.tunnel_port,
        "nat_ip": r.nat_ip,
        "nat_port": r.nat_port,
        "dst_ip": r.dst_ip,
        "dst_num": None if r.dst_ip is None else int.from_bytes(socket.inet_aton(r.dst_ip)),
        "dst_port": r.dst_port,
        "start_at": start,
        "end_at": end,
        "duration_class": duration_class_ms(r.start_ms, end_ms),
        "end_inferred": r.end_inferred if r.kind == "end" else False,
        "packets_out": r.packets_out,
        "bytes_out": r.bytes_out,
        "packets_in": r.packets_in,
        "bytes_in": r.bytes_in,
    }


def _insert(db: Session) -> Callable[..., Any]:
    name = db.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


def store(db: Session, batch: FlowBatch) -> dict[str, int]:
    """Upsert a batch of flow records in the caller's transaction; returns counts."""
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for r in batch.records:
        row = _row(batch.pod, r)
        if r.kind == "start":
            starts.setdefault(r.flow_id, row)
            continue
        # One row per flow_id and statement: PostgreSQL refuses to update a row twice in one
        # INSERT, and a real end must win over an inferred one.
        seen = ends.get(r.flow_id)
        if seen is None or seen["end_inferred"] or not row["end_inferred"]:
            ends[r.flow_id] = row
    conn = db.connection()
    insert = _insert(db)
    if starts:
        stmt = insert(FLOWS).on_conflict_do_nothing(index_elements=["flow_id"])
        conn.execute(stmt, list(starts.values()))
    if ends:
        stmt = insert(FLOWS)
        new = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=["flow_id"],
            # The start's attribution stays: it was taken when the flow opened, while the end
            # of a flow whose start was missed is attributed to the address's owner at its end.
            set_={
                "start_at": new.start_at,
                "end_at": new.end_at,
                "duration_class": new.duration_class,
                "end_inferred": new.end_inferred,
                "packets_out": new.packets_out,
                "bytes_out": new.bytes_out,
                "packets_in": new.packets_in,
                "bytes_in": new.bytes_in,
            },
            where=or_(
                FLOWS.c.end_at.is_(None),
                FLOWS.c.end_inferred == true(),
                new.end_inferred == false(),
            ),
        )
        conn.execute(stmt, list(ends.values()))
    return {"received": len(batch.records), "starts": len(starts), "ends": len(ends)}
