"""The lab's network: namespaces, bridges, veth pairs, addresses and the load balancer's NAT.

Layout for prefix ``<p>``; every address exists only inside namespaces the lab creates,
except the root end of the admin veth, the one thing the lab puts in the root namespace::

    root ns  <p>-adm 10.99.254.1/30 ===== admin0 10.99.254.2/30 in <p>-cp (admin_net)

    <p>-fab  bridge "cluster" 10.99.0.0/24, the pod network:
                 <p>-cp .2   <p>-lb .3 (eth0)   <p>-rtr .4   <p>-pod<i> .(10+i)   <p>-svc .100
             bridge "public" 198.51.100.0/24, the internet:
                 <p>-lb .1 (eth1)   <p>-c-<name> .(10+j)

The load balancer spreads UDP 1194 (and TCP 443, the pods' TCP fallback) on its public
address over the pods like a Kubernetes Service (``-m statistic`` DNAT, no SNAT, so pods see
the client's real address). Pods and clients route via the load balancer, so replies are
un-NATed by its conntrack; its FORWARD chain lets the internet into the pod network only
through that DNAT, so the VPN is the only way in. The control plane and the service have no
default route. Gateway-mode users' addresses reach the service either through the router
namespace, whose BIRD learns one /32 per user over BGP from the pods (``lab/bgprouter.py``;
the service routes the gateway pool via the router), or, with static routing, by one /32
route per user in the service (:func:`add_route`).

Everything is computed purely by :class:`LabPlan`; :func:`build` applies it with ``ip``,
``sysctl`` and ``iptables-restore``; :func:`teardown` rediscovers the lab by its prefix, so it
works from a fresh process and after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

CLUSTER_NET = IPv4Network("10.99.0.0/24")
PUBLIC_NET = IPv4Network("198.51.100.0/24")
ADMIN_NET = IPv4Network("10.99.254.0/30")
#: Where a lab's admin /30 may come from (tests pick another /30 here, so they can run while
#: a development lab with the default one is up).
ADMIN_RANGE = IPv4Network("10.99.254.0/24")
#: Where gateway-mode users' tunnel addresses come from by default; the backend service
#: namespace gets one ``/32`` route per connected gateway user (see :func:`add_route`).
GATEWAY_POOL = IPv4Network("10.201.0.0/16")
VPN_PORT = 1194
VPN_TCP_PORT = 443  # the agent's default TCP fallback port
CONTROL_PLANE_PORT = 8000
BRIDGES = ("cluster", "public")
MAX_PODS = 20
MAX_CLIENTS = 50
MAX_PREFIX_LEN = 8

_NETNS_DIR = Path("/run/netns")
_PREFIX_RE = re.compile(rf"^[a-z][a-z0-9]{{0,{MAX_PREFIX_LEN - 1}}}$")
# Ten characters at most so "c-<name>" stays readable and names fit wherever they are used.
_CLIENT_RE_TEXT = r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?"
_CLIENT_RE = re.compile(rf"^{_CLIENT_RE_TEXT}$")
_IP_TIMEOUT = 10.0
_KILL_WAIT = 3.0
_POLL = 0.05

# rp_filter is pinned off in every lab namespace: fresh namespaces take the compiled-in
# default (0) unless the host sets net.core.devconf_inherit_init_net, and the lab must not
# behave differently depending on that host setting.
_BASE_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
)
_POD_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.ip_forward", "1"),
    # The agent's flow records need byte counters and start/stop times on conntrack entries;
    # both are per-namespace settings.
    ("net.netfilter.nf_conntrack_acct", "1"),
    ("net.netfilter.nf_conntrack_timestamp", "1"),
)
# The router forwards back out of the interface it received on (backend and pods share the
# pod network): without this it would tell the backend, by ICMP redirect, to skip it and go
# to the pod directly, and the backend would keep that shortcut after the user moved.
_ROUTER_SYSCTLS: tuple[tuple[str, str], ...] = (
    *_BASE_SYSCTLS,
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
)
# With br_netfilter loaded, bridged frames would traverse the fabric namespace's iptables and
# conntrack. The fabric is meant to be a dumb switch, so switch that off (per namespace since
# Linux 5.3; the keys are absent when br_netfilter is not loaded, which is equally fine).
_FABRIC_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.bridge.bridge-nf-call-iptables", "0"),
    ("net.bridge.bridge-nf-call-ip6tables", "0"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
)


# --------------------------------------------------------------------------------------------
# Errors and command results


class LabError(RuntimeError):
    """A lab operation failed; the message is one sentence meant for the user."""


class LabExistsError(LabError):
    """A lab with this prefix (or something using its root-namespace addresses) exists."""


class LabCommandError(LabError):
    """A command run by the lab failed or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        how = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"`{shlex.join(self.argv)}` {how}: {self.stderr or 'no error output'}")


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed and returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


