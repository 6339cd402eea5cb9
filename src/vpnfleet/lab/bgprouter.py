"""The lab's BGP router: a BIRD 2 in the ``rtr`` namespace that the pods announce to.

It plays the company router: one passive BGP session per pod (a dynamic neighbour range over
the pod network, as a router in front of a cluster with changing pod addresses would use),
accepting only /32s inside the gateway pool, and installing what it learns as kernel routes
``TUNNEL_IP/32 via POD_IP``. The backend service routes the gateway pool via this namespace.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from vpnfleet.lab import topology
from vpnfleet.lab.topology import CLUSTER_NET, GATEWAY_POOL, LabPlan

ROUTER_ASN = 64600
POD_ASN = 64512
BIRD_PROTO = "bird"  # the kernel's name for routes BIRD installs (rt_protos 12)


class RouterError(RuntimeError):
    """The lab's router could not be started."""


def render_config(plan: LabPlan, hold_time: int) -> str:
    """BIRD's configuration for the lab router."""
    return router_config(str(plan.router_ip), str(CLUSTER_NET), str(GATEWAY_POOL), hold_time)


def router_config(
    router_ip: str,
    pods_net: str,
    pool: str,
    hold_time: int,
    *,
    router_asn: int = ROUTER_ASN,
    pod_asn: int = POD_ASN,
) -> str:
    """A company router's BIRD: a passive session for each pod in ``pods_net`` (AS
    ``pod_asn``), only /32s inside ``pool`` accepted, installed as kernel routes. The lab's
    router, and the router container of the kube play test."""
    keepalive = max(1, hold_time // 3)
    return f"""# The vpnfleet lab's BGP router (lab/bgprouter.py).
log stderr {{ info, remote, warning, error, auth, fatal, bug }};
router id {router_ip};

protocol device {{
}}

protocol kernel {{
  ipv4 {{ export all; }};
}}

filter gateway_users {{
  if net ~ [ {pool}{{32,32}} ] then accept;
  reject;
}}

protocol bgp pods {{
  local {router_ip} as {router_asn};
  neighbor range {pods_net} as {pod_asn};
  dynamic name "pod";
  hold time {hold_time};
  keepalive time {keepalive};
  graceful restart off;
  ipv4 {{
    import filter gateway_users;
    export none;
  }};
}}
"""


def paths(state: Path) -> tuple[Path, Path, Path]:
    """(configuration, control socket, log) of the router whose state directory is ``state``."""
    return state / "bird.conf", state / "bird.ctl", state / "bird.log"


async def start(plan: LabPlan, state: Path, hold_time: int) -> topology.LabProcess:
    """Start the router's BIRD and route the gateway pool from the service through it."""
    conf, sock, log = paths(state)
    # Small local files: no need to leave the event loop for them.
    state.mkdir(mode=0o700, exist_ok=True)  # noqa: ASYNC240
    conf.write_text(render_config(plan, hold_time))
    proc = topology.spawn_in(
        plan.router.ns, "bird", "-f", "-c", str(conf), "-s", str(sock), log_path=log
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RouterError(f"the lab's BIRD router did not start; see {log}")
        await asyncio.sleep(0.05)
    await topology.add_route(plan.svc.ns, GATEWAY_POOL, plan.router_ip)
    return proc


async def birdc(state: Path, *command: str) -> str:
    """Run a ``birdc`` command against the router."""
    _, sock, _ = paths(state)
    proc = await asyncio.create_subprocess_exec(
        "birdc", "-s", str(sock), *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode()


async def established(state: Path) -> set[str]:
    """Addresses of the pods whose BGP session with the router is up."""
    out = await birdc(state, "show", "protocols", "all")
    up: set[str] = set()
    current_up = False
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "BGP":
            current_up = "Established" in line
        elif current_up and line.strip().startswith("Neighbor address:"):
            up.add(line.split(":", 1)[1].strip())
    return up


async def routes(plan: LabPlan) -> dict[str, str]:
    """The router's kernel routes learned over BGP: tunnel address -> pod address."""
    res = await topology.run_in(
        plan.router.ns, "ip", "-j", "route", "show", "proto", BIRD_PROTO, check=False
    )
    rows: list[dict[str, Any]] = json.loads(res.stdout) if res.stdout.strip() else []
    return {str(r["dst"]): str(r.get("gateway", "")) for r in rows}


async def wait_established(state: Path, pod_ips: set[str], seconds: float) -> None:
    """Wait until every pod in ``pod_ips`` has its BGP session up."""
    deadline = time.monotonic() + seconds
    up: set[str] = set()
    while time.monotonic() < deadline:
        up = await established(state)
        if pod_ips <= up:
            return
        await asyncio.sleep(0.2)
    missing = ", ".join(sorted(pod_ips - up))
    raise RouterError(
        f"BGP sessions with {missing} not up within {seconds:.0f}s; see {paths(state)[2]}"
    )
