"""Dynamic group permissions end to end: real OpenVPN, 2 pods, real iptables/ipset/conntrack.

Two users outside the lab's allow-all group get only what their own groups grant; changes
made through the API reach both pods without any reconnect, and revocation cuts open flows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import agent_pid, alive, api, client_running, sessions, until
from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e]

USERS = (LabUser("pa", "nat", lab_access=False), LabUser("pb", "gateway", lab_access=False))
SVC = str(topology.CLUSTER_NET.network_address + 100)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vp") as info:
        api(info, "POST", "/api/v1/groups", {"name": "web"})
        api(info, "POST", "/api/v1/groups", {"name": "ops"})
        api(
            info,
            "POST",
            "/api/v1/rules",
            {"group": "web", "destination": SVC, "proto": "tcp", "ports": "8080"},
        )
        api(info, "POST", "/api/v1/rules", {"group": "ops", "destination": SVC, "proto": "any"})
        api(info, "POST", "/api/v1/groups/web/members", {"user": "pa"})
        api(info, "POST", "/api/v1/groups/ops/members", {"user": "pb"})
        await asyncio.gather(runner.start_client(info, "pa"), runner.start_client(info, "pb"))
        yield info


PROBE = r"""
import json, socket, sys, urllib.request
kind, port = sys.argv[1], int(sys.argv[2])
try:
    if kind == "http":
        body = urllib.request.urlopen(f"http://{sys.argv[3]}:{port}/", timeout=1.5).read()
        print(json.dumps({"ok": True, "seen": json.loads(body)}))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
        s.sendto(b"x", (sys.argv[3], port))
        print(json.dumps({"ok": True, "seen": s.recv(100).decode()}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""


async def probe(info: LabInfo, user: str, kind: str, port: int) -> bool:
    res = await topology.run_in(
        info.plan.client_ns(user), sys.executable, "-c", PROBE, kind, str(port), SVC, timeout=10
    )
    return bool(json.loads(res.stdout)["ok"])


async def set_members(info: LabInfo, group_id: int) -> dict[str, set[str]]:
    out = {}
    for i in range(1, info.pods + 1):
        res = await topology.run_in(
            info.plan.pod_ns(i), "ipset", "list", f"vpnf-g{group_id}-m", check=False
        )
        out[f"pod{i}"] = (
            set(res.stdout.split("Members:\n", 1)[-1].split()) if res.returncode == 0 else set()
        )
    return out


def group_id(info: LabInfo, name: str) -> int:
    return int(api(info, "GET", f"/api/v1/groups/{name}")["id"])


@pytest.mark.asyncio(loop_scope="module")
async def test_users_see_exactly_their_grants(lab: LabInfo) -> None:
    assert await probe(lab, "pa", "http", 8080)
    assert not await probe(lab, "pa", "http", 9090)  # another port, not granted
    assert not await probe(lab, "pa", "udp", 8081)  # another protocol, not granted
    assert await probe(lab, "pb", "http", 8080)
    assert await probe(lab, "pb", "http", 9090)
    assert await probe(lab, "pb", "udp", 8081)
    # The refused attempts are in the audit trail, attributed to pa.
    denied = await until(
        lambda: [d for d in api(lab, "GET", "/api/v1/audit/denied?user=pa") if d["dport"] == 9090],
        15,
        "pa's denied attempt to reach port 9090 in the audit trail",
    )
    assert denied[0]["dst"] == SVC and denied[0]["proto"] == "tcp" and denied[0]["count"] >= 1


@pytest.mark.asyncio(loop_scope="module")
async def test_grant_and_revoke_through_the_api_reach_both_pods_without_reconnect(
    lab: LabInfo,
) -> None:
    pids = {u: sorted(await runner.client_pids(lab, u)) for u in ("pa", "pb")}
    rule = api(
        lab,
        "POST",
        "/api/v1/rules",
        {"group": "web", "destination": SVC, "proto": "tcp", "ports": "9090"},
    )
    granted = time.monotonic()
    await until(lambda: probe(lab, "pa", "http", 9090), 5, "the new grant to work")
    took = time.monotonic() - granted
    # Both pods carry the grant (the other pod has no member of web yet, but the rule set).
    for i in range(1, lab.pods + 1):
        res = await topology.run_in(
            lab.plan.pod_ns(i), "ipset", "list", f"vpnf-g{group_id(lab, 'web')}-d"
        )
        assert f"{SVC},tcp:9090" in res.stdout
    api(lab, "DELETE", f"/api/v1/rules/{rule['id']}")
    await until(lambda: _false(probe(lab, "pa", "http", 9090)), 5, "the revoke to work")
    assert await probe(lab, "pa", "http", 8080)
    assert {u: sorted(await runner.client_pids(lab, u)) for u in ("pa", "pb")} == pids
    assert took < 5


async def _false(value: Any) -> bool:
    return not await value


# A line every 100 ms through one TCP connection, each answered by the echo server. A stall
# ends it, unless a third argument says "patient": then it keeps the connection and tries
# again, so a connection merely paused (packets dropped for a while) shows "ok" again once
# traffic passes, while one cut from conntrack never does.
STREAM = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
patient = sys.argv[3:] == ["patient"]
s.settimeout(1.0)
deadline = time.monotonic() + (60 if patient else 30)
while time.monotonic() < deadline:
    try:
        s.sendall(b"ping\n")
        data = s.recv(100)
        if not data:
            print("closed", time.time(), flush=True); break
        print("ok", time.time(), flush=True)
    except socket.timeout:
        print("stalled", time.time(), flush=True)
        if not patient: break
    except OSError as exc:
        print("closed" if patient else "stalled", time.time(), type(exc).__name__, flush=True)
        break
    time.sleep(0.1)
"""

ECHO_LINES = (
    "import socketserver\n"
    "class H(socketserver.StreamRequestHandler):\n"
    "    def handle(self):\n"
    "        for line in self.rfile: self.wfile.write(line)\n"
    "socketserver.ThreadingTCPServer.allow_reuse_address = True\n"
    "socketserver.ThreadingTCPServer(('0.0.0.0', 7000), H).serve_forever()\n"
)


@pytest.mark.asyncio(loop_scope="module")
async def test_revoking_access_cuts_an_open_tcp_stream(lab: LabInfo) -> None:
    server = topology.spawn_in(
        lab.plan.ns("svc"), sys.executable, "-c", ECHO_LINES, log_path=lab.dir / "stream-server.log"
    )
    rule = api(
        lab,
        "POST",
        "/api/v1/rules",
        {"group": "web", "destination": SVC, "proto": "tcp", "ports": "7000"},
    )
    out = lab.dir / "stream.log"
    try:
        await asyncio.sleep(1.0)
        stream = topology.spawn_in(
            lab.plan.client_ns("pa"), sys.executable, "-u", "-c", STREAM, SVC, "7000", log_path=out
        )
        await until(lambda: out.exists() and out.read_text().count("ok") >= 5, 10, "the stream")
        revoked = time.time()
        api(lab, "DELETE", f"/api/v1/rules/{rule['id']}")
        text = await until(
            lambda: (
                out.exists()
                and ("stalled" in out.read_text() or "closed" in out.read_text())
                and out.read_text()
            ),
            10,
            "the stream to stop",
        )
        oks = [float(line.split()[1]) for line in text.splitlines() if line.startswith("ok")]
        # The last successful round trip is within a second of the revoke.
        assert oks[-1] - revoked < 1.0, (oks[-1] - revoked, text)
        await stream.stop()
    finally:
        await server.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_membership_change_applies_live_and_survives_agent_kill(lab: LabInfo) -> None:
    (session,) = sessions(lab, user="pa")
    pod = session["pod"]
    index = int(pod.removeprefix("pod"))
    ops = group_id(lab, "ops")
    pid = await agent_pid(lab, pod)
    assert pid is not None
    # Kill the agent right as the change is made: the restart must converge on its own.
    api(lab, "POST", "/api/v1/groups/ops/members", {"user": "pa"})
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not alive(pid), 5, "the agent to die")
    await runner.start_agent(lab, index)
    await until(
        lambda: _has(set_members(lab, ops), pod, session["tunnel_ip"]), 20, "pa in ops on its pod"
    )
    assert await probe(lab, "pa", "http", 9090)  # ops grants everything on the service
    api(lab, "DELETE", "/api/v1/groups/ops/members/pa")
    await until(lambda: _false(probe(lab, "pa", "http", 9090)), 5, "the removal to apply")
    assert await client_running(lab, "pa")


async def _has(members: Any, pod: str, ip: str) -> bool:
    return ip in (await members)[pod]


@pytest.mark.asyncio(loop_scope="module")
async def test_hand_deleted_ipset_is_repaired(lab: LabInfo) -> None:
    (session,) = sessions(lab, user="pb")
    ns = lab.plan.ns(session["pod"])
    ops = group_id(lab, "ops")
    # Someone flushes our chain and destroys a set: traffic from the tunnel stops being
    # filtered correctly until the agent notices and repairs it.
    await topology.run_in(ns, "iptables", "-F", "VPNF-FWD")
    await topology.run_in(ns, "ipset", "destroy", f"vpnf-g{ops}-m")
    await until(
        lambda: _has(set_members(lab, ops), session["pod"], session["tunnel_ip"]),
        15,
        "the set to be recreated with pb in it",
    )
    assert await probe(lab, "pb", "http", 9090)
    assert not await probe(lab, "pa", "http", 9090)
    log_text = (lab.dir / f"{session['pod']}.log").read_text()
    assert "firewall drift repaired" in log_text
