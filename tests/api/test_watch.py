"""The watch stream agents follow: ordered, resumable, resync when too far behind."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import Server
from vpnfleet.wire import parse_watch_message


def read_events(server: Server, since: int, want: int, timeout: float = 15) -> list[dict[str, Any]]:
    """Read up to `want` non-heartbeat events from the stream, bounded in time. Every line
    must be one the agents' parser accepts."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with (
        server.client() as c,
        c.stream("GET", "/api/v1/watch", params={"since": since}, timeout=timeout) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        for line in resp.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            parse_watch_message(ev)
            if ev["type"] != "heartbeat":
                events.append(ev)
            if len(events) >= want or time.monotonic() > deadline:
                break
    return events


def test_watch_streams_changes_in_order_and_resumes(server: Server, admin: httpx.Client) -> None:
    start = admin.get("/api/v1/revision").json()["revision"]
    admin.post("/api/v1/users", json={"name": "w1"})
    admin.post("/api/v1/groups", json={"name": "wg"})
    admin.post("/api/v1/groups/wg/members", json={"user": "w1"})
    events = read_events(server, start, 4)
    kinds = [(e["kind"], e["op"]) for e in events]
    assert kinds == [
        ("user", "upsert"),
        ("group", "upsert"),
        ("membership", "upsert"),
        ("user", "upsert"),
    ]
    revs = [e["revision"] for e in events]
    assert revs == sorted(revs) and revs[0] > start
    assert events[-1]["object"]["groups"] == ["wg"]
    assert events[2]["object"] == {
        "group_id": events[1]["object"]["id"],
        "group": "wg",
        "user_id": events[0]["object"]["id"],
        "user": "w1",
    }
    assert events[0]["object"]["cert_serial"] and events[0]["object"]["groups"] == []
    # Resume after the second event: only the later ones come.
    later = read_events(server, revs[1], 2)
    assert [e["revision"] for e in later] == revs[2:]


def test_watch_delivers_a_live_change(server: Server, admin: httpx.Client) -> None:
    head = admin.get("/api/v1/revision").json()["revision"]
    result: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: result.extend(read_events(server, head, 1)))
    t.start()
    time.sleep(0.5)
    admin.post("/api/v1/users", json={"name": "live", "mode": "gateway"})
    t.join(timeout=20)
    assert result and result[0]["kind"] == "user" and result[0]["object"]["mode"] == "gateway"


def test_watch_resync_when_ahead_or_pruned(server: Server, admin: httpx.Client) -> None:
    head = admin.get("/api/v1/revision").json()["revision"]
    ev = read_events(server, head + 1000, 1)
    assert ev[0] == {"type": "resync", "revision": head}
    for i in range(3):
        admin.post("/api/v1/users", json={"name": f"p{i}"})
    engine = create_engine(server.database_url)
    with engine.begin() as conn:
        newest = conn.execute(text("SELECT max(id) FROM changes")).scalar_one()
        conn.execute(text("DELETE FROM changes WHERE id < :n"), {"n": newest - 1})
    engine.dispose()
    # The hub learns the log's oldest row at its next poll (every 0.2 s here; it serves the
    # rows it still holds in memory meanwhile, which are correct, just no longer kept).
    deadline = time.monotonic() + 5
    ev = read_events(server, 1, 1)
    while ev[0]["type"] != "resync" and time.monotonic() < deadline:
        time.sleep(0.1)
        ev = read_events(server, 1, 1)
    assert ev[0]["type"] == "resync" and ev[0]["revision"] >= newest


def test_watch_requires_a_pod_operator_or_auditor(server: Server) -> None:
    enrollment = server.make_token("agent")
    with server.client(enrollment) as c:
        assert c.get("/api/v1/watch").status_code == 403
    with server.client(None) as c:
        assert c.get("/api/v1/watch").status_code == 401
    with server.client() as c:
        assert c.get("/api/v1/watch", params={"since": -1}).status_code == 422


