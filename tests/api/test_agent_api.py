"""The endpoints agents use: register, snapshot, sessions (idempotent, fleet-wide limits)."""

from __future__ import annotations

import datetime as dt

import httpx

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def opened(agent: httpx.Client, uid: str, user: str, real_ip: str, pod: str = "pod1") -> dict:  # type: ignore[type-arg]
    """Open a session on `pod` through that pod's own client."""
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
    with (
        server.client(server.pod_token("pod1")) as agent,
        server.client(server.pod_token("pod2")) as agent2,
    ):
        b2 = agent2.post("/api/v1/agent/register", json={"name": "pod2"})
        b2.raise_for_status()
        boot = agent.post("/api/v1/agent/register", json={"name": "pod1", "pod_ip": "10.99.0.11"})
        assert boot.status_code == 200
        b = boot.json()
        assert "PRIVATE KEY" in b["key_pem"] and b["nat_pool"] == "10.200.0.0/16"
        assert "BEGIN X509 CRL" in b["crl_pem"]
        # One auth-token secret for the fleet: a token from one pod is good on the others.
        assert "BEGIN OpenVPN auth-token server key" in b["auth_token_key"]
        assert b["auth_token_key"] == b2.json()["auth_token_key"]
        assert b["sso_session_seconds"] == 12 * 3600  # no IdP configured: the default
        again = agent.post("/api/v1/agent/register", json={"name": "pod1"}).json()
        assert again["cert_pem"] == b["cert_pem"]  # the pod keeps its certificate
        assert again["auth_token_key"] == b["auth_token_key"]
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
        refused = opened(agent2, "pod2-bbbbbbbb", "alice", "203.0.113.9", pod="pod2")
        assert refused["allowed"] is False and "session limit" in refused["reason"]
        # The same device reconnecting replaces its old session instead: the old one is
        # marked to end and stays live until its pod closes it (bytes, real end time).
        again_v = opened(agent2, "pod2-cccccccc", "alice", "198.51.100.7", pod="pod2")
        assert again_v["allowed"] is True
        live = admin.get("/api/v1/sessions", params={"active": "true"}).json()
        assert {s["pod"]: s["kill_reason"] for s in live} == {
            "pod2": None,
            "pod1": "replaced by a new connection from the same address",
        }
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert {s["uid"]: s["kill"] for s in snap["sessions"]} == {
            "pod1-aaaaaaaa": "replaced by a new connection from the same address",
            "pod2-cccccccc": None,
        }
        # The replaced session no longer holds a place: the limit still counts the new one.
        over = opened(agent2, "pod2-dddddddd", "alice", "203.0.113.10", pod="pod2")
        assert over["allowed"] is False and "session limit" in over["reason"]
        old = {"uid": "pod1-aaaaaaaa", "ended_at": now(), "bytes_in": 7, "bytes_out": 9,
               "reason": "replaced by a new connection"}  # fmt: skip
        assert agent.post("/api/v1/agent/sessions/close", json=old).json() == {"closed": True}
        ended = admin.get("/api/v1/sessions", params={"active": "false"}).json()
        by_uid = {s["id"]: s for s in ended}
        closed = by_uid[v["session_id"]]
        assert (closed["end_reason"], closed["bytes_in"], closed["bytes_out"]) == (
            "replaced by a new connection",
            7,
            9,
        )
        assert closed["kill_reason"] == "replaced by a new connection from the same address"
        assert any(s["end_reason"].startswith("refused: session limit") for s in ended)

        close = {"uid": "pod2-cccccccc", "ended_at": now(), "bytes_in": 10, "bytes_out": 20}
        assert agent2.post("/api/v1/agent/sessions/close", json=close).json() == {"closed": True}
        assert agent2.post("/api/v1/agent/sessions/close", json=close).json() == {"closed": False}
        hb = {"name": "pod1", "applied_revision": 5, "ready": True, "status": {"clients": 0}}
        assert agent.post("/api/v1/agent/heartbeat", json=hb).status_code == 200
        assert "cannot act as pod 'ghost'" in problem(
            agent.post("/api/v1/agent/heartbeat", json={**hb, "name": "ghost"}), 403
        )
    pods = admin.get("/api/v1/pods").json()
    assert pods[0]["name"] == "pod1"
    assert pods[0]["ready"] is True and pods[0]["applied_revision"] == 5


