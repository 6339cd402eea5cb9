"""The NFLOG listener against the real kernel: denied packets from a client namespace, logged by
the pod namespace's firewall, read back by :class:`vpnfleet.agent.nflog.NflogListener`.

Topology (all addresses live only inside the test's namespaces)::

    cl (clients)                   pod (firewall + listener)              sv (server)
    c0 198.18.70.2 A  ------------ p0 198.18.70.1   p1 198.18.71.1 ------ s0 198.18.71.2
       198.18.70.3 B
       198.18.70.9 D (no session)

The listener runs in a subprocess started with ``ip netns exec pod`` and prints JSON lines, so
the test runner itself never changes namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from tests.e2e.netns import Netns, NetnsPool, existing_namespaces, requires_netns, veth
from vpnfleet.agent.dataplane import Dataplane
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant

pytestmark = [pytest.mark.e2e, requires_netns("iptables", "iptables-restore", "ipset")]

NS_PREFIX = "vft-nfl-"
PY = sys.executable
GROUP = 7
PREFIX = "vpnf-deny"
CLIENT_NET = IPv4Network("198.18.70.0/24")
A, B, D = IPv4Address("198.18.70.2"), IPv4Address("198.18.70.3"), IPv4Address("198.18.70.9")
POD_C, POD_S = "198.18.70.1", "198.18.71.1"
SERVER = IPv4Address("198.18.71.2")
WAIT = 15.0  # seconds any single wait in these tests may take before failing

# Runs in the pod namespace. argv: mode group prefix [sessions-json window]
#   packets: print every denied packet;  events: print aggregated events (pump_denied);
#   busy: exercise binding twice, unbinding and rebinding;
#   stall: tiny receive buffer, read nothing until a stdin line, then read until idle.
# A line on stdin (or EOF) closes the listener; the last line is {"done": ..., counters}.
LISTENER = r"""
import asyncio, json, sys
from vpnfleet.agent.nflog import NflogError, NflogListener, pump_denied
from vpnfleet.core.denied import DeniedAggregator

mode, group, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def out(**kw):
    print(json.dumps(kw), flush=True)

async def stdin_reader():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader

async def close_on_stdin(reader, listener):
    await reader.readline()
    listener.close()

async def busy():
    first = NflogListener(group)
    first.open()
    try:
        NflogListener(group).open()
        out(second="bound")
    except NflogError as exc:
        out(second=str(exc))
    reading = asyncio.create_task(anext(aiter(first), None))
    await asyncio.sleep(0.2)
    first.close()
    out(iteration_end=repr(await asyncio.wait_for(reading, 5)))
    again = NflogListener(group)
    again.open()
    out(rebound=again.is_open)
    again.close()

async def stall(reader, listener):
    # Read nothing until told to (the socket buffer overflows meanwhile), then read until idle.
    await reader.readline()
    it = aiter(listener)
    for _ in range(100_000):
        try:
            async with asyncio.timeout(1.0):
                await anext(it)
        except TimeoutError:
            break
    listener.close()

async def main():
    if mode == "busy":
        return await busy()
    reader = await stdin_reader()
    listener = NflogListener(group, prefix=prefix, rcvbuf=4096 if mode == "stall" else 1 << 20)
    listener.open()
    out(ready=True)
    if mode == "stall":
        await stall(reader, listener)
    elif mode == "packets":
        stopper = asyncio.create_task(close_on_stdin(reader, listener))
        async for pkt in listener:
            out(packet=pkt.as_record())
    else:
        stopper = asyncio.create_task(close_on_stdin(reader, listener))
        sessions = json.loads(sys.argv[4])
        def lookup(ip):
            owner = sessions.get(str(ip))
            return None if owner is None else tuple(owner)
        agg = DeniedAggregator(lookup, window=float(sys.argv[5]))
        await pump_denied(listener, agg, lambda e: out(event=e.as_record()), tick=0.2)
    c = listener.counters
    out(done=True, packets=c.packets, decode_errors=c.decode_errors, overruns=c.overruns,
        foreign_prefix=c.foreign_prefix, reasons=dict(c.reasons))

asyncio.run(main())
"""

# Runs in the client namespace: one attempt (kind flood: `count` UDP datagrams).
# argv: kind src dst port sport [count]
SEND = r"""
import os, socket, struct, sys
kind, src, dst = sys.argv[1:4]
port, sport = int(sys.argv[4]), int(sys.argv[5])
count = int(sys.argv[6]) if len(sys.argv) > 6 else 1

def checksum(data):
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

if kind == "tcp":
    s = socket.socket()
    # Shorter than the 1 s initial retransmission timeout: exactly one SYN leaves.
    s.settimeout(0.3)
    s.bind((src, sport))
    try:
        s.connect((dst, port))
        print("connected")
    except OSError as exc:
        print("fail", type(exc).__name__)
