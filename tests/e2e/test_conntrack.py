"""The conntrack listener against the real kernel, in namespaces the test creates.

Topology (addresses exist only inside the test's namespaces)::

    cl (client)               pod (listener + MASQUERADE)                 srv (server)
    c0 198.18.40.2   ----   in0 198.18.40.1    up0 198.18.41.1   ----   s0 198.18.41.2
                                                                          tcp/udp echo :7007

The MASQUERADE rule for 198.18.40.0/24 is what makes conntrack run (and emit events) in the
pod namespace; the server sees every client as 198.18.41.1:<post-NAT port> and says which.
The listener runs as ``python -m vpnfleet.agent.conntrack`` inside the pod namespace (as the
agent does), so the test process never changes namespace.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.e2e.netns import Netns, NetnsPool, existing_namespaces, requires_netns, veth
from vpnfleet.core.flowevents import FlowEvent
from vpnfleet.core.flowtracker import FlowTracker

pytestmark = [pytest.mark.e2e, requires_netns("iptables", "sysctl")]

NS_PREFIX = "vft-ct-"
CLIENT, POD_IN, POD_OUT, SERVER = "198.18.40.2", "198.18.40.1", "198.18.41.1", "198.18.41.2"
PORT = 7007
PY = sys.executable
# The kernel reports DESTROY when its global garbage collector reaps the expired entry; with
# few entries it may scan only every tens of seconds. The stop timestamp is exact regardless.
DESTROY_WAIT = 150.0

SERVER_SCRIPT = r"""
import socket, sys, threading
port = int(sys.argv[1])
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
def serve_tcp():
    while True:
        conn, peer = tcp.accept()
        print("tcp", peer[0], peer[1], flush=True)
        def echo(c=conn):
            while data := c.recv(65536):
                c.sendall(data)
            c.close()
        threading.Thread(target=echo, daemon=True).start()
threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
while True:
    data, peer = udp.recvfrom(65536)
    print("udp", peer[0], peer[1], flush=True)
    udp.sendto(data, peer)
"""

# Opens one TCP connection and one UDP "connection", moves data both ways, reports its own
# ports, and keeps both open until told to close on stdin.
CLIENT_SCRIPT = r"""
import socket, sys
server, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = socket.create_connection((server, port), timeout=10)
t.sendall(b"t" * size)
got = 0
while got < size:
    got += len(t.recv(65536))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
u.connect((server, port))
u.send(b"u" * 700)
assert len(u.recv(65536)) == 700
print("open", t.getsockname()[1], u.getsockname()[1], flush=True)
sys.stdin.readline()
t.close(); u.close()
print("closed", flush=True)
"""

BURST_SCRIPT = r"""
import socket, sys
server, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):  # a new socket, so a new source port and a new flow, every time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"b", (server, port))
    s.close()
