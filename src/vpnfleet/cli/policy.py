"""`vpnfleet policy`: users, groups and grants as code (apply, check, export).

Files are parsed locally first, so a syntax error is reported with file:line before any
network call and without a token; the control plane validates again and computes the diff.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vpnfleet.cli.admin import JsonOpt, api
from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import emit_json
from vpnfleet.core import policyfile
from vpnfleet.core.policyfile import Policy

policy_app = typer.Typer(
    help="Policy as code: users, groups and grants from a YAML file.", no_args_is_help=True
)

FileOpt = Annotated[Path, typer.Option("-f", "--file", help="Policy file (YAML).")]


def _load(path: Path, consequence: str) -> tuple[str, Policy]:
    """Read and parse the file; print every problem and exit 1 if it is invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"policy file {path} does not exist", 2) from None
    except IsADirectoryError:
        raise CLIError(f"{path} is a directory, not a policy file", 2) from None
    except UnicodeDecodeError:
        raise CLIError(f"policy file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise CLIError(f"cannot read policy file {path}: {exc.strerror}") from None
    try:
        policy = policyfile.parse(text, str(path))
    except policyfile.PolicyError as exc:
        for issue in exc.issues:
            typer.secho(issue.format(str(path), "error"), fg="red", err=True)
        typer.echo(f"{path}: {len(exc.issues)} problem(s){consequence}", err=True)
        raise typer.Exit(1) from None
    for warning in policy.warnings:
        typer.secho(warning.format(str(path), "warning"), fg="yellow", err=True)
    return text, policy


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _changes(changes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['field']} {_value(c['old'])} -> {_value(c['new'])}" for c in changes)


def _grant(g: dict[str, Any]) -> str:
    dest = str(g["destination"]).removesuffix("/32")
    text = " ".join(p for p in (dest, g["proto"], g["ports"]) if p)
    return f"{g['group']}: {text}"


def diff_lines(out: dict[str, Any]) -> list[tuple[str, str]]:
    """The diff as (sign, text) lines: `+` create/add, `~` change, `-` delete/remove."""
    lines: list[tuple[str, str]] = []
    groups, grants = out["groups"], out["grants"]
    users, members = out["users"], out["memberships"]
    for g in groups["created"]:
        desc = f" ({g['description']})" if g["description"] else ""
        lines.append(("+", f"group {g['name']}{desc}"))
    for u in groups["updated"]:
        lines.append(("~", f"group {u['name']}: {_changes(u['changes'])}"))
    for g in grants["added"]:
        lines.append(("+", f"grant {_grant(g)}"))
    for g in grants["updated"]:
        lines.append(("~", f"grant {_grant(g)}: {_changes(g['changes'])}"))
    for u in users["created"]:
        attrs = [
            f"mode {u['mode']}",
            f"max_sessions {u['max_sessions']}",
            "enabled" if u["enabled"] else "disabled",
        ]
        if u["email"]:
            attrs.append(f"email {u['email']}")
        attrs.append(f"groups {', '.join(u['groups']) or '-'}")
        lines.append(("+", f"user {u['name']}: {'; '.join(attrs)}"))
    for u in users["updated"]:
        lines.append(("~", f"user {u['name']}: {_changes(u['changes'])}"))
    for m in members["added"]:
        lines.append(("+", f"member {m['group']}/{m['user']}"))
    for m in members["removed"]:
        lines.append(("-", f"member {m['group']}/{m['user']}"))
    for g in grants["removed"]:
        lines.append(("-", f"grant {_grant(g)} (rule {g['rule_id']})"))
    for name in users["deleted"]:
        lines.append(("-", f"user {name} (certificate revoked)"))
    for name in groups["deleted"]:
        lines.append(("-", f"group {name} (with its grants and memberships)"))
    return lines


_COLOUR = {"+": "green", "~": "yellow", "-": "red"}


@policy_app.command("apply")
def policy_apply(
    ctx: typer.Context,
    file: FileOpt,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option("--prune", help="Delete users and groups that the file does not name."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make the control plane's users, groups and grants match FILE, all or nothing."""
    text, _policy = _load(file, "; nothing was sent")
    client = api(ctx)
    resp = client.request(
        "POST",
        "/api/v1/policy/apply",
        # The server labels errors and the audit row with it (at most 200 characters).
        json={"yaml": text, "filename": str(file) if len(str(file)) <= 200 else file.name[-200:]},
        params={"dry_run": str(dry_run).lower(), "prune": str(prune).lower()},
    )
    out: dict[str, Any] = resp.json()
    if as_json:
        emit_json(out)
        return
    for sign, line in diff_lines(out):
        typer.secho(f"{sign} {line}", fg=_COLOUR[sign])
    if not out["changed"]:
        typer.echo(f"no changes: the control plane already matches {file}")
    elif dry_run:
        typer.echo(f"dry run: {out['summary']}; nothing was written")
    else:
        typer.echo(f"applied {file} at revision {out['revision']}: {out['summary']}")


@policy_app.command("check")
def policy_check(file: FileOpt, as_json: JsonOpt = False) -> None:
    """Validate FILE locally (no control plane needed); exit 1 if it is invalid."""
    _text, policy = _load(file, "")
    counts = policy.counts()
    if as_json:
        warnings = [
            {"line": w.line, "field": w.field, "message": w.message} for w in policy.warnings
        ]
        emit_json({"filename": str(file), "valid": True, **counts, "warnings": warnings})
        return
    typer.echo(
        f"{file} is valid: {counts['users']} user(s), {counts['groups']} group(s), "
        f"{counts['grants']} grant(s)"
    )


@policy_app.command("export")
def policy_export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default: stdout).")
    ] = None,
) -> None:
    """Print the current users, groups and grants as a policy file."""
    text = api(ctx).text("/api/v1/policy/export")
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as exc:
        raise CLIError(f"cannot write {output}: {exc.strerror}") from None
    typer.echo(f"wrote {output}", err=True)
