"""Request bodies: nobody without a token makes the server read one, and every route has a
size limit (controlplane/intake.py; FastAPI's max_body_size)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server

MB = 1 << 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _json_chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A syntactically valid JSON body of exactly ``total`` bytes, produced lazily."""
    head, tail = b'{"name": "x", "description": "', b'"}'
    left = total - len(head) - len(tail)
    yield head
    while left > 0:
        n = min(chunk, left)
        yield b"a" * n
        left -= n
    yield tail


def _post(server: Server, path: str, token: str | None, body: Iterator[bytes], **headers: str):
    hdrs = {"content-type": "application/json", **headers}
    if token:
        hdrs["authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=server.url, timeout=60) as c:
        try:
            return c.post(path, content=body, headers=hdrs)
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            return None  # the server answered and closed before the body was all sent


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_large_unauthenticated_body_is_refused_unread(server: Server, declared: bool) -> None:
    # The server runs in this process (a thread): its peak memory is ours. Reset the peak,
    # send 50 MB without a token, and compare.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    size = 50 * MB
    extra = {"content-length": str(size)} if declared else {}
    for token in (None, "vpf_not-a-token"):
        resp = _post(server, "/api/v1/groups", token, _json_chunks(size), **extra)
        if resp is not None:
            assert resp.status_code == 401, resp.text
            assert resp.headers["content-type"] == "application/problem+json"
            assert "before the body is read" in resp.json()["detail"]
    growth_mb = (_status_kb("VmHWM") - before) / 1024
    assert growth_mb < 10, f"peak RSS grew {growth_mb:.1f} MB"
    with server.client() as c:
        assert c.get("/api/v1/groups").json() == []


def test_revoked_tokens_are_refused_before_the_body(server: Server) -> None:
    with server.client() as c:
        made = c.post("/api/v1/tokens", json={"name": "gone", "role": "operator"}).json()
        assert c.delete("/api/v1/tokens/gone").is_success
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(
            "/api/v1/groups",
            json={"name": "g"},
            headers={"Authorization": f"Bearer {made['token']}"},
        )
    assert r.status_code == 401 and "before the body is read" in r.json()["detail"]


def test_a_token_revoked_while_the_intake_remembers_it_is_still_refused(server: Server) -> None:
    """The intake believes a token it found known for a few seconds (agents post often); the
    request's own check still refuses a token revoked in that time, and writes nothing."""
    with server.client() as c:
        made = c.post("/api/v1/tokens", json={"name": "brief", "role": "operator"}).json()
    headers = {"Authorization": f"Bearer {made['token']}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        assert c.post("/api/v1/groups", json={"name": "before"}).status_code == 201
    with server.client() as c:
        assert c.delete("/api/v1/tokens/brief").is_success
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        r = c.post("/api/v1/groups", json={"name": "after"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"], r.text
    with server.client() as c:
        assert [g["name"] for g in c.get("/api/v1/groups").json()] == ["before"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_over_the_route_limit_are_413_and_write_nothing(
    server: Server, declared: bool
) -> None:
    size = 2 * MB  # over the 1 MiB default
    extra = {"content-length": str(size)} if declared else {}
    resp = _post(server, "/api/v1/groups", server.admin_token, _json_chunks(size), **extra)
    assert resp is not None and resp.status_code == 413, resp and resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["title"] == "Request body too large"
    with server.client() as c:
        assert c.get("/api/v1/groups").json() == []
        # Just under the limit is read and judged on its content (the description is too long).
        r = c.post("/api/v1/groups", json={"name": "x", "description": "a" * (MB - 100)})
        assert r.status_code == 422 and "description" in r.text


def test_batch_routes_take_larger_bodies_up_to_their_own_limit(server: Server) -> None:
    agent = server.pod_token("pod-1")
    flow = {
        "flow_id": "f" * 16,
        "pod": "pod-1",
    }
    # 3 MiB of flow records: over the default, under the batch limit, so it is read and
    # judged (these records are incomplete: 422, not 413).
    batch = json.dumps({"pod": "pod-1", "flows": [flow] * 80_000}).encode()
    assert MB < len(batch) < 16 * MB
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(
            "/api/v1/agent/flows",
            content=batch,
            headers={"Authorization": f"Bearer {agent}", "content-type": "application/json"},
        )
    assert r.status_code == 422, r.text[:300]
    resp = _post(server, "/api/v1/agent/flows", agent, _json_chunks(17 * MB))
    assert resp is not None and resp.status_code == 413


def test_the_default_limit_is_a_setting(tmp_path: Path) -> None:
    from vpnfleet.controlplane.settings import ServerSettings

    assert ServerSettings(data_dir=tmp_path).max_body_bytes == MB
    with pytest.raises(ValueError, match="between 4096 bytes and 1 GiB"):
        ServerSettings(data_dir=tmp_path, max_body_bytes=10).validate()