print("sent", count, flush=True)
"""

# A TCP connection that stays open until killed.
HOLD_SCRIPT = r"""
import socket, sys, time
t = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("open", t.getsockname()[1], flush=True)
time.sleep(300)
"""


class Lines:
    """Reads a process's stdout in a thread; lets the test wait for a line, with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait(self, match: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line (seen before or arriving within ``timeout`` s) that matches."""
        for line in self.seen:
            if match(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if match(line):
                return line
        stderr = ""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            stderr = self.proc.stderr.read()
        raise AssertionError(f"no {what} within {timeout:.0f}s; last lines {self.seen[-5:]} "
                             f"{stderr}")  # fmt: skip


@dataclass
class Listener:
    """The listener process in the pod namespace and its JSON output."""

    proc: subprocess.Popen[str]
    out: Lines
    ready: dict[str, Any] = field(default_factory=dict)

    def message(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        line = self.out.wait(lambda s: match(json.loads(s)), timeout, what)
        return dict(json.loads(line))

    def event(self, kind: str, proto: int, sport: int, timeout: float, **extra: Any) -> FlowEvent:
        def match(m: dict[str, Any]) -> bool:
            return (m.get("type") == "event" and m["kind"] == kind and m["proto"] == proto
                    and m["orig_src"] == CLIENT and m["orig_sport"] == sport
                    and all(m.get(k) == v for k, v in extra.items()))  # fmt: skip

        m = self.message(match, timeout, f"{kind} event proto {proto} sport {sport}")
        m.pop("type")
        return FlowEvent.from_dict(m)


@dataclass
class Topo:
    pool: NetnsPool
    cl: Netns
    pod: Netns
    srv: Netns
    server: Lines

    def listen(self, *args: str) -> Listener:
        proc = self.pod.popen(PY, "-m", "vpnfleet.agent.conntrack", *args)
        listener = Listener(proc, Lines(proc))
        listener.ready = listener.message(lambda m: m.get("type") == "ready", 15, "ready line")
        return listener

    def server_saw(self, proto: str, timeout: float = 10) -> tuple[str, int]:
        line = self.server.wait(lambda s: s.startswith(proto + " "), timeout, f"{proto} peer")
        self.server.seen.remove(line)
        _, ip, port = line.split()
        return ip, int(port)


@pytest.fixture
def topo() -> Iterator[Topo]:
    with NetnsPool(NS_PREFIX) as pool:
        cl, pod, srv = pool.create("cl"), pool.create("pod"), pool.create("srv")
        veth(cl, "c0", pod, "in0")
        veth(pod, "up0", srv, "s0")
        cl.add_addr("c0", f"{CLIENT}/24")
        pod.add_addr("in0", f"{POD_IN}/24")
        pod.add_addr("up0", f"{POD_OUT}/24")
        srv.add_addr("s0", f"{SERVER}/24")
        cl.add_route("default", POD_IN)
        pod.sysctl("net.ipv4.ip_forward", "1")
        # What Dataplane.ensure_sysctls does in the agent: counters and timestamps.
        pod.sysctl("net.netfilter.nf_conntrack_acct", "1")
        pod.sysctl("net.netfilter.nf_conntrack_timestamp", "1")
        pod.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.40.0/24",
                "-o", "up0", "-j", "MASQUERADE")  # fmt: skip
        # Closed flows expire after 1 s instead of minutes (per-namespace timeouts).
        for key in (
            "udp_timeout",
            "udp_timeout_stream",
            "tcp_timeout_time_wait",
            "tcp_timeout_close",
            "tcp_timeout_fin_wait",
            "tcp_timeout_last_ack",
        ):
            pod.sysctl(f"net.netfilter.nf_conntrack_{key}", "1")
        server = srv.popen(PY, "-c", SERVER_SCRIPT, str(PORT))
        lines = Lines(server)
        lines.wait(lambda s: s == "ready", 15, "server ready")
        yield Topo(pool, cl, pod, srv, lines)
    assert not existing_namespaces(pool.base)


def test_tcp_and_udp_flows_are_reported_with_their_nat_tuples(topo: Topo) -> None:
    listener = topo.listen()
    assert listener.ready["rcvbuf"] >= 1 << 20
    client = topo.cl.popen(PY, "-c", CLIENT_SCRIPT, SERVER, str(PORT), "30000")
    out = Lines(client)
    _, tcp_port, udp_port = out.wait(lambda s: s.startswith("open"), 15, "client open").split()
    tcp_nat = topo.server_saw("tcp")
    udp_nat = topo.server_saw("udp")
    assert tcp_nat[0] == udp_nat[0] == POD_OUT  # the server sees the pod, not the client

    # NEW arrives while both connections are still open.
    tcp_new = listener.event("new", 6, int(tcp_port), 10)
    udp_new = listener.event("new", 17, int(udp_port), 10)
    assert client.poll() is None
    for ev, nat in ((tcp_new, tcp_nat), (udp_new, udp_nat)):
        assert (ev.orig_dst, ev.orig_dport) == (SERVER, PORT)
        assert (ev.reply_src, ev.reply_sport) == (SERVER, PORT)
        assert (ev.reply_dst, ev.reply_dport) == nat  # post-NAT = what the server saw
        assert not ev.from_dump and ev.ct_id != 0

    assert client.stdin is not None
    client.stdin.write("close\n")
    client.stdin.flush()
    out.wait(lambda s: s == "closed", 10, "client closed")

    tcp_end = listener.event("destroy", 6, int(tcp_port), DESTROY_WAIT, ct_id=tcp_new.ct_id)
    udp_end = listener.event("destroy", 17, int(udp_port), DESTROY_WAIT, ct_id=udp_new.ct_id)
    assert tcp_end.bytes_orig is not None and tcp_end.bytes_orig > 30000
    assert tcp_end.bytes_reply is not None and tcp_end.bytes_reply > 30000
    assert udp_end.bytes_orig == udp_end.bytes_reply == 700 + 28  # payload + IP/UDP headers
    assert (udp_end.packets_orig, udp_end.packets_reply) == (1, 1)
    for new, end in ((tcp_new, tcp_end), (udp_new, udp_end)):
        assert end.start_ns is not None and end.stop_ns is not None
        assert end.start_ns < end.stop_ns
        assert new.at <= end.at
        if new.event_ns is not None:  # Linux >= 6.14: the kernel's time of the NEW event
            assert abs(new.event_ns - end.start_ns) < 50_000_000

    # The same real events through the tracker: attributed, post-NAT port as the server saw.
    tracker = FlowTracker("pod-1", ["198.18.40.0/24"], {CLIENT: ("alice", "s-1")}.get)
    (start,) = tracker.feed(tcp_new)
    (end,) = tracker.feed(tcp_end)
    assert (start.user, start.session_uid, start.nat_ip, start.nat_port) == (
        "alice", "s-1", *tcp_nat)  # fmt: skip
    assert end.flow_id == start.flow_id and end.bytes_out == tcp_end.bytes_orig

    listener.proc.send_signal(signal.SIGTERM)
    final = listener.message(lambda m: m.get("type") == "counters", 10, "final counters")
    assert final["overruns"] == 0 and final["decode_errors"] == 0
    assert final["resyncs"] == 1  # the startup dump
    assert listener.proc.wait(timeout=10) == 0


def test_overrun_is_counted_and_followed_by_a_resync(topo: Topo) -> None:
    # A small buffer (~400 events) and a stopped reader: the kernel must drop events for us.
    # The backlog left is larger than one read batch (256), so the resync starts while the
    # socket is still congested, which is what makes the follow-up dump necessary.
    listener = topo.listen("--rcvbuf", str(256 * 1024), "--no-initial-dump")
    assert listener.ready["rcvbuf"] <= 1 << 20
    os.kill(listener.proc.pid, signal.SIGSTOP)
    try:
        burst = topo.cl.run(PY, "-c", BURST_SCRIPT, SERVER, str(PORT), "2000", timeout=60)
        assert "sent 2000" in burst.stdout
        # Opened while the listener is deaf: its NEW event is lost with the others.
        hold = topo.cl.popen(PY, "-c", HOLD_SCRIPT, SERVER, str(PORT))
        held_port = int(Lines(hold).wait(lambda s: s.startswith("open"), 15, "hold").split()[1])
    finally:
        os.kill(listener.proc.pid, signal.SIGCONT)

    end = listener.message(
        lambda m: m.get("type") == "resync" and m["phase"] == "end", 30, "resync end"
    )
    assert end["counters"]["overruns"] >= 1
    assert end["counters"]["resyncs"] >= 1
    # The held connection was re-learned from the dump, with its kernel start time.
    relearned = listener.event("new", 6, held_port, 5, from_dump=True)
    assert relearned.start_ns is not None and relearned.reply_dst == POD_OUT
    # The kernel reports no further drops until the backlog has been read empty, so a dump
    # taken during the catch-up is followed by another one once it has been.
    ends = lambda: [s for s in listener.out.seen if '"phase": "end"' in s]  # noqa: E731
    listener.message(
        lambda m: m.get("type") == "resync" and m["phase"] == "end" and len(ends()) >= 2,
        30,
        "follow-up resync",
    )

    listener.proc.send_signal(signal.SIGTERM)
    final = listener.message(lambda m: m.get("type") == "counters", 10, "final counters")
    assert final["overruns"] >= 1 and final["dumped"] >= 1
    assert listener.proc.wait(timeout=10) == 0
    assert listener.proc.stderr is not None
    assert "conntrack events lost" in listener.proc.stderr.read()  # never silent
