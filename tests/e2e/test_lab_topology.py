"""The lab's network against the real kernel: namespaces, bridges, the load balancer's DNAT,
the admin link from the root namespace, gateway routes, the echo service and teardown.

Every address contacted lives inside namespaces these tests create, or on the admin veth
(10.99.254.0/30) the lab adds to the root namespace; all of it is removed even when a test
fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import subprocess
import sys
from collections.abc import AsyncIterator
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import pytest

from vpnfleet.lab.topology import (
    ADMIN_NET,
    ADMIN_RANGE,
    Lab,
    LabError,
    LabExistsError,
    LabPlan,
    LabProcess,
    add_route,
    build,
    del_route,
    run_in,
    spawn_in,
    status,
    teardown,
)

pytestmark = [pytest.mark.e2e]

PY = sys.executable
CLIENTS = ["alice", "bob"]
GW_USER = "10.201.0.5"  # a gateway-mode user's tunnel address, faked on a pod's loopback

UDP_RESPONDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 1194))
print("ready", flush=True)
while True:
    data, (host, port) = s.recvfrom(2048)
    s.sendto(f"{sys.argv[1]} {host}:{port}".encode(), (host, port))
"""

# One new socket per try: a new source port, hence a new conntrack flow for the LB to place.
UDP_SENDER = r"""
import json, socket, sys
dst, tries, want = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), set(sys.argv[4:])
out = []
for _ in range(tries):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.bind(("0.0.0.0", 0))
        sport = s.getsockname()[1]
        s.sendto(b"hi", dst)
        try:
            data, src = s.recvfrom(2048)
        except TimeoutError:
            out.append({"sport": sport, "timeout": True})
            continue
        out.append({"sport": sport, "from": f"{src[0]}:{src[1]}", "reply": data.decode()})
    if {r["reply"].split()[0] for r in out if "reply" in r} >= want:
        break
print(json.dumps(out))
"""

TCP_GREETER = r"""
import socket
srv = socket.create_server(("0.0.0.0", 8000))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(b"hello from cp\n")
"""

HTTP_GET = r"""
import http.client, json, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
c = http.client.HTTPConnection(host, port, timeout=3, source_address=source)
try:
    c.request("GET", path)
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
"""

# Listen first, then ask the backend to connect back; the kernel queues its connection.
CONNECT_BACK = r"""
import http.client, json, socket, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lsn = socket.create_server((source, 0))
lsn.settimeout(5)
c = http.client.HTTPConnection(host, port, timeout=8, source_address=(source, 0))
c.request("GET", f"/connect-back?port={lsn.getsockname()[1]}")
r = c.getresponse()
body = json.loads(r.read())
got = ""
if r.status == 200:
    conn, peer = lsn.accept()
    conn.settimeout(5)
    got = conn.recv(100).decode()
print(json.dumps({"status": r.status, "body": body, "received": got}))
"""


# --------------------------------------------------------------------------------------------
# helpers


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [e["name"] for e in json.loads(out.stdout or "[]")]


def _root_link_exists(name: str) -> bool:
    res = subprocess.run(["ip", "link", "show", name], capture_output=True, timeout=10)
    return res.returncode == 0


def _fresh_prefix() -> str:
    """A random prefix no namespace or link on this machine uses yet."""
    names = _netns_names()
    for _ in range(20):
        prefix = "vt" + "".join(random.choices(string.ascii_lowercase, k=3))
        if not any(n.startswith(f"{prefix}-") for n in names) and not _root_link_exists(
            f"{prefix}-adm"
        ):
            return prefix
    raise RuntimeError("no free lab prefix found")


def _free_admin_net() -> str:
    """A /30 for the admin link that nothing in the root namespace uses (never the default
    one, so these tests run while a development lab is up)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
    used = [
        ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in json.loads(out.stdout or "[]")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    candidates = [n for n in ADMIN_RANGE.subnets(new_prefix=30) if n != ADMIN_NET]
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free admin /30 found")


def _plan(pods: int = 2, clients: list[str] | None = None) -> LabPlan:
    return LabPlan(
        _fresh_prefix(),
        pods=pods,
        clients=CLIENTS if clients is None else clients,
        admin_net=_free_admin_net(),
    )


def _leftovers(prefix: str) -> list[str]:
    left = [n for n in _netns_names() if n.startswith(f"{prefix}-")]
    return left + ([f"{prefix}-adm"] if _root_link_exists(f"{prefix}-adm") else [])


async def _wait_for_log(proc: LabProcess, text: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if text in proc.log_path.read_text(errors="replace"):
            return
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    log = proc.log_path.read_text(errors="replace")
    raise AssertionError(f"{proc.argv[:3]} in {proc.ns} never logged {text!r}: {log[-2000:]}")


async def _py(ns: str, script: str, *args: str, timeout: float = 60.0) -> Any:
    res = await run_in(ns, PY, "-c", script, *args, timeout=timeout)
    return json.loads(res.stdout)


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A fresh lab with 2 pods and 2 clients; removed afterwards, whatever happened."""
    plan = _plan()
    try:
        built = await build(plan)
    except LabExistsError:
        raise  # someone else's: not ours to remove
    except BaseException:
        await teardown(plan.prefix)
        raise
    try:
        yield built
    finally:
        report = await teardown(plan.prefix, grace=2.0)
        assert not report.errors, report.errors
        assert _leftovers(plan.prefix) == []


