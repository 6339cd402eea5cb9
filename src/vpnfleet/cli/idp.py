"""`vpnfleet idp`: the OpenID provider for VPN single sign-on (docs/sso.md).

The settings come from a YAML file or options; the client secret from a file or the
environment, never from the command line (where `ps` shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpnfleet.cli.admin import JsonOpt, api, settings_with_secret
from vpnfleet.cli.output import emit_json, record

idp_app = typer.Typer(help="The OpenID provider for VPN single sign-on.", no_args_is_help=True)

SECRET_ENV = "VPNFLEET_IDP_CLIENT_SECRET"  # noqa: S105 - a variable's name


@idp_app.command("set")
def idp_set(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="IdP settings (YAML).")],
    client_secret_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding the client secret (else env {SECRET_ENV}; neither keeps the "
            "stored one)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Configure the IdP from FILE (admin)."""
    body, secret = settings_with_secret(
        file, "client_secret", client_secret_file, SECRET_ENV, "client secret"
    )
    out = api(ctx).put("/api/v1/idp", body)
    if as_json:
        emit_json(out)
        return
    typer.echo(
        "IdP settings stored"
        + ("" if secret is not None else " (client secret unchanged)")
        + f"; register the redirect URI {out['redirect_uri']} at the IdP, then run "
        "'vpnfleet idp test'"
    )


@idp_app.command("show")
def idp_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The IdP settings (never the client secret) and the redirect URI to register."""
    out = api(ctx).get("/api/v1/idp")
    if as_json:
        emit_json(out)
        return
    out["scopes"] = " ".join(out["scopes"])
    record(out)


@idp_app.command("test")
def idp_test(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Fetch the IdP's discovery document and signing keys now and show what was found."""
    out = api(ctx).post("/api/v1/idp/test", None)
    if as_json:
        emit_json(out)
        return
    out["signing_algorithms"] = ", ".join(out["signing_algorithms"])
    out["key_ids"] = ", ".join(out["key_ids"]) or "(none named)"
    pkce = out["pkce_methods"]
    out["pkce_methods"] = "not announced" if pkce is None else ", ".join(pkce)
    record(out)
    typer.echo("the IdP is usable")
