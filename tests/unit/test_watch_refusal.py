"""Agents back off as told when a control plane refuses a watch stream at its limit."""

from __future__ import annotations

import asyncio

import httpx

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.follower import retry_wait


def test_a_refused_watch_carries_retry_after_and_the_reason() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/watch"
        return httpx.Response(
            503,
            headers={"Retry-After": "10", "Content-Type": "application/problem+json"},
            json={"title": "Too many watch streams", "status": 503,
                  "detail": "this control plane serves at most 3 watch streams at once "
                            "(VPNFLEET_WATCH_MAX_SUBSCRIBERS); retry in 10 s"},
        )  # fmt: skip

    async def scenario() -> tuple[ControlPlaneError, bool]:
        cp = ControlPlane("http://cp.test", "tok")
        cp._http = httpx.AsyncClient(
            base_url="http://cp.test", transport=httpx.MockTransport(answer)
        )
        try:
            async for _ in cp.watch(0):
                raise AssertionError("a refused stream yields nothing")
        except ControlPlaneError as exc:
            return exc, cp.reachable
        finally:
            await cp.close()
        raise AssertionError("no error")

    exc, reachable = asyncio.run(scenario())
    assert exc.status == 503 and exc.retry_after == 10.0
    assert "VPNFLEET_WATCH_MAX_SUBSCRIBERS" in str(exc)
    assert reachable  # it answered: full, not down


def test_the_follower_waits_at_least_retry_after_spread_out() -> None:
    refused = ControlPlaneError("watch: HTTP 503", 503, retry_after=10.0)
    waits = [retry_wait(refused, 0.5) for _ in range(200)]
    assert all(10.0 <= w <= 15.0 for w in waits)
    assert max(waits) - min(waits) > 1.0  # spread, so refused agents do not return together
    # Without Retry-After: the usual backoff.
    assert retry_wait(ControlPlaneError("watch: ConnectError"), 2.0) == 2.0
