"""`vpnfleet idp`: the OpenID provider for VPN single sign-on (docs/sso.md).

The settings come from a YAML file or options; the client secret from a file or the
environment, never from the command line (where `ps` shows it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from vpnfleet.cli.admin import JsonOpt, api
from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import emit_json, record

idp_app = typer.Typer(help="The OpenID provider for VPN single sign-on.", no_args_is_help=True)

SECRET_ENV = "VPNFLEET_IDP_CLIENT_SECRET"  # noqa: S105 - a variable's name


def _secret(path: Path | None) -> str | None:
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CLIError(f"cannot read the client secret file {path}: {exc.strerror}") from None
        if not text:
            raise CLIError(f"the client secret file {path} is empty")
        return text
    return os.environ.get(SECRET_ENV) or None


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
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CLIError(f"cannot read {file}: {exc.strerror}", 2) from None
    except yaml.YAMLError as exc:
        raise CLIError(f"{file} is not valid YAML: {exc}", 2) from None
    if not isinstance(settings, dict):
        raise CLIError(f"{file} must hold a mapping of settings", 2)
    if "client_secret" in settings:
        raise CLIError(
            f"{file} holds client_secret: keep it out of the settings file and pass "
            f"--client-secret-file or {SECRET_ENV}",
            2,
        )
    body: dict[str, Any] = dict(settings)
    secret = _secret(client_secret_file)
    if secret is not None:
        body["client_secret"] = secret
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
