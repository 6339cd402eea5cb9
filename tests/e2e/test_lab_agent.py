"""The pod agent end to end: the lab with real OpenVPN servers and clients, 2 pods, a load
balancer, a backend service, real iptables/ipset, and the control plane.

One lab per module (building it takes seconds); every test leaves it as it found it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.polling import until
from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser
from vpnfleet.lab.topology import alive

pytestmark = [pytest.mark.e2e]

USERS = (
    LabUser("alice", "nat"),
    LabUser("bob", "nat"),
    LabUser("gary", "gateway"),
    LabUser("dora", "nat"),  # disabled before connecting
    LabUser("rita", "nat"),  # certificate revoked before connecting
    LabUser("carl", "nat"),  # disabled while connected
    LabUser("kim", "nat"),  # session kill
    LabUser("nora", "nat"),  # connects while the control plane is down
    LabUser("rena", "nat"),  # re-enabled just after a control-plane restart
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS) as info:
        await asyncio.gather(*(runner.start_client(info, u) for u in ("alice", "bob", "gary")))
        yield info


async def fetch(info: LabInfo, user: str, path: str = "/") -> dict[str, Any]:
    """GET the backend service from inside the user's namespace (through their tunnel)."""
    url = f"{info.service}{path}"
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    )
    res = await topology.run_in(info.plan.client_ns(user), sys.executable, "-c", code, timeout=20)
    return dict(json.loads(res.stdout))


def sessions(info: LabInfo, **params: str) -> list[dict[str, Any]]:
    with info.client() as c:
        return list(c.get("/api/v1/sessions", params={"active": "true", **params}).json())


def api(info: LabInfo, method: str, path: str, body: Any = None) -> Any:
    with info.client() as c:
        resp = c.request(method, path, json=body)
        assert resp.status_code < 400, resp.text
        return resp.json() if resp.content else None


async def _not(value: Any) -> bool:
    return not await value


async def ipset_members(info: LabInfo, pod: str, name: str = "vpnf-clients") -> set[str]:
    res = await topology.run_in(info.plan.ns(pod), "ipset", "list", name, check=False)
    if res.returncode != 0:
        return set()
    lines = res.stdout.split("Members:\n", 1)[-1].split()
    return set(lines)


def client_log(info: LabInfo, user: str) -> str:
    path = info.dir / "clients" / f"{user}.log"
    return path.read_text(errors="replace") if path.exists() else ""


async def client_running(info: LabInfo, user: str) -> bool:
    return bool(await runner.client_pids(info, user))


@pytest.mark.asyncio(loop_scope="module")
async def test_nat_users_reach_the_service_as_their_pod(lab: LabInfo) -> None:
    for user in ("alice", "bob"):
        seen = await fetch(lab, user)
        (session,) = sessions(lab, user=user)
        pod_index = int(session["pod"].removeprefix("pod"))
        assert seen["remote_addr"] == str(lab.plan.pod_ip(pod_index))
        assert session["mode"] == "nat" and session["real_ip"] == str(lab.plan.client_ip(user))


@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_user_keeps_its_address_and_is_reachable_back(lab: LabInfo) -> None:
    (session,) = sessions(lab, user="gary")
    tunnel_ip = session["tunnel_ip"]
    assert tunnel_ip == api(lab, "GET", "/api/v1/users/gary")["gateway_address"]
    seen = await fetch(lab, "gary")
    assert seen["remote_addr"] == tunnel_ip
    # The backend opens a new TCP connection to the laptop: a listener in gary's namespace.
    got = lab.dir / "gary-listener.txt"
    listener = topology.spawn_in(
        lab.plan.client_ns("gary"),
        sys.executable,
        "-c",
        "import socket,sys;s=socket.create_server(('0.0.0.0',7070));s.settimeout(20);"
        "c,a=s.accept();c.settimeout(5);"
        f"open({str(got)!r},'w').write(a[0]+' '+c.recv(100).decode())",
        log_path=lab.dir / "gary-listener.log",
    )
    try:
        await asyncio.sleep(0.5)
        result = await fetch(lab, "gary", "/connect-back?port=7070")
        assert result.get("ok") is True, result
        text = await until(lambda: got.exists() and got.read_text(), 10, "the connect-back")
        assert text.startswith(str(lab.plan.svc_ip)) and "hello from backend" in text
    finally:
        await listener.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_disabled_user_is_refused_with_the_reason_in_the_client_log(lab: LabInfo) -> None:
    api(lab, "POST", "/api/v1/users/dora/disable")
    await runner.start_client(lab, "dora", wait=False)
    await until(
        lambda: "AUTH_FAILED,account disabled" in client_log(lab, "dora"), 20, "AUTH_FAILED"
    )
    assert await runner.client_address(lab, "dora") is None
    assert sessions(lab, user="dora") == []
    await runner.stop_client(lab, "dora")


