"""Metrics as Prometheus reads them: the agent's scrape-time collector (openvpn_* and vpnfleet_*
series from an agent's readings), the control plane's /metrics, and `vpnfleet status`,
which reports the same facts from the API.

Every scrape is rendered with prometheus_client's `generate_latest` and read back with its text
parser, as a scraper would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, free_port
from vpnfleet.agent.exporter import ExporterConfig, LagClock, Readings
from vpnfleet.agent.flowaudit import FlowAudit
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.netcommands import DataplaneStats
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.spool import Spool
from vpnfleet.controlplane import pki
from vpnfleet.core.fleetstatus import assess
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant
from vpnfleet.core.mgmt_protocol import StatusClient
from vpnfleet.core.sessionbook import Client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)


def scrape(metrics: AgentMetrics) -> Samples:
    """Render and parse one scrape; fail on a duplicate series (Prometheus rejects those)."""
    text = generate_latest(metrics.registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


class Agent:
    """An agent's scrape-time readings, held as plain values the tests set.

    ``PodAgent.readings()`` assembles the same values from the running parts (tested with the
    agent itself, tests/api/test_agent_parts.py); here the collector's rendering is pinned.
    """

    def __init__(self, state_dir: Path) -> None:
        self.s = AgentSettings(
            server="http://127.0.0.1:9", token="t", name="pod-a", state_dir=state_dir
        )
        self.clients: dict[int, Client] = {}
        self.last_status: list[StatusClient] = []
        self.last_status_at = 0.0
        self.view_revision = 0
        self.applied_revision = 0
        self.applied_state: DesiredState | None = None
        self.spool = Spool(state_dir, "sessions")
        self.openvpn_ready = False
        self.openvpn_version: str | None = None
        self.flows: FlowAudit | None = None
        self.watch_connected = False

    def readings(self) -> Readings:
        f = self.flows
        spools: dict[str, Spool] = {"sessions": self.spool}
        if f is not None:
            spools["flows"] = f.spool
        return Readings(
            pod=self.s.name,
            state_dir=self.s.state_dir,
            crl_verify=self.s.crl_verify,
            clients=list(self.clients.values()),
            last_status=self.last_status,
            last_status_at=self.last_status_at,
            view_revision=self.view_revision,
            applied_revision=self.applied_revision,
            applied_state=self.applied_state,
            dataplane_stats=DataplaneStats(),
            spools=spools,
            openvpn_ready=self.openvpn_ready,
            openvpn_version=self.openvpn_version,
            draining=False,
            ready=False,
            watch_connected=self.watch_connected,
            watch_last_event=0.0,
            listener_counters=f.listener.counters if f and f.listener else None,
            tracker_counters=f.tracker.counters if f else None,
            tracked_flows=len(f.tracker) if f else None,
            flow_listener_up=f.listener_up if f else None,
            flows_delivered=f.delivered if f else None,
            flows_refused=f.refused if f else None,
        )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.spool.close()


def connect(
    agent: Agent,
    cid: int,
    user: str,
    tunnel_ip: str,
    received: int,
    sent: int,
    started: dt.datetime = T0,
    mode: str = "nat",
) -> None:
    """A client as the agent holds it after ESTABLISHED, and OpenVPN's status row for it."""
    agent.clients[cid] = Client(
        cid=cid,
        user=user,
        mode=mode,
        tunnel_ip=tunnel_ip,
        real_ip="198.51.100.7",
        real_port=40000 + cid,
        uid=f"pod-a-{cid:016x}",
        connected_at=started.isoformat(),
        established=True,
    )
    agent.last_status.append(
        StatusClient(
            common_name=user,
            real_address=f"198.51.100.7:{40000 + cid}",
            virtual_address=tunnel_ip,
            virtual_ipv6_address=None,
            bytes_received=received,
            bytes_sent=sent,
            connected_since=started,
            username=None,
            client_id=cid,
            peer_id=cid,
            data_channel_cipher="AES-256-GCM",
        )
    )