def test_session_report_closes_what_the_pod_no_longer_has(
    server: Server, admin: httpx.Client
) -> None:
    admin.post("/api/v1/users", json={"name": "bob", "max_sessions": 5})
    with server.client(server.pod_token("pod1")) as agent:
        agent.post("/api/v1/agent/register", json={"name": "pod1"})
        opened(agent, "pod1-11111111", "bob", "198.51.100.1")
        opened(agent, "pod1-22222222", "bob", "198.51.100.2")
        out = agent.post(
            "/api/v1/agent/sessions/report", json={"pod": "pod1", "live": ["pod1-22222222"]}
        ).json()
        assert out == {"closed": 1, "ended": []}
    live = admin.get("/api/v1/sessions", params={"active": "true"}).json()
    assert [s["real_ip"] for s in live] == ["198.51.100.2"]


def test_kill_marks_live_sessions_until_their_pods_close_them(
    server: Server, admin: httpx.Client
) -> None:
    """A kill is state: every live session of the user is marked (in the snapshot, for a pod
    that is away now), stays live until its pod closes it, and stops counting toward the
    limit, so the user may connect again at once."""
    admin.post("/api/v1/users", json={"name": "kim", "max_sessions": 2}).raise_for_status()
    admin.post("/api/v1/users", json={"name": "other"}).raise_for_status()
    with server.client(server.pod_token("pod1")) as agent:
        agent.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
        opened(agent, "pod1-kim00001", "kim", "198.51.100.1")
        opened(agent, "pod1-kim00002", "kim", "198.51.100.2")
        opened(agent, "pod1-oth00001", "other", "198.51.100.3")
        assert opened(agent, "pod1-kim00003", "kim", "198.51.100.4")["allowed"] is False

        head = admin.get("/api/v1/revision").json()["revision"]
        out = admin.post("/api/v1/users/kim/kill")
        assert out.status_code == 200, out.text
        assert out.json() == {"sessions": 2, "revision": head + 2}
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert snap["revision"] == head + 2
        assert {s["uid"]: s["kill"] for s in snap["sessions"]} == {
            "pod1-kim00001": "disconnected by an administrator",
            "pod1-kim00002": "disconnected by an administrator",
            "pod1-oth00001": None,
        }
        live = admin.get("/api/v1/sessions", params={"user": "kim", "active": "true"}).json()
        assert len(live) == 2 and all(s["kill_requested_at"] for s in live)
        # Killed sessions do not count: kim may connect again while the pods close the old.
        assert opened(agent, "pod1-kim00004", "kim", "198.51.100.5")["allowed"] is True
        close = {"uid": "pod1-kim00001", "ended_at": now(), "bytes_in": 100, "bytes_out": 200,
                 "reason": "disconnected by an administrator"}  # fmt: skip
        assert agent.post("/api/v1/agent/sessions/close", json=close).json() == {"closed": True}
    audit = admin.get("/api/v1/audit/admin", params={"action": "session.kill"}).json()
    assert audit[0]["target"] == "kim" and audit[0]["revision"] == head + 2
    assert sorted(audit[0]["after"]["sessions"]) == ["pod1-kim00001", "pod1-kim00002"]
    ended = admin.get("/api/v1/sessions", params={"user": "kim", "active": "false"}).json()
    done = [s for s in ended if s["end_reason"] == "disconnected by an administrator"]
    assert len(done) == 1 and done[0]["bytes_out"] == 200
    assert admin.post("/api/v1/users/ghost/kill").status_code == 404
