"""`vpnfleet`: the command line. Thin: parse, call the API, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

import vpnfleet.cli.audit_cmds  # noqa: F401  (registers its commands on admin.audit_app)
from vpnfleet import __version__
from vpnfleet.cli import (
    admin,
    agentcmd,
    consolecmds,
    dbcmds,
    directory,
    idp,
    lab,
    policy,
    servercmd,
)
from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import err_console, safe
from vpnfleet.cli.status import status as status_command

app = typer.Typer(
    name="vpnfleet",
    help="Run a company OpenVPN service as a fleet of pods.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(help="Control plane URL (env VPNFLEET_URL).", show_default=False)
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="API token (env VPNFLEET_TOKEN).", show_default=False)
    ] = None,
    ca_file: Annotated[
        str | None,
        typer.Option(
            help="Trust only this CA for an https URL (env VPNFLEET_CA_FILE).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    ctx.obj = {"url": url, "token": token, "ca_file": ca_file}


# The processes first, in this order in `--help`.
app.command()(servercmd.server)
app.command("server-cert")(servercmd.server_cert)
app.command()(agentcmd.agent)


@app.command("gateway-routes")
def gateway_routes(
    server: Annotated[
        str | None,
        typer.Option(
            help="Control plane URL, or several replicas' URLs separated by commas "
            "(env VPNFLEET_SERVER).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="A read-only token, role auditor (env VPNFLEET_ROUTES_TOKEN).",
        ),
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
    ca_file: Annotated[
        Path | None,
        typer.Option(help="Trust only this CA for an https server URL (env VPNFLEET_CA_FILE)."),
    ] = None,
) -> None:
    """Keep /32 routes to gateway-mode users via the pod they are on (run on a router).

    Only addresses inside the gateway pool, only via registered pods' addresses."""
    import asyncio
    import os
    import signal

    from vpnfleet import logsetup
    from vpnfleet.agent.cpclient import ControlPlane
    from vpnfleet.agent.gwroutes import follow

    urls = [u.strip() for u in (server or os.environ.get("VPNFLEET_SERVER") or "").split(",")]
    urls = [u for u in urls if u]
    secret = token or os.environ.get("VPNFLEET_ROUTES_TOKEN")
    if not urls or not secret:
        raise CLIError("give --server and --token (or VPNFLEET_SERVER / VPNFLEET_ROUTES_TOKEN)", 2)
    pinned = ca_file or os.environ.get("VPNFLEET_CA_FILE") or None
    if pinned:
        from vpnfleet.tlspin import TrustError, pinned_context

        try:
            pinned_context(pinned)
        except TrustError as exc:
            raise CLIError(str(exc), 2) from None
    logsetup.setup(log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        cp = ControlPlane(urls, secret, ca_file=pinned)
        try:
            await follow(cp, stop)
        finally:
            await cp.close()

    asyncio.run(main())


app.add_typer(dbcmds.db_app, name="db")
app.add_typer(admin.user_app, name="user")
app.add_typer(admin.group_app, name="group")
app.add_typer(admin.rule_app, name="rule")
app.add_typer(admin.pool_app, name="pool")
app.add_typer(admin.token_app, name="token")
app.add_typer(admin.pki_app, name="pki")
app.add_typer(admin.audit_app, name="audit")
app.add_typer(admin.session_app, name="session")
app.add_typer(admin.pod_app, name="pod")
app.add_typer(policy.policy_app, name="policy")
app.add_typer(directory.directory_app, name="directory")
app.add_typer(idp.idp_app, name="idp")
app.add_typer(consolecmds.console_app, name="console")
app.add_typer(lab.lab_app, name="lab")
app.command("status")(status_command)


def main() -> None:
    """Console entry point: one clear sentence and exit code != 0 on failure."""
    try:
        result = app(standalone_mode=False)
    except CLIError as exc:
        message = escape(safe(str(exc)))
        err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(exc.code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # Usage errors come from the click that typer bundles; they know how to print
        # themselves. Anything else is a bug and keeps its traceback.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