def metrics_for(agent: Agent, **config: Any) -> AgentMetrics:
    m = AgentMetrics(agent.s.name, agent)
    if config:
        assert m.collector is not None
        m.collector.config = ExporterConfig(**config)
    return m


# ------------------------------------------------------------------ agent collector


def test_two_sessions_of_one_user_are_one_valid_series(agent: Agent) -> None:
    connect(agent, 1, "alice", "10.200.0.2", 1000, 5000, started=T0)
    connect(agent, 2, "alice", "10.200.0.3", 300, 700, started=T0 - dt.timedelta(minutes=5))
    connect(agent, 3, "bob", "10.201.0.9", 42, 24, mode="gateway")
    s = scrape(metrics_for(agent))
    assert value(s, "openvpn_connections", server="pod-a") == 3
    assert value(s, "openvpn_bytes_received", server="pod-a", common_name="alice") == 1300
    assert value(s, "openvpn_bytes_sent", server="pod-a", common_name="alice") == 5700
    oldest = (T0 - dt.timedelta(minutes=5)).timestamp()
    assert value(s, "openvpn_connected_since", server="pod-a", common_name="alice") == oldest
    assert value(s, "openvpn_bytes_received", server="pod-a", common_name="bob") == 42
    assert sorted(x["common_name"] for x in names(s, "openvpn_bytes_sent")) == ["alice", "bob"]
    assert value(s, "vpnfleet_clients_by_mode", mode="nat") == 2
    assert value(s, "vpnfleet_clients_by_mode", mode="gateway") == 1
    assert value(s, "vpnfleet_clients_received_bytes") == 1342
    assert value(s, "vpnfleet_clients_sent_bytes") == 5724
    assert value(s, "vpnfleet_metrics_client_series") == 2


def test_a_disconnected_user_vanishes_before_the_next_status_poll(agent: Agent) -> None:
    connect(agent, 1, "alice", "10.200.0.2", 10, 20)
    connect(agent, 2, "bob", "10.200.0.3", 10, 20)
    m = metrics_for(agent)
    assert len(names(scrape(m), "openvpn_bytes_received")) == 2
    del agent.clients[2]  # DISCONNECT; OpenVPN's last listing still has bob
    s = scrape(m)
    assert [x["common_name"] for x in names(s, "openvpn_bytes_received")] == ["alice"]
    assert value(s, "openvpn_connections", server="pod-a") == 1


def test_a_connecting_client_is_not_counted_until_established(agent: Agent) -> None:
    connect(agent, 1, "alice", "10.200.0.2", 10, 20)
    agent.clients[1] = dataclasses.replace(agent.clients[1], established=False)
    s = scrape(metrics_for(agent))
    assert value(s, "openvpn_connections", server="pod-a") == 0
    assert names(s, "openvpn_bytes_received") == []


def test_the_cap_keeps_only_totals(agent: Agent) -> None:
    for i, user in enumerate(("alice", "bob", "carol"), start=1):
        connect(agent, i, user, f"10.200.0.{i + 1}", 100 * i, 10 * i)
    at_cap = scrape(metrics_for(agent, max_clients=3))
    assert len(names(at_cap, "openvpn_bytes_received")) == 3
    assert value(at_cap, "vpnfleet_metrics_clients_truncated") == 0
    over = scrape(metrics_for(agent, max_clients=2))
    for family in ("openvpn_bytes_received", "openvpn_bytes_sent", "openvpn_connected_since"):
        assert names(over, family) == []
    assert value(over, "vpnfleet_metrics_clients_truncated") == 1
    assert value(over, "vpnfleet_metrics_client_series") == 0
    assert value(over, "openvpn_connections", server="pod-a") == 3
    assert value(over, "vpnfleet_clients_received_bytes") == 600


