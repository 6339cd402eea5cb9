"""`vpnfleet agent`: the pod agent process, with the start-up checks it logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vpnfleet.cli.client import CLIError

if TYPE_CHECKING:  # the agent's modules load only when the agent command runs
    from vpnfleet.agent.settings import AgentSettings


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
