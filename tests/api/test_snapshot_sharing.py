"""Agents that ask for the fleet snapshot at once share one build (controlplane/snapshotcache).

A fleet starting together (every pod after a control-plane outage) used to cost the replica
one snapshot each: with 20,000 users about a second of its CPU apiece. Agents now ask with
`max_age`; an operator's or a script's request without it still gets one built after it."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from vpnfleet.agent.cpclient import SNAPSHOT_MAX_AGE

ASKING = 20


def builds(admin: httpx.Client) -> float:
    text = admin.get("/metrics").text
    found = re.search(r"^vpnfleet_snapshot_builds_total (\S+)$", text, re.MULTILINE)
    assert found, text[:500]
    return float(found.group(1))


def test_agents_asking_at_once_share_a_snapshot_and_others_get_a_fresh_one(
    server: Server, admin: httpx.Client
) -> None:
    for i in range(30):
        assert admin.post("/api/v1/users", json={"name": f"user{i:02d}"}).status_code == 201
    token = server.pod_token("pod1")
    with closing(server.client(token)) as pod:
        pod.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
    before = builds(admin)

    def ask(_: int) -> bytes:
        with closing(server.client(token)) as c:
            r = c.get("/api/v1/agent/snapshot", params={"max_age": 10})
            assert r.status_code == 200, r.text
            return r.content

    with ThreadPoolExecutor(ASKING) as pool:
        bodies = list(pool.map(ask, range(ASKING)))
    assert len(set(bodies)) == 1  # one snapshot, byte for byte
    assert builds(admin) - before == 1
    shared = httpx.Response(200, content=bodies[0]).json()
    assert len(shared["users"]) == 30 and shared["pods"][0]["name"] == "pod1"

    # A change after it: a request without max_age sees it; one that accepts an older
    # snapshot may get the shared one, whose revision says where its watch must start.
    assert admin.post("/api/v1/users", json={"name": "late"}).status_code == 201
    with closing(server.client(token)) as pod:
        fresh = pod.get("/api/v1/agent/snapshot").json()
        assert "late" in {u["name"] for u in fresh["users"]}
        assert fresh["revision"] > shared["revision"]
        again = pod.get("/api/v1/agent/snapshot", params={"max_age": 10}).json()
        assert again["revision"] >= shared["revision"]
        assert pod.get("/api/v1/agent/snapshot", params={"max_age": SNAPSHOT_MAX_AGE}).is_success
        # Compressed once per build for clients that accept gzip (httpx, the agent's client,
        # does by default); the same document either way.
        zipped = pod.get("/api/v1/agent/snapshot", params={"max_age": 10})
        assert zipped.headers["content-encoding"] == "gzip"
        assert int(zipped.headers["content-length"]) * 3 < len(zipped.content)
        identity = {"Accept-Encoding": "identity"}
        plain = pod.get("/api/v1/agent/snapshot", params={"max_age": 10}, headers=identity)
        assert "content-encoding" not in plain.headers
        assert plain.content == zipped.content
        refused = pod.get(
            "/api/v1/agent/snapshot",
            params={"max_age": 10},
            headers={"Accept-Encoding": "gzip;q=0, identity"},
        )
        assert "content-encoding" not in refused.headers and refused.content == plain.content
        for bad in ("11", "-1", "soon"):
            r = pod.get("/api/v1/agent/snapshot", params={"max_age": bad})
            assert "max_age" in problem(r, 422), bad
