"""`vpnfleet server` (the control plane process) and `vpnfleet server-cert` (its HTTPS
certificate made ahead of time)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from vpnfleet.cli.client import CLIError


def server(
    data_dir: Annotated[
        Path | None, typer.Option(help="State directory (env VPNFLEET_DATA_DIR).")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="sqlite:///PATH or postgresql+psycopg://... (env VPNFLEET_DATABASE_URL)."
        ),
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve on (default 127.0.0.1:8000).")
    ] = None,
    public_endpoint: Annotated[
        list[str] | None,
        typer.Option(help="HOST[:PORT] clients connect to; repeat for several."),
    ] = None,
    public_tcp_endpoint: Annotated[
        list[str] | None,
        typer.Option(
            help="HOST[:PORT] of the TCP fallback (port 443 if left out); repeat for several, "
            "or 'off'. Default: each public endpoint's host on 443 (env "
            "VPNFLEET_PUBLIC_TCP_ENDPOINTS).",
        ),
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
    audit_retention: Annotated[
        int | None,
        typer.Option(
            help="Days to keep flow records and denied attempts (env "
            "VPNFLEET_AUDIT_RETENTION_DAYS; default: forever).",
            metavar="DAYS",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="Serve HTTPS with this certificate (PEM; env VPNFLEET_TLS_CERT)."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="The certificate's private key (PEM; env VPNFLEET_TLS_KEY)."),
    ] = None,
    tls_self_signed: Annotated[
        list[str] | None,
        typer.Option(
            help="Serve HTTPS with a certificate for this DNS name or IP, made at first start "
            "from the control plane's own CA (DATA_DIR/tls/ca.pem: give it to clients); "
            "repeat for several (env VPNFLEET_TLS_SELF_SIGNED, comma-separated).",
            metavar="NAME",
        ),
    ] = None,
    forwarded_allow_ips: Annotated[
        list[str] | None,
        typer.Option(
            help="An address or CIDR of a proxy (ingress, load balancer) whose X-Forwarded-For "
            "to believe; repeat for several (env VPNFLEET_FORWARDED_ALLOW_IPS, comma-separated; "
            "default 127.0.0.1).",
            metavar="CIDR",
        ),
    ] = None,
    advertise_url: Annotated[
        list[str] | None,
        typer.Option(
            help="A URL clients reach this server at (beyond loopback and the certificate's "
            "names); the local admin token file may be sent there. Repeat for several "
            "(env VPNFLEET_ADVERTISE_URLS).",
            metavar="URL",
        ),
    ] = None,
) -> None:
    """Run the control plane (applies database migrations first)."""
    from vpnfleet import logsetup
    from vpnfleet.controlplane.app import create_app, prepare
    from vpnfleet.controlplane.serving import ControlPlaneServer, server_config
    from vpnfleet.controlplane.settings import ServerSettings

    try:
        logsetup.setup(log_format)
        settings = ServerSettings.from_env(
            data_dir=data_dir,
            database_url=database_url,
            listen=listen,
            public_endpoints=public_endpoint or None,
            public_tcp_endpoints=(
                None
                if not public_tcp_endpoint
                else [e for e in public_tcp_endpoint if e.strip().lower() != "off"]
            ),
            log_format=log_format,
            audit_retention_days=audit_retention,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_self_signed=[
                n.strip() for item in tls_self_signed or [] for n in item.split(",") if n.strip()
            ]
            or None,
            advertise_urls=advertise_url or None,
            forwarded_allow_ips=[
                n.strip() for item in forwarded_allow_ips or [] for n in item.split(",") if n
            ]
            or None,
        )
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    try:
        state = prepare(settings)
    except Exception as exc:
        raise CLIError(f"cannot start: {describe_failure(exc)}") from None
    if state.tls is not None and state.tls.ca_file is not None:
        logging.getLogger("vpnfleet.server").info(
            "serving HTTPS for %s; clients pin the CA in %s",
            ", ".join(state.tls.names),
            state.tls.ca_file,
        )
    config = server_config(create_app(settings, state), settings, state)
    # Ends the watch streams first when it stops (controlplane/serving.py).
    ControlPlaneServer(config, state.hub, state.bell).run()


def server_cert(
    directory: Annotated[
        Path, typer.Argument(help="Where ca.pem, ca.key, server.pem and server.key go.")
    ],
    name: Annotated[
        list[str],
        typer.Option(
            help="A DNS name or IP clients use for the control plane; repeat.", metavar="NAME"
        ),
    ],
) -> None:
    """Make the control plane's CA and HTTPS certificate without starting it (what
    --tls-self-signed does at first start), e.g. for a Secret shared by several replicas.
    Run again to add names or renew: the CA stays."""
    from vpnfleet.controlplane import servertls

    try:
        tls = servertls.ensure_self_signed(directory, name)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    except OSError as exc:
        raise CLIError(f"cannot write {directory}: {exc.strerror}") from None
    typer.echo(f"certificate {tls.cert_file} (key {tls.key_file}) for {', '.join(tls.names)}")
    typer.echo(f"CA to give agents and operators: {tls.ca_file}; keep ca.key offline")


def describe_failure(exc: Exception) -> str:
    """One line for a failure at start or in a database command: for an unreachable database,
    the driver's own first line rather than SQLAlchemy's wrapping."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        return f"database unreachable ({type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]})"
    return str(exc) or type(exc).__name__
