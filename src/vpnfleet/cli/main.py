"""`vpnfleet`: the command line. Thin: parse, call the API, print."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

import vpnfleet.cli.audit_cmds  # noqa: F401  (registers its commands on admin.audit_app)
from vpnfleet import __version__
from vpnfleet.cli import admin, consolecmds, directory, idp, lab, policy
from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import err_console, safe
from vpnfleet.cli.status import status as status_command

if TYPE_CHECKING:  # the agent's modules load only when the agent command runs
    from vpnfleet.agent.settings import AgentSettings

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


@app.command()
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
        raise CLIError(f"cannot start: {_describe(exc)}") from None
    if state.tls is not None and state.tls.ca_file is not None:
        logging.getLogger("vpnfleet.server").info(
            "serving HTTPS for %s; clients pin the CA in %s",
            ", ".join(state.tls.names),
            state.tls.ca_file,
        )
    config = server_config(create_app(settings, state), settings, state)
    # Ends the watch streams first when it stops (controlplane/serving.py).
    ControlPlaneServer(config, state.hub, state.bell).run()


@app.command("server-cert")
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


def _describe(exc: Exception) -> str:
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        return f"database unreachable ({type(exc.orig).__name__}: {str(exc.orig).splitlines()[0]})"
    return str(exc) or type(exc).__name__


@app.command()
def agent(
    server: Annotated[
        str | None,
        typer.Option(
            help="Control plane URL, or several replicas' URLs separated by commas, tried in "
            "that order (env VPNFLEET_SERVER).",
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Agent token (env VPNFLEET_AGENT_TOKEN).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Pod name (env VPNFLEET_POD_NAME).")] = None,
    public_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT clients use (env VPNFLEET_PUBLIC_ENDPOINT).")
    ] = None,
    http: Annotated[
        str | None,
        typer.Option(help="Probes and fleet metrics HOST:PORT, no user names (0.0.0.0:9176)."),
    ] = None,
    user_metrics_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of the metrics with per-user series, or off (default "
            "127.0.0.1:9177; env VPNFLEET_USER_METRICS_LISTEN).",
        ),
    ] = None,
    user_metrics_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the bearer token the per-user metrics require (env "
            "VPNFLEET_USER_METRICS_TOKEN_FILE).",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Working directory (env VPNFLEET_STATE_DIR).")
    ] = None,
    uplink: Annotated[
        str | None, typer.Option(help="Interface NAT traffic leaves by (env VPNFLEET_UPLINK).")
    ] = None,
    pod_ip: Annotated[str | None, typer.Option(help="This pod's IP (env VPNFLEET_POD_IP).")] = None,
    push_route: Annotated[
        list[str] | None, typer.Option(help="CIDR to route through the VPN; repeat.")
    ] = None,
    crl_verify: Annotated[
        bool | None,
        typer.Option(
            "--crl-verify/--no-crl-verify",
            help="Also check the CRL at the TLS handshake (clients then see no reason).",
        ),
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json.")] = None,
    flow_audit: Annotated[
        bool | None,
        typer.Option(
            "--flow-audit/--no-flow-audit",
            help="Record every flow from a tunnel address (default on; env VPNFLEET_FLOW_AUDIT).",
        ),
    ] = None,
    flow_destinations: Annotated[
        bool | None,
        typer.Option(
            "--flow-destinations/--no-flow-destinations",
            help="Keep destinations in flow records (default on; env VPNFLEET_FLOW_DESTINATIONS).",
        ),
    ] = None,
    flow_log: Annotated[
        str | None,
        typer.Option(help="stdout: print flow records as JSON lines; off (env VPNFLEET_FLOW_LOG)."),
    ] = None,
    flow_spool_mb: Annotated[
        int | None,
        typer.Option(help="Disk for undelivered flow records, MiB (default 1024)."),
    ] = None,
    denied_audit: Annotated[
        bool | None,
        typer.Option(
            "--denied-audit/--no-denied-audit",
            help="Record denied attempts from the firewall's log (default on; "
            "env VPNFLEET_DENIED_AUDIT).",
        ),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="Trust only this CA for an https server URL (env VPNFLEET_CA_FILE)."),
    ] = None,
    tcp_port: Annotated[
        str | None,
        typer.Option(
            help="Port of the TCP fallback server, or 'off' (default 443; env VPNFLEET_TCP_PORT)."
        ),
    ] = None,
    bgp: Annotated[
        bool | None,
        typer.Option(
            "--bgp/--no-bgp",
            help="Announce hosted gateway users' /32 over BGP with BIRD (env VPNFLEET_BGP; "
            "docs/bgp.md).",
        ),
    ] = None,
    bgp_asn: Annotated[
        str | None, typer.Option(help="This pod's AS number (env VPNFLEET_BGP_ASN).")
    ] = None,
    bgp_router_id: Annotated[
        str | None,
        typer.Option(help="BGP router id (default: --pod-ip; env VPNFLEET_BGP_ROUTER_ID)."),
    ] = None,
    bgp_neighbor: Annotated[
        list[str] | None,
        typer.Option(
            help="A router to peer with, ADDRESS:ASN; repeat (env VPNFLEET_BGP_NEIGHBORS, "
            "comma-separated)."
        ),
    ] = None,
    bgp_hold_time: Annotated[
        str | None,
        typer.Option(
            help="BGP hold time, seconds, 3-65535 (default 9; env VPNFLEET_BGP_HOLD_TIME)."
        ),
    ] = None,
    bird: Annotated[
        str | None, typer.Option(help="The BIRD 2 binary (default bird; env VPNFLEET_BIRD).")
    ] = None,
) -> None:
    """Run the pod agent: supervise OpenVPN, enforce the firewall, report sessions and flows."""
    import asyncio
    import os

    from vpnfleet import logsetup
    from vpnfleet.agent import podaddr
    from vpnfleet.agent.pod import PodAgent
    from vpnfleet.agent.settings import AgentSettings
    from vpnfleet.agent.statedir import StateDir
    from vpnfleet.agent.sysctls import SysctlsMissing

    try:
        settings = AgentSettings.from_env(
            find_pod_ip=podaddr.discover,
            server=server,
            token=token,
            name=name,
            public_endpoint=public_endpoint,
            http=http,
            user_metrics_listen=user_metrics_listen,
            user_metrics_token_file=user_metrics_token_file,
            state_dir=state_dir,
            uplink=uplink,
            pod_ip=pod_ip,
            push_routes=push_route or [],
            crl_verify=crl_verify,
            log_format=log_format,
            flow_audit=flow_audit,
            flow_destinations=flow_destinations,
            flow_log=flow_log,
            flow_spool_mb=flow_spool_mb,
            denied_audit=denied_audit,
            ca_file=ca_file,
            tcp_port=tcp_port,
            bgp=bgp,
            bgp_asn=bgp_asn,
            bgp_router_id=bgp_router_id,
            bgp_neighbors=bgp_neighbor or [],
            bgp_hold_time=bgp_hold_time,
            bird=bird,
        )
        logsetup.setup(settings.log_format)
        _log_pod_ip(settings)
        _check_uplink(settings)
        # Refuse early, in one sentence, a state directory this user cannot make private.
        StateDir(settings.state_dir).create()
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc), 2) from None
    # Whatever the agent and openvpn create (pid, logs, spools) is for this user alone.
    os.umask(0o077)
    try:
        asyncio.run(PodAgent(settings).run())
    except SysctlsMissing as exc:
        raise CLIError(str(exc), 3) from None


def _log_pod_ip(settings: AgentSettings) -> None:
    """Say at start which address gateway routes will point at, and where it came from."""
    log = logging.getLogger("vpnfleet.agent")
    if settings.pod_ip and settings.pod_ip_source:
        log.info(
            "pod IP %s: not given (VPNFLEET_POD_IP), so %s",
            settings.pod_ip,
            settings.pod_ip_source,
        )
    elif not settings.pod_ip:
        log.warning(
            "no pod IP: none given (VPNFLEET_POD_IP) and none found on the pod's interfaces; "
            "gateway routes cannot point at this pod"
        )


def _check_uplink(settings: AgentSettings) -> None:
    """Warn at start when a network pushed to clients does not leave through the uplink: NAT
    (``-o UPLINK``) would not apply to it and NAT users could not reach it."""
    if not settings.uplink or not settings.push_routes:
        return
    from vpnfleet.agent import podaddr

    elsewhere = podaddr.leaving_elsewhere(settings.uplink, settings.push_routes)
    devices = sorted({dev for _, dev in elsewhere})
    if len(devices) == 1:
        advice = f"set VPNFLEET_UPLINK={devices[0]}"
        if settings.pod_ip_source:  # the uplink also chose the pod IP
            advice += " (which also picks the pod IP, unless VPNFLEET_POD_IP is given)"
        advice += " or leave it unset to NAT out of every interface"
    else:
        advice = "they leave through several interfaces: leave VPNFLEET_UPLINK unset to NAT "
        advice += "out of every interface"
    for network, dev in elsewhere:
        logging.getLogger("vpnfleet.agent").warning(
            "the pushed route %s leaves through %s, not the uplink %s (VPNFLEET_UPLINK): NAT "
            "applies to the uplink only, so NAT users cannot reach %s; %s",
            network,
            dev,
            settings.uplink,
            network,
            advice,
        )


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


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: Annotated[Path | None, typer.Option()] = None,
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Apply schema migrations (the server also does this at start)."""
    from vpnfleet.controlplane import db
    from vpnfleet.controlplane.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(data_dir=data_dir, database_url=database_url)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    settings.ensure_data_dir()
    try:
        engine = db.make_engine(settings.resolved_database_url)
        db.upgrade(engine)
        typer.echo(f"database at revision {db.current_revision(engine)}")
    except Exception as exc:
        raise CLIError(f"migration failed: {_describe(exc)}") from None


