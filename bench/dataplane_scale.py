"""Pod firewall at scale: rule count, resync and incremental update times, throughput.

    sudo .venv/bin/python bench/dataplane_scale.py [--members 5000] [--groups 200]
        [--destinations 10000] [--updates 60] [--resyncs 5] [--iperf-runs 3] [--iperf-seconds 5]

Creates three network namespaces of its own (``vfbench-<random>-{pod,cl,srv}``) and removes
them on exit, failure, Ctrl-C or SIGTERM. The dataplane runs as the agent runs in a pod: this
process enters the pod namespace, so ipset/iptables/conntrack are called directly (no
``ip netns exec`` in the timed path).

Synthetic state: ``--members`` connected clients (70 % NAT) in 198.18.0.0/17, each in one
(50 %), two (35 %) or three (15 %) random groups; ``--destinations`` grants spread evenly
over ``--groups`` groups: 60 % single hosts, 30 % /24, 10 % /28 (in 10.0.0.0/8: set elements
only, nothing is ever sent there), 45 % tcp single port, 10 % tcp range of 4-16 ports,
15 % udp single port, 5 % udp all ports, 10 % tcp all ports, 5 % icmp, 10 % any protocol.
Three of the members are real addresses in the client namespace: FIRST (group 0 only),
LAST (last group only; every other group's rules are walked before it matches) and DENIED
(group 1, which grants nothing on the server). Groups 0 and last grant tcp/5201 on the server.

Incremental updates are timed around ``Dataplane.apply(new_state)``, the call the agent makes,
including deletion of revoked conntrack entries; "ipset step" is the ``ipset restore`` that
puts the new set contents in the kernel (the policy is in force once it returns; conntrack
entries of revoked flows are deleted after it), "plan" the pure ``fwdiff.diff`` of an identical
pair of states.
New states are derived from the previous one (unchanged groups and sets reused);
"incremental_unshared_connect" times building and diffing states rebuilt from strings instead,
as the agent's ``DesiredStateBuilder`` (core/fwdesired.py) does.
Throughput: iperf3 TCP client -> server through the pod (``-t`` seconds, only the server
namespace's address), alternating runs with our chains absent (``Dataplane.remove_all``) and
with the policy loaded, from FIRST and from LAST; the ratios compare medians. A diagnostic run
in each round has only a conntrack ESTABLISHED rule and MASQUERADE, which separates the cost of
stateful NAT (which the runs without our chains do not pay) from that of our sets and rules.

Prints a JSON summary and a one-line summary. Exits 0 when the run completed (goals missed
or not), 1 when the run itself failed, 2 when it cannot run here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from types import FrameType
from typing import Any

from vpnfleet.agent.dataplane import Dataplane
from vpnfleet.core import fwdiff, fwnames
from vpnfleet.core.fwstate import ClientCheck, DesiredState, GroupAccess
from vpnfleet.core.grants import Grant, Proto

PREFIX = "vpnb"
TUN = IPv4Network("198.18.0.0/17")
POD_TUN = TUN[1]
UPLINK_NET = IPv4Network("198.19.0.0/24")
POD_UP, SERVER = UPLINK_NET[1], UPLINK_NET[2]
PORT = 5201
TOOLS = ("ip", "ipset", "iptables", "iptables-restore", "conntrack", "sysctl", "iperf3")
CLONE_NEWNET = 0x40000000
GOAL_UPDATE_MS = 10.0
GOAL_RATIO = 0.9


# --- synthetic state ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale:
    members: int
    groups: int
    destinations: int
    seed: int = 1


@dataclasses.dataclass(frozen=True)
class Synthetic:
    state: DesiredState
    first: IPv4Address  # only in group 0
    last: IPv4Address  # only in the last group
    denied: IPv4Address  # only in group 1: no grant on the server


def _destination(rng: random.Random) -> Grant:
    base = 0x0A000000 + rng.randrange(1 << 22) * 4
    r = rng.random()
    net = IPv4Network(
        (base, 32) if r < 0.6 else (base & ~0xFF, 24) if r < 0.9 else (base & ~0xF, 28)
    )
    r = rng.random()
    if r < 0.45:
        return Grant(net, "tcp", rng.choice((22, 80, 443, 3306, 5432, 6443, 8443, 9200)))
    if r < 0.55:
        lo = rng.choice((8000, 9000, 30000))
        return Grant(net, "tcp", lo, lo + rng.choice((3, 9, 15)))
    if r < 0.70:
        return Grant(net, "udp", rng.choice((53, 123, 161, 514)))
    proto: Proto = "udp" if r < 0.75 else "tcp" if r < 0.85 else "icmp" if r < 0.90 else "any"
    return Grant(net, proto)


def synthetic(scale: Scale) -> Synthetic:
    """The benchmark's desired state (deterministic for a seed)."""
    if not 3 <= scale.members <= TUN.num_addresses // 2 or scale.groups < 2:
        raise ValueError("need 3 <= members <= 16384 and at least 2 groups")
    rng = random.Random(scale.seed)
    members = [TUN[2 + i] for i in range(scale.members)]
    first, denied, last = members[0], members[1], members[-1]
    in_group: list[set[IPv4Address]] = [set() for _ in range(scale.groups)]
    for m in members[2:-1]:
        k = rng.choices((1, 2, 3), (50, 35, 15))[0]
        for gid in rng.sample(range(scale.groups), min(k, scale.groups)):
            in_group[gid].add(m)
    in_group[0].add(first)
    in_group[1].add(denied)
    in_group[-1].add(last)
    grants: list[list[Grant]] = [[] for _ in range(scale.groups)]
    for i in range(scale.destinations):
        grants[i % scale.groups].append(_destination(rng))
    to_server = Grant(IPv4Network((SERVER, 32)), "tcp", PORT)
    for gid in (0, scale.groups - 1):
        grants[gid][:1] = [to_server]
    nat = frozenset(m for m in members if rng.random() < 0.7) | {first, denied, last}
    state = DesiredState(
        prefix=PREFIX,
        tunnel_networks=(TUN,),
        uplink="u0",
        nat_members=nat,
        all_clients=frozenset(members),
        groups=tuple(
            GroupAccess(gid, frozenset(in_group[gid]), tuple(grants[gid]))
            for gid in range(scale.groups)
        ),
        # The memo of validated clients an agent keeps: states derived from this one with
        # dataclasses.replace share it, so a connect validates one address, not 5,000.
        client_check=ClientCheck(),
    )
    return Synthetic(state, first, last, denied)