@pytest.fixture
async def echo(lab: Lab, tmp_path: Path) -> LabProcess:
    """The echo service running in the lab's service namespace."""
    proc = spawn_in(
        lab.plan.svc.ns,
        PY, "-m", "vpnfleet.lab.echo", "--listen", "0.0.0.0:8080", "--udp-listen", "0.0.0.0:8081",
        log_path=tmp_path / "echo.log",
    )  # fmt: skip
    await _wait_for_log(proc, '"listening"')
    return proc


# --------------------------------------------------------------------------------------------
# tests


async def test_load_balancer_spreads_clients_over_pods_and_keeps_their_address(
    lab: Lab, tmp_path: Path
) -> None:
    plan = lab.plan
    pods = {f"pod{i}": plan.pod_ns(i) for i in (1, 2)}
    for name, ns in pods.items():
        proc = spawn_in(ns, PY, "-c", UDP_RESPONDER, name, log_path=tmp_path / f"{name}.log")
        await _wait_for_log(proc, "ready")

    for client in CLIENTS:
        ip, port = plan.vpn_endpoint
        out = await _py(plan.client_ns(client), UDP_SENDER, str(ip), str(port), "40", *pods)
        assert not [r for r in out if r.get("timeout")], out
        for r in out:
            _pod, seen = r["reply"].split()
            # The pod saw the client's real address and port (no SNAT anywhere) ...
            assert seen == f"{plan.client_ip(client)}:{r['sport']}"
            # ... and the reply came back from the Service address (the LB un-DNATed it).
            assert r["from"] == f"{ip}:{port}"
        # 40 tries with a fair coin: both pods answer unless the DNAT spread is broken.
        assert {r["reply"].split()[0] for r in out} == set(pods)


async def test_pods_reach_the_backend_with_their_own_address(lab: Lab, echo: LabProcess) -> None:
    plan = lab.plan
    for i in (1, 2):
        got = await _py(plan.pod_ns(i), HTTP_GET, str(plan.svc_ip), "8080", "/")
        assert got["status"] == 200
        assert got["body"]["remote_addr"] == str(plan.pod_ip(i))
    # UDP echo reports the sender too.
    res = await run_in(
        plan.pod_ns(1),
        PY, "-c",
        "import socket,sys;s=socket.socket(2,2);s.settimeout(3);"
        f"s.sendto(b'x',('{plan.svc_ip}',8081));print(s.recvfrom(100)[0].decode())",
    )  # fmt: skip
    assert res.stdout.strip().startswith(f"{plan.pod_ip(1)}:")
    # The service's access log records who called, with the client port (for attribution).
    log = [json.loads(line) for line in echo.log_path.read_text().splitlines()]
    assert {e["remote_addr"] for e in log if e.get("event") == "http"} == {
        str(plan.pod_ip(1)),
        str(plan.pod_ip(2)),
    }
    # SIGTERM stops it cleanly.
    assert await echo.stop(grace=5) == 0
    assert json.loads(echo.log_path.read_text().splitlines()[-1])["event"] == "stopped"


async def test_echo_rejects_what_it_does_not_serve(lab: Lab, echo: LabProcess) -> None:
    pod, svc = lab.plan.pod_ns(1), str(lab.plan.svc_ip)
    assert (await _py(pod, HTTP_GET, svc, "8080", "/nope"))["status"] == 404
    bad = await _py(pod, HTTP_GET, svc, "8080", "/connect-back?port=70000")
    assert bad["status"] == 400
    assert "port" in bad["body"]["error"]
    # Nothing listens on the port: the failure is reported, not hung on.
    failed = await _py(pod, HTTP_GET, svc, "8080", "/connect-back?port=9")
    assert failed["status"] == 502
    assert failed["body"]["ok"] is False
    assert failed["body"]["error"] == "Connection refused"


