"""`vpnfleet directory`: users and groups from LDAP / Active Directory (docs/sso.md).

The settings come from a YAML file (the group mapping does not fit options); the bind
password from a file or the environment, never from the command line (where `ps` shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vpnfleet.cli.admin import JsonOpt, api, settings_with_secret
from vpnfleet.cli.output import emit_json, record

directory_app = typer.Typer(
    help="Users and group memberships from LDAP / Active Directory.", no_args_is_help=True
)

PASSWORD_ENV = "VPNFLEET_DIRECTORY_BIND_PASSWORD"  # noqa: S105 - a variable's name
SYNC_TIMEOUT = 900.0  # seconds: a first sync of a large directory issues many certificates


@directory_app.command("set")
def directory_set(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="Directory settings (YAML).")],
    bind_password_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding the bind password (else env {PASSWORD_ENV}; neither keeps "
            "the stored one)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Configure the directory sync from FILE (admin)."""
    body, password = settings_with_secret(
        file, "bind_password", bind_password_file, PASSWORD_ENV, "bind password"
    )
    out = api(ctx).put("/api/v1/directory", body)
    if as_json:
        emit_json(out)
        return
    typer.echo(
        "directory settings stored"
        + ("" if password is not None else " (bind password unchanged)")
        + ": run 'vpnfleet directory sync --dry-run' to see what a sync would change"
    )


@directory_app.command("show")
def directory_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The directory settings (never the bind password) and the last sync."""
    out = api(ctx).get("/api/v1/directory")
    if as_json:
        emit_json(out)
        return
    status = out.pop("status")
    group_map = out.pop("group_map")
    record(out)
    typer.echo("group map:")
    for key, group in sorted(group_map.items()):
        typer.echo(f"  {key} -> {group}")
    typer.echo(f"last sync: {_status_line(status)}")


def _status_line(s: dict[str, Any]) -> str:
    if not s.get("configured"):
        return "no directory configured"
    if not s.get("last_attempt_at"):
        return "never"
    line = f"{s['last_status']} at {s['last_attempt_at']} by {s['last_actor']}"
    if s.get("last_error"):
        line += f": {s['last_error']}"
    return line


@directory_app.command("status")
def directory_status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """When the directory was last synced, by whom, with what outcome."""
    s = api(ctx).get("/api/v1/directory/status")
    if as_json:
        emit_json(s)
        return
    typer.echo(f"last sync: {_status_line(s)}")
    if s.get("configured"):
        periodic = f"every {s['interval_seconds']} s" if s["enabled"] else "off"
        typer.echo(f"periodic sync: {periodic}")
        if s.get("last_success_at"):
            typer.echo(f"last success: {s['last_success_at']}")
        if s.get("last_counts"):
            typer.echo("last counts: " + ", ".join(f"{k} {v}" for k, v in s["last_counts"].items()))
        if s.get("syncing"):
            typer.echo(f"syncing now: {s['syncing']}")


_DIFF = (
    ("groups_created", "+", "group"),
    ("users_created", "+", "user"),
    ("users_adopted", "~", "adopt user"),
    ("users_enabled", "+", "enable user"),
    ("emails_updated", "~", "email of user"),
    ("members_added", "+", "member"),
    ("members_removed", "-", "member"),
    ("users_disabled", "-", "disable user"),
)
_COLOUR = {"+": "green", "~": "yellow", "-": "red"}


@directory_app.command("sync")
def directory_sync(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Apply even when it disables many users at once."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Sync users and memberships from the directory now."""
    client = api(ctx)
    client.timeout = SYNC_TIMEOUT
    resp = client.request(
        "POST",
        "/api/v1/directory/sync",
        params={"dry_run": str(dry_run).lower(), "force": str(force).lower()},
    )
    out: dict[str, Any] = resp.json()
    if as_json:
        emit_json(out)
        return
    for key, sign, what in _DIFF:
        for item in out["diff"][key]:
            typer.secho(f"{sign} {what} {item}", fg=_COLOUR[sign])
    for item in out["skipped"]:
        typer.secho(f"skipped {item}", fg="yellow", err=True)
    changed = sum(out["counts"].values())
    facts = (
        f"{out['directory_users']} directory user(s), {out['queries']} LDAP queries, "
        f"{out['seconds']} s"
    )
    if not changed:
        typer.echo(f"no changes: vpnfleet matches the directory ({facts})")
    elif dry_run:
        typer.echo(f"dry run: {changed} change(s), nothing was written ({facts})")
    else:
        typer.echo(
            f"synced at revision {out['revision']}: {changed} change(s), "
            f"{out['sessions_killed']} session(s) ended ({facts})"
        )
