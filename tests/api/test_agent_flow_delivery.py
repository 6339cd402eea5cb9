"""The agent's flow delivery against a real control plane (SQLite and PostgreSQL): records
made by the agent's own per-event path reach the audit API in order, exactly once; a record
the control plane refuses is dropped alone; an unreachable control plane keeps them spooled."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.flowaudit import FlowAudit
from vpnfleet.agent.spool import Spool
from vpnfleet.core.flowevents import FlowEvent, FlowEventKind

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def agent_for(url: str, token: str, state: Path) -> FlowAudit:
    """The agent's flow audit part, as the agent builds it (flow log off)."""
    owners = {"10.200.0.2": ("alice", "pod1-s1")}
    return FlowAudit(
        ControlPlane(url, token),
        "pod1",
        Spool(state, "flows"),
        [ipaddress.IPv4Network("10.200.0.0/24")],
        owners.get,
        out=None,
    )


def connection(ct_id: int, port: int, kind: FlowEventKind = FlowEventKind.NEW) -> FlowEvent:
    start = int(NOW.timestamp() * 1e9)
    return FlowEvent(kind, 6, "10.200.0.2", port, "10.20.0.5", 443, "10.20.0.5", 443,
                     "10.99.0.11", port, ct_id, start, start + 2_000_000_000, None, 3, 180, 2,
                     900, NOW)  # fmt: skip


def send_once(agent: FlowAudit) -> int:
    """One delivery attempt, as the agent's loop makes it (its HTTP client closed after)."""

    async def attempt() -> int:
        try:
            return await agent._send(5000)
        finally:
            await agent._cp.close()

    return asyncio.run(attempt())


def stored(admin: httpx.Client) -> list[dict[str, object]]:
    flows = admin.get("/api/v1/audit/flows", params={"pod": "pod1", "limit": 10000})
    assert flows.status_code == 200, flows.text
    return list(flows.json())


def test_records_arrive_once_and_a_refused_one_is_dropped_alone(
    server: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    token = server.pod_token("pod1")
    agent = agent_for(server.url, token, tmp_path)
    for i in range(1, 301):
        agent._on_item(connection(i, 20000 + i))
    # One record no control plane accepts (a tunnel address that is not an address),
    # in the middle of the queue.
    good = agent.spool.peek_lines(1)[0]
    agent.spool.put_line(good.replace('"tunnel_ip":"10.200.0.2"', '"tunnel_ip":"nowhere"'))
    for i in range(1, 101):
        agent._on_item(connection(i, 20000 + i, FlowEventKind.DESTROY))

    async def deliver() -> int:
        sent = total = 0
        while sent := await agent._send(5000):
            total += sent
        await agent._cp.close()
        return total

    assert asyncio.run(deliver()) == 401
    assert len(agent.spool) == 0
    assert (agent.delivered, agent.refused) == (400, 1)
    flows = stored(admin)
    assert len(flows) == 300 and {f["user"] for f in flows} == {"alice"}
    ended = [f for f in flows if f["end_at"] is not None]
    assert len(ended) == 100 and all(f["bytes_in"] == 900 for f in ended)
    # Redelivery (at least once) changes nothing.
    agent2 = agent_for(server.url, token, tmp_path / "again")
    for i in range(1, 11):
        agent2._on_item(connection(i, 20000 + i))

    assert send_once(agent2) == 10
    assert len(stored(admin)) == 300
    agent.spool.close()


def test_an_unreachable_control_plane_keeps_the_records(tmp_path: Path) -> None:
    agent = agent_for(f"http://127.0.0.1:{free_port()}", "t", tmp_path)
    for i in range(1, 6):
        agent._on_item(connection(i, 30000 + i))

    with pytest.raises(ControlPlaneError):
        send_once(agent)
    assert len(agent.spool) == 5
    agent.spool.close()
    # A restart finds them on disk.
    assert len(Spool(tmp_path, "flows")) == 5


def test_a_rejected_token_keeps_the_records_instead_of_dropping_them(
    server: Server, tmp_path: Path
) -> None:
    agent = agent_for(server.url, "not-a-token", tmp_path)
    for i in range(1, 4):
        agent._on_item(connection(i, 31000 + i))

    with pytest.raises(ControlPlaneError) as err:
        send_once(agent)
    assert err.value.status == 401
    assert len(agent.spool) == 3 and agent.refused == 0
    agent.spool.close()
