"""NAT audit end to end: the seed's scenario with real OpenVPN, conntrack and nginx.

Two NAT users share one pod and a third is on the other; they fetch pages from a real nginx
that logs ``$remote_addr:$remote_port`` (the pod's address, never the person). The agents'
flow listeners attribute every connection; ``vpnfleet audit annotate`` and ``audit who`` name
the person. The control plane is stopped during traffic, an agent is restarted cleanly
meanwhile, the control plane comes back: every flow still arrives, exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import (
    _cp_up,
    _not,
    agent_pid,
    alive,
    ns_processes,
    sessions,
    until,
)
from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e(tools=("nginx",))]

USERS = (LabUser("ann", "nat"), LabUser("ben", "nat"), LabUser("cal", "nat"))
LINE = re.compile(r"^(?P<ip>[\d.]+):(?P<port>\d+) - \S+ \[(?P<time>[^\]]+)\] \"GET (?P<path>\S+) ")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="va") as info:
        assert info.web is not None, "nginx is installed (the e2e marker checks), so the lab has it"
        await _place(info)
        yield info


async def _place(info: LabInfo) -> None:
    """Connect everyone; reconnect until two users share a pod and one is on the other
    (the load balancer spreads clients at random)."""
    await asyncio.gather(*(runner.start_client(info, u.name) for u in USERS))
    for _ in range(16):
        # Every tunnel is up; the agents' reports of the sessions may still be on the way.
        live = await until(lambda: _all_live(info), 10, "every user's session at the control plane")
        by_pod = collections.Counter(s["pod"] for s in live)
        if sorted(by_pod.values()) == [1, 2]:
            return
        crowded = by_pod.most_common(1)[0][0]
        user = next(s["user"] for s in live if s["pod"] == crowded)
        await runner.stop_client(info, user)
        await until(lambda u=user: sessions(info, user=u) == [], 10, f"{user} to leave")
        await runner.start_client(info, user)
    pytest.fail(f"could not get a 2+1 placement of the users: {sessions(info)}")


def _all_live(info: LabInfo) -> list[dict[str, Any]]:
    live = sessions(info)
    return live if len(live) == len(USERS) else []


async def browse(info: LabInfo, user: str, tag: str, pages: int) -> None:
    """``pages`` GETs from inside the user's namespace, one TCP connection each."""
    code = (
        "import urllib.request\n"
        f"for i in range({pages}):\n"
        f"    urllib.request.urlopen({info.web!r} + f'/{tag}/{user}/{{i}}', timeout=10).read()\n"
    )
    await topology.run_in(info.plan.client_ns(user), sys.executable, "-c", code, timeout=60)


async def udp_probe(info: LabInfo, user: str) -> tuple[str, int, str]:
    """One UDP datagram to the echo service; it answers with the address it saw."""
    host = info.service.split("//")[1].split(":")[0]
    code = (
        "import socket,datetime,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5)\n"
        f"s.sendto(b'who',({host!r},{runner.ECHO_UDP_PORT}))\n"
        "seen=s.recv(100).decode()\n"
        # When the server had it: between sending and this answer (as a server log would say).
        "t=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')\n"
        "sys.stdout.write(seen+' '+t)\n"
    )
    res = await topology.run_in(info.plan.client_ns(user), sys.executable, "-c", code, timeout=20)
    seen, at = res.stdout.split()
    ip, _, port = seen.rpartition(":")
    return ip, int(port), at


