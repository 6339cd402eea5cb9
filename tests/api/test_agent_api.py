"""The endpoints agents use: register, snapshot, sessions (idempotent, fleet-wide limits)."""

from __future__ import annotations

import datetime as dt

import httpx

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def opened(agent: httpx.Client, uid: str, user: str, real_ip: str, pod: str = "pod1") -> dict:  # type: ignore[type-arg]
    body = {
        "uid": uid,
        "user": user,
        "pod": pod,
        "mode": "nat",
        "tunnel_ip": "10.200.0.2",
        "real_ip": real_ip,
        "real_port": 5000,
        "started_at": now(),
    }
    r = agent.post("/api/v1/agent/sessions/open", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_register_snapshot_and_session_lifecycle(server: Server, admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "alice", "max_sessions": 1})
    with server.client(server.make_token("agent")) as agent:
        boot = agent.post("/api/v1/agent/register", json={"name": "pod1", "pod_ip": "10.99.0.11"})
        assert boot.status_code == 200
        b = boot.json()
        assert "PRIVATE KEY" in b["key_pem"] and b["nat_pool"] == "10.200.0.0/16"
        assert "BEGIN X509 CRL" in b["crl_pem"]
        again = agent.post("/api/v1/agent/register", json={"name": "pod1"}).json()
        assert again["cert_pem"] == b["cert_pem"]  # the pod keeps its certificate
        bad = agent.post("/api/v1/agent/register", json={"name": "pod1", "wire_version": 99})
        assert "wire version" in problem(bad, 400)

        v = opened(agent, "pod1-aaaaaaaa", "alice", "198.51.100.7")
        assert v["allowed"] is True
        # Idempotent: the spool may deliver the same record twice.
        assert (
            opened(agent, "pod1-aaaaaaaa", "alice", "198.51.100.7")["session_id"] == v["session_id"]
        )
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert [s["uid"] for s in snap["sessions"]] == ["pod1-aaaaaaaa"]
        assert snap["users"][0]["cert_serial"] and snap["pods"][0]["pod_ip"] == "10.99.0.11"

        # Another device (another address) over the limit: recorded, refused, closed at once.
        refused = opened(agent, "pod2-bbbbbbbb", "alice", "203.0.113.9", pod="pod2")
        assert refused["allowed"] is False and "session limit" in refused["reason"]
        # The same device reconnecting replaces its old session instead.
        again_v = opened(agent, "pod2-cccccccc", "alice", "198.51.100.7", pod="pod2")
        assert again_v["allowed"] is True
        live = admin.get("/api/v1/sessions", params={"active": "true"}).json()
        assert [s["pod"] for s in live] == ["pod2"]
        ended = admin.get("/api/v1/sessions", params={"active": "false"}).json()
        reasons = {s["end_reason"] for s in ended}
        assert "replaced by a new connection from the same address" in reasons
        assert any(r.startswith("refused: session limit") for r in reasons)

        close = {"uid": "pod2-cccccccc", "ended_at": now(), "bytes_in": 10, "bytes_out": 20}
        assert agent.post("/api/v1/agent/sessions/close", json=close).json() == {"closed": True}
        assert agent.post("/api/v1/agent/sessions/close", json=close).json() == {"closed": False}
        hb = {"name": "pod1", "applied_revision": 5, "ready": True, "status": {"clients": 0}}
        assert agent.post("/api/v1/agent/heartbeat", json=hb).status_code == 200
        assert problem(agent.post("/api/v1/agent/heartbeat", json={**hb, "name": "ghost"}), 404)
    pods = admin.get("/api/v1/pods").json()
    assert pods[0]["ready"] is True and pods[0]["applied_revision"] == 5


def test_session_report_closes_what_the_pod_no_longer_has(
    server: Server, admin: httpx.Client
) -> None:
    admin.post("/api/v1/users", json={"name": "bob", "max_sessions": 5})
    with server.client(server.make_token("agent")) as agent:
        agent.post("/api/v1/agent/register", json={"name": "pod1"})
        opened(agent, "pod1-11111111", "bob", "198.51.100.1")
        opened(agent, "pod1-22222222", "bob", "198.51.100.2")
        out = agent.post(
            "/api/v1/agent/sessions/report", json={"pod": "pod1", "live": ["pod1-22222222"]}
        ).json()
        assert out == {"closed": 1}
    live = admin.get("/api/v1/sessions", params={"active": "true"}).json()
    assert [s["real_ip"] for s in live] == ["198.51.100.2"]
