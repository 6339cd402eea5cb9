"""Gateway-mode routes that follow their users: `vpnfleet gateway-routes`.

Run on whatever routes the company network towards the pods (a router, a node, the lab's
service network). It follows the control plane's watch stream and keeps one kernel route per
connected gateway-mode user: `TUNNEL_IP/32 via POD_IP`, so services can reach the user's laptop
on whichever pod they landed. Its routes carry their own protocol number, so it never touches
routes it does not own, and a full reconcile after every change batch removes stale ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError, WatchProtocolError
from vpnfleet.agent.follower import retry_wait
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import PodUpsert, SessionDelete, SessionUpsert, WatchHeartbeat, WatchResync

log = logging.getLogger("vpnfleet.gwroutes")

RT_PROTO = "241"  # our mark on the routes we own (unassigned in iproute2's rt_protos)


def desired_routes(view: FleetView) -> dict[str, str]:
    """Tunnel IP (/32) -> pod IP for every live gateway-mode session with a known pod IP.

    A session marked to end is left out: when the same device reconnects elsewhere, its old
    session (same stable address) lingers until its pod closes it, and the route must follow
    the new one. Only addresses inside a gateway pool, only via a registered pod's address:
    whatever else a session row might say, a router must never learn it from us.
    """
    pools = [ipaddress.IPv4Network(p.cidr) for p in view.pools.values() if p.kind == "gateway"]
    routes: dict[str, str] = {}
    for session in view.sessions.values():
        pod = view.pods.get(session.pod)
        if session.mode != "gateway" or session.kill is not None or pod is None:
            continue
        if not pod.pod_ip:  # pods are the registered ones; one without an address gets none
            continue
        try:
            addr = ipaddress.IPv4Address(session.tunnel_ip)
        except ValueError:
            continue
        if any(addr in net for net in pools):
            routes[f"{addr}/32"] = str(pod.pod_ip)
    return routes


async def _ip(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {err.decode().strip()}")
    return out.decode()


async def kernel_routes() -> dict[str, str]:
    """Our routes as the kernel has them."""
    rows = json.loads(await _ip("-j", "route", "show", "proto", RT_PROTO) or "[]")
    out: dict[str, str] = {}
    for row in rows:
        dst = str(row.get("dst", ""))
        if "/" not in dst:
            dst += "/32"
        out[dst] = str(row.get("gateway", ""))
    return out


async def reconcile(view: FleetView) -> tuple[int, int]:
    """Make the kernel match the view; returns (routes set, routes removed)."""
    want = desired_routes(view)
    have = await kernel_routes()
    added = removed = 0
    for dst, via in want.items():
        if have.get(dst) != via:
            try:
                await _ip("route", "replace", dst, "via", via, "proto", RT_PROTO)
                added += 1
                log.info("route %s via %s", dst, via)
            except RuntimeError as exc:
                log.error("%s", exc)
    for dst in have.keys() - want.keys():
        with contextlib.suppress(RuntimeError):
            await _ip("route", "del", dst, "proto", RT_PROTO)
            removed += 1
            log.info("route %s withdrawn", dst)
    return added, removed


async def follow(cp: ControlPlane, stop: asyncio.Event) -> None:
    """Follow the fleet until `stop` is set; survive control-plane outages."""
    view = FleetView()
    delay = 0.5
    while not stop.is_set():
        try:
            view = FleetView.from_snapshot(await cp.snapshot())
            await reconcile(view)
            async for message in cp.watch(view.revision):
                delay = 0.5
                if isinstance(message, WatchResync):
                    break
                if not isinstance(message, WatchHeartbeat):
                    view.apply(message)
                    if isinstance(message, SessionUpsert | SessionDelete | PodUpsert):
                        await reconcile(view)
                if stop.is_set():
                    return
        except ControlPlaneError as exc:
            # Either way the loop starts over from a snapshot, which also holds whatever an
            # unreadable line described; the pause keeps a stream that repeats one from
            # turning into a busy loop.
            resync = isinstance(exc, WatchProtocolError)
            what = "resyncing from a snapshot" if resync else "retrying"
            wait = retry_wait(exc, delay)  # longer when refused at a replica's stream limit
            log.warning("control plane: %s; %s in %.1fs", exc, what, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            delay = min(delay * 2, 5)
