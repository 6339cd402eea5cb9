"""Bad input that used to answer HTTP 500: each is a 4xx with a problem+json body now, and
writes nothing (issue reproducers, on SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx
import pytest

from tests.conftest import Server

BIG = 2**63  # one past the largest 64-bit signed integer both databases store
BIG32 = 2**31  # one past a plain Integer column on PostgreSQL (found by tests/api/test_fuzz.py)
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
NOW_MS = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
EARLY = "0001-01-01T00:00:00+14:00"  # before year 1 in UTC
LATE = "9999-12-31T23:59:59-14:00"  # after year 9999 in UTC


def _raw(client: httpx.Client, method: str, path: str, body: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"} if body is not None else {}
    return client.request(method, path, content=body, headers=headers)


def _check(r: httpx.Response, *, field: str | None = None) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/problem+json", r.headers
    if field is not None:
        assert field in r.json()["detail"], r.json()


def _pod(server: Server, agent: str, name: str = "pod-a") -> None:
    with server.client(agent) as c:
        r = c.post("/api/v1/agent/register", json={"name": name, "pod_ip": "192.0.2.10"})
        assert r.is_success, r.text


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PUT", "/api/v1/pools/A", {"cidr": "10.99.0.0/24", "kind": "nat"}, "pool name"),
        ("PUT", "/api/v1/pools/" + "p" * 300, {"cidr": "10.99.0.0/24", "kind": "nat"}, "pool"),
        ("DELETE", "/api/v1/rules/329044669945398820864", None, "rule_id"),
        ("DELETE", "/api/v1/rules/-1", None, None),
        ("DELETE", f"/api/v1/rules/{BIG32}", None, "rule_id"),
        ("GET", f"/api/v1/sessions?until={EARLY}", None, "until"),
        ("GET", f"/api/v1/sessions?since={LATE}", None, "since"),
        ("GET", f"/api/v1/audit/admin?until={EARLY}", None, "until"),
        ("GET", f"/api/v1/audit/denied?until={EARLY}", None, "until"),
        ("GET", f"/api/v1/audit/flows?until={EARLY}", None, "until"),
        ("GET", f"/api/v1/audit/flows?since={EARLY}", None, "since"),
        ("GET", "/api/v1/users/%00", None, None),
        ("GET", "/api/v1/groups/a%00b", None, None),
        ("GET", "/api/v1/sessions?user=%00", None, None),
        ("POST", "/api/v1/users", {"name": "bob", "email": "b\ud800@example.com"}, "email"),
        ("POST", "/api/v1/users", {"name": "bob", "email": "b\x00@example.com"}, "email"),
        ("POST", "/api/v1/groups", {"name": "g", "description": "a\x00b"}, "description"),
        ("POST", "/api/v1/groups", {"name": "g", "description": "\udfff"}, "description"),
        ("POST", "/api/v1/tokens", {"name": "t\x00", "role": "operator"}, "name"),
    ],
)
def test_operator_input(
    server: Server, method: str, path: str, body: dict[str, Any] | None, field: str | None
) -> None:
    with server.client() as c:
        pools = c.get("/api/v1/pools").json()
        r = _raw(c, method, path, None if body is None else json.dumps(body))
        _check(r, field=field)
        assert c.get("/api/v1/users").json() == []
        assert c.get("/api/v1/groups").json() == []
        assert c.get("/api/v1/pools").json() == pools


def test_rule_ports_longer_than_the_column(server: Server) -> None:
    with server.client() as c:
        assert c.post("/api/v1/groups", json={"name": "g"}).is_success
        ports = ",".join(str(p) for p in range(1000, 1800, 2))  # > 1,000 characters
        r = c.post(
            "/api/v1/rules",
            json={"group": "g", "destination": "10.0.0.0/24", "proto": "tcp", "ports": ports},
        )
        _check(r, field="ports")
        assert c.get("/api/v1/rules").json() == []


def _agent_cases() -> list[tuple[str, dict[str, Any], str]]:
    open_ok = {
        "uid": "pod-a-0000000001",
        "user": "alice",
        "pod": "pod-a",
        "mode": "nat",
        "tunnel_ip": "10.200.0.2",
        "started_at": NOW,
    }
    flow_ok = {
        "kind": "end",
        "flow_id": "f1",
        "proto": "tcp",
        "start_ms": NOW_MS,
        "end_ms": NOW_MS,
        "tunnel_ip": "10.200.0.2",
        "tunnel_port": 40000,
        "nat_ip": "192.0.2.10",
        "nat_port": 40000,
        "dst_ip": "10.1.0.5",
        "dst_port": 80,
    }
    denied_ok = {
        "src": "10.200.0.2",
        "proto": "tcp",
        "first_at": NOW,
        "last_at": NOW,
        "count": 1,
    }
    return [
        ("/api/v1/agent/heartbeat", {"name": "pod-a", "applied_revision": BIG, "ready": True},
         "applied_revision"),
        ("/api/v1/agent/heartbeat", {"name": "pod-a", "applied_revision": 1, "ready": True,
                                     "status": {"x": "y" * 70_000}}, "status"),
        ("/api/v1/agent/sessions/open", {**open_ok, "client_id": BIG}, "client_id"),
        ("/api/v1/agent/sessions/open", {**open_ok, "client_id": BIG32}, "client_id"),
        ("/api/v1/agent/sessions/open", {**open_ok, "tunnel_ip": "1" * 300}, "tunnel_ip"),
        ("/api/v1/agent/sessions/open", {**open_ok, "pod": "p" * 300}, "pod"),
        ("/api/v1/agent/sessions/open", {**open_ok, "real_ip": "r" * 300}, "real_ip"),
        ("/api/v1/agent/sessions/open", {**open_ok, "user": "a\x00"}, "user"),
        ("/api/v1/agent/sessions/open", {**open_ok, "started_at": EARLY}, "started_at"),
        ("/api/v1/agent/sessions/close", {"uid": "pod-a-0000000001", "ended_at": NOW,
                                          "bytes_in": BIG}, "bytes_in"),
        ("/api/v1/agent/denied", {"pod": "pod-a", "events": [{**denied_ok, "count": BIG}]},
         "count"),
        ("/api/v1/agent/denied", {"pod": "pod-a", "events": [{**denied_ok, "count": BIG32}]},
         "count"),
        ("/api/v1/agent/denied", {"pod": "pod-a", "events": [{**denied_ok, "src": "s" * 300}]},
         "src"),
        ("/api/v1/agent/denied",
         {"pod": "pod-a", "events": [{**denied_ok, "first_at": "2026-12-02T10:00:00"}]},
         "first_at"),
        ("/api/v1/agent/flows", {"pod": "pod-a", "records": [{**flow_ok, "bytes_out": BIG}]},
         "bytes_out"),
        ("/api/v1/agent/flows", {"pod": "pod-\x00", "records": [flow_ok]}, "pod"),
        ("/api/v1/agent/heartbeat", {"name": "Pod A", "applied_revision": 1, "ready": True},
         "pod name"),
        ("/api/v1/agent/register", {"name": "pod-b", "pod_ip": "9" * 300}, "pod_ip"),
        ("/api/v1/agent/register", {"name": "pod-b", "public_endpoint": "e\x00"},
         "public_endpoint"),
    ]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "field"), _agent_cases())
def test_agent_input(server: Server, path: str, body: dict[str, Any], field: str) -> None:
    agent = server.pod_token("pod-a")
    _pod(server, agent)
    with server.client(agent) as c:
        r = _raw(c, "POST", path, json.dumps(body))
        _check(r, field=field)
    with server.client() as c:
        assert c.get("/api/v1/sessions").json() == []
        assert c.get("/api/v1/audit/denied").json() == []
        assert [p["name"] for p in c.get("/api/v1/pods").json()] == ["pod-a"]
