"""The whole pod agent against a real control plane, with its runners replaced by fakes.

A real control plane (uvicorn on loopback, SQLite and PostgreSQL) and a real PodAgent — view
follower, client handler, firewall sync, shippers, heartbeat, probes — with the firewall, the
OpenVPN management session and the openvpn process swapped for the in-memory fakes of
``vpnfleet.agent.fakes`` (the real ones are exercised by tests/e2e). What is checked is what a
user or an operator would notice: which grants a connected client gets, whether changes reach
connected clients, who gets disconnected, and what the pod reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import polling
from tests.conftest import Server, free_port
from vpnfleet.agent.fakes import FakeFirewall, FakeManagement, FakeProcess
from vpnfleet.agent.pod import PodAgent
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.statedir import StateDir
from vpnfleet.agent.sysctls import Shortfall, SysctlsMissing
from vpnfleet.core import fwstate, revocation

SVC = ipaddress.IPv4Address("10.20.0.5")


async def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    return await polling.until(check, seconds, what, every=0.02)


class Pod:
    """One agent process's worth of parts, with fake runners that outlive it (like OpenVPN
    and the kernel outlive a killed agent)."""

    def __init__(self, server: Server, token: str, state: Path) -> None:
        self.server = server
        self.token = token
        self.state = state
        self.firewall = FakeFirewall()
        # One OpenVPN server per protocol, as a pod runs them (TCP is on by default).
        self.mgmts = {"udp": FakeManagement(), "tcp": FakeManagement()}
        self.processes = {"udp": FakeProcess(), "tcp": FakeProcess()}
        self.agent: PodAgent | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def mgmt(self) -> FakeManagement:
        """The UDP server's management session."""
        return self.mgmts["udp"]

    def settings(self) -> AgentSettings:
        return AgentSettings(
            server=self.server.url,
            token=self.token,
            name="pod1",
            state_dir=self.state,
            http=f"127.0.0.1:{free_port()}",
            user_metrics_listen=f"127.0.0.1:{free_port()}",
            heartbeat_interval=0.2,
            reconcile_interval=0.5,
            flow_audit=False,
            denied_audit=False,
            drain_delay=0.1,
            drain_timeout=1,
        )

    async def start(self, *, adopt: bool = False, slow: str | None = None) -> PodAgent:
        """``slow``: that server's management socket answers a second late."""
        if adopt:
            # openvpn kept running: the next agent finds its pid and socket, and attaches anew.
            for n, server in enumerate(self.mgmts):
                self.processes[server] = FakeProcess(recorded=4242 + n)
                self.mgmts[server] = self.mgmts[server].reopen()
                StateDir(self.state).server(server).mgmt_socket.touch()
        mgmts = dict(self.mgmts)

        async def connect(server: str) -> FakeManagement:
            if server == slow:
                await asyncio.sleep(1.0)
            return mgmts[server]

        agent = PodAgent(
            self.settings(),
            firewall=self.firewall,
            process=lambda server: self.processes[server],
            connect=connect,
        )
        self.agent = agent
        self.task = asyncio.create_task(agent.run())
        await until(lambda: agent.ready()[0], 20, "the agent to be ready")
        return agent

    async def crash(self) -> None:
        """kill -9: the agent's tasks stop, OpenVPN and the kernel keep their state."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    async def join(self, user: str, ip: str = "198.51.100.7", server: str = "udp") -> int:
        mgmt = self.mgmts[server]
        cid = mgmt.connect(user, real_ip=ip, serial=self.serial(user))
        await until(lambda: mgmt.answers_for(cid), 5, f"{user}'s CONNECT to be answered")
        mgmt.establish(cid)
        assert self.agent is not None and self.agent.clients is not None
        await until(
            lambda: any(c.key == (server, cid) for c in self.agent.clients.established()),
            5,
            "ESTABLISHED",
        )
        return cid

    def serial(self, user: str) -> str:
        with self.server.client() as c:
            cert = c.get(f"/api/v1/users/{user}").json()["certificate"]
            return str(int(cert["serial"]))

    def address(self, cid: int, server: str = "udp") -> ipaddress.IPv4Address:
        addr = self.mgmts[server].address_of(cid)
        assert addr is not None
        return addr

    def kernel(self) -> fwstate.DesiredState:
        assert self.firewall.kernel is not None
        return self.firewall.kernel

    def allowed(self, cid: int, dport: int, proto: str = "tcp", server: str = "udp") -> bool:
        return fwstate.is_allowed(self.kernel(), self.address(cid, server), proto, SVC, dport)

    async def stop(self) -> None:
        if self.task is not None and self.agent is not None:
            self.agent.request_stop()
            await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def pod(server: Server, tmp_path: Path) -> AsyncIterator[Pod]:
    p = Pod(server, server.make_token("agent"), tmp_path / "pod1")
    try:
        yield p
    finally:
        await p.stop()


def api(server: Server, method: str, path: str, body: Any = None) -> Any:
    with server.client() as c:
        r = c.request(method, path, json=body)
        assert r.status_code < 400, r.text
        return r.json() if r.content else None


def setup_policy(server: Server) -> None:
    api(server, "POST", "/api/v1/users", {"name": "pa", "email": "pa@example.com"})
    api(
        server,
        "POST",
        "/api/v1/users",
        {"name": "pb", "email": "pb@example.com", "max_sessions": 1},
    )
    api(server, "POST", "/api/v1/groups", {"name": "web"})
    api(server, "POST", "/api/v1/groups", {"name": "ops"})
    api(
        server,
        "POST",
        "/api/v1/rules",
        {"group": "web", "destination": str(SVC), "proto": "tcp", "ports": "8080"},
    )
    api(
        server,
        "POST",
        "/api/v1/rules",
        {"group": "ops", "destination": "10.20.0.0/24", "proto": "any"},
    )
    api(server, "POST", "/api/v1/groups/web/members", {"user": "pa"})


async def test_a_port_limited_grant_reaches_a_connected_client_port_limited(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    await pod.start()
    pa = await pod.join("pa")
    await until(lambda: pod.allowed(pa, 8080), 5, "pa's grant in the firewall")
    assert not pod.allowed(pa, 22) and not pod.allowed(pa, 8081)
    assert not pod.allowed(pa, 8080, "udp")
    # A later port-limited rule arrives through the watch stream, still port-limited.
    api(
        server,
        "POST",
        "/api/v1/rules",
        {"group": "web", "destination": str(SVC), "proto": "tcp", "ports": "9000-9001"},
    )
    await until(lambda: pod.allowed(pa, 9001), 5, "the new rule")
    assert not pod.allowed(pa, 9002) and not pod.allowed(pa, 22)


async def test_a_pod_without_its_kernel_settings_stops_before_registering(
    server: Server, pod: Pod
) -> None:
    # The fake stands for a read-only /proc/sys (tests/e2e/test_container.py has the real one).
    pod.firewall.missing_sysctls = [
        Shortfall("net.netfilter.nf_conntrack_acct", "1", "0"),
        Shortfall("net.netfilter.nf_conntrack_timestamp", "1", "0"),
    ]
    agent = PodAgent(
        pod.settings(), firewall=pod.firewall, process=lambda server: pod.processes[server]
    )
    with pytest.raises(SysctlsMissing) as err:
        await asyncio.wait_for(agent.run(), 20)
    assert "net.netfilter.nf_conntrack_acct=1 (is 0)" in str(err.value)
    assert "--sysctl net.netfilter.nf_conntrack_timestamp=1" in str(err.value)
    # Nothing reached the control plane and nothing was started.
    assert api(server, "GET", "/api/v1/pods") == []
    assert not any(p.running for p in pod.processes.values()) and pod.firewall.applies == []


async def test_membership_changes_reach_connected_clients_and_cut_their_flows(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    await pod.start()
    pa = await pod.join("pa")
    await until(lambda: pod.allowed(pa, 8080), 5, "web's grant")
    assert not pod.allowed(pa, 22)
    api(server, "POST", "/api/v1/groups/ops/members", {"user": "pa"})
    await until(lambda: pod.allowed(pa, 22), 5, "ops' grant without reconnecting")
    pod.firewall.flows = [
        revocation.Flow("tcp", 6, pod.address(pa), SVC, 40000, 22),
        revocation.Flow("tcp", 6, pod.address(pa), SVC, 40001, 8080),
    ]
    api(server, "DELETE", "/api/v1/groups/ops/members/pa")
    await until(lambda: not pod.allowed(pa, 22), 5, "ops' grant to go")
    await until(lambda: len(pod.firewall.flows) == 1, 5, "the ssh connection to be cut")
    assert pod.firewall.flows[0].dport == 8080  # still granted by web: kept
    assert [a[0] for a in pod.mgmt.answers_for(pa)] == ["auth"]  # never disconnected


async def test_the_same_device_reconnecting_replaces_its_session(server: Server, pod: Pod) -> None:
    setup_policy(server)
    await pod.start()
    first = await pod.join("pb")
    second = await pod.join("pb")  # same public address; max_sessions 1
    assert ("kill", first, "HALT") in pod.mgmt.answers
    assert [a[0] for a in pod.mgmt.answers_for(second)] == ["auth"]
    other = pod.mgmt.connect("pb", real_ip="192.0.2.99", serial=pod.serial("pb"))
    await until(lambda: pod.mgmt.answers_for(other), 5, "the other device's answer")
    (answer,) = pod.mgmt.answers_for(other)
    assert (answer[0], answer[3]) == ("deny", "session limit reached (1)")


async def test_the_heartbeat_reports_a_revision_only_once_it_is_in_the_kernel(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    agent = await pod.start()
    await pod.join("pa")

    def reported() -> int:
        pods = api(server, "GET", "/api/v1/pods")
        return int(pods[0]["applied_revision"])

    head = api(server, "GET", "/api/v1/revision")["revision"]
    # ">=": pa's session record, shipped by the agent, is a change of its own.
    await until(lambda: reported() >= head, 5, "the pod to report the head")
    pod.firewall.gate = asyncio.Event()
    api(server, "POST", "/api/v1/groups/ops/members", {"user": "pa"})
    new_head = api(server, "GET", "/api/v1/revision")["revision"]
    await asyncio.wait_for(pod.firewall.entered.wait(), 5)
    await until(lambda: agent.view.revision >= new_head, 5, "the agent to learn the change")
    await asyncio.sleep(0.6)  # a few heartbeats
    assert reported() < new_head
    pod.firewall.gate.set()
    pod.firewall.gate = None
    await until(lambda: reported() >= new_head, 5, "the pod to report the new head")


async def test_a_kill_made_while_the_agent_is_down_ends_the_session_once_it_is_back(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    await pod.start()
    pa = await pod.join("pa")
    await until(
        lambda: api(server, "GET", "/api/v1/sessions?user=pa&active=true"),
        5,
        "pa's session to be recorded",
    )
    await pod.crash()
    assert api(server, "POST", "/api/v1/users/pa/kill")["sessions"] == 1
    await pod.start(adopt=True)
    ready = time.monotonic()
    await until(lambda: ("kill", pa, "HALT") in pod.mgmt.answers, 2, "pa to be disconnected")
    assert time.monotonic() - ready < 2

    def ended() -> list[dict[str, Any]]:
        return list(api(server, "GET", "/api/v1/sessions?user=pa&active=false"))

    (session,) = await until(ended, 5, "pa's session to close")
    assert session["end_reason"] == "disconnected by an administrator"


async def test_a_revocation_made_while_the_agent_is_down_cuts_open_flows_at_restart(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    await pod.start()
    pa = await pod.join("pa")
    await until(lambda: pod.allowed(pa, 8080), 5, "web's grant")
    pod.firewall.flows = [revocation.Flow("tcp", 6, pod.address(pa), SVC, 40001, 8080)]
    await pod.crash()
    api(server, "DELETE", "/api/v1/groups/web/members/pa")
    await asyncio.sleep(0.3)
    assert pod.firewall.flows  # nothing enforced while the agent is down
    await pod.start(adopt=True)
    # The first apply after adopting the running clients is followed by a cut.
    assert pod.firewall.flows == []
    assert not pod.allowed(pa, 8080)
    # pa stays connected (only a grant was lost), adopted under its session.
    assert not any(a[0] == "kill" for a in pod.mgmt.answers)
    assert pod.agent is not None and pod.agent.clients is not None
    assert [c.cid for c in pod.agent.clients.established()] == [pa]


async def test_readings_report_the_running_parts(server: Server, pod: Pod) -> None:
    setup_policy(server)
    agent = await pod.start()
    await pod.join("pa")
    r = agent.readings()
    assert r.openvpn_ready and r.ready and [c.user for c in r.clients] == ["pa"]
    assert r.applied_state is pod.firewall.kernel
    assert r.openvpn_version is not None and "2.6" in r.openvpn_version
    async with httpx.AsyncClient() as http:
        host = agent.s.http
        ready = await http.get(f"http://{host}/readyz")
        metrics = await http.get(f"http://{host}/metrics")
    assert ready.status_code == 200 and ready.json()["config_applied"] is True
    assert 'openvpn_connections{server="pod1"} 1.0' in metrics.text


async def test_a_pod_back_after_its_lease_ran_out_disconnects_the_ended_sessions(
    server: Server, pod: Pod
) -> None:
    """The agent was away longer than the lease: the control plane closed its sessions (here
    at once, by a kill on a pod out of its lease), and the client that OpenVPN kept must not
    stay up unaccounted once the agent is back."""
    import datetime as dt

    from sqlalchemy import create_engine, update

    from vpnfleet.controlplane.models import Pod as PodRow

    setup_policy(server)
    await pod.start()
    pa = await pod.join("pa")
    await until(
        lambda: api(server, "GET", "/api/v1/sessions?user=pa&active=true"), 5, "pa's session"
    )
    await pod.crash()
    then = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
    engine = create_engine(server.database_url)
    with engine.begin() as conn:
        conn.execute(
            update(PodRow)
            .where(PodRow.name == "pod1")
            .values(last_heartbeat=then, registered_at=then)
        )
    engine.dispose()
    assert api(server, "POST", "/api/v1/users/pa/kill")["sessions"] == 1
    (ended,) = api(server, "GET", "/api/v1/sessions?user=pa&active=false")
    assert ended["end_reason"] == "disconnected by an administrator"  # closed at once
    await pod.start(adopt=True)
    await until(lambda: any(a[:2] == ("kill", pa) for a in pod.mgmt.answers), 5, "pa kicked")


async def test_a_revoked_pod_stops_its_agent(server: Server, pod: Pod) -> None:
    """`vpnfleet pod revoke`: the agent's next heartbeat is refused and the agent stops."""
    setup_policy(server)
    await pod.start()
    out = api(server, "POST", "/api/v1/pods/pod1/revoke")
    assert out["credentials"] == 1
    task = pod.task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 10)
    pod.task = None