elif kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, sport))
    s.sendto(b"denied?", (dst, port))
    print("sent")
elif kind == "flood":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, sport))
    for _ in range(count):
        s.sendto(b"flood", (dst, port))
    print("sent")
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0))
    head = struct.pack("!BBHHH", 8, 0, 0, os.getpid() & 0xFFFF, 1) + b"vpnfleet"
    s.sendto(head[:2] + struct.pack("!H", checksum(head)) + head[4:], (dst, 0))
    print("sent")
"""

# Runs in the server namespace: accepts TCP connections on the given port.
TCP_SERVER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
time.sleep(120)  # killed by the namespace pool long before
"""


@dataclass
class Lab:
    cl: Netns
    pod: Netns
    sv: Netns

    async def send(
        self, kind: str, src: IPv4Address, port: int = 0, sport: int = 0, count: int = 1
    ) -> str:
        r = await self.cl.arun(
            PY, "-c", SEND, kind, str(src), str(SERVER), str(port), str(sport), str(count)
        )
        return r.stdout.strip()


@pytest.fixture
def lab() -> Iterator[Lab]:
    with NetnsPool(NS_PREFIX) as pool:
        cl, pod, sv = pool.create("cl"), pool.create("pod"), pool.create("sv")
        veth(cl, "c0", pod, "p0")
        veth(pod, "p1", sv, "s0")
        for ip in (A, B, D):
            cl.add_addr("c0", f"{ip}/24")
        cl.add_route("default", POD_C)
        pod.add_addr("p0", f"{POD_C}/24")
        pod.add_addr("p1", f"{POD_S}/24")
        pod.sysctl("net.ipv4.ip_forward", "1")
        sv.add_addr("s0", f"{SERVER}/24")
        sv.add_route("default", POD_S)
        yield Lab(cl, pod, sv)
    assert not existing_namespaces(pool.base), "namespaces left behind"


