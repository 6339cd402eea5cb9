"""What the requests every pod makes every few seconds cost a replica's event loop.

A plain FastAPI handler with a database session and a token check takes five worker-thread
calls, and each waits its turn in the event loop on the way back: with 200 pods the loop, not
the database, was what requests queued for (docs/performance.md). The heartbeat, the session
report, session batches and flow records take one. Counted on a server in this process."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import closing
from typing import Any

import anyio.to_thread
import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.pool import Pool

from tests.api.test_session_batch import open_rec
from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from vpnfleet.controlplane import state as state_module

# Worker-thread calls that are not the request's: the change hub's reads, the lease sweep.
BACKGROUND = ("vpnfleet.controlplane.watch", "vpnfleet.controlplane.podleases")


def name_of(func: Callable[..., Any]) -> tuple[str, str]:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__module__", "") or "", getattr(func, "__qualname__", repr(func))


def test_each_frequent_pod_request_takes_one_worker_thread_call(
    server: Server, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The intake's memory of the pod's token must outlast the test on a slow machine: its
    # lookup after that is a worker-thread call of its own (one per token per 10 s).
    monkeypatch.setattr(state_module, "KNOWN_TOKEN_TTL", 3600.0)
    assert admin.post("/api/v1/users", json={"name": "alice"}).status_code == 201
    pod = server.client(server.pod_token("pod1"))
    with closing(pod):
        pod.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
        opened = open_rec("pod1-00000001", "alice", "198.51.100.1")
        requests: dict[str, tuple[str, dict[str, Any]]] = {
            "heartbeat": ("/api/v1/agent/heartbeat",
                          {"name": "pod1", "applied_revision": 0, "ready": True}),
            "batch": ("/api/v1/agent/sessions/batch", {"pod": "pod1", "records": [opened]}),
            "report": ("/api/v1/agent/sessions/report", {"pod": "pod1", "live": ["pod1-00000001"]}),
            "flows": ("/api/v1/agent/flows", {"pod": "pod1", "records": []}),
        }  # fmt: skip
        calls: list[tuple[str, str]] = []
        checkouts: list[tuple[str, str]] = []  # database connections taken by those calls
        real = anyio.to_thread.run_sync
        in_call = threading.local()

        async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            calls.append(name_of(func))

            def traced(*a: Any) -> Any:
                in_call.name = name_of(func)
                try:
                    return func(*a)
                finally:
                    in_call.name = None

            return await real(traced, *args, **kwargs)

        def checked_out(*_: Any) -> None:
            name = getattr(in_call, "name", None)
            if name is not None and not name[0].startswith(BACKGROUND):
                checkouts.append(name)

        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        event.listen(Pool, "checkout", checked_out)
        try:
            for what, (path, body) in requests.items():
                calls.clear()
                checkouts.clear()
                r = pod.post(path, json=body)
                assert r.status_code == 200, (what, r.text)
                if what == "batch":
                    assert r.json()["results"][0]["verdict"]["allowed"] is True, r.text
                mine = [c for c in calls if not c[0].startswith(BACKGROUND)]
                run = ("vpnfleet.controlplane.state", "pod_transaction.<locals>.run")
                assert mine == [run], (what, calls)
                # The token check shares the work's transaction: one connection, one commit.
                assert checkouts == [run], (what, checkouts)
        finally:
            event.remove(Pool, "checkout", checked_out)
            monkeypatch.setattr(anyio.to_thread, "run_sync", real)
        # The answers are what the agent expects: the batch's verdict, the report's repair.
        snap = pod.get("/api/v1/agent/snapshot").json()
        assert [s["uid"] for s in snap["sessions"]] == ["pod1-00000001"]
        pods = {p["name"]: p for p in admin.get("/api/v1/pods").json()}
        assert pods["pod1"]["ready"] is True


def test_an_invalid_body_does_not_hide_a_refused_token(server: Server, admin: httpx.Client) -> None:
    """These endpoints check the token in the handler's thread, after FastAPI has validated
    the body; a refused token must still be answered 401/403 (as on every other endpoint),
    not 422, which would tell its holder the token is fine."""
    pod_token = server.pod_token("pod1")
    with closing(server.client(pod_token)) as pod:
        pod.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
    operator = server.make_token("operator")
    bad = {
        "/api/v1/agent/heartbeat": {"name": "pod1", "applied_revision": "soon"},
        "/api/v1/agent/sessions/batch": {"pod": "pod1", "records": "none"},
        "/api/v1/agent/sessions/report": {"pod": "pod1"},
        "/api/v1/agent/flows": {"records": []},
    }
    json_type = {"Content-Type": "application/json"}
    with closing(server.client(operator)) as op, closing(server.client(pod_token)) as pod:
        for path, body in bad.items():
            assert "pod credential" in problem(op.post(path, json=body), 403), path
            # A body that is not JSON at all is refused before any dependency runs: the same.
            r = op.post(path, content=b"{not json", headers=json_type)
            assert "pod credential" in problem(r, 403), path
            r = pod.post(path, content=b"{not json", headers=json_type)
            assert "not valid JSON" in problem(r, 422), path
            # The pod's own token: the body's fault, named.
            detail = problem(pod.post(path, json=body), 422)
            assert detail.split(":")[0] in {"applied_revision", "records", "live", "pod"}, detail
        assert admin.post("/api/v1/pods/pod1/revoke").status_code == 200
        for path, body in bad.items():
            assert "revoked" in problem(pod.post(path, json=body), 401), path
