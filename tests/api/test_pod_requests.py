"""What the requests every pod makes every few seconds cost a replica's event loop.

A plain FastAPI handler with a database session and a token check takes five worker-thread
calls, and each waits its turn in the event loop on the way back: with 200 pods the loop, not
the database, was what requests queued for (docs/performance.md). The heartbeat, the session
report, session batches and flow records take one. Counted on a server in this process."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import closing
from typing import Any

import anyio.to_thread
import httpx
import pytest

from tests.api.test_session_batch import open_rec
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
        real = anyio.to_thread.run_sync

        async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            calls.append(name_of(func))
            return await real(func, *args, **kwargs)

        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        for what, (path, body) in requests.items():
            calls.clear()
            r = pod.post(path, json=body)
            assert r.status_code == 200, (what, r.text)
            if what == "batch":
                assert r.json()["results"][0]["verdict"]["allowed"] is True, r.text
            mine = [c for c in calls if not c[0].startswith(BACKGROUND)]
            assert mine == [("vpnfleet.controlplane.state", "pod_transaction.<locals>.run")], (
                what,
                calls,
            )
        monkeypatch.setattr(anyio.to_thread, "run_sync", real)
        # The answers are what the agent expects: the batch's verdict, the report's repair.
        snap = pod.get("/api/v1/agent/snapshot").json()
        assert [s["uid"] for s in snap["sessions"]] == ["pod1-00000001"]
        pods = {p["name"]: p for p in admin.get("/api/v1/pods").json()}
        assert pods["pod1"]["ready"] is True
