"""`vpnfleet status`: the fleet on one screen, and which alert conditions hold right now.

Computed from the API alone (`/api/v1/pods`, `/api/v1/revision`, `/api/v1/pki`), so it works
without Prometheus; the report itself is core/fleetstatus.py (the console shows the same).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer
from rich.markup import escape

from vpnfleet.cli.admin import api
from vpnfleet.cli.output import console, emit_json, safe, table
from vpnfleet.core.fleetstatus import assess


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
