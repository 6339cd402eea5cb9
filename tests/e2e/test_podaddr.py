"""The agent finds its pod IP itself when the pod spec does not give it (podman, plain containers).

Real namespaces shaped like a pod: ``eth0`` with the pod address and the default route, a
second interface towards clients, loopback. The agent's start (`vpnfleet agent`, run inside the
namespace until it has parsed its settings) must pick the pod address, say where it came from,
and keep an address given in the environment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.netns import Netns, NetnsPool, requires_netns, veth

pytestmark = [requires_netns()]

# What `vpnfleet agent` does before it starts anything: settings, with discovery.
SETTINGS = """
import json, sys
from vpnfleet.agent import podaddr
from vpnfleet.agent.settings import AgentSettings
uplink = sys.argv[1] or None
s = AgentSettings.from_env(
    find_pod_ip=podaddr.discover, server="http://127.0.0.1:1", token="t", name="pod-a",
    uplink=uplink,
)
print(json.dumps({"pod_ip": s.pod_ip, "source": s.pod_ip_source}))
"""


def settings_in(ns: Netns, uplink: str = "", env: dict[str, str] | None = None) -> dict[str, str]:
    prefix = [f"{k}={v}" for k, v in (env or {}).items()]
    res = ns.run("env", *prefix, sys.executable, "-c", SETTINGS, uplink)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


@pytest.fixture
def pod() -> Iterator[Netns]:
    with NetnsPool("vft-podip-") as pool:
        pod, router, clients = pool.create("pod"), pool.create("rt"), pool.create("cl")
        veth(pod, "eth0", router, "p0")
        veth(pod, "eth1", clients, "c0")
        pod.add_addr("eth0", "10.88.0.7/24")
        pod.add_addr("eth1", "172.30.0.7/24")  # the clients' network
        router.add_addr("p0", "10.88.0.1/24")
        pod.add_route("default", "10.88.0.1")
        yield pod


def test_the_default_route_s_source_address_is_the_pod_ip(pod: Netns) -> None:
    got = settings_in(pod)
    assert got["pod_ip"] == "10.88.0.7"
    assert "default route (dev eth0)" in got["source"]


def test_the_uplink_s_address_wins_when_an_uplink_is_named(pod: Netns) -> None:
    got = settings_in(pod, uplink="eth1")
    assert got == {"pod_ip": "172.30.0.7", "source": "the address of the uplink eth1"}


def test_a_given_pod_ip_is_kept(pod: Netns) -> None:
    got = settings_in(pod, env={"VPNFLEET_POD_IP": "10.88.0.99"})
    assert got == {"pod_ip": "10.88.0.99", "source": None}


def test_no_route_and_no_uplink_address_leave_the_pod_without_one(pod: Netns) -> None:
    pod.run("ip", "route", "del", "default")
    pod.run("ip", "addr", "flush", "dev", "eth0")
    assert settings_in(pod) == {"pod_ip": None, "source": None}
    assert settings_in(pod, uplink="eth0") == {"pod_ip": None, "source": None}
    assert settings_in(pod, uplink="nosuch0") == {"pod_ip": None, "source": None}


UPLINK_CHECK = """
import logging, sys
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.cli.agentcmd import _check_uplink
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
s = AgentSettings.from_env(
    server="http://127.0.0.1:1", token="t", name="pod-a", pod_ip="10.88.0.7",
    uplink=sys.argv[1], push_routes=sys.argv[2].split(","),
)
_check_uplink(s)
"""


def test_a_pushed_route_that_leaves_through_another_interface_is_named_at_start(
    pod: Netns,
) -> None:
    """NAT masquerades only what leaves through the uplink (``-o UPLINK``): a pushed network
    behind another interface would silently not work for NAT users (what a container whose
    interfaces podman had swapped did in a CI run). The agent says so at start, naming the
    interface the kernel uses."""

    def check(uplink: str, routes: str) -> str:
        res = pod.run(sys.executable, "-c", UPLINK_CHECK, uplink, routes)
        assert res.returncode == 0, res.stderr
        return str(res.stdout)

    # 172.30.0.0/24 is behind eth1, everything else (the default route) behind eth0.
    said = check("eth0", "172.30.0.0/24,192.0.2.0/24")
    [line] = said.splitlines()
    assert line.startswith("WARNING the pushed route 172.30.0.0/24 leaves through eth1, not ")
    assert "NAT users cannot reach 172.30.0.0/24; set VPNFLEET_UPLINK=eth1" in line
    # Two networks behind two other interfaces: no single uplink fits.
    said = check("lo", "172.30.0.0/24,192.0.2.0/24")
    assert len(said.splitlines()) == 2, said
    assert "several interfaces: leave VPNFLEET_UPLINK unset" in said
    # A pushed network that is the pod's own (a DNS server on the pod): local, not routed.
    assert check("eth0", "10.88.0.7/32") == ""
    # The right uplink for every pushed network: nothing to say.
    assert check("eth0", "192.0.2.0/24,10.88.0.0/24") == ""
    assert check("eth1", "172.30.0.0/24") == ""
    # A network the pod has no route to at all is not this check's business.
    pod.run("ip", "route", "del", "default")
    assert check("eth0", "192.0.2.0/24") == ""