def with_members(
    state: DesiredState, ip: IPv4Address, gids: set[int], connected: bool
) -> DesiredState:
    """``state`` with ``ip`` connected (NAT mode, in ``gids``) or disconnected.

    Unchanged groups and sets are reused, as an agent keeping its last state would.
    """

    def change(s: frozenset[IPv4Address]) -> frozenset[IPv4Address]:
        return s | {ip} if connected else s - {ip}

    groups = tuple(
        GroupAccess(g.group_id, change(g.members), g.grants) if g.group_id in gids else g
        for g in state.groups
    )
    return dataclasses.replace(
        state,
        all_clients=change(state.all_clients),
        nat_members=change(state.nat_members),
        groups=groups,
    )


def with_grants(state: DesiredState, gid: int, grants: tuple[Grant, ...]) -> DesiredState:
    """``state`` with group ``gid``'s grants replaced."""
    groups = tuple(
        GroupAccess(g.group_id, g.members, grants) if g.group_id == gid else g for g in state.groups
    )
    return dataclasses.replace(state, groups=groups)


def unshared_connects(state: DesiredState, n: int, seed: int) -> dict[str, Any]:
    """Connects when every update rebuilds the state from strings, sharing no address, set or
    group object with the previous one (as ``DesiredStateBuilder.build()`` makes it; grant
    tuples are shared, the agent caches those). Pure: no kernel involved."""
    rng = random.Random(seed)
    nat = {str(c) for c in state.nat_members}
    groups_of: dict[str, list[int]] = {str(c): [] for c in state.all_clients}
    for g in state.groups:
        for m in g.members:
            groups_of[str(m)].append(g.group_id)
    grants = {g.group_id: g.grants for g in state.groups}

    def build(clients: dict[str, list[int]]) -> DesiredState:
        members: dict[int, set[IPv4Address]] = {gid: set() for gid in grants}
        for c, gids in clients.items():
            for gid in gids:
                members[gid].add(IPv4Address(c))
        return dataclasses.replace(
            state,
            all_clients=frozenset(IPv4Address(c) for c in clients),
            nat_members=frozenset(IPv4Address(c) for c in clients if c in nat),
            groups=tuple(GroupAccess(gid, frozenset(m), grants[gid]) for gid, m in members.items()),
        )

    current = build(groups_of)
    build_ms, plan_ms = [], []
    first_free = 2 + len(groups_of) + 1000  # clear of the members and of incremental()'s
    for i in range(n):
        ip = str(TUN[first_free + i])
        groups_of = {**groups_of, ip: rng.sample(sorted(grants), 2)}
        nat.add(ip)
        t0 = time.perf_counter()
        new = build(groups_of)
        build_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        fwdiff.diff(current, new)
        plan_ms.append((time.perf_counter() - t0) * 1000)
        current = new
    return {"state_build_ms": summary(build_ms), "plan_ms": summary(plan_ms)}


