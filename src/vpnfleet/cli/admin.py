"""Admin commands: thin wrappers over the REST API."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from vpnfleet.cli.client import APIClient, CLIError, resolve
from vpnfleet.cli.output import emit_json, record, say, show, table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def api(ctx: typer.Context) -> APIClient:
    obj = ctx.find_root().obj or {}
    url, token, ca_file = resolve(obj.get("url"), obj.get("token"), obj.get("ca_file"))
    return APIClient(url, token, ca_file=ca_file)


def settings_with_secret(
    file: Path, secret_key: str, secret_file: Path | None, env: str, what: str
) -> tuple[dict[str, Any], str | None]:
    """A settings file (a YAML mapping) as a request body, and the secret (`what`, the
    body's `secret_key`) read from `secret_file`, else the environment variable `env`; None
    when neither gives one (the stored one is kept). The secret must never be in the file,
    where it would be copied around with the settings, nor on the command line, where `ps`
    shows it."""
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CLIError(f"cannot read {file}: {exc.strerror}", 2) from None
    except yaml.YAMLError as exc:
        raise CLIError(f"{file} is not valid YAML: {exc}", 2) from None
    if not isinstance(settings, dict):
        raise CLIError(f"{file} must hold a mapping of settings", 2)
    if secret_key in settings:
        option = "--" + secret_key.replace("_", "-") + "-file"
        raise CLIError(
            f"{file} holds {secret_key}: keep it out of the settings file and pass "
            f"{option} or {env}",
            2,
        )
    body: dict[str, Any] = dict(settings)
    secret = os.environ.get(env) or None
    if secret_file is not None:
        try:
            secret = secret_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CLIError(f"cannot read the {what} file {secret_file}: {exc.strerror}") from None
        if not secret:
            raise CLIError(f"the {what} file {secret_file} is empty")
    if secret is not None:
        body[secret_key] = secret
    return body, secret


def _time(value: str | None, name: str) -> str | None:
    """Validate a CLI time: ISO 8601 with a zone (or a trailing Z)."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CLIError(
            f"{name} {value!r} is not an ISO 8601 time like 2026-01-31T12:00:00Z", 2
        ) from None
    if parsed.tzinfo is None:
        raise CLIError(f"{name} {value!r} has no time zone; add Z or +HH:MM", 2)
    return parsed.isoformat()


# --- users -------------------------------------------------------------------------------

