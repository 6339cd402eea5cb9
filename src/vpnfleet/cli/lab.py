"""`vpnfleet lab`: the whole system on one Linux machine (root, network namespaces)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Annotated

import typer

from vpnfleet.cli.client import CLIError
from vpnfleet.cli.output import emit_json

lab_app = typer.Typer(
    help="The lab: control plane, pods, load balancer, clients and a backend, each in its "
    "own network namespace, with real OpenVPN.",
    no_args_is_help=True,
)

PrefixOpt = Annotated[
    str, typer.Option(help="Name prefix of the lab's namespaces (several labs can coexist).")
]


def _need_root() -> None:
    if os.geteuid() != 0:
        raise CLIError("the lab needs root (network namespaces, iptables): run it with sudo", 2)


@lab_app.command("up")
def lab_up(
    pods: Annotated[int, typer.Option(help="OpenVPN pods behind the load balancer.")] = 2,
    user: Annotated[
        list[str] | None,
        typer.Option(
            "--user", help="NAME[:nat|gateway]; repeat. Default: alice, bob, gary:gateway."
        ),
    ] = None,
    no_connect: Annotated[bool, typer.Option(help="Create users but do not connect them.")] = False,
    routing: Annotated[
        str,
        typer.Option(
            help="How the backend reaches gateway users: bgp (pods announce to a BIRD router "
            "namespace) or static (vpnfleet gateway-routes in the backend's namespace)."
        ),
    ] = "bgp",
    bgp_hold_time: Annotated[
        int, typer.Option(help="BGP hold time of the pods and the router, seconds.")
    ] = 9,
    prefix: PrefixOpt = "vfl",
) -> None:
    """Build the lab and start everything in it."""
    _need_root()
    from vpnfleet.lab import runner, topology

    try:
        users = tuple(runner.LabUser.parse(u) for u in user) if user else runner.DEFAULT_USERS
        info = asyncio.run(
            runner.up(
                prefix,
                pods,
                users,
                connect=not no_connect,
                routing=routing,
                bgp_hold_time=bgp_hold_time,
            )
        )
    except (ValueError, runner.LabRunError, topology.LabError) as exc:
        raise CLIError(str(exc)) from None
    typer.echo(f"lab {prefix} is up: {pods} pod(s), users {', '.join(u.name for u in users)}")
    typer.echo("talk to its control plane with:")
    typer.echo(f"  export VPNFLEET_URL={info.url}")
    typer.echo(f"  export VPNFLEET_TOKEN_FILE={info.dir / 'cp' / 'admin-token'}")
    typer.echo(
        f"  (its https certificate is checked against {info.ca_file}, named beside the token)"
    )
    typer.echo(f"try:  vpnfleet lab exec alice -- curl -s {info.service}/")
    if info.web:
        fetch = f"import urllib.request as u; u.urlopen('{info.web}/report')"
        typer.echo(f'      vpnfleet lab exec alice -- python3 -c "{fetch}"')
        typer.echo(f"      vpnfleet audit annotate --format nginx {info.web_access_log}")
    typer.echo(f"stop: vpnfleet lab down{'' if prefix == 'vfl' else ' --prefix ' + prefix}")


@lab_app.command("status")
def lab_status(
    prefix: PrefixOpt = "vfl",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What runs in the lab, pods' readiness and live sessions."""
    _need_root()
    from vpnfleet.lab import runner

    try:
        info = runner.LabInfo.load(prefix)
        out = asyncio.run(runner.status(info))
    except runner.LabRunError as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        emit_json(out)
        return
    from vpnfleet.cli.output import table

    typer.echo(f"lab {prefix}: control plane {out['url']}  service {out['service']}")
    if "pods" in out:
        table(out["pods"], ["name", "ready", "pod_ip", "applied_revision", "status"], "pods")
        table(out["sessions"], ["user", "pod", "mode", "tunnel_ip", "real_ip"], "live sessions")
    else:
        typer.echo(f"control plane unreachable: {out['control_plane_error']}")
    for name, addr in out["clients"].items():
        typer.echo(f"client {name}: {addr or 'not connected'}")


@lab_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def lab_exec(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="cp, lb, svc, rtr, pod1.., or a user name.")],
    prefix: PrefixOpt = "vfl",
) -> None:
    """Run a command inside a lab node: vpnfleet lab exec alice -- curl -s URL"""
    _need_root()
    from vpnfleet.lab import runner

    argv = list(ctx.args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CLIError("give the command after --, e.g. vpnfleet lab exec alice -- ip addr", 2)
    try:
        info = runner.LabInfo.load(prefix)
        ns = asyncio.run(runner.node_namespace(info, node))
    except runner.LabRunError as exc:
        raise CLIError(str(exc)) from None
    raise typer.Exit(subprocess.run(["ip", "netns", "exec", ns, *argv], check=False).returncode)


@lab_app.command("down")
def lab_down(prefix: PrefixOpt = "vfl") -> None:
    """Stop everything the lab started and remove its namespaces and links."""
    _need_root()
    from vpnfleet.lab import runner

    report = asyncio.run(runner.down(prefix))
    if report.errors:
        raise CLIError("lab down left something behind: " + "; ".join(report.errors))
    if report.removed_anything:
        typer.echo(
            f"removed lab {prefix}: {len(report.namespaces)} namespace(s), "
            f"{len(report.terminated) + len(report.killed)} process(es)"
        )
    else:
        typer.echo(f"no lab {prefix} to remove")