async def test_clients_cannot_bypass_the_service_to_reach_the_pod_network(
    lab: Lab, tmp_path: Path
) -> None:
    plan = lab.plan
    proc = spawn_in(plan.pod_ns(1), PY, "-c", TCP_GREETER, log_path=tmp_path / "pod1.log")
    await _wait_for_log(proc, "ready")
    dial = (
        "import socket\n"
        "try:\n"
        f"    print(socket.create_connection(('{plan.pod_ip(1)}', 8000), 2).recv(100))\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    # Reachable on the pod network (and the pod's replies would route via the LB) ...
    assert "hello from cp" in (await run_in(plan.svc.ns, PY, "-c", dial)).stdout
    # ... but from the internet only the Service's DNAT gets in: the LB's FORWARD drops it.
    assert (await run_in(plan.client_ns("alice"), PY, "-c", dial)).stdout.strip() == "TimeoutError"


async def test_gateway_routes_make_a_tunnel_address_reachable_from_the_backend(
    lab: Lab, echo: LabProcess
) -> None:
    plan = lab.plan
    svc, pod1, pod1_ip, pod2_ip = plan.svc.ns, plan.pod_ns(1), plan.pod_ip(1), plan.pod_ip(2)
    await run_in(pod1, "ip", "addr", "add", f"{GW_USER}/32", "dev", "lo")
    target = (str(plan.svc_ip), "8080", "/", GW_USER)

    # Without a route the backend cannot answer the tunnel address at all.
    assert await _py(pod1, HTTP_GET, *target) == {"error": "TimeoutError"}

    await add_route(svc, f"{GW_USER}/32", pod2_ip)
    await add_route(svc, f"{GW_USER}/32", pod1_ip)  # the user moved: replaced, not duplicated
    routes = (await run_in(svc, "ip", "route", "show", f"{GW_USER}/32")).stdout.strip()
    assert routes == f"{GW_USER} via {pod1_ip} dev eth0"

    got = await _py(pod1, HTTP_GET, *target)
    assert got["body"]["remote_addr"] == GW_USER
    back = await _py(pod1, CONNECT_BACK, str(plan.svc_ip), "8080", GW_USER)
    assert back["body"]["ok"] is True
    assert back["body"]["target"].startswith(f"{GW_USER}:")
    assert back["received"] == "hello from backend\n"

    # A late withdrawal from the pod the user left must not remove the current route.
    assert await del_route(svc, f"{GW_USER}/32", pod2_ip) is False
    assert (await _py(pod1, HTTP_GET, *target))["status"] == 200
    assert await del_route(svc, f"{GW_USER}/32", pod1_ip) is True
    assert await del_route(svc, f"{GW_USER}/32", pod1_ip) is False
    assert await del_route(svc, f"{GW_USER}/32") is False
    assert await _py(pod1, HTTP_GET, *target) == {"error": "TimeoutError"}


async def test_root_namespace_reaches_the_control_plane_over_the_admin_link(
    lab: Lab, tmp_path: Path
) -> None:
    plan = lab.plan
    proc = spawn_in(plan.cp.ns, PY, "-c", TCP_GREETER, log_path=tmp_path / "cp.log")
    await _wait_for_log(proc, "ready")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(str(plan.admin.ns_address.ip), 8000), 5
    )
    try:
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello from cp\n"
    finally:
        writer.close()
    # Agents in the pods reach it on the pod network.
    res = await run_in(
        plan.pod_ns(2),
        PY, "-c",
        f"import socket;print(socket.create_connection(('{plan.cp_ip}',8000),3).recv(100))",
    )  # fmt: skip
    assert "hello from cp" in res.stdout
    await proc.stop(grace=2)
    assert proc.returncode is not None


async def test_pods_have_forwarding_conntrack_accounting_and_tun(lab: Lab) -> None:
    keys = [
        "net.ipv4.ip_forward",
        "net.netfilter.nf_conntrack_acct",
        "net.netfilter.nf_conntrack_timestamp",
    ]
    for i in (1, 2):
        res = await run_in(lab.plan.pod_ns(i), "sysctl", "-n", *keys)
        assert res.stdout.split() == ["1", "1", "1"]
        await run_in(
            lab.plan.pod_ns(i), PY, "-c", "import os; os.close(os.open('/dev/net/tun', os.O_RDWR))"
        )
    # Namespace-local: the clients keep their own settings. A new namespace takes its IPv4
    # forwarding from the root namespace (devconf_inherit_init_net=0, the default), which the
    # lab never touches, and starts with conntrack accounting and timestamps off.
    root = await asyncio.create_subprocess_exec(
        "sysctl", "-n", "net.ipv4.ip_forward", stdout=asyncio.subprocess.PIPE
    )
    root_forward = (await root.communicate())[0].decode().strip()
    assert root_forward in ("0", "1")
    res = await run_in(lab.plan.client_ns("alice"), "sysctl", "-n", *keys)
    assert res.stdout.split() == [root_forward, "0", "0"]
    for ns in lab.plan.namespaces:
        res = await run_in(ns, "ip", "-j", "link", "show", "lo")
        assert "UP" in json.loads(res.stdout)[0]["flags"], ns