def test_per_client_series_can_be_turned_off_by_environment(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(agent, 1, "alice", "10.200.0.2", 10, 20)
    monkeypatch.setenv("VPNFLEET_METRICS_PER_CLIENT", "0")
    s = scrape(AgentMetrics("pod-a", agent))
    assert names(s, "openvpn_bytes_received") == []
    assert value(s, "vpnfleet_metrics_clients_truncated") == 0  # off is not truncation
    assert value(s, "openvpn_connections", server="pod-a") == 1
    monkeypatch.setenv("VPNFLEET_METRICS_PER_CLIENT", "1")
    monkeypatch.setenv("VPNFLEET_METRICS_MAX_CLIENTS", "0")
    assert value(scrape(AgentMetrics("pod-a", agent)), "vpnfleet_metrics_clients_truncated") == 1


def test_a_bad_cap_setting_does_not_stop_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    cfg = ExporterConfig.from_env({"VPNFLEET_METRICS_MAX_CLIENTS": "lots"})
    assert cfg == ExporterConfig(per_client=True, max_clients=1000)
    assert "VPNFLEET_METRICS_MAX_CLIENTS" in caplog.text


def test_no_label_carries_an_address_a_port_or_a_time(agent: Agent, tmp_path: Path) -> None:
    connect(agent, 1, "alice", "10.200.0.2", 10, 20)
    connect(agent, 2, "alice", "10.200.0.3", 10, 20)
    agent.openvpn_version = "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [EPOLL]"
    s = scrape(metrics_for(agent))
    allowed = {"server", "common_name", "mode", "set", "version", "arch", "pod", "result", "le"}
    allowed.add("spool")  # sessions | flows
    for name, labels in s:
        for key, val in labels:
            assert key in allowed, f"{name} has label {key}"
            assert not re.search(r"\d+\.\d+\.\d+\.\d+", val), f"{name}{{{key}={val}}}"
            assert not re.fullmatch(r"\d{9,}", val), f"{name}{{{key}={val}}}"
    info = names(s, "openvpn_server_info")
    assert info == [{"server": "pod-a", "version": "2.6.14", "arch": "x86_64-pc-linux-gnu"}]


def test_agent_state_values(agent: Agent) -> None:
    now = [1_000.0]
    m = AgentMetrics(agent.s.name, agent)
    assert m.collector is not None
    m.collector.clock = lambda: now[0]
    agent.openvpn_ready = True
    agent.last_status_at = 1_795_000_000.5
    agent.view_revision, agent.applied_revision = 40, 40
    agent.spool.put({"kind": "open", "body": {"uid": "x"}})
    agent.spool.put({"kind": "close", "body": {"uid": "x"}})
    tunnel = ipaddress.IPv4Network("10.200.0.0/16")
    agent.applied_state = DesiredState(
        prefix="vpnf",
        tunnel_networks=(tunnel,),
        uplink=None,
        nat_members=frozenset({ipaddress.IPv4Address("10.200.0.2")}),
        all_clients=frozenset(ipaddress.IPv4Address(a) for a in ("10.200.0.2", "10.200.0.3")),
        groups=(
            GroupAccess(
                group_id=7,
                members=frozenset({ipaddress.IPv4Address("10.200.0.2")}),
                grants=(Grant(ipaddress.IPv4Network("10.99.0.0/24"), "tcp", 80, 81),),
            ),
        ),
    )
    s = scrape(m)
    assert value(s, "openvpn_up", server="pod-a") == 1
    assert value(s, "openvpn_last_updated", server="pod-a") == 1_795_000_000.5
    assert value(s, "vpnfleet_agent_ready") == 0  # not registered
    assert value(s, "vpnfleet_policy_applied_revision") == 40
    assert value(s, "vpnfleet_policy_revision_lag") == 0
    assert value(s, "vpnfleet_spool_records", spool="sessions") == 2
    assert value(s, "vpnfleet_spool_bytes", spool="sessions") == agent.spool.size_bytes > 0
    assert names(s, "vpnfleet_spool_records") == [{"spool": "sessions"}]  # no flow audit yet
    assert value(s, "vpnfleet_ipset_entries", set="vpnf-clients") == 2
    assert value(s, "vpnfleet_ipset_entries", set="vpnf-nat") == 1
    assert value(s, "vpnfleet_ipset_entries", set="vpnf-g7-m") == 1
    assert value(s, "vpnfleet_ipset_entries", set="vpnf-g7-d") == 2  # ports 80 and 81
    # A change arrives and is not enforced: the lag grows until the firewall catches up.
    agent.view_revision = 43
    s = scrape(m)
    assert value(s, "vpnfleet_policy_revision_lag") == 3
    assert value(s, "vpnfleet_policy_lag_seconds") == 0
    now[0] += 4
    assert value(scrape(m), "vpnfleet_policy_lag_seconds") == 4
    agent.applied_revision = 43
    now[0] += 1
    s = scrape(m)
    assert value(s, "vpnfleet_policy_revision_lag") == 0
    assert value(s, "vpnfleet_policy_lag_seconds") == 0
    # Optional parts the agent does not have yet stay out rather than read as zero.
    assert names(s, "vpnfleet_flow_event_overruns_total") == []
    assert value(s, "vpnfleet_watch_connected") == 0  # a fresh agent has not connected yet


def test_lag_clock_counts_from_the_oldest_unapplied_revision() -> None:
    clock = LagClock()
    assert clock.observe(0, view_revision=10, applied_revision=10) == 0
    assert clock.observe(1, 11, 10) == 0  # 11 first seen at t=1
    assert clock.observe(3, 12, 10) == 2
    assert clock.observe(5, 12, 11) == 2  # 11 applied; 12 has waited since t=3
    assert clock.observe(6, 12, 12) == 0
    assert clock.observe(7, 13, 12) == 0


def test_flow_and_watch_counters_when_the_agent_has_them(agent: Agent, tmp_path: Path) -> None:
    import io

    from vpnfleet.agent.conntrack import ConntrackListener, ListenerCounters
    from vpnfleet.agent.cpclient import ControlPlane
    from vpnfleet.core.flowevents import FlowEvent, FlowEventKind

    listener = ConntrackListener()
    listener.counters = ListenerCounters(events=120, overruns=2, resyncs=1)
    owners = {"10.200.0.2": ("alice", "pod-a-1")}
    flows = FlowAudit(
        ControlPlane("http://127.0.0.1:9", "t"),
        "pod-a",
        Spool(tmp_path, "flows"),
        [ipaddress.IPv4Network("10.200.0.0/16")],
        owners.get,
        out=(printed := io.StringIO()),  # stdout in the agent
    )
    flows.listener, flows.listener_up = listener, True
    agent.flows = flows
    at = dt.datetime.now(dt.UTC)
    for ct_id, src in ((1, "10.200.0.2"), (2, "10.200.0.9"), (3, "10.99.0.5")):
        ev = FlowEvent(FlowEventKind.NEW, 6, src, 40000, "10.99.0.100", 80, "10.99.0.100", 80,
                       "10.99.0.11", 40000, ct_id, None, None, None, None, None, None, None,
                       at)  # fmt: skip
        flows._on_item(ev)
    flows.delivered = 5
    agent.watch_connected = True
    s = scrape(metrics_for(agent))
    assert value(s, "vpnfleet_flow_events_total") == 120
    assert value(s, "vpnfleet_flow_event_overruns_total") == 2
    # Two flows from tunnel addresses (one nobody owns), one from elsewhere (ignored).
    assert value(s, "vpnfleet_flow_records_total") == 2
    assert value(s, "vpnfleet_flow_records_unattributed_total") == 1
    assert value(s, "vpnfleet_flows_tracked") == 2
    assert value(s, "vpnfleet_spool_records", spool="flows") == 2
    assert value(s, "vpnfleet_flow_listener_up") == 1
    assert value(s, "vpnfleet_flow_records_delivered_total") == 5
    assert value(s, "vpnfleet_watch_connected") == 1
    # Each record is also a JSON line on stdout, marked for log pipelines.
    lines = [json.loads(x) for x in printed.getvalue().splitlines()]
    assert [(x["event"], x["kind"], x["user"]) for x in lines] == [
        ("flow", "start", "alice"), ("flow", "start", None)]  # fmt: skip
    assert lines[0]["nat_ip"] == "10.99.0.11" and lines[0]["dst_port"] == 80
    flows.spool.close()


def test_certificate_and_crl_expiry_of_the_files_openvpn_uses(agent: Agent) -> None:
    ca = pki.create_ca()
    server = pki.issue_server_cert(ca, "pod-a", days=20)
    d = agent.s.state_dir
    (d / "ca.crt").write_text(ca.cert_pem)
    (d / "server.crt").write_text(server.cert_pem)
    (d / "crl.pem").write_text(pki.build_crl(ca, [], days=3))
    s = scrape(metrics_for(agent))
    ca_end = pki.cert_info(ca.cert_pem).not_after.timestamp()
    assert value(s, "vpnfleet_ca_expiry_timestamp_seconds") == ca_end
    srv_end = value(s, "vpnfleet_server_cert_expiry_timestamp_seconds")
    assert srv_end == pki.cert_info(server.cert_pem).not_after.timestamp()
    # The CRL only matters when OpenVPN checks it.
    assert names(s, "vpnfleet_crl_next_update_timestamp_seconds") == []
    agent.s.crl_verify = True
    crl_end = value(scrape(metrics_for(agent)), "vpnfleet_crl_next_update_timestamp_seconds")
    assert crl_end is not None
    assert 2.9 * 86400 < crl_end - dt.datetime.now(dt.UTC).timestamp() <= 3 * 86400


def test_metrics_without_an_agent_still_work() -> None:
    m = AgentMetrics("pod-z")
    s = scrape(m)
    assert value(s, "vpnfleet_agent_info", pod="pod-z") == 1
    assert not [n for n, _ in s if n.startswith("openvpn_")]


def test_the_default_cap_is_a_thousand_users(agent: Agent) -> None:
    for i in range(1, 1001):
        connect(agent, i, f"user{i:04d}", f"10.200.{i // 250}.{i % 250 + 2}", i, 2 * i)
    s = scrape(metrics_for(agent))
    assert len(names(s, "openvpn_bytes_received")) == 1000
    connect(agent, 1001, "user1001", "10.200.9.9", 1, 1)
    assert names(scrape(metrics_for(agent)), "openvpn_bytes_received") == []


# ------------------------------------------------------------------ who may see user names

METRICS_TOKEN = "metrics-token-Qx9LmPz4Rk8Vw2b7Tn5H"


def parsed(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_user_names_are_served_only_on_the_user_listener_with_its_token(
    agent: Agent, tmp_path: Path
) -> None:
    from vpnfleet.agent.health import serve_http

    connect(agent, 1, "alice", "10.200.0.2", 1000, 5000)
    http_port, user_port = free_port(), free_port()
    agent.s = AgentSettings(
        server="http://127.0.0.1:9",
        token="t",
        name="pod-a",
        state_dir=tmp_path,
        http=f"127.0.0.1:{http_port}",
        user_metrics_listen=f"127.0.0.1:{user_port}",
        user_metrics_token=METRICS_TOKEN,
    )
    agent.metrics = AgentMetrics("pod-a", agent)  # type: ignore[attr-defined]
    task = asyncio.create_task(serve_http(agent))  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            public_url = f"http://127.0.0.1:{http_port}/metrics"
            user_url = f"http://127.0.0.1:{user_port}/metrics"
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    await http.get(public_url)
                    await http.get(user_url)
                    break
                await asyncio.sleep(0.05)
            public = await http.get(public_url)
            assert public.status_code == 200
            assert "alice" not in public.text and "common_name" not in public.text
            assert "openvpn_bytes_received" not in public.text  # not even its HELP line
            fleet = parsed(public.text)
            assert value(fleet, "openvpn_connections", server="pod-a") == 1
            assert value(fleet, "vpnfleet_clients_received_bytes") == 1000

            assert (await http.get(user_url)).status_code == 401
            wrong = await http.get(user_url, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "alice" not in wrong.text
            full = await http.get(user_url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            assert full.status_code == 200
            users = parsed(full.text)
            alice = {"server": "pod-a", "common_name": "alice"}
            assert value(users, "openvpn_bytes_received", **alice) == 1000
            assert value(users, "openvpn_connections", server="pod-a") == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_the_user_listener_defaults_to_loopback_and_can_be_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("VPNFLEET_USER_METRICS_LISTEN", "VPNFLEET_USER_METRICS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("VPNFLEET_USER_METRICS_TOKEN_FILE", raising=False)
    base = {"server": "http://cp:8000", "token": "t", "name": "p1"}
    s = AgentSettings.from_env(**base)
    assert (s.http, s.user_metrics_listen, s.user_metrics_token) == (
        "0.0.0.0:9176", "127.0.0.1:9177", None)  # fmt: skip
    monkeypatch.setenv("VPNFLEET_USER_METRICS_LISTEN", "off")
    assert AgentSettings.from_env(**base).user_metrics_listen == "off"


def test_with_the_user_listener_off_no_per_user_series_are_built(tmp_path: Path) -> None:
    from vpnfleet.agent.pod import PodAgent

    def settings(listen: str) -> AgentSettings:
        return AgentSettings(
            server="http://127.0.0.1:9", token="t", name="p", state_dir=tmp_path,
            user_metrics_listen=listen,
        )  # fmt: skip

    on = PodAgent(settings("127.0.0.1:9177")).metrics.collector
    off = PodAgent(settings("off")).metrics.collector
    assert on is not None and off is not None
    assert (on.config.per_client, off.config.per_client) == (True, False)


def test_user_metrics_settings_refuse_a_weak_token_and_a_shared_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = {"server": "http://cp:8000", "token": "t", "name": "p1"}
    token_file = tmp_path / "metrics-token"
    token_file.write_text("secret\n")
    with pytest.raises(ValueError, match=r"VPNFLEET_USER_METRICS_TOKEN\(_FILE\) is too weak"):
        AgentSettings.from_env(**base, user_metrics_token_file=token_file)
    token_file.write_text(METRICS_TOKEN + "\n")
    s = AgentSettings.from_env(**base, user_metrics_token_file=token_file)
    assert s.user_metrics_token == METRICS_TOKEN
    with pytest.raises(ValueError, match="port of its own"):
        AgentSettings.from_env(**base, user_metrics_listen="127.0.0.1:9176")


# ------------------------------------------------------------------ control plane /metrics


def cp_scrape(client: httpx.Client) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def test_control_plane_metrics(server: Server, admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "alice"})
    admin.get("/api/v1/users/alice")
    admin.get("/api/v1/users/nobody")
    admin.get("/no/such/path/12345")
    with (
        server.client(server.pod_token("pod1")) as agent,
        server.client(server.pod_token("pod2")) as agent2,
    ):
        assert agent.post("/api/v1/agent/register", json={"name": "pod1"}).status_code == 200
        assert agent2.post("/api/v1/agent/register", json={"name": "pod2"}).status_code == 200
        hb = {"name": "pod1", "applied_revision": 1, "ready": True, "status": {"clients": 3}}
        agent.post("/api/v1/agent/heartbeat", json=hb)
        gone = {"name": "pod2", "applied_revision": 1, "ready": False, "status": {"drained": True}}
        agent2.post("/api/v1/agent/heartbeat", json=gone)
        body = {
            "uid": "pod1-0000000000000001",
            "user": "alice",
            "pod": "pod1",
            "mode": "nat",
            "tunnel_ip": "10.200.0.2",
            "real_ip": "198.51.100.7",
            "real_port": 5000,
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        assert agent.post("/api/v1/agent/sessions/open", json=body).json()["allowed"]
        head = admin.get("/api/v1/revision").json()["revision"]
        s = cp_scrape(agent)
    routes = {x["route"] for x in names(s, "vpnfleet_api_request_duration_seconds_count")}
    assert {"/api/v1/users", "/api/v1/users/{name}", "unmatched"} <= routes
    assert not [r for r in routes if "alice" in r or "nobody" in r or "12345" in r]
    found = value(
        s, "vpnfleet_api_request_duration_seconds_count", route="/api/v1/users/{name}",
        method="GET", status="4xx",
    )  # fmt: skip
    assert found == 1
    assert value(s, "vpnfleet_database_up") == 1
    assert value(s, "vpnfleet_changelog_head_revision") == head
    assert value(s, "vpnfleet_pods", state="ready") == 1
    assert value(s, "vpnfleet_pods", state="drained") == 1
    assert value(s, "vpnfleet_pod_ready", pod="pod1") == 1
    assert names(s, "vpnfleet_pod_ready") == [{"pod": "pod1"}]  # the drained pod left
    assert value(s, "vpnfleet_pod_clients", pod="pod1") == 3
    assert value(s, "vpnfleet_pod_revision_lag", pod="pod1") == head - 1
    assert value(s, "vpnfleet_pod_sessions_live", pod="pod1") == 1
    assert value(s, "vpnfleet_sessions_live") == 1
    ca_end = value(s, "vpnfleet_ca_expiry_timestamp_seconds")
    assert ca_end is not None and ca_end > dt.datetime.now(dt.UTC).timestamp() + 3000 * 86400
    assert value(s, "vpnfleet_cert_expiry_soonest_timestamp_seconds", kind="client")
    assert value(s, "vpnfleet_cert_expiry_soonest_timestamp_seconds", kind="server")
    assert value(s, "vpnfleet_certs_expiring_soon", kind="client") == 0


def test_watch_streams_are_counted_not_timed(server: Server) -> None:
    with server.client(server.pod_token("pod1")) as agent:
        with agent.stream("GET", "/api/v1/watch", params={"since": 0}) as stream:
            assert stream.status_code == 200
            s = cp_scrape(agent)
            assert value(s, "vpnfleet_watch_subscribers") == 1
        # The server notices the closed stream at its next write (a heartbeat, 1 s here).
        for _ in range(50):
            s = cp_scrape(agent)
            if value(s, "vpnfleet_watch_subscribers") == 0:
                break
            time.sleep(0.1)
        assert value(s, "vpnfleet_watch_subscribers") == 0
    routes = {x["route"] for x in names(s, "vpnfleet_api_request_duration_seconds_count")}
    assert "/api/v1/watch" not in routes


@contextlib.contextmanager
def serving(app: Any) -> Iterator[httpx.Client]:
    """Serve `app` with uvicorn on a free loopback port (as `vpnfleet server` does)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


def test_a_locked_database_reads_as_down_without_hanging_the_scrape(tmp_path: Path) -> None:
    from vpnfleet.controlplane.app import create_app
    from vpnfleet.controlplane.settings import ServerSettings

    db_path = tmp_path / "cp.db"
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{db_path}",
        listen="127.0.0.1:9",
        public_endpoints=["vpn.example.test:1194"],
        secret="test-seal-secret-Qx9LmPz4Rk8Vw2b7",
    )
    app = create_app(settings)
    app.state.metrics.db_timeout = 0.5
    with serving(app) as client:
        assert value(cp_scrape(client), "vpnfleet_database_up") == 1
        # A real writer holding SQLite's lock: the control plane's BEGIN IMMEDIATE waits.
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=1)
        lock.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            s = cp_scrape(client)
            assert time.monotonic() - started < 5
            assert value(s, "vpnfleet_database_up") == 0
            assert names(s, "vpnfleet_pods") == []  # left out, not reported as zero
            assert value(s, "vpnfleet_changelog_head_revision") is not None
            # The next scrape waits on the same stuck probe: no pile-up of threads.
            stuck = app.state.metrics._probe
            assert value(cp_scrape(client), "vpnfleet_database_up") == 0
            assert app.state.metrics._probe is stuck
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for _ in range(50):
            if value(cp_scrape(client), "vpnfleet_database_up") == 1:
                break
            time.sleep(0.1)
        assert value(cp_scrape(client), "vpnfleet_database_up") == 1


# ------------------------------------------------------------------ vpnfleet status


def pod(name: str, age: float | None, ready: bool = True, applied: int = 9, **status: Any) -> Any:
    beat = None if age is None else (T0 - dt.timedelta(seconds=age)).isoformat()
    return {
        "name": name,
        "ready": ready,
        "last_heartbeat": beat,
        "registered_at": (T0 - dt.timedelta(minutes=10)).isoformat(),
        "applied_revision": applied,
        "status": status,
    }


def test_status_conditions() -> None:
    pods = [
        pod("pod1", 2, clients=4, spooled=0),
        pod("pod2", 3, ready=False, clients=0),
        pod("pod3", 45, clients=1),
        pod("pod4", 1, applied=7, spooled=12, clients=2),
        pod("pod5", 20, ready=False, drained=True),
        pod("old", 7200, ready=False),
    ]
    ca = {"ca": {"not_after": (T0 + dt.timedelta(days=12)).isoformat()}}
    r = assess(9, pods, ca, T0)
    assert [p["name"] for p in r["pods"]] == ["pod1", "pod2", "pod3", "pod4", "pod5"]
    assert r["hidden_pods"] == 1
    assert r["totals"] == {"pods": 4, "ready": 2, "clients": 7, "spooled": 12}
    held = {(c["name"], c["subject"]) for c in r["conditions"]}
    assert held == {
        ("PodNotReady", "pod2"),
        ("PodHeartbeatStale", "pod3"),
        ("PodRevisionLag", "pod4"),
        ("SpoolBacklog", "pod4"),
        ("CAExpiring", "pki"),
    }
    healthy = assess(9, [pod("pod1", 2)], {"ca": {"not_after": "2036-01-01T00:00:00Z"}}, T0)
    assert healthy["conditions"] == []
    assert [c["name"] for c in assess(9, [], None, T0)["conditions"]] == ["NoPodReady"]


def test_status_command_against_a_control_plane(server: Server) -> None:
    with server.client(server.pod_token("pod1")) as agent:
        agent.post("/api/v1/agent/register", json={"name": "pod1"})
        head = agent.get("/api/v1/revision").json()["revision"]
        hb = {"name": "pod1", "applied_revision": head, "ready": True, "status": {"clients": 2}}
        agent.post("/api/v1/agent/heartbeat", json=hb)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(VPNFLEET_URL=server.url, VPNFLEET_TOKEN=server.admin_token, COLUMNS="200")
    cli = [sys.executable, "-m", "vpnfleet.cli.main", "status"]
    out = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["pods"][0]["name"] == "pod1" and report["pods"][0]["lag"] == 0
    assert report["totals"]["clients"] == 2 and report["conditions"] == []
    text = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0 and "1/1 pods ready" in text.stdout
    assert "no alert condition holds" in text.stdout
    denied = subprocess.run(
        cli, capture_output=True, text=True, timeout=60, env={**env, "VPNFLEET_TOKEN": "nope"}
    )
    assert denied.returncode != 0 and "Traceback" not in denied.stderr
