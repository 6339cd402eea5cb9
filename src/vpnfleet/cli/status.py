"""`vpnfleet status`: the fleet on one screen, and which alert conditions hold right now.

Computed from the API alone (`/api/v1/pods`, `/api/v1/revision`, `/api/v1/pki`), so it works
without Prometheus; the conditions mirror deploy/prometheus/alerts.yml where the API has the
facts (docs/observability.md lists both).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape

from vpnfleet.cli.admin import api
from vpnfleet.cli.output import console, emit_json, safe, table
from vpnfleet.wire import CERT_EXPIRY_WARNING, POD_FORGET_AFTER

HEARTBEAT_STALE = dt.timedelta(seconds=30)
# The control plane signs CRLs valid for 30 days, so "within 30 days" would always hold for a
# fresh one: warn when a pod's copy has a week left (only pods that report it).
CRL_WARN = dt.timedelta(days=7)


@dataclass(frozen=True)
class Condition:
    """One alert condition that holds now."""

    name: str
    subject: str
    detail: str


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def assess(
    revision: int,
    pods: list[dict[str, Any]],
    pki: dict[str, Any] | None,
    now: dt.datetime,
    show_all: bool = False,
) -> dict[str, Any]:
    """The status report: rows per pod, totals and conditions. Pure, for tests and --json."""
    rows: list[dict[str, Any]] = []
    conditions: list[Condition] = []
    hidden = 0
    for p in sorted(pods, key=lambda p: str(p.get("name"))):
        name = str(p.get("name"))
        raw = p.get("status")
        status: dict[str, Any] = raw if isinstance(raw, dict) else {}
        beat = _time(p.get("last_heartbeat"))
        seen = beat or _time(p.get("registered_at"))
        age = (now - beat).total_seconds() if beat else None
        if not show_all and (seen is None or now - seen > POD_FORGET_AFTER):
            hidden += 1
            continue
        drained = bool(status.get("drained"))
        stale = age is None or age > HEARTBEAT_STALE.total_seconds()
        applied = _int(p.get("applied_revision")) or 0
        lag = max(0, revision - applied)
        spooled = _int(status.get("spooled"))
        ready = bool(p.get("ready")) and not stale
        state = "drained" if drained else "silent" if stale else "ready" if ready else "not ready"
        rows.append(
            {
                "name": name,
                "state": state,
                "ready": ready,
                "heartbeat_age_s": None if age is None else round(age, 1),
                "clients": _int(status.get("clients")),
                "applied_revision": applied,
                "lag": lag,
                "spooled": spooled,
                "openvpn": status.get("openvpn"),
            }
        )
        if drained:
            continue  # it said goodbye: nothing to alert on
        if stale:
            when = "never" if age is None else f"{age:.0f}s ago"
            conditions.append(Condition("PodHeartbeatStale", name, f"last heartbeat {when}"))
        elif not ready:
            conditions.append(Condition("PodNotReady", name, "the pod says it is not ready"))
        if lag > 0 and not stale:
            conditions.append(
                Condition("PodRevisionLag", name, f"enforces {applied}, head is {revision}")
            )
        if spooled:
            conditions.append(Condition("SpoolBacklog", name, f"{spooled} record(s) undelivered"))
        crl = _time(status.get("crl_next_update"))
        if crl is not None and crl - now < CRL_WARN:
            conditions.append(
                Condition("CRLExpiring", name, f"its CRL copy expires {crl.isoformat()}")
            )
    live = [r for r in rows if r["state"] != "drained"]
    if not any(r["ready"] for r in live):
        conditions.append(Condition("NoPodReady", "fleet", "no pod is ready for clients"))
    pki_out: dict[str, Any] = {}
    ca = pki.get("ca") if isinstance(pki, dict) else None
    ca_end = _time(ca.get("not_after")) if isinstance(ca, dict) else None
    if ca_end is not None:
        left = ca_end - now
        days = round(left.total_seconds() / 86400, 1)
        pki_out = {"ca_not_after": ca_end.isoformat(), "ca_days_left": days}
        if left < CERT_EXPIRY_WARNING:
            conditions.append(
                Condition("CAExpiring", "pki", f"the CA expires {ca_end.date()} ({days} d)")
            )
    totals = {
        "pods": len(live),
        "ready": sum(1 for r in live if r["ready"]),
        "clients": sum(r["clients"] or 0 for r in live),
        "spooled": sum(r["spooled"] or 0 for r in live),
    }
    return {
        "at": now.isoformat(),
        "revision": revision,
        "pods": rows,
        "hidden_pods": hidden,
        "totals": totals,
        "pki": pki_out,
        "conditions": [asdict(c) for c in conditions],
    }


def _print(report: dict[str, Any]) -> None:
    rows = [
        {
            **r,
            "heartbeat": "-" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.0f}s",
        }
        for r in report["pods"]
    ]
    cols = ["name", "state", "heartbeat", "clients", "applied_revision", "lag", "spooled"]
    table(rows, cols, title=f"pods at revision {report['revision']}")
    t = report["totals"]
    line = f"{t['ready']}/{t['pods']} pods ready, {t['clients']} client(s)"
    if t["spooled"]:
        line += f", {t['spooled']} record(s) spooled"
    if report["hidden_pods"]:
        line += f"; {report['hidden_pods']} pod(s) silent for over an hour not shown (--all)"
    console.print(line, highlight=False)
    if report["pki"]:
        console.print(
            f"CA valid until {report['pki']['ca_not_after']} "
            f"({report['pki']['ca_days_left']:.0f} days)",
            highlight=False,
        )
    if not report["conditions"]:
        console.print("[green]no alert condition holds[/green]")
        return
    console.print(f"[red]{len(report['conditions'])} alert condition(s) hold:[/red]")
    for c in report["conditions"]:
        console.print(
            f"  {escape(safe(c['name']))}  {escape(safe(c['subject']))}: "
            f"{escape(safe(c['detail']))}",
            highlight=False,
        )


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list pods silent for over an hour.")
    ] = False,
) -> None:
    """The fleet on one screen: pods, totals and which alert conditions hold now."""
    client = api(ctx)
    revision = int(client.get("/api/v1/revision")["revision"])
    pods = client.get_all("/api/v1/pods")
    pki = client.get("/api/v1/pki")
    report = assess(revision, pods, pki, dt.datetime.now(dt.UTC), show_all)
    if as_json:
        emit_json(report)
    else:
        _print(report)