# --- namespaces ---------------------------------------------------------------------------


class Namespaces:
    """Named network namespaces with a random prefix; :meth:`close` removes every one."""

    def __init__(self) -> None:
        self.prefix = f"vfbench-{secrets.token_hex(3)}-"
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._home: int | None = None  # our original namespace while inside the pod's

    def create(self, role: str) -> str:
        name = self.prefix + role
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        self.names.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def run(self, ns: str, *argv: str, timeout: float = 30.0) -> str:
        """Run a command inside ``ns``; stdout, or RuntimeError with its stderr."""
        cp = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {ns} exited {cp.returncode}: {cp.stderr}")
        return cp.stdout

    def popen(self, ns: str, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        subprocess.run(
            ["ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if,
             "netns", b],
            check=True,
            capture_output=True,
            timeout=10,
        )  # fmt: skip
        self.run(a, "ip", "link", "set", a_if, "up")
        self.run(b, "ip", "link", "set", b_if, "up")

    def enter(self, ns: str) -> None:
        """Move this process (single-threaded still) into ``ns``; :meth:`leave` returns."""
        libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        finally:
            os.close(fd)
        if os.stat("/proc/self/ns/net").st_ino != os.stat(f"/run/netns/{ns}").st_ino:
            raise RuntimeError(f"not inside namespace {ns} after setns")

    def leave(self) -> None:
        if self._home is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            if libc.setns(self._home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
        finally:
            os.close(self._home)
            self._home = None

    def close(self) -> list[str]:
        """Kill our processes, delete our namespaces; returns the names still present."""
        with contextlib.suppress(OSError):
            self.leave()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        for name in reversed(self.names):
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10
            ).stdout.split()
            for pid in pids:
                if int(pid) != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
        ).stdout.split("\n")
        left = [line.split()[0] for line in listed if line.startswith(self.prefix)]
        self.names.clear()
        return left


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks run (Ctrl-C already does)."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --- measuring ----------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "p99": pct(ms, 99), "max": max(ms), "n": len(ms)}


@dataclasses.dataclass
class UpdateTimes:
    total: list[float] = dataclasses.field(default_factory=list)
    ipset: list[float] = dataclasses.field(default_factory=list)
    plan: list[float] = dataclasses.field(default_factory=list)
    build: list[float] = dataclasses.field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "total_ms": summary(self.total),
            "ipset_step_ms": summary(self.ipset),
            "plan_ms": summary(self.plan),
            "state_build_ms": summary(self.build),
        }