@pytest.mark.asyncio(loop_scope="module")
async def test_revoked_certificate_is_refused(lab: LabInfo) -> None:
    api(lab, "POST", "/api/v1/users/rita/revoke", {"reason": "laptop stolen"})
    await asyncio.sleep(2)  # the CRL reaches every pod through the watch stream
    await runner.start_client(lab, "rita", wait=False)
    try:
        await until(
            lambda: "AUTH_FAILED,certificate revoked or replaced" in client_log(lab, "rita"),
            20,
            "the refusal in rita's client log",
        )
        assert await runner.client_address(lab, "rita") is None
        assert sessions(lab, user="rita") == []
    finally:
        await runner.stop_client(lab, "rita")


@pytest.mark.asyncio(loop_scope="module")
async def test_user_disabled_while_connected_is_cut_within_two_seconds(lab: LabInfo) -> None:
    await runner.start_client(lab, "carl")
    # The tunnel is up before the agent's report of the session reaches the control plane.
    (session,) = await until(lambda: sessions(lab, user="carl"), 10, "carl's session")
    pod, tunnel_ip = session["pod"], session["tunnel_ip"]
    assert tunnel_ip in await ipset_members(lab, pod)
    started = time.monotonic()
    api(lab, "POST", "/api/v1/users/carl/disable")

    async def cut() -> bool:
        halted = "Halt command was pushed by server" in client_log(lab, "carl")
        return halted and tunnel_ip not in await ipset_members(lab, pod)

    await until(cut, 2.0, "carl to be told to halt and removed from the firewall")
    assert time.monotonic() - started < 2.0
    # No traffic passes any more, and the client gives up for good (no reconnect).
    with pytest.raises(topology.LabCommandError):
        await fetch(lab, "carl")
    await until(lambda: _not(client_running(lab, "carl")), 5, "carl's client to exit")
    await until(lambda: sessions(lab, user="carl") == [], 5, "carl's session to close")


@pytest.mark.asyncio(loop_scope="module")
async def test_session_kill(lab: LabInfo) -> None:
    await runner.start_client(lab, "kim")
    await until(lambda: sessions(lab, user="kim"), 10, "kim's session")
    assert len(sessions(lab, user="kim")) == 1
    out = api(lab, "POST", "/api/v1/users/kim/kill")
    assert out["sessions"] == 1
    # What kim notices: the server tells the client to stop, within 2 s of the call.
    await until(
        lambda: "Halt command was pushed by server" in client_log(lab, "kim"), 2.0, "kim's halt"
    )
    await until(lambda: sessions(lab, user="kim") == [], 5.0, "kim's session to close")
    await until(lambda: _not(client_running(lab, "kim")), 5, "kim's client to exit")