@db_app.command("reseal")
def db_reseal(
    old_secret_file: Annotated[
        Path,
        typer.Option(help="File holding the secret the keys are sealed with now (any strength)."),
    ],
    data_dir: Annotated[Path | None, typer.Option()] = None,
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Re-seal every stored private key, the directory bind password and the IdP client secret
    with the current secret (VPNFLEET_SECRET or the data dir's secret.key), e.g. to replace a
    weak secret the server now refuses. Stop the servers first; one transaction: on any error
    nothing is changed."""
    from vpnfleet.controlplane import certs, db
    from vpnfleet.controlplane.pki import PKIError, Sealer
    from vpnfleet.controlplane.services import directory as directory_service
    from vpnfleet.controlplane.services import idp as idp_service
    from vpnfleet.controlplane.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(data_dir=data_dir, database_url=database_url)
        old = Sealer(old_secret_file.read_text().strip())
        new = Sealer(settings.resolved_secret())
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc), 2) from None
    engine = db.make_engine(settings.resolved_database_url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            count = certs.reseal(session, old, new)
            bind_password = directory_service.reseal(session, old, new)
            client_secret = idp_service.reseal(session, old, new)
    except PKIError:
        raise CLIError(
            f"nothing changed: the stored keys do not open with the secret in {old_secret_file}"
        ) from None
    except Exception as exc:
        raise CLIError(f"re-sealing failed, nothing changed: {_describe(exc)}") from None
    finally:
        engine.dispose()
    extras = [
        what
        for what, done in (
            ("the directory bind password", bind_password),
            ("the IdP client secret", client_secret),
        )
        if done
    ]
    also = "".join(f" and {what}" for what in extras)
    typer.echo(f"re-sealed {count} private keys{also} with the current secret")


app.add_typer(db_app, name="db")
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
