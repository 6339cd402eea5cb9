"""`vpnfleet idp`: the OpenID provider for VPN single sign-on (docs/sso.md).

The settings come from a YAML file or options; the client secret from a file or the
environment, never from the command line (where `ps` shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpnfleet.cli.admin import JsonOpt, api, settings_with_secret
from vpnfleet.cli.client import CLIError
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
    groups_claim: Annotated[
        str | None,
        typer.Option(help="ID token claim listing the user's groups (overrides the file's)."),
    ] = None,
    group_map: Annotated[
        list[str] | None,
        typer.Option(
            "--group-map",
            help="IDP_GROUP=VPNFLEET_GROUP: a vpnfleet group the claim manages (repeat; "
            "replaces the file's group_map).",
        ),
    ] = None,
    no_groups: Annotated[
        bool,
        typer.Option(
            "--no-groups",
            help="Memberships no longer follow the IdP (drops groups_claim, group_map).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Configure the IdP from FILE (admin)."""
    body, secret = settings_with_secret(
        file, "client_secret", client_secret_file, SECRET_ENV, "client secret"
    )
    if no_groups and (groups_claim is not None or group_map):
        raise CLIError("--no-groups cannot go with --groups-claim or --group-map", 2)
    if no_groups:
        body.pop("groups_claim", None)
        body.pop("group_map", None)
    if groups_claim is not None:
        body["groups_claim"] = groups_claim
    if group_map:
        body["group_map"] = parse_group_map(group_map)
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


def parse_group_map(pairs: list[str]) -> dict[str, str]:
    """`IDP_GROUP=VPNFLEET_GROUP` options as a mapping (the last `=` splits, so an IdP group
    may hold `=`, as LDAP-style names in Keycloak do; vpnfleet group names cannot)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, group = pair.rpartition("=")
        if not sep or not key or not group:
            raise CLIError(f"--group-map {pair!r}: give IDP_GROUP=VPNFLEET_GROUP", 2)
        if key in out and out[key] != group:
            raise CLIError(f"--group-map maps {key!r} twice", 2)
        out[key] = group
    return out


@idp_app.command("show")
def idp_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The IdP settings (never the client secret) and the redirect URI to register."""
    out = api(ctx).get("/api/v1/idp")
    if as_json:
        emit_json(out)
        return
    out["scopes"] = " ".join(out["scopes"])
    if out.get("groups_claim") is None:
        out["groups_claim"] = "- (memberships do not follow the IdP)"
    out["group_map"] = ", ".join(f"{k} -> {v}" for k, v in sorted(out["group_map"].items()))
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