async def agent_pid(info: LabInfo, pod: str) -> int | None:
    for pid in await _pids(info.plan.ns(pod)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # noqa: ASYNC240
        except OSError:
            continue
        if b"agent" in cmd and any(b"vpnfleet" in part for part in cmd):
            return pid
    return None


async def _pids(ns: str) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", ns, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [int(x) for x in out.split()]


@pytest.mark.asyncio(loop_scope="module")
async def test_agent_killed_and_restarted_converges(lab: LabInfo) -> None:
    live = {s["user"]: s for s in sessions(lab)}
    pod = live["alice"]["pod"]
    index = int(pod.removeprefix("pod"))
    pid = await agent_pid(lab, pod)
    assert pid is not None
    os.kill(pid, 9)
    await until(lambda: not alive(pid), 5, "the agent to die")
    # While the agent is dead, alice disconnects: the DISCONNECT event is lost.
    await runner.stop_client(lab, "alice")
    # OpenVPN drops the instance after its exit notification delay (5 s), with no one listening.
    await asyncio.sleep(7)
    others = {u for u, s in live.items() if s["pod"] == pod and u != "alice"}
    await runner.start_agent(lab, index)

    async def converged() -> bool:
        users_here = {s["user"] for s in sessions(lab, pod=pod)}
        members = await ipset_members(lab, pod)
        wanted = {s["tunnel_ip"] for s in sessions(lab, pod=pod)}
        return users_here == others and members == wanted

    await until(converged, 20, f"{pod} to converge after the restart")
    # Sessions that stayed up kept their identity (no close/reopen churn).
    for user in others:
        (again,) = sessions(lab, user=user)
        assert again["id"] == live[user]["id"]
    with lab.client() as c:
        ended = c.get("/api/v1/sessions", params={"user": "alice", "active": "false"}).json()
    assert ended[0]["id"] == live["alice"]["id"] and "reconciled" in ended[0]["end_reason"]
    # Alice can connect again and is served.
    await runner.start_client(lab, "alice")
    assert (await fetch(lab, "alice"))["remote_addr"] in {str(ip) for ip in lab.plan.pod_ips}


async def ns_processes(info: LabInfo, node: str, needle: bytes) -> list[int]:
    found = []
    for pid in await _pids(info.plan.ns(node)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()  # noqa: ASYNC240
        except OSError:
            continue
        if needle in cmd and alive(pid):
            found.append(pid)
    return found


@pytest.mark.asyncio(loop_scope="module")
async def test_control_plane_outage_decides_from_cache_and_delivers_later(lab: LabInfo) -> None:
    for pid in await ns_processes(lab, "cp", b"server"):
        os.kill(pid, 9)
    await until(lambda: _not(_cp_up(lab)), 5, "the control plane to be down")
    # nora connects while nobody can ask the control plane: decided from the agent's replica.
    await runner.start_client(lab, "nora")
    assert (await fetch(lab, "nora"))["remote_addr"] in {str(ip) for ip in lab.plan.pod_ips}
    await runner.start_control_plane(lab)
    # The spooled session record arrives, exactly once.
    live = await until(lambda: sessions(lab, user="nora"), 20, "nora's spooled session")
    assert len(live) == 1
    with lab.client() as c:
        everything = c.get("/api/v1/sessions", params={"user": "nora"}).json()
    assert len(everything) == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_control_plane_restart_is_quick_quiet_and_refuses_no_one(lab: LabInfo) -> None:
    """SIGTERM the control plane while both pods and gateway-routes follow its watch stream:
    it exits at once without an error; rena, re-enabled as soon as it is back, connects at once
    with the stock client (which gives up for good on a refusal)."""
    api(lab, "POST", "/api/v1/users/rena/disable")
    log = lab.dir / "cp.log"
    mark = len(log.read_text())
    pids = await ns_processes(lab, "cp", b"server")
    assert pids
    started = time.monotonic()
    for pid in pids:
        os.kill(pid, 15)
    await until(lambda: not any(alive(p) for p in pids), 10, "the control plane to exit")
    took = time.monotonic() - started
    stopping = log.read_text()[mark:].splitlines()
    records = [json.loads(line) for line in stopping if line.startswith("{")]
    assert records and [r for r in records if r["level"] in ("error", "critical")] == []
    assert not [line for line in stopping if not line.startswith("{")]  # no bare traceback
    assert took < 2.5, f"the control plane took {took:.2f}s to stop"
    await runner.start_control_plane(lab)
    api(lab, "POST", "/api/v1/users/rena/enable")
    await runner.start_client(lab, "rena")  # raises if she gets no address (AUTH_FAILED)
    assert (await fetch(lab, "rena"))["remote_addr"] in {str(ip) for ip in lab.plan.pod_ips}
    await runner.stop_client(lab, "rena")
    await until(lambda: not sessions(lab, user="rena"), 20, "rena's session to close")


async def _cp_up(info: LabInfo) -> bool:
    import httpx

    from vpnfleet.tlspin import pinned_context

    try:
        async with httpx.AsyncClient(timeout=1, verify=pinned_context(info.ca_file)) as http:
            return (await http.get(f"{info.url}/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.asyncio(loop_scope="module")
async def test_sigterm_drains_clients_to_the_other_pod(lab: LabInfo) -> None:
    live = sessions(lab)
    by_pod: dict[str, list[str]] = {}
    for s in live:
        by_pod.setdefault(s["pod"], []).append(s["user"])
    pod = max(by_pod, key=lambda p: len(by_pod[p]))
    moved = set(by_pod[pod])
    pid = await agent_pid(lab, pod)
    assert pid is not None
    logs = {u: lab.dir / "clients" / f"{u}.log" for u in moved}
    sizes = {u: path.stat().st_size for u, path in logs.items()}
    t0 = time.monotonic()
    os.kill(pid, 15)
    # Its users are told to reconnect (RESTART through the balancer's translation, which a
    # draining pod keeps until it has told them) and land on the remaining pod. Well before
    # the clients' own 60 s ping-restart: that alone brought them back before the fix, as it
    # does after a crash.
    await until(
        lambda: {s["user"] for s in sessions(lab) if s["pod"] != pod} >= moved,
        30,
        "the drained users to reconnect elsewhere",
    )
    back = time.monotonic() - t0
    print(f"\n{len(moved)} drained user(s) back on another pod {back:.1f} s after SIGTERM")
    assert back < 30, back
    await until(lambda: not alive(pid), 20, "the agent to drain and exit")
    for user, path in logs.items():
        with path.open() as f:  # what the client logged since the SIGTERM
            f.seek(sizes[user])
            since = f.read()
        assert "[soft,ping-restart]" not in since, since[-2000:]  # not the ping timeout
        assert "Incoming packet rejected" not in since, since[-2000:]  # the RESTART got there
        assert "[soft,server-pushed-connection-reset]" in since, since[-2000:]
    assert not [s for s in sessions(lab) if s["pod"] == pod]
    with lab.client() as c:
        ended = c.get("/api/v1/sessions", params={"pod": pod, "active": "false"}).json()
    assert {s["user"] for s in ended} >= moved
    pods = {p["name"]: p for p in api(lab, "GET", "/api/v1/pods")}
    assert pods[pod]["ready"] is False
    # Nothing of ours is left in the drained pod's firewall.
    res = await topology.run_in(lab.plan.ns(pod), "ipset", "list", "-n")
    assert not [n for n in res.stdout.split() if n.startswith("vpnf")]


def test_demo_cli_uses_the_token_file_at_the_lab_url_only(lab: LabInfo) -> None:
    """scripts/demo.sh exports VPNFLEET_URL and VPNFLEET_TOKEN_FILE only: the control plane
    bound its token file to the lab's https URL and named its CA beside it, so that works; the
    token is not sent to another server (the lab's backend service here)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(VPNFLEET_TOKEN_FILE=str(lab.dir / "cp" / "admin-token"), COLUMNS="200")
    cmd = [sys.executable, "-m", "vpnfleet.cli.main", "pod", "list", "--json"]
    assert lab.url.startswith("https://")
    ok = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**env, "VPNFLEET_URL": lab.url}
    )
    assert ok.returncode == 0, ok.stderr
    assert {p["name"] for p in json.loads(ok.stdout)} >= {"pod1", "pod2"}
    other = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**env, "VPNFLEET_URL": lab.service}
    )
    assert other.returncode == 1 and f"not {lab.service}" in other.stderr