user_app = typer.Typer(
    help="Users: accounts, modes, certificates and profiles.", no_args_is_help=True
)
USER_COLS = [
    "name",
    "mode",
    "enabled",
    "max_sessions",
    "groups",
    "gateway_address",
    "email",
    "auth",
]


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str,
    email: Annotated[str | None, typer.Option(help="Contact address.")] = None,
    mode: Annotated[str, typer.Option(help="nat (default) or gateway.")] = "nat",
    max_sessions: Annotated[int, typer.Option(help="Concurrent sessions allowed.")] = 1,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="Group (repeat).")
    ] = None,
    disabled: Annotated[bool, typer.Option(help="Create the user disabled.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a user and issue their client certificate."""
    body = {
        "name": name,
        "email": email,
        "mode": mode,
        "max_sessions": max_sessions,
        "groups": group or [],
        "enabled": not disabled,
    }
    out = api(ctx).post("/api/v1/users", body)
    show(out, as_json) if as_json else typer.echo(f"created user {out['name']} (id {out['id']})")


@user_app.command("list")
def user_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List users."""
    show(api(ctx).get_all("/api/v1/users"), as_json, USER_COLS)


@user_app.command("show")
def user_show(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Show one user with their certificate."""
    show(api(ctx).get(f"/api/v1/users/{name}"), as_json)


@user_app.command("set")
def user_set(
    ctx: typer.Context,
    name: str,
    email: Annotated[str | None, typer.Option()] = None,
    mode: Annotated[str | None, typer.Option(help="nat or gateway.")] = None,
    max_sessions: Annotated[int | None, typer.Option()] = None,
    auth_policy: Annotated[
        str | None,
        typer.Option(help="cert, cert+sso, or inherit (as the user's groups say)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's email, mode, session limit or auth policy."""
    body: dict[str, Any] = {
        k: v
        for k, v in {"email": email, "mode": mode, "max_sessions": max_sessions}.items()
        if v is not None
    }
    if auth_policy is not None:
        body["auth_policy"] = None if auth_policy == "inherit" else auth_policy
    if not body:
        raise CLIError(
            "nothing to change: give --email, --mode, --max-sessions or --auth-policy", 2
        )
    out = api(ctx).patch(f"/api/v1/users/{name}", body)
    show(out, as_json) if as_json else typer.echo(f"updated user {name}")


@user_app.command("disable")
def user_disable(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Disable a user (live sessions are cut)."""
    out = api(ctx).post(f"/api/v1/users/{name}/disable")
    show(out, as_json) if as_json else typer.echo(f"disabled user {name}")


@user_app.command("enable")
def user_enable(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Enable a user."""
    out = api(ctx).post(f"/api/v1/users/{name}/enable")
    show(out, as_json) if as_json else typer.echo(f"enabled user {name}")


@user_app.command("delete")
def user_delete(ctx: typer.Context, name: str) -> None:
    """Delete a user; their certificates are revoked."""
    api(ctx).delete(f"/api/v1/users/{name}")
    typer.echo(f"deleted user {name}")


@user_app.command("reissue")
def user_reissue(
    ctx: typer.Context,
    name: str,
    reason: Annotated[str | None, typer.Option(help="Recorded with the revocation.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the user's current certificate and issue a new one."""
    out = api(ctx).post(f"/api/v1/users/{name}/reissue", {"reason": reason})
    if as_json:
        show(out, True)
    else:
        typer.echo(f"reissued certificate for {name}: serial {out['certificate']['serial']}")


@user_app.command("revoke")
def user_revoke(
    ctx: typer.Context,
    name: str,
    reason: Annotated[str | None, typer.Option(help="Recorded with the revocation.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the user's certificate without issuing a new one."""
    out = api(ctx).post(f"/api/v1/users/{name}/revoke", {"reason": reason})
    show(out, as_json) if as_json else typer.echo(f"revoked the certificate of {name}")


@user_app.command("profile")
def user_profile(
    ctx: typer.Context,
    name: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default: stdout).")
    ] = None,
) -> None:
    """Download the user's complete .ovpn client profile."""
    text = api(ctx).text(f"/api/v1/users/{name}/profile")
    if output is None:
        sys.stdout.write(text)
        return
    import os

    tmp = output.with_name(output.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, output)
    typer.echo(f"wrote {output} (it holds a private key: keep it private)", err=True)


@user_app.command("kill")
def user_kill(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Disconnect every live session of a user."""
    out = api(ctx).post(f"/api/v1/users/{name}/kill")
    show(out, as_json) if as_json else typer.echo(f"asked pods to disconnect {name}")


@user_app.command("access")
def user_access(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Show what a user may reach, through which group, and which pods enforce it yet."""
    out = api(ctx).get(f"/api/v1/users/{name}/access")
    if as_json:
        emit_json(out)
        return
    record(
        {
            "user": out["user"],
            "mode": out["mode"],
            "enabled": out["enabled"],
            "groups": out["groups"],
            "last_change": f"revision {out['revision']} (now {out['current_revision']})",
            "enforced_everywhere": out["enforced_everywhere"] if out["pods"] else None,
        }
    )
    grants = [
        {**g, "ports": g["ports"] or ("all" if g["proto"] in ("tcp", "udp") else None)}
        for g in out["grants"]
    ]
    if grants:
        table(grants, ["group", "destination", "proto", "ports", "description"], title="grants")
    else:
        typer.echo("no grants: the user is in no group with rules")
    if out["pods"]:
        cols = ["pod", "ready", "applied_revision", "last_heartbeat", "enforced"]
        table(out["pods"], cols, title="pods")
    else:
        typer.echo("no pods registered")


# --- groups and rules ----------------------------------------------------------------------

group_app = typer.Typer(help="Groups and their members.", no_args_is_help=True)


@group_app.command("add")
def group_add(
    ctx: typer.Context,
    name: str,
    description: Annotated[str | None, typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a group."""
    out = api(ctx).post("/api/v1/groups", {"name": name, "description": description})
    show(out, as_json) if as_json else typer.echo(f"created group {name} (id {out['id']})")


@group_app.command("set")
def group_set(
    ctx: typer.Context,
    name: str,
    description: Annotated[str | None, typer.Option()] = None,
    auth_policy: Annotated[
        str | None,
        typer.Option(help="cert, cert+sso, or none: what the members' connections must present."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a group's description or the auth policy asked of its members."""
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    if auth_policy is not None:
        body["auth_policy"] = None if auth_policy == "none" else auth_policy
    if not body:
        raise CLIError("nothing to change: give --description or --auth-policy", 2)
    out = api(ctx).patch(f"/api/v1/groups/{name}", body)
    show(out, as_json) if as_json else typer.echo(f"updated group {name}")


@group_app.command("list")
def group_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List groups."""
    cols = ["name", "members", "rules", "auth_policy", "description"]
    show(api(ctx).get_all("/api/v1/groups"), as_json, cols)


@group_app.command("show")
def group_show(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Show a group."""
    show(api(ctx).get(f"/api/v1/groups/{name}"), as_json)


@group_app.command("delete")
def group_delete(ctx: typer.Context, name: str) -> None:
    """Delete a group with its rules and memberships."""
    api(ctx).delete(f"/api/v1/groups/{name}")
    typer.echo(f"deleted group {name}")


@group_app.command("add-member")
def group_add_member(ctx: typer.Context, group: str, user: str, as_json: JsonOpt = False) -> None:
    """Add a user to a group."""
    out = api(ctx).post(f"/api/v1/groups/{group}/members", {"user": user})
    show(out, as_json) if as_json else typer.echo(f"added {user} to {group}")


@group_app.command("remove-member")
def group_remove_member(
    ctx: typer.Context, group: str, user: str, as_json: JsonOpt = False
) -> None:
    """Remove a user from a group."""
    out = api(ctx).delete(f"/api/v1/groups/{group}/members/{user}")
    show(out, as_json) if as_json else typer.echo(f"removed {user} from {group}")


rule_app = typer.Typer(help="Access rules: what a group may reach.", no_args_is_help=True)


@rule_app.command("add")
def rule_add(
    ctx: typer.Context,
    group: str,
    destination: Annotated[str, typer.Argument(help="IPv4 host or CIDR.")],
    proto: Annotated[str, typer.Option(help="tcp, udp, icmp or any.")] = "any",
    ports: Annotated[str | None, typer.Option(help="e.g. 80,443,8000-8100 (tcp/udp).")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grant a group access to a destination."""
    body = {
        "group": group,
        "destination": destination,
        "proto": proto,
        "ports": ports,
        "description": description,
    }
    out = api(ctx).post("/api/v1/rules", body)
    if as_json:
        show(out, True)
    else:
        typer.echo(
            f"added rule {out['id']}: {group} -> {out['destination']} {out['proto']}"
            + (f" {out['ports']}" if out["ports"] else "")
        )


@rule_app.command("list")
def rule_list(
    ctx: typer.Context,
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List access rules."""
    rows = api(ctx).get_all("/api/v1/rules", group=group)
    show(rows, as_json, ["id", "group", "destination", "proto", "ports", "description"])


@rule_app.command("delete")
def rule_delete(ctx: typer.Context, rule_id: int) -> None:
    """Delete a rule by id."""
    api(ctx).delete(f"/api/v1/rules/{rule_id}")
    typer.echo(f"deleted rule {rule_id}")


# --- pools, tokens, pki ---------------------------------------------------------------------

pool_app = typer.Typer(help="Address pools.", no_args_is_help=True)


@pool_app.command("list")
def pool_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List address pools."""
    show(api(ctx).get_all("/api/v1/pools"), as_json, ["name", "kind", "cidr", "capacity", "leases"])


@pool_app.command("set")
def pool_set(
    ctx: typer.Context,
    name: str,
    cidr: Annotated[str, typer.Option(help="IPv4 CIDR, /8 to /29.")],
    kind: Annotated[str | None, typer.Option(help="nat or gateway (new pools).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a pool or change its CIDR."""
    out = api(ctx).put(f"/api/v1/pools/{name}", {"cidr": cidr, "kind": kind})
    show(out, as_json) if as_json else typer.echo(f"pool {name} is {out['kind']} {out['cidr']}")


token_app = typer.Typer(help="API tokens (admin only).", no_args_is_help=True)


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="admin, operator, auditor or agent.")],
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once."""
    out = api(ctx).post("/api/v1/tokens", {"name": name, "role": role})
    if as_json:
        emit_json(out)
    else:
        typer.echo(
            f"created {out['role']} token {out['name']}; store it now, it is not shown again:"
        )
        typer.echo(out["token"])


@token_app.command("list")
def token_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    cols = ["name", "role", "prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    show(api(ctx).get_all("/api/v1/tokens"), as_json, cols)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, name: str) -> None:
    """Revoke a token."""
    api(ctx).delete(f"/api/v1/tokens/{name}")
    typer.echo(f"revoked token {name}")


pki_app = typer.Typer(help="The fleet's CA and CRL.", no_args_is_help=True)


@pki_app.command("show")
def pki_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the CA and certificate counts."""
    out = api(ctx).get("/api/v1/pki")
    if as_json:
        emit_json(out)
    else:
        ca = out["ca"]
        show(
            {
                "ca": ca["common_name"],
                "ca_serial": ca["serial"],
                "ca_expires": ca["not_after"],
                "ca_sha256": ca["fingerprint_sha256"],
                "issued": out["issued"],
                "revoked": out["revoked"],
            },
            False,
        )


@pki_app.command("crl")
def pki_crl(ctx: typer.Context) -> None:
    """Print the current CRL (PEM)."""
    sys.stdout.write(api(ctx).text("/api/v1/pki/crl"))


# --- audit, sessions, pods --------------------------------------------------------------------

audit_app = typer.Typer(help="Audit trails.", no_args_is_help=True)


@audit_app.command("admin")
def audit_admin(
    ctx: typer.Context,
    actor: Annotated[str | None, typer.Option(help="Token name.")] = None,
    action: Annotated[str | None, typer.Option(help="Action prefix, e.g. user.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time with zone.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 time with zone.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Who changed what, when."""
    rows = api(ctx).get_all(
        "/api/v1/audit/admin",
        total=limit,
        actor=actor,
        action=action,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
    )
    show(rows, as_json, ["at", "actor", "role", "action", "target", "revision"])


@audit_app.command("denied")
def audit_denied(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time with zone.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 time with zone.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Traffic from VPN users that no grant allowed."""
    rows = api(ctx).get_all(
        "/api/v1/audit/denied",
        total=limit,
        user=user,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
    )
    show(rows, as_json, ["first_at", "user", "pod", "src", "dst", "proto", "dport", "count"])


session_app = typer.Typer(help="VPN sessions.", no_args_is_help=True)


@session_app.command("list")
def session_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option()] = None,
    pod: Annotated[str | None, typer.Option()] = None,
    active: Annotated[bool, typer.Option("--active", help="Only live sessions.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List sessions, newest first."""
    rows = api(ctx).get_all("/api/v1/sessions", user=user, pod=pod, active=True if active else None)
    cols = ["id", "user", "pod", "mode", "tunnel_ip", "real_ip", "started_at", "ended_at"]
    show(rows, as_json, cols)


@session_app.command("kill")
def session_kill(ctx: typer.Context, user: str, as_json: JsonOpt = False) -> None:
    """Disconnect every live session of a user."""
    out = api(ctx).post(f"/api/v1/users/{user}/kill")
    show(out, as_json) if as_json else typer.echo(
        f"asked pods to disconnect {user} ({out['sessions']} live session(s))"
    )


pod_app = typer.Typer(help="Registered pods.", no_args_is_help=True)


@pod_app.command("list")
def pod_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List pods with readiness, heartbeat and applied revision."""
    cols = ["name", "ready", "pod_ip", "public_endpoint", "applied_revision", "last_heartbeat"]
    show(api(ctx).get_all("/api/v1/pods"), as_json, cols)


@pod_app.command("revoke")
def pod_revoke(ctx: typer.Context, name: str) -> None:
    """Cut a pod off: credential and server certificate revoked, its sessions closed; its
    name may not enroll again until 'vpnfleet pod forget'."""
    out = api(ctx).post(f"/api/v1/pods/{name}/revoke")
    say(
        f"revoked pod {name}: {out['credentials']} credential(s), {out['certificates']} "
        f"certificate(s), {out['sessions_closed']} session(s) closed"
    )


@pod_app.command("forget")
def pod_forget(ctx: typer.Context, name: str) -> None:
    """Remove a pod that is gone (revoked, or silent past its lease): its name is free again."""
    api(ctx).delete(f"/api/v1/pods/{name}")
    say(f"forgot pod {name}")