# --------------------------------------------------------------------------------------------
# The plan (pure)


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid lab prefix, else raise :class:`ValueError`.

    A prefix has no ``-`` so that ``<prefix>-<role>`` names of different labs never match
    each other's discovery pattern.
    """
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"lab prefix {prefix!r} is invalid: use 1-{MAX_PREFIX_LEN} lowercase letters and "
            "digits, starting with a letter"
        )
    return prefix


def validate_client_name(name: str) -> str:
    """Return ``name`` if it is a valid client name, else raise :class:`ValueError`."""
    if not isinstance(name, str) or not _CLIENT_RE.match(name):
        raise ValueError(
            f"client name {name!r} is invalid: use 1-10 lowercase letters, digits and '-' "
            "(not at the start or end)"
        )
    return name


def _role_pattern(prefix: str) -> re.Pattern[str]:
    roles = rf"fab|cp|lb|svc|rtr|pod[1-9][0-9]*|c-{_CLIENT_RE_TEXT}"
    return re.compile(rf"^{re.escape(prefix)}-({roles})$")


def lab_role(prefix: str, ns_name: str) -> str | None:
    """The role (``fab``, ``cp``, ``lb``, ``svc``, ``rtr``, ``pod3``, ``c-alice``) of a
    namespace of lab ``prefix``, or None when the name is not one the lab creates."""
    m = _role_pattern(prefix).match(ns_name)
    return m.group(1) if m else None


def admin_link_name(prefix: str) -> str:
    """Name of the root-namespace end of the admin veth of lab ``prefix``."""
    return f"{prefix}-adm"


@dataclass(frozen=True)
class Attachment:
    """One veth pair joining a node namespace to a bridge in the fabric namespace."""

    bridge: str
    ifname: str  # the end inside the node's namespace
    port: str  # the end inside the fabric namespace, enslaved to ``bridge``
    address: IPv4Interface


@dataclass(frozen=True)
class Node:
    """A namespace hanging off the fabric: its links, default route and sysctls."""

    role: str
    ns: str
    attachments: tuple[Attachment, ...]
    gateway: IPv4Address | None
    sysctls: tuple[tuple[str, str], ...]

    def address(self, bridge: str = "cluster") -> IPv4Address:
        """This node's address on ``bridge``."""
        for att in self.attachments:
            if att.bridge == bridge:
                return att.address.ip
        raise KeyError(f"{self.ns} is not attached to the {bridge} bridge")


@dataclass(frozen=True)
class AdminLink:
    """The veth pair between the root namespace and the control plane namespace."""

    root_ifname: str
    ns_ifname: str
    root_address: IPv4Interface
    ns_address: IPv4Interface


