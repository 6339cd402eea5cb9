"""The TCP fallback end to end: clients whose network drops UDP connect with the same profile.

The lab's pods run their UDP and TCP OpenVPN servers behind the load balancer (UDP 1194,
TCP 443). In the namespaces of the clients that "cannot use UDP" the test drops every UDP
datagram to the load balancer (an iptables rule it adds and removes there): their stock
OpenVPN clients try the profile's UDP entry, give up after its server-poll-timeout, and
connect over TCP. What is checked is what the user and the operator notice: the TCP client
gets a tunnel address from the TCP server's half of the pod's pool, reaches what its group
grants and nothing else (the refused attempt is audited under its name), its flows are
attributed to it, a gateway user over TCP is reachable back from the backend, and a session
limit of one holds across UDP and TCP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import api, client_log, sessions, until
from tests.e2e.test_lab_permissions import PROBE, SVC
from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e]

USERS = (
    LabUser("tia", "nat", lab_access=False),  # UDP blocked; only the web grant
    LabUser("gil", "gateway"),  # UDP blocked; reached back by the backend
    LabUser("tom", "nat"),  # one session at most: on UDP here ...
    LabUser("tod", "nat"),  # ... and a second device of tom's, UDP blocked (tom's profile)
)
NO_UDP = ("tia", "gil", "tod")


async def block_udp(info: LabInfo, user: str, add: bool = True) -> None:
    """Drop every UDP datagram from ``user``'s namespace to the load balancer."""
    host = str(info.plan.lb_public_ip)
    rule = ["OUTPUT", "-p", "udp", "-d", host, "-j", "DROP"]
    ns = info.plan.client_ns(user)
    await topology.run_in(ns, "iptables", "-w", "-A" if add else "-D", *rule, check=add)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vc") as info:
        api(info, "POST", "/api/v1/groups", {"name": "web"})
        api(
            info,
            "POST",
            "/api/v1/rules",
            {"group": "web", "destination": SVC, "proto": "tcp", "ports": "8080"},
        )
        api(info, "POST", "/api/v1/groups/web/members", {"user": "tia"})
        for user in NO_UDP:
            await block_udp(info, user)
        try:
            yield info
        finally:
            for user in NO_UDP:
                await block_udp(info, user, add=False)


async def probe(info: LabInfo, user: str, port: int) -> bool:
    res = await topology.run_in(
        info.plan.client_ns(user), sys.executable, "-c", PROBE, "http", str(port), SVC, timeout=10
    )
    return bool(json.loads(res.stdout)["ok"])


def server_subnet(info: LabInfo, pod: str, server: str) -> ipaddress.IPv4Network:
    """The tunnel subnet of ``pod``'s UDP or TCP server, from the config its agent wrote."""
    name = "server.conf" if server == "udp" else f"server-{server}.conf"
    for line in (info.dir / pod / name).read_text().splitlines():
        if line.startswith("ifconfig "):
            _, ip, mask = line.split()
            return ipaddress.IPv4Interface(f"{ip}/{mask}").network
    raise AssertionError(f"no ifconfig in {pod}'s {name}")


async def wait_session(info: LabInfo, user: str) -> dict[str, Any]:
    found = await until(lambda: sessions(info, user=user), 20, f"{user}'s session")
    return dict(found[0])


@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_that_cannot_use_udp_connects_over_tcp_with_the_same_profile(
    lab: LabInfo,
) -> None:
    # The profile is the one every user gets: UDP first, then the TCP fallback.
    profile = (lab.dir / "clients" / "tia.ovpn").read_text()
    remotes = [line for line in profile.splitlines() if line.startswith("remote ")]
    assert remotes == [f"remote {lab.vpn_endpoint.replace(':', ' ')} udp",
                       f"remote {lab.plan.lb_public_ip} 443 tcp"]  # fmt: skip
    await runner.start_client(lab, "tia", wait=False)
    address = await runner.wait_client_address(lab, "tia", 45)
    log = client_log(lab, "tia")
    assert address is not None, log[-3000:]
    assert "TCP connection established" in log or "TCP_CLIENT link" in log, log[-3000:]
    session = await wait_session(lab, "tia")
    assert session["tunnel_ip"] == address and session["mode"] == "nat"
    assert session["real_ip"] == str(lab.plan.client_ip("tia"))
    # From the TCP server's half of the pod's NAT pool: never one the UDP server hands out.
    tcp_net = server_subnet(lab, session["pod"], "tcp")
    udp_net = server_subnet(lab, session["pod"], "udp")
    assert ipaddress.IPv4Address(address) in tcp_net and not tcp_net.overlaps(udp_net)
    # What its group grants works; the rest is refused, and the refusal is audited as tia's.
    assert await probe(lab, "tia", 8080)
    assert not await probe(lab, "tia", 9090)
    denied = await until(
        lambda: [d for d in api(lab, "GET", "/api/v1/audit/denied?user=tia") if d["dport"] == 9090],
        15,
        "tia's refused attempt in the audit trail",
    )
    assert denied[0]["dst"] == SVC and denied[0]["src"] == address
    assert denied[0]["pod"] == session["pod"] and denied[0]["session_uid"]
    # Her NAT flow to the backend is attributed to her session.
    flows = await until(
        lambda: [
            f
            for f in api(lab, "GET", "/api/v1/audit/flows?user=tia")
            if f["dst_ip"] == SVC and f["dst_port"] == 8080
        ],
        15,
        "tia's flow in the audit trail",
    )
    assert flows[0]["tunnel_ip"] == address and flows[0]["pod"] == session["pod"]
    assert flows[0]["session_uid"] == denied[0]["session_uid"]
    # The pod counts her as a TCP connection (its own series; openvpn_* are unchanged).
    metrics = await pod_metrics(lab, session["pod"])
    assert 'vpnfleet_connections_by_proto{proto="tcp"} 1.0' in metrics
    assert 'vpnfleet_openvpn_server_up{proto="tcp"} 1.0' in metrics
    assert f'openvpn_connections{{server="{session["pod"]}"}} ' in metrics


