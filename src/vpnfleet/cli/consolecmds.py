"""`vpnfleet console account ...`: who may sign in to the web console (docs/console.md).

Passwords are read from a prompt (typed twice, not echoed) or from a file / stdin
(``--password-file -``), never from the command line, where `ps` would show them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vpnfleet.cli.admin import JsonOpt, api
from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import emit_json, record, table

console_app = typer.Typer(help="The web console served under /console.", no_args_is_help=True)
account_app = typer.Typer(help="Console accounts (admin).", no_args_is_help=True)
console_app.add_typer(account_app, name="account")

PasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="Read the password from this file ('-': stdin) instead of a prompt.",
    ),
]


def _password(path: Path | None) -> str:
    if path is None:
        if not sys.stdin.isatty():
            raise CLIError("no terminal to prompt on: pass --password-file FILE (or -)", 2)
        entered: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        return entered
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}", 2) from None
    return text.rstrip("\r\n")


def _show(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(out)
    else:
        record(out)


@account_app.command("add")
def account_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Account name (lowercase letters, digits, . _ -).")],
    role: Annotated[str, typer.Option(help="admin, operator or auditor.")] = "operator",
    password_file: PasswordFile = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a console account (12+ character password)."""
    body = {"name": name, "role": role, "password": _password(password_file)}
    _show(api(ctx).post("/api/v1/console-accounts", body), as_json)


@account_app.command("list")
def account_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every console account, its role and last sign-in."""
    rows = api(ctx).get_all("/api/v1/console-accounts")
    if as_json:
        emit_json(rows)
        return
    table(rows, ["name", "role", "disabled", "last_login_at", "created_by"], title="accounts")


@account_app.command("passwd")
def account_passwd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Account name.")],
    password_file: PasswordFile = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a new password; the account's signed-in browsers are signed out."""
    out = api(ctx).patch(f"/api/v1/console-accounts/{name}", {"password": _password(password_file)})
    _show(out, as_json)


@account_app.command("disable")
def account_disable(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], as_json: JsonOpt = False
) -> None:
    """Refuse the account's sign-ins and end its sessions now."""
    _show(api(ctx).patch(f"/api/v1/console-accounts/{name}", {"disabled": True}), as_json)


@account_app.command("enable")
def account_enable(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], as_json: JsonOpt = False
) -> None:
    _show(api(ctx).patch(f"/api/v1/console-accounts/{name}", {"disabled": False}), as_json)


@account_app.command("remove")
def account_remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    api(ctx).delete(f"/api/v1/console-accounts/{name}")
    typer.echo(f"removed console account {name}")