@dataclass
class Listener:
    """The listener subprocess: its JSON lines so far, read with bounded waits."""

    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)

    async def _read_line(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        raw = await asyncio.wait_for(self.proc.stdout.readline(), left)
        if not raw:
            err = b""
            if self.proc.stderr is not None:
                err = await asyncio.wait_for(self.proc.stderr.read(), 5)
            raise AssertionError(f"listener exited early: {err.decode()}")
        line: dict[str, Any] = json.loads(raw)
        self.lines.append(line)
        return line

    async def wait_for(self, done: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Read lines until ``done(lines)`` holds (fails after :data:`WAIT` seconds)."""
        deadline = time.monotonic() + WAIT
        while not done(self.lines):
            try:
                await self._read_line(deadline)
            except TimeoutError:
                pytest.fail(f"timed out waiting for the listener; got {self.lines}")

    async def stop(self) -> dict[str, Any]:
        """Close the listener (line on stdin) and return its final counters line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        await self.wait_for(lambda lines: bool(lines) and "done" in lines[-1])
        return self.lines[-1]

    def packets(self) -> list[dict[str, Any]]:
        return [line["packet"] for line in self.lines if "packet" in line]

    def events(self) -> list[dict[str, Any]]:
        return [line["event"] for line in self.lines if "event" in line]


@contextlib.asynccontextmanager
async def listener(ns: Netns, *args: str) -> AsyncIterator[Listener]:
    proc = await asyncio.create_subprocess_exec(
        *ns.argv(PY, "-c", LISTENER, *args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        lst = Listener(proc)
        await lst.wait_for(lambda lines: any("ready" in line for line in lines))
        yield lst
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def tuple_of(p: dict[str, Any]) -> tuple[Any, ...]:
    return (p["proto"], p["src"], p["sport"], p["dst"], p["dport"], p["icmp_type"], p["prefix"])


async def test_denied_tcp_udp_icmp_are_reported_with_their_tuple(lab: Lab) -> None:
    ipt = ("iptables", "-A", "FORWARD")
    nflog = ("-j", "NFLOG", "--nflog-group", str(GROUP))
    # Another tool logging to the same group under its own prefix: filtered, not reported.
    lab.pod.run(*ipt, "-p", "udp", "--dport", "9999", *nflog, "--nflog-prefix", "other")
    lab.pod.run(*ipt, "-s", str(CLIENT_NET), *nflog, "--nflog-prefix", PREFIX)
    lab.pod.run(*ipt, "-s", str(CLIENT_NET), "-j", "DROP")

    started = time.time()
    async with listener(lab.pod, "packets", str(GROUP), PREFIX) as lst:
        assert await lab.send("tcp", A, 8080, 41001) == "fail TimeoutError"  # dropped
        assert await lab.send("udp", A, 5353, 41002) == "sent"
        assert await lab.send("icmp", A) == "sent"
        assert await lab.send("udp", B, 9999, 41003) == "sent"
        await lst.wait_for(lambda lines: sum("packet" in line for line in lines) >= 4)
        final = await lst.stop()
    ended = time.time()

    a, b, s = str(A), str(B), str(SERVER)
    assert sorted(map(tuple_of, lst.packets()), key=str) == sorted(
        [
            ("tcp", a, 41001, s, 8080, None, PREFIX),
            ("udp", a, 41002, s, 5353, None, PREFIX),
            ("icmp", a, None, s, None, 8, PREFIX),
            ("udp", b, 41003, s, 9999, None, PREFIX),
        ],
        key=str,
    )
    for p in lst.packets():
        at = dt.datetime.fromisoformat(p["at"]).timestamp()
        assert started - 1 <= at <= ended + 1, p
    assert final["packets"] == 4
    assert final["foreign_prefix"] == 1  # the "other" copy of the udp/9999 packet
    assert (final["decode_errors"], final["overruns"]) == (0, 0), final


async def test_pod_firewall_denials_become_attributed_events(lab: Lab) -> None:
    """The real pod ruleset (fwrender via the dataplane runner) feeding listener + aggregator."""
    state = DesiredState(
        prefix="vpnf",
        tunnel_networks=(CLIENT_NET,),
        uplink=None,
        nat_members=frozenset(),
        all_clients=frozenset({A, B}),
        groups=(GroupAccess(1, frozenset({A}), (Grant(IPv4Network(f"{SERVER}/32"), "tcp", 80),)),),
        nflog_group=GROUP,
    )
    plane = Dataplane("vpnf", netns=lab.pod.name, timeout=20)
    await plane.apply_full(state)
    server = lab.sv.popen(PY, "-c", TCP_SERVER, str(SERVER), "80")
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"

    sessions = json.dumps({str(A): ["alice", "sess-a"], str(B): ["bob", "sess-b"]})
    async with listener(lab.pod, "events", str(GROUP), PREFIX, sessions, "1.0") as lst:
        assert await lab.send("tcp", A, 80, 42000) == "connected"  # granted: not logged
        for sport in (42001, 42002):
            assert await lab.send("tcp", A, 81, sport) == "fail TimeoutError"
        assert await lab.send("udp", A, 53, 42003) == "sent"
        assert await lab.send("tcp", B, 80, 42004) == "fail TimeoutError"  # no group
        assert await lab.send("icmp", D) == "sent"  # no session at all

        def totals() -> Counter[tuple[Any, ...]]:
            c: Counter[tuple[Any, ...]] = Counter()
            for e in lst.events():
                c[(e["user"], e["session_uid"], e["src"], e["proto"], e["dport"])] += e["count"]
            return c

        # Windows close on the pump's timer, with no further packet to push them out.
        await lst.wait_for(lambda _: sum(totals().values()) >= 5)
        final = await lst.stop()

    assert totals() == {
        ("alice", "sess-a", str(A), "tcp", 81): 2,
        ("alice", "sess-a", str(A), "udp", 53): 1,
        ("bob", "sess-b", str(B), "tcp", 80): 1,
        (None, None, str(D), "icmp", None): 1,
    }
    assert all(e["dst"] == str(SERVER) and e["event"] == "denied" for e in lst.events())
    assert final["packets"] == 5 and final["decode_errors"] == 0, final


async def test_group_is_exclusive_and_released_on_close_or_crash(lab: Lab) -> None:
    r = await lab.pod.arun(PY, "-c", LISTENER, "busy", str(GROUP), PREFIX, time_limit=WAIT)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [
        {"second": f"NFLOG group {GROUP} is already bound by another process in this network "
                   "namespace"},
        {"iteration_end": "None"},
        {"rebound": True},
    ], r.stderr  # fmt: skip

    # A listener that dies without closing (SIGKILL) does not keep the group taken.
    async with listener(lab.pod, "packets", str(GROUP), PREFIX) as first:
        first.proc.kill()
        await first.proc.wait()
    async with listener(lab.pod, "packets", str(GROUP), PREFIX) as second:
        assert (await second.stop())["packets"] == 0


async def test_socket_overflow_is_counted_and_reading_goes_on(lab: Lab) -> None:
    lab.pod.run("iptables", "-A", "FORWARD", "-s", str(CLIENT_NET), "-j", "NFLOG",
                "--nflog-group", str(GROUP), "--nflog-prefix", PREFIX)  # fmt: skip
    lab.pod.run("iptables", "-A", "FORWARD", "-s", str(CLIENT_NET), "-j", "DROP")
    sent = 300
    async with listener(lab.pod, "stall", str(GROUP), PREFIX) as lst:
        assert await lab.send("flood", A, 5353, 43000, count=sent) == "sent"
        final = await lst.stop()  # starts reading, returns once the socket is idle
    assert final["overruns"] >= 1, final
    assert 1 <= final["packets"] < sent, final
    assert final["decode_errors"] == 0, final