@dataclass(frozen=True)
class LabPlan:
    """Desired lab topology; every name and address is computed from these inputs.

    ``admin_net`` is the /30 of the root <-> control plane link, the only addresses the lab
    puts in the root namespace; two labs can coexist only with different ones.
    """

    prefix: str = "vfl"
    pods: int = 2
    clients: Sequence[str] = ("alice", "bob")
    admin_net: IPv4Network | str = ADMIN_NET

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if isinstance(self.pods, bool) or not isinstance(self.pods, int):
            raise ValueError(f"pods must be an integer, got {self.pods!r}")
        if not 1 <= self.pods <= MAX_PODS:
            raise ValueError(f"pods must be between 1 and {MAX_PODS}, got {self.pods}")
        if isinstance(self.clients, str):
            raise ValueError("clients must be a list of names, not a single string")
        clients = tuple(self.clients)
        for name in clients:
            validate_client_name(name)
        if len(set(clients)) != len(clients):
            dupes = sorted({c for c in clients if clients.count(c) > 1})
            raise ValueError(f"client names must be unique, repeated: {', '.join(dupes)}")
        if len(clients) > MAX_CLIENTS:
            raise ValueError(f"at most {MAX_CLIENTS} clients, got {len(clients)}")
        object.__setattr__(self, "clients", clients)
        try:
            admin_net = IPv4Network(self.admin_net)
        except ValueError as exc:
            raise ValueError(f"admin network {self.admin_net!r} is invalid: {exc}") from None
        if admin_net.prefixlen != 30 or not admin_net.subnet_of(ADMIN_RANGE):
            raise ValueError(f"admin network must be a /30 inside {ADMIN_RANGE}, got {admin_net}")
        object.__setattr__(self, "admin_net", admin_net)

    # names ------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name for ``role`` (``fab``, ``cp``, ``lb``, ``svc``, ``pod1``, ``c-x``)."""
        return f"{self.prefix}-{role}"

    @property
    def fabric_ns(self) -> str:
        """The namespace holding the two bridges."""
        return self.ns("fab")

    def pod_ns(self, index: int) -> str:
        """Namespace of pod ``index`` (1-based)."""
        self._check_pod(index)
        return self.ns(f"pod{index}")

    def client_ns(self, name: str) -> str:
        """Namespace of client ``name``."""
        self._client_index(name)
        return self.ns(f"c-{name}")

    def _port(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    # addresses --------------------------------------------------------------------------

    @property
    def lb_public_ip(self) -> IPv4Address:
        """The VPN's public address (the Service's external IP)."""
        return PUBLIC_NET.network_address + 1

    @property
    def lb_cluster_ip(self) -> IPv4Address:
        """The load balancer on the pod network; the pods' default gateway."""
        return CLUSTER_NET.network_address + 3

    @property
    def cp_ip(self) -> IPv4Address:
        """The control plane on the pod network (what agents talk to)."""
        return CLUSTER_NET.network_address + 2

    @property
    def router_ip(self) -> IPv4Address:
        """The BGP router in front of the pods (it routes gateway users' addresses)."""
        return CLUSTER_NET.network_address + 4

    @property
    def svc_ip(self) -> IPv4Address:
        """The backend service namespace's address."""
        return CLUSTER_NET.network_address + 100

    def pod_ip(self, index: int) -> IPv4Address:
        """Cluster address of pod ``index`` (1-based)."""
        self._check_pod(index)
        return CLUSTER_NET.network_address + 10 + index

    @property
    def pod_ips(self) -> tuple[IPv4Address, ...]:
        """Cluster addresses of all pods, in pod order."""
        return tuple(self.pod_ip(i) for i in range(1, self.pods + 1))

    def client_ip(self, name: str) -> IPv4Address:
        """Public address of client ``name``."""
        return PUBLIC_NET.network_address + 10 + self._client_index(name)

    @property
    def vpn_endpoint(self) -> tuple[IPv4Address, int]:
        """Address and UDP port clients connect to."""
        return self.lb_public_ip, VPN_PORT

    @property
    def vpn_tcp_endpoint(self) -> tuple[IPv4Address, int]:
        """Address and TCP port clients fall back to when UDP does not get through."""
        return self.lb_public_ip, VPN_TCP_PORT

    @property
    def admin(self) -> AdminLink:
        """The root <-> control plane admin link."""
        net = IPv4Network(self.admin_net)
        return AdminLink(
            root_ifname=admin_link_name(self.prefix),
            ns_ifname="admin0",
            root_address=IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}"),
            ns_address=IPv4Interface(f"{net.network_address + 2}/{net.prefixlen}"),
        )

    @property
    def control_plane_url(self) -> str:
        """URL at which the root namespace (the operator's CLI) reaches the control plane."""
        return f"https://{self.admin.ns_address.ip}:{CONTROL_PLANE_PORT}"

    def _check_pod(self, index: int) -> None:
        if not 1 <= index <= self.pods:
            raise ValueError(f"pod index must be between 1 and {self.pods}, got {index}")

    def _client_index(self, name: str) -> int:
        try:
            return self.clients.index(name) + 1
        except ValueError:
            raise ValueError(f"no client named {name!r} in this lab") from None

    # nodes ------------------------------------------------------------------------------

    def _attach(self, bridge: str, ifname: str, port: str, ip: IPv4Address) -> Attachment:
        net = CLUSTER_NET if bridge == "cluster" else PUBLIC_NET
        return Attachment(bridge, ifname, self._port(port), IPv4Interface(f"{ip}/{net.prefixlen}"))

    @property
    def cp(self) -> Node:
        """The control plane namespace (no default route: it only serves)."""
        att = self._attach("cluster", "eth0", "cp", self.cp_ip)
        return Node("cp", self.ns("cp"), (att,), None, _BASE_SYSCTLS)

    @property
    def lb(self) -> Node:
        """The load balancer namespace: eth0 on the pod network, eth1 on the internet."""
        return Node(
            "lb",
            self.ns("lb"),
            (
                self._attach("cluster", "eth0", "lbc", self.lb_cluster_ip),
                self._attach("public", "eth1", "lbp", self.lb_public_ip),
            ),
            None,
            (*_BASE_SYSCTLS, ("net.ipv4.ip_forward", "1")),
        )

    @property
    def svc(self) -> Node:
        """The backend service namespace (no default route; gateway users get /32 routes)."""
        att = self._attach("cluster", "eth0", "svc", self.svc_ip)
        return Node("svc", self.ns("svc"), (att,), None, _BASE_SYSCTLS)

    @property
    def router(self) -> Node:
        """The router namespace: BIRD learns gateway users' /32s from the pods over BGP."""
        att = self._attach("cluster", "eth0", "rtr", self.router_ip)
        return Node("rtr", self.ns("rtr"), (att,), None, _ROUTER_SYSCTLS)

    def pod(self, index: int) -> Node:
        """Pod ``index`` (1-based): default route via the load balancer."""
        att = self._attach("cluster", "eth0", f"p{index}", self.pod_ip(index))
        return Node(
            f"pod{index}",
            self.pod_ns(index),
            (att,),
            self.lb_cluster_ip,
            (*_BASE_SYSCTLS, *_POD_SYSCTLS),
        )

    def client(self, name: str) -> Node:
        """Client ``name`` on the internet: default route via the load balancer."""
        j = self._client_index(name)
        att = self._attach("public", "eth0", f"c{j}", self.client_ip(name))
        return Node(f"c-{name}", self.client_ns(name), (att,), self.lb_public_ip, _BASE_SYSCTLS)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every namespace except the fabric, in build order."""
        return (
            self.lb,  # first: its NAT rules load nf_conntrack, whose sysctls the pods need
            self.cp,
            self.svc,
            self.router,
            *(self.pod(i) for i in range(1, self.pods + 1)),
            *(self.client(c) for c in self.clients),
        )

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace the lab creates (fabric first)."""
        return (self.fabric_ns, *(n.ns for n in self.nodes))

    def interface_names(self) -> tuple[str, ...]:
        """Every interface name the lab creates (bridges, both veth ends, admin link)."""
        names: list[str] = [*BRIDGES, self.admin.root_ifname, self.admin.ns_ifname]
        for node in self.nodes:
            for att in node.attachments:
                names += [att.ifname, att.port]
        return tuple(names)

    # load balancer rules ----------------------------------------------------------------

    def dnat_probabilities(self) -> tuple[float | None, ...]:
        """Per pod, the ``-m statistic`` probability of its DNAT rule (None: unconditional).

        Rule ``k`` (0-based) only sees packets the earlier rules passed on, so it takes
        ``1/(N-k)`` of them; every pod ends up with ``1/N`` of new flows.
        """
        n = self.pods
        return tuple(1.0 / (n - k) if k < n - 1 else None for k in range(n))

    def lb_nat_rules(self, pod_ips: Sequence[IPv4Address]) -> str:
        """``iptables-restore`` input for the nat table: spread UDP 1194 and TCP 443 over
        ``pod_ips`` (the ready endpoints, as kube-proxy does for the two Services)."""
        public_if = self.lb.attachments[1].ifname
        lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
        n = len(pod_ips)
        for proto, port in (("udp", VPN_PORT), ("tcp", VPN_TCP_PORT)):
            match = f"-d {self.lb_public_ip}/32 -i {public_if} -p {proto} -m {proto} --dport {port}"
            for k, ip in enumerate(pod_ips):
                prob = 1.0 / (n - k) if k < n - 1 else None
                stat_match = (
                    "" if prob is None else f" -m statistic --mode random --probability {prob:.10f}"
                )
                lines.append(f"-A PREROUTING {match}{stat_match} -j DNAT --to-destination {ip}")
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def lb_ruleset(self) -> str:
        """The load balancer's complete ``iptables-restore`` input.

        nat: UDP 1194 and TCP 443 to the public address are DNATed to one pod, no SNAT.
        filter: the internet may only reach the pod network through that DNAT (so a client
        cannot bypass the VPN to reach the backend service); the pod network may reach out.
        """
        lb = self.lb
        cluster_if, public_if = lb.attachments[0].ifname, lb.attachments[1].ifname
        lines = self.lb_nat_rules(self.pod_ips).splitlines()
        lines += [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A FORWARD -i {public_if} -o {cluster_if} -m conntrack --ctstate DNAT -j ACCEPT",
            f"-A FORWARD -i {cluster_if} -o {public_if} -j ACCEPT",
            "COMMIT",
        ]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Lab:
    """A built lab: its plan and how long building took."""

    plan: LabPlan
    build_seconds: float