async def test_a_group_stored_over_the_firewall_limit_does_not_block_the_pod(
    server: Server, pod: Pod, caplog: pytest.LogCaptureFixture
) -> None:
    # The reproducer as an older release stored it (the API now refuses it): "web"
    # holds 17 x "tcp 2-65535". Before, the agent never became ready and applied nothing.
    from sqlalchemy import create_engine
    from sqlalchemy import text as sql

    setup_policy(server)
    engine = create_engine(server.database_url)
    with engine.begin() as conn:
        gid = conn.execute(sql("SELECT id FROM groups WHERE name = 'web'")).scalar_one()
        for nn in range(17):
            conn.execute(
                sql(
                    "INSERT INTO rules (group_id, destination, proto, ports, created_at) "
                    "VALUES (:g, :d, 'tcp', '2-65535', CURRENT_TIMESTAMP)"
                ),
                {"g": gid, "d": f"10.1{nn:02d}.0.0/16"},
            )
    engine.dispose()
    agent = await pod.start()  # ready: the rest of the policy is enforced
    pa = await pod.join("pa")  # a member of web only
    assert not pod.allowed(pa, 8080)  # web grants nothing while it is over the limit
    errors = [r for r in caplog.records if getattr(r, "event", "") == "group_over_limit"]
    assert len(errors) == 1
    assert (
        errors[0]
        .getMessage()
        .startswith(
            "group 'web' needs 1,114,079 firewall set elements, 1,114,080 with all other groups "
            "(limit 1,048,576 on every pod)"
        )
    )

    def status() -> dict[str, Any]:
        return dict(api(server, "GET", "/api/v1/pods")[0]["status"])

    await until(lambda: status().get("groups_over_limit") == ["web"], 5, "the heartbeat")
    assert status()["groups_over_limit_count"] == 1
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://{agent.s.http}/metrics")).text
    assert "vpnfleet_firewall_groups_over_limit 1.0" in metrics
    # Later changes still apply: a membership, then narrowing web enforces it again.
    api(server, "POST", "/api/v1/groups/ops/members", {"user": "pa"})
    await until(lambda: pod.allowed(pa, 22), 5, "ops' grant")
    rules = api(server, "GET", "/api/v1/rules?group=web")
    for rule in rules:
        if rule["ports"] == "2-65535" and rule["destination"] != "10.100.0.0/16":
            api(server, "DELETE", f"/api/v1/rules/{rule['id']}")
    await until(lambda: pod.allowed(pa, 8080), 10, "web enforced again")
    await until(lambda: "groups_over_limit" not in status(), 5, "the heartbeat to clear")
    assert agent.metrics.groups_over_limit._value.get() == 0


