"""Agents that ask for the fleet snapshot at once share builds (controlplane/snapshotcache).

A fleet starting together (every pod after a control-plane outage) used to cost the replica
one snapshot each: with 20,000 users about a second of its CPU apiece. Requests that come
while one is built now share the next build; each still gets a snapshot read after it
arrived."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_users_groups_rules import problem
from tests.conftest import RunningServer, Server, fresh_database
from vpnfleet.controlplane import fleetstate
from vpnfleet.controlplane.routers.agents import _accepts_gzip

ASKING = 20
BUILD_SECONDS = 1.0  # each build made this slow, so that the requests overlap it


def builds(admin: httpx.Client) -> float:
    text = admin.get("/metrics").text
    found = re.search(r"^vpnfleet_snapshot_builds_total (\S+)$", text, re.MULTILINE)
    assert found, text[:500]
    return float(found.group(1))


def test_agents_asking_at_once_share_builds_and_each_gets_one_read_after_it_asked(
    server: Server, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(30):
        assert admin.post("/api/v1/users", json={"name": f"user{i:02d}"}).status_code == 201
    token = server.pod_token("pod1")
    with closing(server.client(token)) as pod:
        pod.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
    real = fleetstate.build_snapshot
    reads: list[float] = []  # when each build started reading
    lock = threading.Lock()

    def slow(*args: Any, **kwargs: Any) -> Any:
        with lock:
            reads.append(time.monotonic())
        time.sleep(BUILD_SECONDS)
        return real(*args, **kwargs)

    monkeypatch.setattr(fleetstate, "build_snapshot", slow)
    before = builds(admin)

    def ask(_: int) -> tuple[float, dict[str, Any]]:
        with closing(server.client(token)) as c:
            asked = time.monotonic()
            r = c.get("/api/v1/agent/snapshot")
            assert r.status_code == 200, r.text
            return asked, r.json()

    with ThreadPoolExecutor(ASKING) as pool:
        answers = list(pool.map(ask, range(ASKING)))
    built = builds(admin) - before
    assert 1 <= built <= 3, built  # not one per request
    assert len(reads) == built
    for asked, snap in answers:
        assert len(snap["users"]) == 30 and snap["pods"][0]["name"] == "pod1"
    # Every answer was read after its request was sent: none predates what its asker knew.
    assert all(any(asked <= read for read in reads) for asked, _ in answers)
    monkeypatch.setattr(fleetstate, "build_snapshot", real)

    # A change just before a request is in its answer, gzipped or not.
    assert admin.post("/api/v1/users", json={"name": "late"}).status_code == 201
    with closing(server.client(token)) as pod:
        zipped = pod.get("/api/v1/agent/snapshot")
        assert "late" in {u["name"] for u in zipped.json()["users"]}
        # Compressed once per build for clients that accept gzip (httpx, the agent's client,
        # does by default); the same document either way.
        assert zipped.headers["content-encoding"] == "gzip"
        assert int(zipped.headers["content-length"]) * 3 < len(zipped.content)
        identity = {"Accept-Encoding": "identity"}
        plain = pod.get("/api/v1/agent/snapshot", headers=identity)
        assert "content-encoding" not in plain.headers
        assert plain.json() == zipped.json()
        no_gzip = {"Accept-Encoding": "gzip;q=0, identity"}
        refused = pod.get("/api/v1/agent/snapshot", headers=no_gzip)
        assert "content-encoding" not in refused.headers
    with closing(server.client(server.make_token("agent"))) as enroller:
        assert problem(enroller.get("/api/v1/agent/snapshot"), 403)


@pytest.mark.postgres
def test_a_snapshot_is_one_view_even_while_changes_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revision a snapshot names and the state it holds come from one view of the database:
    the watch from that revision replays only what the snapshot does not hold. (Forced: a user
    is disabled between the snapshot's read of the revision and its read of the users.)
    PostgreSQL only: a SQLite read transaction sees one view by itself, and there the forced
    write would wait for the snapshot's request slot (one on SQLite)."""
    with fresh_database("postgresql", tmp_path) as url:
        running = RunningServer(url, tmp_path / "data")
        try:
            with running.server.client() as admin:
                _one_view(running.server, admin, monkeypatch)
        finally:
            running.stop()


def _one_view(server: Server, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    assert admin.post("/api/v1/users", json={"name": "alice"}).status_code == 201
    real = fleetstate.user_states
    disabled: list[int] = []
    started: list[bool] = []  # the disable itself calls user_states too

    def change_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not started:
            started.append(True)
            assert admin.post("/api/v1/users/alice/disable").status_code == 200
            disabled.append(admin.get("/api/v1/revision").json()["revision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fleetstate, "user_states", change_meanwhile)
    with closing(server.client(server.pod_token("pod1"))) as pod:
        snap = pod.get("/api/v1/agent/snapshot").json()
    (alice,) = [u for u in snap["users"] if u["name"] == "alice"]
    assert disabled and snap["revision"] < disabled[0]
    assert alice["enabled"] is True  # as of its revision: the disable comes by the watch


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip, deflate", True),  # httpx's default
        ("deflate, gzip;q=0.5", True),
        ("gzip ; q = 0.5", True),
        ("x-gzip", True),
        ("gzip;q=0, identity", False),
        ("gzip; q=0.0", False),
        ("*", False),
        ("identity", False),
        ("", False),
        ("gzip;q=much", False),
    ],
)
def test_accept_encoding_is_read_as_written(header: str, gzip: bool) -> None:
    assert _accepts_gzip(header) is gzip