@pytest.mark.asyncio(loop_scope="module")
async def test_a_gateway_user_over_tcp_is_reachable_back(lab: LabInfo) -> None:
    await runner.start_client(lab, "gil", wait=False)
    address = await runner.wait_client_address(lab, "gil", 45)
    assert address is not None, client_log(lab, "gil")[-3000:]
    assert address == api(lab, "GET", "/api/v1/users/gil")["gateway_address"]
    session = await wait_session(lab, "gil")
    # The pod routes gil's address into its TCP server's device, not the pool's UDP one.
    pod_ns = lab.plan.ns(session["pod"])

    async def device() -> str:
        route = await topology.run_in(pod_ns, "ip", "route", "get", address)
        return route.stdout.split(" dev ", 1)[1].split()[0]

    await until(lambda: _is(device(), "tun1"), 5, "gil's address routed into tun1")
    # A new connection from the backend to the laptop, over the TCP tunnel.
    got = lab.dir / "gil-listener.txt"
    listener = topology.spawn_in(
        lab.plan.client_ns("gil"),
        sys.executable,
        "-c",
        "import socket;s=socket.create_server(('0.0.0.0',7070));s.settimeout(30);"
        "c,a=s.accept();c.settimeout(5);"
        f"open({str(got)!r},'w').write(a[0]+' '+c.recv(100).decode())",
        log_path=lab.dir / "gil-listener.log",
    )
    try:
        await asyncio.sleep(0.5)
        code = (
            "import socket,time\n"
            "for i in range(40):\n"
            "    try:\n"
            f"        c=socket.create_connection(({address!r},7070),timeout=2);break\n"
            "    except OSError: time.sleep(0.25)\n"
            "c.sendall(b'hello from the backend')\n"
        )
        await topology.run_in(lab.plan.ns("svc"), sys.executable, "-c", code, timeout=30)
        seen = await until(lambda: got.exists() and got.read_text(), 10, "gil to be reached")
        assert seen == f"{topology.CLUSTER_NET.network_address + 100} hello from the backend"
    finally:
        await listener.stop()
    await runner.stop_client(lab, "gil")
    await until(lambda: not sessions(lab, user="gil"), 15, "gil's session to end")
    # The host route goes with the session: the address falls back to the pool's route.
    await until(lambda: _is(device(), "tun0"), 5, "gil's host route to go")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_session_limit_holds_across_udp_and_tcp(lab: LabInfo) -> None:
    api(lab, "PATCH", "/api/v1/users/tom", {"max_sessions": 1})
    await runner.start_client(lab, "tom")  # UDP gets through from tom's namespace
    (first,) = await until(lambda: sessions(lab, user="tom"), 20, "tom's session")
    # tom's second device (another address, UDP blocked) with tom's profile: over TCP.
    second = topology.spawn_in(
        lab.plan.client_ns("tod"),
        "openvpn",
        "--config",
        str(lab.dir / "clients" / "tom.ovpn"),
        "--dev",
        "tun0",
        "--connect-retry",
        "1",
        "1",
        "--verb",
        "3",
        log_path=lab.dir / "clients" / "tod.log",
    )
    try:
        await until(
            lambda: "AUTH_FAILED,too many sessions" in client_log(lab, "tod"),
            45,
            "the second device to be refused",
        )
        log = client_log(lab, "tod")
        assert "TCP connection established" in log or "TCP_CLIENT link" in log, log[-3000:]
        assert await runner.client_address(lab, "tod") is None
        assert [s["id"] for s in sessions(lab, user="tom")] == [first["id"]]
    finally:
        await second.stop()
        await runner.stop_client(lab, "tom")


async def pod_metrics(info: LabInfo, pod: str) -> str:
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{runner.AGENT_HTTP_PORT}"
        "/metrics',timeout=5).read().decode())"
    )
    res = await topology.run_in(info.plan.ns(pod), sys.executable, "-c", code, timeout=20)
    return res.stdout


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)
