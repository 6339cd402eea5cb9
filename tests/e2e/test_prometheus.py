"""Prometheus scraping a real lab: 2 pods with real OpenVPN, stock clients, the control plane.

A real `prometheus` runs in the lab's control-plane namespace, scrapes both agents and the
control plane every second with deploy/prometheus/alerts.yml loaded, and is queried from the
root namespace through the lab's admin link. Everything it starts lives in lab namespaces, so
`runner.down` removes it even when the test fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e(tools=("prometheus",))]

ROOT = Path(__file__).resolve().parents[2]
PROM_PORT = 9090
T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T]], seconds: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while True:
        try:
            last = await check()
        except httpx.HTTPError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(0.25)


def prometheus_config(info: LabInfo, directory: Path) -> Path:
    plan = info.plan
    # The agents' per-user listener (with its bearer token) serves every series; the probes
    # port (AGENT_HTTP_PORT) serves the same minus user names, checked separately below.
    agents = [f"{ip}:{runner.AGENT_USER_METRICS_PORT}" for ip in plan.pod_ips]
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", directory / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(directory / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "vpnfleet-agent",
                "authorization": {"credentials_file": str(runner.metrics_token_path(info))},
                "static_configs": [{"targets": agents}],
            },
            {
                "job_name": "vpnfleet-controlplane",
                "static_configs": [{"targets": [f"{plan.cp_ip}:{runner.CP_PORT}"]}],
                "scheme": "https",
                "tls_config": {"ca_file": str(info.ca_file)},
            },
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class Prom:
    """Prometheus' query API, reached from the root namespace over the admin link."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=5)

    async def query(self, q: str) -> list[dict[str, Any]]:
        resp = await self.http.get("/api/v1/query", params={"query": q})
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    async def scalar(self, q: str) -> float | None:
        result = await self.query(q)
        return float(result[0]["value"][1]) if result else None

    async def by(self, q: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(q)}


async def pod_network_metrics(info: LabInfo, port: int, token: str | None = None) -> str:
    """GET an agent's /metrics from another namespace of the pod network (the control plane's),
    as any workload there could; the status code and the body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    code = (
        "import sys,urllib.request,urllib.error\n"
        f"req=urllib.request.Request('http://{info.plan.pod_ips[0]}:{port}/metrics',"
        f"headers={headers!r})\n"
        "try:\n r=urllib.request.urlopen(req,timeout=5);print(r.status);print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n print(e.code)\n"
    )
    res = await topology.run_in(info.plan.ns("cp"), sys.executable, "-c", code, timeout=20)
    return res.stdout


async def fetch(info: LabInfo, user: str) -> None:
    """Some traffic through the user's tunnel: GET the backend service."""
    code = f"import urllib.request;urllib.request.urlopen({info.service!r}, timeout=10).read()"
    await topology.run_in(info.plan.client_ns(user), sys.executable, "-c", code, timeout=20)


def sessions(info: LabInfo) -> dict[str, dict[str, Any]]:
    with info.client() as c:
        rows = c.get("/api/v1/sessions", params={"active": "true"}).json()
    return {r["user"]: r for r in rows}