# ------------------------------------------------------------------ UDP and TCP servers


async def test_udp_and_tcp_clients_share_limits_kills_and_the_drain(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    api(server, "POST", "/api/v1/users", {"name": "pc", "email": "pc@x.com", "max_sessions": 2})
    agent = await pod.start()
    udp, tcp = pod.mgmts["udp"], pod.mgmts["tcp"]
    # pb may hold one session: one on UDP leaves no room for another device on TCP.
    await pod.join("pb", ip="192.0.2.1", server="udp")
    other = tcp.connect("pb", real_ip="192.0.2.2", serial=pod.serial("pb"))
    await until(lambda: tcp.answers_for(other), 5, "the TCP CONNECT's answer")
    (answer,) = tcp.answers_for(other)
    assert (answer[0], answer[3]) == ("deny", "session limit reached (1)")
    # The same device falling back to TCP replaces its UDP session instead.
    first = next(c.cid for c in agent.clients.established() if c.user == "pb")  # type: ignore[union-attr]
    fallback = await pod.join("pb", ip="192.0.2.1", server="tcp")
    assert ("kill", first, "HALT") in udp.answers
    assert [a[0] for a in tcp.answers_for(fallback)] == ["auth"]
    # pc on both servers; OpenVPN's client ids repeat across them, the sessions do not.
    c_udp = await pod.join("pc", ip="192.0.2.3", server="udp")
    c_tcp = await pod.join("pc", ip="192.0.2.4", server="tcp")
    assert agent.clients is not None
    keys = sorted(c.key for c in agent.clients.established() if c.user == "pc")
    assert keys == [("tcp", c_tcp), ("udp", c_udp)]
    addresses = {str(pod.mgmts[s].address_of(cid)) for s, cid in keys}
    assert len(addresses) == 2  # the servers split the NAT pool
    r = agent.readings()
    assert r.connections_by_server == {"udp": 1, "tcp": 2}
    assert r.servers_ready == {"udp": True, "tcp": True} and r.openvpn_ready

    def active(user: str) -> list[dict[str, Any]]:
        return list(api(server, "GET", f"/api/v1/sessions?user={user}&active=true"))

    await until(lambda: len(active("pc")) == 2, 5, "pc's two sessions to be recorded")
    # One kill reaches the clients on both servers.
    assert api(server, "POST", "/api/v1/users/pc/kill")["sessions"] == 2
    await until(
        lambda: ("kill", c_udp, "HALT") in udp.answers and ("kill", c_tcp, "HALT") in tcp.answers,
        5,
        "pc's clients on both servers to be disconnected",
    )
    await until(lambda: not active("pc"), 5, "pc's sessions to close")
    # Drain: the remaining client (pb, on TCP) is moved, both openvpn processes stop.
    await pod.stop()
    assert ("kill", fallback, "RESTART") in tcp.answers
    assert pod.processes["udp"].stopped and pod.processes["tcp"].stopped


async def test_clients_of_both_servers_are_adopted_under_their_sessions(
    server: Server, pod: Pod
) -> None:
    setup_policy(server)
    api(server, "POST", "/api/v1/groups/ops/members", {"user": "pb"})
    await pod.start()
    a = await pod.join("pa", ip="192.0.2.1", server="udp")
    b = await pod.join("pb", ip="192.0.2.2", server="tcp")
    assert a == b  # both servers number their clients from the same start
    await until(lambda: pod.allowed(b, 22, server="tcp"), 5, "pb's address in the firewall")
    before = {c.key: c.uid for c in pod.agent.clients.established()}  # type: ignore[union-attr]
    # pb has an open connection through the TCP server while the agent is away.
    flow = revocation.Flow("tcp", 6, pod.address(b, "tcp"), SVC, 40001, 22)
    pod.firewall.flows = [flow]
    await pod.crash()
    # The TCP openvpn answers late: the first apply must still wait for its clients (an
    # apply without pb would lock it out and cut its connection).
    agent = await pod.start(adopt=True, slow="tcp")
    assert agent.clients is not None
    assert {c.key: c.uid for c in agent.clients.established()} == before
    assert not any(a[0] == "kill" for m in pod.mgmts.values() for a in m.answers)
    assert pod.firewall.flows == [flow] and pod.allowed(b, 22, server="tcp")
    # Several session reports later (every reconcile, 0.5 s here) both sessions are still live
    # at the control plane: a report sent before the slow server's clients were adopted used
    # to close pb's session, and pb was then disconnected.
    await asyncio.sleep(2.0)
    live = {s["user"] for s in api(server, "GET", "/api/v1/sessions?active=true")}
    assert live == {"pa", "pb"}, live
    assert {c.key for c in agent.clients.established()} == set(before)