def vpnfleet(info: LabInfo, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, as an auditor would run it against the lab's control plane."""
    env = {**os.environ, **info.cli_env()}
    return subprocess.run(
        [sys.executable, "-m", "vpnfleet.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def access_lines(info: LabInfo) -> list[str]:
    return info.web_access_log.read_text().splitlines()


def web_flows(info: LabInfo) -> list[dict[str, Any]]:
    """Every flow the control plane has to the nginx backend."""
    with info.client() as c:
        flows = c.get("/api/v1/audit/flows", params={"dst": "10.99.0.100", "limit": 10000}).json()
    return [f for f in flows if f["dst_port"] == runner.nginx.NGINX_PORT and f["proto"] == "tcp"]


def who(info: LabInfo, ip: str, port: int, at: str, proto: str) -> dict[str, Any]:
    res = vpnfleet(info, "audit", "who", "--ip", ip, "--port", str(port), "--proto", proto,
                   "--at", at, "--json")  # fmt: skip
    assert res.returncode in (0, 1), res.stderr
    return dict(json.loads(res.stdout))


async def agent_metric(info: LabInfo, pod: str, name: str) -> float:
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{runner.AGENT_HTTP_PORT}"
        "/metrics',timeout=5).read().decode())"
    )
    res = await topology.run_in(info.plan.ns(pod), sys.executable, "-c", code, timeout=20)
    for line in res.stdout.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def check_annotated(info: LabInfo) -> int:
    """Annotate nginx's log; every line must name the user whose page it was."""
    out = info.dir / "annotated.log"
    res = vpnfleet(info, "audit", "annotate", "--format", "nginx", str(info.web_access_log),
                   "-o", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    original = access_lines(info)
    annotated = out.read_text().splitlines()
    assert len(annotated) == len(original) > 0
    for before, after in zip(original, annotated, strict=True):
        m = LINE.match(before)
        assert m, before
        owner = m["path"].split("/")[2]
        assert after == f"{before} user={owner}", after
    return len(annotated)


def check_custom_formats(info: LabInfo) -> int:
    """The same requests in nginx's other logs, written by the real nginx in the lab's own
    log_format lines (combined + $remote_port, escape=json): annotate reads each with
    --log-format given the line as it is in nginx.conf, and names each page's owner."""
    web_dir = info.web_access_log.parent
    counted = []
    for name, fmt in runner.nginx.CUSTOM_FORMATS.items():
        log = runner.nginx.custom_log(web_dir, name)
        out = info.dir / f"annotated.{name}.log"
        res = vpnfleet(info, "audit", "annotate", "--log-format", f"log_format {name} {fmt};",
                       str(log), "-o", str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "could not be read" not in res.stderr, res.stderr
        original = log.read_text().splitlines()
        annotated = out.read_text().splitlines()
        assert len(annotated) == len(original) == len(access_lines(info))
        for before, after in zip(original, annotated, strict=True):
            if name == "audit_json":
                row = json.loads(before)
                owner = row["request"].split()[1].split("/")[2]
                assert json.loads(after) == {**row, "vpnfleet_user": owner}, after
            else:
                owner = before.split('"')[1].split()[1].split("/")[2]
                assert after == f"{before} user={owner}", after
        counted.append(len(annotated))
    return min(counted)


@pytest.mark.asyncio(loop_scope="module")
async def test_annotate_and_who_name_the_person_behind_the_pod_address(lab: LabInfo) -> None:
    placed = {s["user"]: s for s in sessions(lab)}
    shared = [u for u in placed if sum(s["pod"] == placed[u]["pod"] for s in placed.values()) == 2]
    assert len(shared) == 2  # two users behind one pod address
    await asyncio.gather(*(browse(lab, u.name, "day", 8) for u in USERS))
    lines = access_lines(lab)
    assert len(lines) == 24
    # nginx sees only pod addresses: two users' lines carry the same one.
    pod_ips = {str(ip) for ip in lab.plan.pod_ips}
    seen = {m["ip"] for m in map(LINE.match, lines) if m}
    assert seen <= pod_ips and len(seen) == 2
    await until(lambda: len(web_flows(lab)) >= 24, 15, "the 24 flows at the control plane")
    assert check_annotated(lab) == 24
    assert check_custom_formats(lab) == 24
    # `audit who` with the logged address, port and time, for one line of each user.
    for user in placed:
        m = next(m for m in map(LINE.match, lines) if m and f"/{user}/" in m["path"])
        out = who(lab, m["ip"], int(m["port"]), m["time"], "tcp")
        assert out["user"] == user, out
        assert out["session"]["id"] == placed[user]["id"]
        assert out["session"]["real_ip"] == str(lab.plan.client_ip(user))
        assert out["flow"]["dst_ip"] == "10.99.0.100"


@pytest.mark.asyncio(loop_scope="module")
async def test_who_answers_for_udp(lab: LabInfo) -> None:
    for user in ("ann", "ben", "cal"):
        ip, port, at = await udp_probe(lab, user)
        assert ip in {str(p) for p in lab.plan.pod_ips}

        def answered(ip: str = ip, port: int = port, at: str = at) -> dict[str, Any] | None:
            out = who(lab, ip, port, at, "udp")
            return out if out["user"] else None

        out = await until(answered, 10, f"the UDP flow of {user}")
        assert out["user"] == user and out["flow"]["proto"] == "udp"


@pytest.mark.asyncio(loop_scope="module")
async def test_outage_and_agent_restart_lose_no_flow_and_duplicate_none(lab: LabInfo) -> None:
    before = len(access_lines(lab))
    await until(lambda: len(web_flows(lab)) >= before, 15, "earlier flows to be delivered")
    for pid in await ns_processes(lab, "cp", b"server"):
        os.kill(pid, 9)
    await until(lambda: _not(_cp_up(lab)), 5, "the control plane to be down")
    # Traffic while the control plane is away: the agents keep the records on disk.
    await asyncio.gather(*(browse(lab, u.name, "outage", 10) for u in USERS))
    spooled = [await agent_metric(lab, f"pod{i}", 'vpnfleet_spool_records{spool="flows"}')
               for i in (1, 2)]  # fmt: skip
    assert sum(spooled) >= 30, spooled
    # A clean restart of an agent meanwhile (SIGTERM: drain; then start again, from its
    # cached state since the control plane is still down) keeps its spooled records.
    busy = max((1, 2), key=lambda i: spooled[i - 1])
    pid = await agent_pid(lab, f"pod{busy}")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    await until(lambda: not alive(pid), 30, f"pod{busy}'s agent to drain and exit")
    assert (lab.dir / f"pod{busy}" / "flows.jsonl").stat().st_size > 0
    await runner.start_agent(lab, busy)
    await runner.start_control_plane(lab)
    total = before + 30
    assert len(access_lines(lab)) == total
    await until(lambda: len(web_flows(lab)) >= total, 30, "the spooled flows to arrive")
    await asyncio.sleep(1.5)  # anything still in flight would arrive now (and fail below)
    flows = web_flows(lab)
    # Exactly once: as many flows as connections nginx logged, and each line has its flow.
    assert len(flows) == total, f"{len(flows)} flows for {total} connections"
    assert len({f["flow_id"] for f in flows}) == total
    by_addr = collections.defaultdict(list)
    for f in flows:
        by_addr[(f["nat_ip"], f["nat_port"])].append(f)
    for line in access_lines(lab):
        m = LINE.match(line)
        assert m
        logged = dt.datetime.strptime(m["time"], "%d/%b/%Y:%H:%M:%S %z")
        found = by_addr[(m["ip"], int(m["port"]))]
        starts = [dt.datetime.fromisoformat(f["start_at"]) for f in found]
        assert any(abs((s - logged).total_seconds()) <= 2 for s in starts), line
    # The spools are empty again and every line is still attributed to its user.
    for pod in ("pod1", "pod2"):
        await until(lambda p=pod: _spool_empty(lab, p), 15, f"{pod}'s flow spool to drain")
    assert check_annotated(lab) == total


async def _spool_empty(info: LabInfo, pod: str) -> bool:
    return await agent_metric(info, pod, 'vpnfleet_spool_records{spool="flows"}') == 0
