"""Gateway routes through BGP, end to end: real OpenVPN, a real BIRD in every pod (started by
its agent) and a real BIRD router namespace in front of the pods, which the backend reaches
gateway users through.

A gateway user on pod 1 is reachable from the backend through the router; it reconnects to
pod 2 and the route follows (measured from the new session's start on pod 2); the pod dies
(its link cut, every process in it killed with SIGKILL, as when its node fails) and the
router's hold timer (3 s here, the least BIRD allows) withdraws the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.polling import until
from vpnfleet.lab import bgprouter, runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e(tools=("bird", "birdc"))]

HOLD = 3
USERS = (LabUser("gary", "gateway"),)
LISTEN_PORT = 7070


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(
        tmp_path_factory.mktemp("lab"), USERS, letters="vb", routing="bgp", bgp_hold_time=HOLD
    ) as info:
        yield info


def connected_at(info: LabInfo, pod: int, tunnel_ip: str, after: float) -> float | None:
    """When pod ``pod``'s agent logged the session of ``tunnel_ip`` as established (epoch s)."""
    for line in (info.dir / f"pod{pod}.log").read_text().splitlines():
        if '"event": "connect"' not in line and '"event":"connect"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("event") == "connect" and rec.get("tunnel_ip") == tunnel_ip:
            ts = dt.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            if ts >= after:
                return ts
    return None


async def route_of(info: LabInfo, address: str) -> str | None:
    """The pod address the router sends ``address`` to, or None."""
    return (await bgprouter.routes(info.plan)).get(address)


async def wait_route(info: LabInfo, address: str, via: str | None, seconds: float) -> float:
    """Poll the router's kernel table until ``address`` routes via ``via`` (None: no route);
    returns the wall-clock time it was first seen so."""
    deadline = time.monotonic() + seconds
    while True:
        if await route_of(info, address) == via:
            return time.time()
        if time.monotonic() > deadline:
            got = await route_of(info, address)
            pytest.fail(f"route of {address} is via {got}, not {via}, after {seconds}s")
        await asyncio.sleep(0.01)


async def reach_back(info: LabInfo, user: str, address: str) -> str:
    """The backend opens a TCP connection to the user's tunnel address; what the user got."""
    got = info.dir / f"{user}-reached.txt"
    got.unlink(missing_ok=True)
    listener = topology.spawn_in(
        info.plan.client_ns(user),
        sys.executable,
        "-c",
        f"import socket;s=socket.create_server(('0.0.0.0',{LISTEN_PORT}));s.settimeout(20);"
        "c,a=s.accept();c.settimeout(5);"
        f"open({str(got)!r},'w').write(a[0]+' '+c.recv(100).decode())",
        log_path=info.dir / f"{user}-listener.log",
    )
    try:
        dial = (
            "import socket,time\n"
            "for _ in range(50):\n"
            "    try:\n"
            f"        c=socket.create_connection(({address!r},{LISTEN_PORT}),2);break\n"
            "    except ConnectionRefusedError:\n"
            "        time.sleep(0.1)\n"
            "c.sendall(b'hello from backend')\n"
        )
        await topology.run_in(info.plan.svc.ns, sys.executable, "-c", dial, timeout=20)
        return str(await until(lambda: got.exists() and got.read_text(), 10, "the connection"))
    finally:
        await listener.stop()


async def kill_pod(info: LabInfo, pod: int) -> None:
    """The pod's node dies: its cable is pulled, then everything in it gets SIGKILL (so no
    BGP notification, not even a TCP FIN, reaches the router)."""
    plan = info.plan
    port = plan.pod(pod).attachments[0].port
    await topology.run_in(plan.fabric_ns, "ip", "link", "set", port, "down")
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", plan.pod_ns(pod), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    pids = [int(p) for p in out.split()]
    assert len(pids) >= 3, pids  # the agent, openvpn and BIRD at least
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_route_follows_the_user_and_dies_with_the_pod(lab: LabInfo) -> None:
    plan = lab.plan
    pod1, pod2 = str(plan.pod_ip(1)), str(plan.pod_ip(2))
    # The backend's way to gateway users is the router; it has no route of its own to them.
    svc_routes = (await topology.run_in(plan.svc.ns, "ip", "route")).stdout
    assert f"10.201.0.0/16 via {plan.router_ip}" in svc_routes
    assert svc_routes.count("10.201.") == 1

    # On pod 1: announced, learned by the router, reachable from the backend through it.
    await runner.pin_client(lab, "gary", 1)
    client = await runner.start_client(lab, "gary")
    address = await runner.wait_client_address(lab, "gary", 5)
    assert address is not None
    await wait_route(lab, address, pod1, 5)
    hops = (await topology.run_in(plan.svc.ns, "ip", "route", "get", address)).stdout
    assert f"via {plan.router_ip}" in hops
    text = await reach_back(lab, "gary", address)
    assert text == f"{plan.svc_ip} hello from backend"

    # It reconnects to the other pod, three times: the route follows each time.
    follows = []
    pod = 1
    for _ in range(3):
        pod = 3 - pod
        await runner.pin_client(lab, "gary", pod)
        started = time.time()
        await runner.stop_client(lab, "gary")
        await client.stop()
        client = await runner.start_client(lab, "gary")
        seen = await wait_route(lab, address, str(plan.pod_ip(pod)), 10)
        session = await until(
            lambda: connected_at(lab, pod, address, started), 5, "the session in the pod's log"
        )
        follows.append(seen - session)
    ms = ", ".join(f"{f * 1000:.0f}" for f in follows)
    print(f"\nroute followed the reconnects {ms} ms after the new session")
    assert pod == 2
    assert max(follows) < 1.0, f"the route took {max(follows):.3f}s to follow the new session"
    # Pod 1 withdrew its route (the disconnect): only pod 2's is left at the router.
    assert await route_of(lab, address) == pod2
    out = await until(lambda: _single_path(lab, address), 5, "pod 1 to withdraw the old route")
    assert "AS64512" in out
    assert (await reach_back(lab, "gary", address)).startswith(str(plan.svc_ip))

    # Pod 2 dies with its node; the user's laptop goes away too (no reconnect elsewhere).
    for pid in await runner.client_pids(lab, "gary"):
        os.kill(pid, signal.SIGKILL)
    cut = time.time()
    await kill_pod(lab, 2)
    gone = await wait_route(lab, address, None, HOLD + 5)
    withdrawn = gone - cut
    print(f"route withdrawn {withdrawn:.2f}s after the pod died (hold time {HOLD}s)")
    # Not before a keepalive could have been missed (it was the hold timer, not a FIN)...
    assert withdrawn > 1.0
    # ... and within the hold time (plus the router's timer tick).
    assert withdrawn <= HOLD + 0.5, f"withdrawn after {withdrawn:.2f}s"
    await client.stop()


async def _single_path(info: LabInfo, address: str) -> str | None:
    out = await bgprouter.birdc(info.router_dir, "show", "route", "for", address, "all")
    paths = [line for line in out.splitlines() if "unicast [" in line]
    return out if len(paths) == 1 else None