# --------------------------------------------------------------------------------------------
# Running commands


async def _exec(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    input: str | None = None,
) -> CommandResult:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise LabCommandError(argv, 127, f"{argv[0]}: command not found") from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(input.encode() if input is not None else None), timeout
        )
    except TimeoutError:
        raise LabCommandError(argv, None, f"no answer within {timeout:g} s") from None
    finally:
        # Also on cancellation: never leave a child behind.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
    rc = proc.returncode if proc.returncode is not None else -1
    result = CommandResult(
        tuple(argv), rc, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and rc != 0:
        raise LabCommandError(argv, rc, result.stderr)
    return result


async def _ip(ns: str | None, *args: str, check: bool = True) -> CommandResult:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return await _exec(argv, timeout=_IP_TIMEOUT, check=check)


async def run_in(
    ns: str,
    *argv: str,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> CommandResult:
    """Run ``argv`` to completion inside namespace ``ns`` (``ip netns exec``).

    Raises :class:`LabCommandError` when it exits non-zero (with ``check``) or runs longer
    than ``timeout`` seconds (it is killed then).
    """
    if not argv:
        raise ValueError("run_in needs a command")
    return await _exec(
        ["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, input=input
    )


@dataclass
class LabProcess:
    """A long-running process started by :func:`spawn_in`, leader of its own process group."""

    ns: str
    argv: tuple[str, ...]
    log_path: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        """Process id (``ip netns exec`` execs the command, so this is the command itself)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while it runs (reaps it if it exited)."""
        return self.popen.poll()

    async def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for it to exit; its exit status or None."""
        await _wait_until(lambda: self.popen.poll() is not None, timeout)
        return self.popen.poll()

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM its process group, SIGKILL after ``grace`` seconds; its exit status."""
        _signal_group(self.pid, signal.SIGTERM)
        rc = await self.wait(grace)
        if rc is None:
            _signal_group(self.pid, signal.SIGKILL)
            rc = await self.wait(_KILL_WAIT)
        else:
            # The leader exited; children it left in the group go too.
            _signal_group(self.pid, signal.SIGKILL)
        return rc


async def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll ``done`` for up to ``seconds``; True once it holds.

    Polling, because nothing signals the exit of a process that is not an asyncio child.
    """
    for _ in range(max(1, math.ceil(seconds / _POLL))):
        if done():
            return True
        await asyncio.sleep(_POLL)
    return done()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def spawn_in(
    ns: str,
    *argv: str,
    log_path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> LabProcess:
    """Start ``argv`` inside namespace ``ns`` as a long-running process.

    It gets its own session and process group (a Ctrl-C aimed at the caller does not reach
    it, and :meth:`LabProcess.stop` takes its children along); stdin is /dev/null, stdout
    and stderr are appended to ``log_path``. It outlives the caller unless stopped;
    :func:`teardown` kills whatever still runs in the lab's namespaces.
    """
    if not argv:
        raise ValueError("spawn_in needs a command")
    if not (_NETNS_DIR / ns).exists():
        raise LabError(f"network namespace {ns!r} does not exist; is the lab up?")
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as log:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    return LabProcess(ns=ns, argv=tuple(argv), log_path=path, popen=popen)


# --------------------------------------------------------------------------------------------
# Routes (for gateway-mode users, added at run time by another component)


async def add_route(ns: str, cidr: str | IPv4Network, via: str | IPv4Address) -> None:
    """Route ``cidr`` via ``via`` in namespace ``ns``, replacing any route for ``cidr``.

    Replacing (not adding) makes it idempotent and moves a route atomically when a gateway
    user reconnects to a different pod.
    """
    net, gw = IPv4Network(cidr), IPv4Address(via)
    await _ip(ns, "route", "replace", str(net), "via", str(gw))


async def del_route(ns: str, cidr: str | IPv4Network, via: str | IPv4Address | None = None) -> bool:
    """Remove the route for ``cidr`` in ``ns``; True if one was removed.

    With ``via``, only a route through that gateway is removed: a late withdrawal from the
    pod a user left must not delete the route to the pod the user is on now.
    """
    net = IPv4Network(cidr)
    gw = IPv4Address(via) if via is not None else None
    args = ["route", "del", str(net), *(["via", str(gw)] if gw else [])]
    result = await _ip(ns, *args, check=False)
    if result.returncode == 0:
        return True
    # Failure means "no such route" unless a matching route is still there.
    if await _route_exists(ns, net, gw):
        raise LabCommandError(result.argv, result.returncode, result.stderr)
    return False


async def _route_exists(ns: str, net: IPv4Network, via: IPv4Address | None) -> bool:
    out = (await _ip(ns, "-j", "route", "show", "exact", str(net))).stdout
    routes: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return any(via is None or r.get("gateway") == str(via) for r in routes)


# --------------------------------------------------------------------------------------------
# Discovery and status


async def _list_namespaces() -> list[str]:
    out = (await _ip(None, "-j", "netns", "list")).stdout
    entries: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return [str(e["name"]) for e in entries]


async def _lab_namespaces(prefix: str) -> list[str]:
    return sorted(n for n in await _list_namespaces() if lab_role(prefix, n) is not None)


@dataclass(frozen=True)
class InterfaceStatus:
    """An interface and its IPv4 addresses (``a.b.c.d/len``)."""

    name: str
    state: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class NamespaceStatus:
    """One existing lab namespace: its role, interfaces and the processes inside."""

    name: str
    role: str
    interfaces: tuple[InterfaceStatus, ...]
    pids: tuple[int, ...]


@dataclass(frozen=True)
class LabStatus:
    """What of lab ``prefix`` exists right now."""

    prefix: str
    namespaces: tuple[NamespaceStatus, ...]
    admin_link: InterfaceStatus | None

    @property
    def exists(self) -> bool:
        """True if any part of the lab exists."""
        return bool(self.namespaces) or self.admin_link is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``vpnfleet lab status --json``)."""
        return {"exists": self.exists, **asdict(self)}


def _interfaces(ip_json: str, names: Iterable[str] | None = None) -> list[InterfaceStatus]:
    wanted = set(names) if names is not None else None
    result = []
    for link in json.loads(ip_json) if ip_json.strip() else []:
        name = str(link.get("ifname", ""))
        if name == "lo" or (wanted is not None and name not in wanted):
            continue
        addrs = tuple(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        )
        result.append(InterfaceStatus(name, str(link.get("operstate", "UNKNOWN")), addrs))
    return result


async def _ns_pids(ns: str) -> list[int]:
    res = await _exec(["ip", "netns", "pids", ns], timeout=_IP_TIMEOUT, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


async def _root_admin_link(prefix: str) -> InterfaceStatus | None:
    out = (await _ip(None, "-j", "addr", "show")).stdout
    found = _interfaces(out, [admin_link_name(prefix)])
    return found[0] if found else None


async def status(prefix: str) -> LabStatus:
    """Which namespaces of lab ``prefix`` exist, with their addresses and processes."""
    validate_prefix(prefix)
    namespaces = []
    for name in await _lab_namespaces(prefix):
        role = lab_role(prefix, name) or ""
        res = await _ip(name, "-j", "addr", "show", check=False)
        ifaces = _interfaces(res.stdout) if res.returncode == 0 else []
        namespaces.append(NamespaceStatus(name, role, tuple(ifaces), tuple(await _ns_pids(name))))
    return LabStatus(prefix, tuple(namespaces), await _root_admin_link(prefix))


# --------------------------------------------------------------------------------------------
# Teardown


@dataclass
class TeardownReport:
    """What :func:`teardown` removed, and what it could not."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    terminated: list[int] = field(default_factory=list)  # exited after SIGTERM
    killed: list[int] = field(default_factory=list)  # needed SIGKILL
    errors: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        """False when there was nothing to remove."""
        return bool(self.namespaces or self.links or self.terminated or self.killed)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"  # a zombie is gone for our purposes; its parent reaps it


async def _stop_processes(namespaces: Sequence[str], grace: float, report: TeardownReport) -> None:
    me = os.getpid()
    pids: set[int] = set()
    for ns in namespaces:
        pids.update(p for p in await _ns_pids(ns) if p != me)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    await _wait_until(lambda: not any(alive(p) for p in pids), grace)
    # Processes may have forked while dying: sweep the namespaces once more.
    stragglers = {p for p in pids if alive(p)}
    for ns in namespaces:
        stragglers.update(p for p in await _ns_pids(ns) if p != me)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await _wait_until(lambda: not any(alive(p) for p in stragglers), _KILL_WAIT)
    report.terminated += sorted(pids - stragglers)
    report.killed += sorted(stragglers)
    report.errors += [f"process {p} survived SIGKILL" for p in sorted(stragglers) if alive(p)]


async def _remove(
    prefix: str, namespaces: Sequence[str], links: Sequence[str], grace: float
) -> TeardownReport:
    report = TeardownReport(prefix)
    existing = [ns for ns in namespaces if (_NETNS_DIR / ns).exists()]
    await _stop_processes(existing, grace, report)
    for link in links:
        res = await _ip(None, "link", "del", link, check=False)
        if res.returncode == 0:
            report.links.append(link)
        elif (await _ip(None, "link", "show", link, check=False)).returncode == 0:
            report.errors.append(f"could not delete link {link}: {res.stderr.strip()}")
    # Node namespaces first, the fabric last: deleting a node removes its veth peers.
    for ns in sorted(existing, key=lambda n: n.endswith("-fab")):
        res = await _ip(None, "netns", "delete", ns, check=False)
        if res.returncode == 0:
            report.namespaces.append(ns)
        else:
            report.errors.append(f"could not delete namespace {ns}: {res.stderr.strip()}")
    return report


async def teardown(prefix: str, *, grace: float = 5.0) -> TeardownReport:
    """Remove lab ``prefix``: stop processes in its namespaces, delete them and the admin link.

    Needs no state from :func:`build` (everything is found by name), and is idempotent: a
    second call finds nothing and reports nothing removed. Problems are collected in
    :attr:`TeardownReport.errors` after trying everything, rather than stopping halfway.
    """
    validate_prefix(prefix)
    namespaces = await _lab_namespaces(prefix)
    link = await _root_admin_link(prefix)
    return await _remove(prefix, namespaces, [link.name] if link else [], grace)


# --------------------------------------------------------------------------------------------
# Build


def _preflight() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); run it with sudo")
    missing = [t for t in ("ip", "sysctl", "iptables-restore") if shutil.which(t) is None]
    if missing:
        raise LabError(f"the lab needs these commands, which are not installed: {missing}")
    # OpenVPN in the pods and clients needs the tun device; /dev is shared by all namespaces.
    try:
        if not stat.S_ISCHR(os.stat("/dev/net/tun").st_mode):
            raise LabError("/dev/net/tun is not a character device; OpenVPN cannot run")
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        raise LabError(f"/dev/net/tun is not usable ({exc.strerror}); OpenVPN cannot run") from None


async def _refuse_existing(plan: LabPlan) -> None:
    found = await _lab_namespaces(plan.prefix)
    link = await _root_admin_link(plan.prefix)
    if found or link:
        what = ", ".join([*found, *([f"link {link.name}"] if link else [])])
        raise LabExistsError(
            f"lab {plan.prefix!r} already exists ({what}); run `vpnfleet lab down` to "
            "remove it first"
        )
    # Labs with different prefixes can coexist, but not on the same admin subnet in root.
    admin_net = plan.admin.root_address.network
    out = (await _ip(None, "-j", "addr", "show")).stdout
    for iface in _interfaces(out):
        for addr in iface.addresses:
            if IPv4Interface(addr).network.overlaps(admin_net):
                raise LabExistsError(
                    f"the lab's admin network {admin_net} is already in use in the root "
                    f"namespace ({addr} on {iface.name}); is another lab running? Remove it "
                    "with `vpnfleet lab down` first"
                )


async def _sysctl(ns: str, settings: Sequence[tuple[str, str]], *, optional: bool = False) -> None:
    if settings:
        flags = ["-e"] if optional else []  # -e: ignore keys this kernel does not have
        await run_in(ns, "sysctl", "-q", *flags, "-w", *(f"{k}={v}" for k, v in settings))


async def _add_namespace(ns: str, created: list[str]) -> None:
    # Recorded before it exists so that a cancellation mid-command still gets it removed.
    created.append(ns)
    await _ip(None, "netns", "add", ns)
    await _ip(ns, "link", "set", "lo", "up")


async def _build_fabric(plan: LabPlan, created: list[str]) -> None:
    fab = plan.fabric_ns
    await _add_namespace(fab, created)
    await _sysctl(fab, _FABRIC_SYSCTLS, optional=True)
    for bridge in BRIDGES:
        await _ip(fab, "link", "add", bridge, "type", "bridge")
        await _ip(fab, "link", "set", bridge, "up")


async def _build_node(plan: LabPlan, node: Node, created: list[str]) -> None:
    await _add_namespace(node.ns, created)
    # Before any interface exists, so "default" sysctls (rp_filter) apply to them.
    await _sysctl(node.ns, node.sysctls)
    for att in node.attachments:
        # Both ends are created directly in their namespaces: nothing appears in root.
        await _ip(
            None, "link", "add", att.ifname, "netns", node.ns, "type", "veth",
            "peer", "name", att.port, "netns", plan.fabric_ns,
        )  # fmt: skip
        await _ip(plan.fabric_ns, "link", "set", att.port, "master", att.bridge, "up")
        await _ip(node.ns, "addr", "add", str(att.address), "dev", att.ifname)
        await _ip(node.ns, "link", "set", att.ifname, "up")
    if node.gateway is not None:
        await _ip(node.ns, "route", "add", "default", "via", str(node.gateway))


async def _build_admin_link(plan: LabPlan, created_links: list[str]) -> None:
    adm, cp = plan.admin, plan.cp.ns
    created_links.append(adm.root_ifname)
    await _ip(
        None, "link", "add", adm.root_ifname, "type", "veth",
        "peer", "name", adm.ns_ifname, "netns", cp,
    )  # fmt: skip
    await _ip(None, "addr", "add", str(adm.root_address), "dev", adm.root_ifname)
    await _ip(None, "link", "set", adm.root_ifname, "up")
    await _ip(cp, "addr", "add", str(adm.ns_address), "dev", adm.ns_ifname)
    await _ip(cp, "link", "set", adm.ns_ifname, "up")


async def _apply_lb_rules(plan: LabPlan) -> None:
    # -w: legacy iptables takes a lock file shared by all namespaces (nft ignores it).
    await run_in(plan.lb.ns, "iptables-restore", "-w", "10", input=plan.lb_ruleset())


async def build(plan: LabPlan) -> Lab:
    """Create the lab described by ``plan``.

    Refuses (:class:`LabExistsError`) when anything of a lab with the same prefix exists, or
    the admin subnet is taken in the root namespace. If any step fails, or the build is
    cancelled, everything created so far is removed before the error propagates.
    """
    started = time.monotonic()
    _preflight()
    await _refuse_existing(plan)
    created_ns: list[str] = []
    created_links: list[str] = []
    step = "starting"
    try:
        step = "creating the fabric namespace"
        await _build_fabric(plan, created_ns)
        for node in plan.nodes:
            step = f"creating namespace {node.ns}"
            await _build_node(plan, node, created_ns)
        step = "creating the admin link from the root namespace to the control plane"
        await _build_admin_link(plan, created_links)
        step = "installing the load balancer's NAT rules"
        await _apply_lb_rules(plan)
    except BaseException as exc:
        # Cancellation and Ctrl-C also roll back; only our own errors get rewrapped.
        report = await _remove(plan.prefix, created_ns, created_links, grace=1.0)
        if not isinstance(exc, LabError | OSError):
            raise
        left = f" (cleanup problems: {'; '.join(report.errors)})" if report.errors else ""
        raise LabError(
            f"building lab {plan.prefix!r} failed while {step}: {exc}; everything it had "
            f"created was removed{left}"
        ) from exc
    return Lab(plan, time.monotonic() - started)