def test_a_stored_change_the_stream_cannot_read_makes_watchers_resync(
    server: Server, admin: httpx.Client
) -> None:
    """A change-log row an older version wrote (here the retired `kill` event, as it was
    stored before the upgrade) is neither sent nor skipped: the watcher resyncs past it."""
    start = admin.get("/api/v1/revision").json()["revision"]
    admin.post("/api/v1/users", json={"name": "before"}).raise_for_status()
    engine = create_engine(server.database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO changes (at, kind, op, object_id, data) "
                "VALUES (:at, 'kill', 'upsert', 1, :data)"
            ),
            {"at": "2026-01-31 12:00:00", "data": json.dumps({"user": "before"})},
        )
        bad = conn.execute(text("SELECT max(id) FROM changes")).scalar_one()
    engine.dispose()
    admin.post("/api/v1/users", json={"name": "after"}).raise_for_status()
    events = read_events(server, start, 2)
    assert [(e["type"], e.get("kind")) for e in events] == [("change", "user"), ("resync", None)]
    assert events[1]["revision"] >= bad
    # The snapshot at the resync's revision holds every user, and the stream goes on.
    with server.client(server.pod_token("pod1")) as agent:
        snap = agent.get("/api/v1/agent/snapshot").json()
    assert {"before", "after"} <= {u["name"] for u in snap["users"]}
    assert snap["revision"] >= events[1]["revision"]
    admin.post("/api/v1/users", json={"name": "later"}).raise_for_status()
    later = read_events(server, snap["revision"], 1)
    assert later[0]["kind"] == "user" and later[0]["object"]["name"] == "later"


def _stream_until_end(server: Server, token: str, timeout: float) -> tuple[float | None, int]:
    """Follow the watch with `token` from the head; return when the server ended the stream
    (seconds after the call started waiting) and how many lines came. None: still open."""
    with (
        server.client(token) as c,
        c.stream("GET", "/api/v1/watch", params={"since": 10**9}, timeout=timeout + 5) as r,
    ):
        assert r.status_code == 200
        lines = 0
        started = time.monotonic()
        ended: float | None = None
        try:
            for line in r.iter_lines():
                lines += bool(line)
                if time.monotonic() - started > timeout:
                    break
            else:
                ended = time.monotonic() - started
        except httpx.ReadTimeout:
            pass
        return ended, lines


def test_a_revoked_token_s_open_watch_streams_end(server: Server, admin: httpx.Client) -> None:
    """Revoking a pod or a reader cuts it off the fleet view at once, also an open stream; a
    stream whose token stays valid goes on."""
    pod = server.pod_token("pod-w")
    auditor_name = "watch-auditor"
    r = admin.post("/api/v1/tokens", json={"name": auditor_name, "role": "auditor"})
    r.raise_for_status()
    auditor = r.json()["token"]
    kept = server.make_token("operator")
    results: dict[str, tuple[float | None, int]] = {}

    def follow(label: str, token: str, timeout: float) -> None:
        results[label] = _stream_until_end(server, token, timeout)

    threads = [
        threading.Thread(target=follow, args=("pod", pod, 20)),
        threading.Thread(target=follow, args=("auditor", auditor, 20)),
        threading.Thread(target=follow, args=("kept", kept, 6)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every stream is open (each starts with a resync line from the future)
    admin.post("/api/v1/pods/pod-w/revoke").raise_for_status()
    admin.delete(f"/api/v1/tokens/{auditor_name}").raise_for_status()
    revoked_at = time.monotonic()
    for t in threads:
        t.join(timeout=30)
    pod_end, auditor_end = results["pod"][0], results["auditor"][0]
    assert pod_end is not None and auditor_end is not None, results
    # Each stream began waiting ~1.5 s before the revocations; they end within ~1 s of them.
    assert pod_end < 1.5 + 3.0 and auditor_end < 1.5 + 3.0, (results, revoked_at)
    assert results["kept"][0] is None, "a valid token's stream must not be ended"
    for token in (pod, auditor):
        with server.client(token) as c:
            assert c.get("/api/v1/watch", params={"since": 0}).status_code == 401
