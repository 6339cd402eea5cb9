"""An agent given several control-plane replicas moves to the next one when its replica goes.

The replicas here are httpx mock transports (a fault a unit test cannot make real: a replica
refusing connections); tests/api/test_cp_replicas.py stops real replicas.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.follower import FIRST_BACKOFF, MAX_BACKOFF, SPREAD, reconnect_delay
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.wire import Heartbeat, WatchHeartbeat

A, B = "http://cp-a.test:8000", "http://cp-b.test:8000"


def client(urls: list[str], answer: httpx.MockTransport) -> ControlPlane:
    cp = ControlPlane(urls, "tok")
    cp._http = httpx.AsyncClient(base_url=cp.url, transport=answer)
    return cp


def beat() -> Heartbeat:
    return Heartbeat(name="pod1", applied_revision=1, ready=True, status={})


def test_a_request_no_replica_took_goes_to_the_next_one_at_once() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "cp-a.test":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"revision": 7})

    async def scenario() -> tuple[int, str]:
        cp = client([A, B], httpx.MockTransport(answer))
        try:
            return await cp.heartbeat(beat()), cp.url
        finally:
            await cp.close()

    revision, now = asyncio.run(scenario())
    assert revision == 7 and now == B
    assert seen == ["cp-a.test", "cp-b.test"]


def test_a_request_that_may_have_arrived_is_not_sent_twice() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        raise httpx.ReadError("connection reset", request=request)

    async def scenario() -> str:
        cp = client([A, B], httpx.MockTransport(answer))
        try:
            with pytest.raises(ControlPlaneError, match=r"heartbeat \(http://cp-a.test:8000\)"):
                await cp.heartbeat(beat())
            return cp.url
        finally:
            await cp.close()

    assert asyncio.run(scenario()) == B  # the next request goes to the other replica
    assert seen == ["cp-a.test"]


def test_every_replica_refusing_is_one_clear_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> None:
        cp = client([A, B], httpx.MockTransport(answer))
        try:
            await cp.heartbeat(beat())
        finally:
            await cp.close()

    with pytest.raises(ControlPlaneError, match="ConnectError") as err:
        asyncio.run(scenario())
    assert err.value.retryable


def test_a_watch_stream_the_replica_ended_moves_the_agent_to_the_next_replica() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        line = WatchHeartbeat(revision=3).model_dump_json() + "\n"
        return httpx.Response(200, content=line.encode())

    async def scenario() -> tuple[list[int], str]:
        cp = client([A, B], httpx.MockTransport(answer))
        try:
            got = [m.revision async for m in cp.watch(3)]
            return got, cp.url
        finally:
            await cp.close()

    assert asyncio.run(scenario()) == ([3], B)


def test_with_one_url_every_request_goes_there() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> str:
        cp = client([A], httpx.MockTransport(answer))
        try:
            with pytest.raises(ControlPlaneError):
                await cp.heartbeat(beat())
            return cp.url
        finally:
            await cp.close()

    assert asyncio.run(scenario()) == A


def test_reconnects_are_immediate_until_every_replica_failed_then_back_off_bounded() -> None:
    for _ in range(200):
        assert 0 <= reconnect_delay(0, 2) <= SPREAD  # the stream delivered, then ended
        assert 0 <= reconnect_delay(1, 2) <= SPREAD  # the other replica is still untried
        assert FIRST_BACKOFF / 2 <= reconnect_delay(2, 2) <= FIRST_BACKOFF
        assert FIRST_BACKOFF / 2 <= reconnect_delay(1, 1) <= FIRST_BACKOFF
        assert MAX_BACKOFF / 2 <= reconnect_delay(50, 2) <= MAX_BACKOFF
    waits = [reconnect_delay(0, 1) for _ in range(200)]
    assert max(waits) - min(waits) > SPREAD / 2  # spread: a replica's agents do not return at once


def test_several_control_plane_urls_are_given_comma_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("VPNFLEET_SERVER", "VPNFLEET_CA_FILE"):
        monkeypatch.delenv(var, raising=False)
    flags = {"token": "t" * 32, "name": "pod1"}
    settings = AgentSettings.from_env(server=f"{A}, {B}", **flags)
    assert settings.control_planes == [A, B]
    with pytest.raises(ValueError, match="names the same URL twice"):
        AgentSettings.from_env(server=f"{A},{A}", **flags)
    with pytest.raises(ValueError, match="'cp-b:8000' must be an http:// or https:// URL"):
        AgentSettings.from_env(server=f"{A},cp-b:8000", **flags)