async def timed_update(
    dp: Dataplane,
    current: DesiredState,
    make: Callable[[], DesiredState],
    times: UpdateTimes,
) -> DesiredState:
    """Apply ``make()`` incrementally on top of ``current``; record the timings."""
    twin = make()  # an equal pair of states: plan time without warm caches on ``new``
    t0 = time.perf_counter()
    fwdiff.diff(current, twin)
    times.plan.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    new = make()
    times.build.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    await dp.apply(new)
    times.total.append((time.perf_counter() - t0) * 1000)
    if dp.stats.last_apply_kind != "diff" or dp.applied is not new:
        raise RuntimeError(f"update was not applied incrementally ({dp.stats.last_apply_kind})")
    times.ipset.append(dp.stats.last_apply_seconds * 1000)
    return new


async def incremental(
    dp: Dataplane, syn: Synthetic, scale: Scale, n: int
) -> dict[str, dict[str, Any]]:
    rng = random.Random(scale.seed + 1)
    times = {k: UpdateTimes() for k in ("connect", "disconnect", "grant_add", "grant_revoke")}
    state = syn.state
    for i in range(n):
        ip = TUN[2 + scale.members + 100 + i]
        gids = set(rng.sample(range(scale.groups), 2))
        make = functools.partial(with_members, state, ip, gids, True)
        state = await timed_update(dp, state, make, times["connect"])
        make = functools.partial(with_members, state, ip, gids, False)
        state = await timed_update(dp, state, make, times["disconnect"])
    by_id = {g.group_id: g for g in syn.state.groups}
    for i in range(n):
        gid = rng.randrange(scale.groups)
        old = by_id[gid].grants
        extra = Grant(IPv4Network((0x0AFA0000 + i, 32)), "tcp", 443)
        make = functools.partial(with_grants, state, gid, (*old, extra))
        state = await timed_update(dp, state, make, times["grant_add"])
        make = functools.partial(with_grants, state, gid, old)
        state = await timed_update(dp, state, make, times["grant_revoke"])
    return {k: t.report() for k, t in times.items()}


async def kernel_counts(dp: Dataplane) -> dict[str, int]:
    k = await dp.read_kernel()
    fwd = k.chains.get(("filter", fwnames.fwd_chain(PREFIX)), ())
    post = k.chains.get(("nat", fwnames.post_chain(PREFIX)), ())
    return {
        "rules_fwd_chain": len(fwd),
        "rules_nat_chain": len(post),
        "rules_total": len(fwd) + len(post),
        "ipsets": len(k.sets),
        "ipset_elements": sum(len(s.elements) for s in k.sets.values()),
    }