def status_report(info: LabInfo) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(info.cli_env())
    out = subprocess.run(
        [sys.executable, "-m", "vpnfleet.cli.main", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.asyncio
async def test_prometheus_sees_clients_come_and_go(tmp_path: Path) -> None:
    prefix = "vp" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    users = (LabUser("alice", "nat"), LabUser("bob", "nat"))
    prom: Prom | None = None
    try:
        info = await runner.up(prefix, pods=2, users=users, state_root=tmp_path, connect=False)
        pdir = info.dir / "prometheus"
        pdir.mkdir()
        topology.spawn_in(
            info.plan.ns("cp"),
            "prometheus",
            f"--config.file={prometheus_config(info, pdir)}",
            f"--storage.tsdb.path={pdir / 'data'}",
            f"--web.listen-address=0.0.0.0:{PROM_PORT}",
            log_path=pdir / "prometheus.log",
        )
        prom = Prom(f"http://{info.plan.admin.ns_address.ip}:{PROM_PORT}")

        async def ready() -> bool:
            return (await prom.http.get("/-/ready")).status_code == 200

        await until(ready, 30, "prometheus to start")

        async def targets_up() -> bool:
            return await prom.scalar("sum(up)") == 3

        await until(targets_up, 30, "both agents and the control plane to be scraped")

        await asyncio.gather(*(runner.start_client(info, u.name) for u in users))
        await asyncio.gather(*(fetch(info, u.name) for u in users))
        live = sessions(info)
        assert set(live) == {"alice", "bob"}

        async def both_seen() -> dict[str, float]:
            got = await prom.by("openvpn_bytes_received > 0", "common_name")
            return got if set(got) == {"alice", "bob"} else {}

        await until(both_seen, 30, "both users' byte counters")
        per_pod = await prom.by("openvpn_connections", "server")
        expected: dict[str, float] = {"pod1": 0, "pod2": 0}
        for s in live.values():
            expected[s["pod"]] += 1
        assert per_pod == expected
        for user, s in live.items():
            (row,) = await prom.query(f'openvpn_connected_since{{common_name="{user}"}}')
            # The series sits on the pod the session is on, with the session's start time.
            assert row["metric"]["server"] == s["pod"]
            started = s["started_at"].replace("Z", "+00:00")
            start = dt.datetime.fromisoformat(started).timestamp()
            assert float(row["value"][1]) == pytest.approx(start, abs=0.001)
            assert set(row["metric"]) == {"__name__", "common_name", "server", "instance", "job"}
        assert await prom.scalar("sum(vpnfleet_clients_by_mode)") == 2
        assert await prom.scalar('vpnfleet_pods{state="ready"}') == 2
        assert await prom.scalar("vpnfleet_database_up") == 1
        assert await prom.scalar("sum(vpnfleet_agent_ready)") == 2
        routes = await prom.by("vpnfleet_api_request_duration_seconds_count", "route")
        assert "/api/v1/agent/heartbeat" in routes
        # One per agent (the lab routes gateway users over BGP: no gateway-route follower).
        assert await prom.scalar("vpnfleet_watch_subscribers") == 2
        # The NAT audit pipeline: both listeners up, the fetches recorded and delivered.
        assert await prom.scalar("sum(vpnfleet_flow_listener_up)") == 2

        async def flows_delivered() -> bool:
            return (await prom.scalar("sum(vpnfleet_flow_records_delivered_total)") or 0) >= 2

        await until(flows_delivered, 30, "the fetches' flow records to be delivered")
        assert (await prom.scalar("sum(vpnfleet_flow_records_total)") or 0) >= 2
        assert await prom.scalar("sum(vpnfleet_flow_event_overruns_total)") == 0
        assert await prom.scalar('sum(vpnfleet_spool_dropped_total{spool="flows"})') == 0

        # The pod network sees no user names on the probes port, and the per-user port
        # answers only with the token.
        public = await pod_network_metrics(info, runner.AGENT_HTTP_PORT)
        assert public.startswith("200") and "openvpn_connections" in public
        assert "common_name" not in public and "alice" not in public and "bob" not in public
        refused = await pod_network_metrics(info, runner.AGENT_USER_METRICS_PORT)
        assert refused.strip() == "401"

        seen_in = await prom.scalar('openvpn_bytes_received{common_name="bob"}')
        seen_out = await prom.scalar('openvpn_bytes_sent{common_name="bob"}')
        assert seen_in and seen_out
        await runner.stop_client(info, "bob")

        async def bob_gone() -> bool:
            left = await prom.by("openvpn_bytes_received", "common_name")
            return set(left) == {"alice"} and await prom.scalar("sum(openvpn_connections)") == 1

        await until(bob_gone, 30, "bob's series to disappear")
        with info.client() as c:
            (closed,) = c.get("/api/v1/sessions", params={"active": "false", "user": "bob"}).json()
        # The session record's final counters (from DISCONNECT) cover what was scraped before.
        assert closed["bytes_in"] >= seen_in and closed["bytes_out"] >= seen_out
        assert await prom.scalar('sum(vpnfleet_clients_by_mode{mode="nat"})') == 1

        # The healthy lab raised no alert, and the rules loaded in a real Prometheus.
        rules = (await prom.http.get("/api/v1/rules")).json()["data"]["groups"]
        assert rules and all(r["health"] == "ok" for g in rules for r in g["rules"])
        alerts = (await prom.http.get("/api/v1/alerts")).json()["data"]["alerts"]
        assert [a for a in alerts if a["state"] == "firing"] == []

        async def status_shows_one_client() -> dict[str, Any]:
            report = await asyncio.to_thread(status_report, info)
            return report if report["totals"]["clients"] == 1 else {}

        report = await until(status_shows_one_client, 15, "vpnfleet status to count 1 client")
        assert report["totals"]["ready"] == 2
    finally:
        if prom is not None:
            await prom.http.aclose()
        result = await runner.down(prefix, state_root=tmp_path)
        assert not result.errors, result.errors