async def test_status_lists_every_namespace_with_its_addresses(lab: Lab) -> None:
    plan = lab.plan
    st = await status(plan.prefix)
    assert st.exists
    by_name = {ns.name: ns for ns in st.namespaces}
    assert set(by_name) == set(plan.namespaces)
    for node in plan.nodes:
        addrs = {a for i in by_name[node.ns].interfaces for a in i.addresses}
        assert {str(a.address) for a in node.attachments} <= addrs
    assert st.admin_link is not None
    assert st.admin_link.addresses == (str(plan.admin.root_address),)
    assert str(plan.admin.ns_address) in {
        a for i in by_name[plan.cp.ns].interfaces for a in i.addresses
    }
    assert json.loads(json.dumps(st.as_dict()))["exists"] is True


async def test_building_over_an_existing_lab_is_refused_and_leaves_it_alone(lab: Lab) -> None:
    with pytest.raises(LabExistsError, match="vpnfleet lab down"):
        await build(lab.plan)
    assert {n.name for n in (await status(lab.plan.prefix)).namespaces} == set(lab.plan.namespaces)
    # A second lab on the same admin subnet would clash in the root namespace.
    other = LabPlan(_fresh_prefix(), pods=1, clients=[], admin_net=lab.plan.admin_net)
    with pytest.raises(LabExistsError, match=re.escape(f"{lab.plan.admin_net} is already in use")):
        await build(other)
    assert _leftovers(other.prefix) == []


async def test_teardown_stops_processes_removes_everything_and_is_idempotent(
    lab: Lab, tmp_path: Path
) -> None:
    plan = lab.plan
    polite = spawn_in(plan.svc.ns, "sleep", "300", log_path=tmp_path / "polite.log")
    stubborn = spawn_in(
        plan.pod_ns(1),
        PY, "-c",
        "import signal,time;signal.signal(signal.SIGTERM,signal.SIG_IGN);print('ready',flush=True);"
        "time.sleep(300)",
        log_path=tmp_path / "stubborn.log",
    )  # fmt: skip
    await _wait_for_log(stubborn, "ready")
    assert polite.returncode is None

    report = await teardown(plan.prefix, grace=1.0)
    assert sorted(report.namespaces) == sorted(plan.namespaces)
    assert report.links == [plan.admin.root_ifname]
    assert polite.pid in report.terminated
    assert stubborn.pid in report.killed
    assert report.errors == []
    assert await polite.wait(5) is not None
    assert await stubborn.wait(5) == -9
    assert _leftovers(plan.prefix) == []
    assert not (await status(plan.prefix)).exists

    again = await teardown(plan.prefix)
    assert not again.removed_anything
    assert again.errors == []
    with pytest.raises(LabError, match="does not exist"):
        spawn_in(plan.svc.ns, "true", log_path=tmp_path / "x.log")


async def test_failed_build_removes_everything_it_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = _plan(clients=["alice"])
    # A ruleset the real iptables-restore rejects: the last build step fails for real.
    monkeypatch.setattr(LabPlan, "lb_ruleset", lambda self: "*nat\n-A NOSUCHCHAIN -j ACCEPT\n")
    try:
        with pytest.raises(LabError, match="installing the load balancer's NAT rules") as info:
            await build(plan)
        assert "everything it had created was removed" in str(info.value)
        assert _leftovers(plan.prefix) == []
    finally:
        await teardown(plan.prefix)


async def test_cancelled_build_leaves_nothing_behind() -> None:
    plan = _plan(pods=3)
    try:
        task = asyncio.create_task(build(plan))
        await asyncio.sleep(0.05)  # somewhere in the middle of the build
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert _leftovers(plan.prefix) == []
        else:  # the machine was fast enough to finish: still a valid lab
            assert (await status(plan.prefix)).exists
    finally:
        await teardown(plan.prefix)
    assert _leftovers(plan.prefix) == []