async def ns_run(ns: str, *argv: str, timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:  # timed out or cancelled: never leave it running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise RuntimeError(f"{argv[0]} in {ns} did not finish within {timeout:.0f}s") from None
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def iperf(cl: str, src: IPv4Address, seconds: int) -> float:
    """Gbit/s received by the server in one TCP run from ``src``."""
    rc, out, err = await ns_run(
        cl, "iperf3", "-c", str(SERVER), "-B", str(src), "-p", str(PORT), "-t", str(seconds),
        "-J", "--connect-timeout", "3000",
        timeout=seconds + 30,
    )  # fmt: skip
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 from {src} exited {rc}: {err.strip()}") from None
    if rc != 0 or "error" in data:
        raise RuntimeError(f"iperf3 from {src} failed: {data.get('error', err.strip())}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 1.0, (sys.argv[3], 0)).close()
    print("open")
except OSError:
    print("closed")
"""


async def reachable(cl: str, src: IPv4Address) -> bool:
    _, out, _ = await ns_run(
        cl, sys.executable, "-c", PROBE, str(SERVER), str(PORT), str(src), timeout=15
    )
    return out.strip() == "open"


async def conntrack_list() -> None:
    proc = await asyncio.create_subprocess_exec(
        "conntrack", "-L", "-s", str(TUN[-1]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()


async def timed(step: Awaitable[None]) -> float:
    t0 = time.perf_counter()
    await step
    return (time.perf_counter() - t0) * 1000


async def measure_until_signal(
    args: argparse.Namespace, nss: Namespaces, cl: str, signals: list[int]
) -> dict[str, Any]:
    """:func:`measure`, cancelled cleanly by SIGTERM/SIGHUP (asyncio.run handles Ctrl-C)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(signum: int) -> None:
        signals.append(signum)
        task.cancel()

    for s in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(s, stop, s)
    return await measure(args, nss, cl)


async def measure(args: argparse.Namespace, nss: Namespaces, cl: str) -> dict[str, Any]:
    scale = Scale(args.members, args.groups, args.destinations, args.seed)
    t0 = time.perf_counter()
    syn = synthetic(scale)
    build_ms = (time.perf_counter() - t0) * 1000
    state = syn.state
    # Validating a 5,000-client state from scratch: alternating tunnel networks defeat the
    # ClientCheck the state carries (a connect checks only the newcomer).
    validate = []
    for nets in [(TUN, IPv4Network("198.18.128.0/17")), (TUN,)] * 10:
        t0 = time.perf_counter()
        dataclasses.replace(state, tunnel_networks=nets)
        validate.append((time.perf_counter() - t0) * 1000)

    dp = Dataplane(PREFIX, timeout=120)  # we are inside the pod namespace
    await dp.ensure_sysctls()
    out: dict[str, Any] = {}

    # Rule count against the number of groups, same members and destinations.
    small = synthetic(dataclasses.replace(scale, groups=10)).state
    await dp.apply_full(small)
    counts_small = await kernel_counts(dp)
    first_ms = await timed(dp.apply_full(state))
    counts = await kernel_counts(dp)
    out["rules"] = {
        "total": counts["rules_total"],
        "fwd_chain": counts["rules_fwd_chain"],
        "nat_chain": counts["rules_nat_chain"],
        "per_group": (counts["rules_total"] - counts_small["rules_total"]) / (scale.groups - 10),
        "by_groups": {"10": counts_small["rules_total"], str(scale.groups): counts["rules_total"]},
    }
    out["ipsets"] = {"sets": counts["ipsets"], "elements": counts["ipset_elements"]}
    resync = [await timed(dp.apply_full(state)) for _ in range(args.resyncs)]
    out["full_resync_ms"] = {
        "median": statistics.median(resync),
        "samples": resync,
        "first_apply_from_10_groups": first_ms,
    }
    out["state"] = {
        "build_ms": build_ms,
        "validation_from_scratch_ms": statistics.median(validate),
        "memberships": sum(len(g.members) for g in state.groups),
        "nat_members": len(state.nat_members),
    }
    if await dp.check_drift(state):
        raise RuntimeError("kernel differs from the desired state after a full resync")

    # What one conntrack run costs here, whatever it matches: the floor under every update
    # that revokes something (the kernel walks its whole conntrack hash table).
    out["conntrack_list_ms"] = statistics.median([await timed(conntrack_list()) for _ in range(20)])
    out["incremental"] = await incremental(dp, syn, scale, args.updates)
    out["incremental_unshared_connect"] = unshared_connects(state, 20, scale.seed)
    if await dp.check_drift(state):
        raise RuntimeError("kernel differs from the desired state after the updates")

    out["throughput_gbps"] = await throughput(dp, syn, args, nss.names[0], cl)
    await dp.remove_all()
    return out


async def throughput(
    dp: Dataplane, syn: Synthetic, args: argparse.Namespace, pod: str, cl: str
) -> dict[str, Any] | None:
    """iperf3 runs alternating "our chains absent" and "policy loaded"."""
    if args.iperf_runs == 0:
        return None
    gbps: dict[str, list[float]] = {
        "none": [],
        "conntrack_nat_only": [],
        "first_group": [],
        "last_group": [],
    }
    tracked_without_policy = []
    # Diagnostic between the two: stateful forwarding and masquerading without our sets and
    # chains, to tell conntrack's share of the cost from the policy's.
    stateful = [
        ("filter", "FORWARD", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j",
         "ACCEPT"),
        ("nat", "POSTROUTING", "-o", "u0", "-s", str(syn.first), "-j", "MASQUERADE"),
    ]  # fmt: skip
    for _ in range(args.iperf_runs):
        await dp.remove_all()
        if not (await dp.read_kernel()).is_empty:
            raise RuntimeError("our chains or sets are still present after remove_all")
        # Is conntrack still tracking without our chains? (iptables-nft keeps the nat table's
        # base chains, which need it.) Our own namespace: flushing it disturbs nothing else.
        await ns_run(pod, "conntrack", "-F", timeout=15)
        gbps["none"].append(await iperf(cl, syn.first, args.iperf_seconds))
        _, count, _ = await ns_run(pod, "conntrack", "-C", timeout=15)
        tracked_without_policy.append(int(count.strip() or 0))
        for table, chain, *rule in stateful:
            await ns_run(pod, "iptables", "-w", "-t", table, "-A", chain, *rule, timeout=15)
        gbps["conntrack_nat_only"].append(await iperf(cl, syn.first, args.iperf_seconds))
        for table, chain, *rule in stateful:
            await ns_run(pod, "iptables", "-w", "-t", table, "-D", chain, *rule, timeout=15)
        await dp.apply_full(syn.state)
        if await reachable(cl, syn.denied):
            raise RuntimeError("policy not enforced: a member without a grant reached the server")
        gbps["first_group"].append(await iperf(cl, syn.first, args.iperf_seconds))
        gbps["last_group"].append(await iperf(cl, syn.last, args.iperf_seconds))
    none = statistics.median(gbps["none"])
    return {
        **gbps,
        "ratio_first_group": statistics.median(gbps["first_group"]) / none,
        "ratio_last_group": statistics.median(gbps["last_group"]) / none,
        "ratio_first_group_vs_conntrack_nat_only": statistics.median(gbps["first_group"])
        / statistics.median(gbps["conntrack_nat_only"]),
        "conntrack_entries_after_runs_without_policy": tracked_without_policy,
    }


def goals(result: dict[str, Any], groups: int) -> dict[str, Any]:
    inc = result["incremental"]
    worst = {k: v["total_ms"]["p99"] for k, v in inc.items()}
    medians = {k: v["total_ms"]["median"] for k, v in inc.items()}
    tp = result["throughput_gbps"]
    return {
        "rules_o_groups": result["rules"]["by_groups"][str(groups)] == 8 + 5 * groups + 1,
        "incremental_median_under_10ms": {k: v < GOAL_UPDATE_MS for k, v in medians.items()},
        "incremental_p99_under_10ms": {k: v < GOAL_UPDATE_MS for k, v in worst.items()},
        "throughput_ratio_at_least_0_9": None
        if tp is None
        else min(tp["ratio_first_group"], tp["ratio_last_group"]) >= GOAL_RATIO,
    }


def one_line(r: dict[str, Any]) -> str:
    inc = r["incremental"]
    tp = r["throughput_gbps"]
    parts = ", ".join(
        f"{k} {v['total_ms']['median']:.1f}/{v['total_ms']['p99']:.1f} ms"
        f" (ipset step {v['ipset_step_ms']['median']:.1f})"
        for k, v in inc.items()
    )
    return (
        f"{r['scale']['members']} members, {r['scale']['groups']} groups, "
        f"{r['scale']['destinations']} destinations: {r['rules']['total']} rules "
        f"({r['rules']['by_groups']['10']} at 10 groups), {r['ipsets']['elements']} set elements;"
        f" full resync {r['full_resync_ms']['median']:.0f} ms; updates median/p99: {parts}; "
        + (
            "throughput not measured"
            if tp is None
            else f"throughput {statistics.median(tp['none']):.2f} Gbit/s without policy, ratio"
            f" {tp['ratio_first_group']:.2f} (first group) / {tp['ratio_last_group']:.2f}"
            " (last group)"
        )
    )


def build_topology(nss: Namespaces, syn: Synthetic) -> tuple[str, str, str]:
    pod, cl, srv = nss.create("pod"), nss.create("cl"), nss.create("srv")
    nss.veth(cl, "c0", pod, "t0")
    nss.veth(pod, "u0", srv, "s0")
    nss.run(pod, "ip", "addr", "add", f"{POD_TUN}/{TUN.prefixlen}", "dev", "t0")
    nss.run(pod, "ip", "addr", "add", f"{POD_UP}/{UPLINK_NET.prefixlen}", "dev", "u0")
    for ip in (syn.first, syn.last, syn.denied):
        nss.run(cl, "ip", "addr", "add", f"{ip}/{TUN.prefixlen}", "dev", "c0")
    nss.run(cl, "ip", "route", "add", "default", "via", str(POD_TUN))
    nss.run(srv, "ip", "addr", "add", f"{SERVER}/{UPLINK_NET.prefixlen}", "dev", "s0")
    nss.run(srv, "ip", "route", "add", str(TUN), "via", str(POD_UP))
    server = nss.popen(srv, "iperf3", "-s", "-B", str(SERVER), "-p", str(PORT))
    deadline = time.monotonic() + 10
    while f"{SERVER}:{PORT}" not in nss.run(srv, "ss", "-Hltn"):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("iperf3 server did not start")
        time.sleep(0.05)
    return pod, cl, srv


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--destinations", type=int, default=10000)
    ap.add_argument("--updates", type=int, default=60, help="samples per update kind")
    ap.add_argument("--resyncs", type=int, default=5)
    ap.add_argument("--iperf-runs", type=int, default=3, help="per mode; 0 skips throughput")
    ap.add_argument("--iperf-seconds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: sudo .venv/bin/python bench/dataplane_scale.py", file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.groups <= 10:
        print("--groups must be more than 10 (compared with 10 groups)", file=sys.stderr)
        return 2
    if not 3 <= args.members <= 16384 or not 1 <= args.updates <= 1000:
        print("need 3 <= --members <= 16384 and 1 <= --updates <= 1000", file=sys.stderr)
        return 2
    if not 1 <= args.iperf_seconds <= 60 or args.iperf_runs < 0 or args.resyncs < 1:
        print("need 1 <= --iperf-seconds <= 60, --iperf-runs >= 0, --resyncs >= 1", file=sys.stderr)
        return 2

    machine = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
        "conntrack_buckets": _read("/proc/sys/net/netfilter/nf_conntrack_buckets"),
    }
    nss = Namespaces()
    code = 1
    signals: list[int] = []
    with cleanup_on_signals():
        try:
            syn = synthetic(Scale(args.members, args.groups, args.destinations, args.seed))
            pod, cl, _ = build_topology(nss, syn)
            nss.enter(pod)  # before any thread exists: every later child starts in the pod
            result = asyncio.run(measure_until_signal(args, nss, cl, signals))
            nss.leave()
            result = {
                "machine": {**machine, "loadavg_after": os.getloadavg()},
                "scale": {
                    "members": args.members,
                    "groups": args.groups,
                    "destinations": args.destinations,
                    "seed": args.seed,
                },
                **result,
            }
            result["goals"] = goals(result, args.groups)
            print(json.dumps(result, indent=2))
            print(one_line(result))
            code = 0
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted: namespaces are being removed", file=sys.stderr)
            code = 128 + (signals[0] if signals else signal.SIGINT)
        except SystemExit as exc:  # a signal before the event loop ran
            print("interrupted: namespaces are being removed", file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
            left = nss.close()
            if left:
                print(f"could not remove namespaces: {', '.join(left)}", file=sys.stderr)
                code = code or 1
    return code


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
