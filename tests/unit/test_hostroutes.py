"""Host routes of gateway users on the TCP server: the plan, and the sync against the fake
runner (the real `ip route` commands run in tests/e2e/test_lab_tcp.py)."""

from __future__ import annotations

from vpnfleet.agent.fakes import FakeFirewall
from vpnfleet.agent.hostroutes import HostRoutes, route_plan
from vpnfleet.agent.registration import TUN_DEVS


def test_route_plan_is_a_diff() -> None:
    have = {"10.9.0.1": "tun1", "10.9.0.2": "tun1", "10.9.0.3": "tun0"}
    want = {"10.9.0.1": "tun1", "10.9.0.3": "tun1", "10.9.0.4": "tun0"}
    add, remove = route_plan(want, have)
    assert add == {"10.9.0.3": "tun1", "10.9.0.4": "tun0"}
    assert remove == ["10.9.0.2"]
    applied = {k: v for k, v in have.items() if k not in remove} | add
    assert applied == want
    assert route_plan(want, want) == ({}, [])


async def test_sync_makes_the_kernel_follow_the_book() -> None:
    fw = FakeFirewall()
    want: dict[str, str] = {"10.9.0.7": "tcp"}
    routes = HostRoutes(fw, lambda: want, TUN_DEVS)
    # A route an earlier agent left for a user who is gone now.
    fw.host_routes_["10.9.0.8"] = "tun1"
    await routes.sync()
    assert fw.host_routes_ == {"10.9.0.7": "tun1"}
    # The user came back over UDP while its TCP session lingers: the newest wins (book).
    want["10.9.0.7"] = "udp"
    await routes.sync()
    assert fw.host_routes_ == {"10.9.0.7": "tun0"}
    want.clear()
    await routes.sync()
    assert fw.host_routes_ == {}
