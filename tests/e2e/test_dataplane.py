"""The dataplane against the real kernel: iptables, ipset and conntrack in namespaces we create.

Topology (all addresses live only inside the test's namespaces)::

    cl (clients)              gw (the "pod": dataplane under test)        be (backend)
    c0 198.18.8.2 A  NAT  ---- tun0 198.18.8.1     up0 198.18.20.1 ---- b0 198.18.20.2 be1
       198.18.8.3 B  gateway                                               198.18.20.3 be2
       198.18.8.4 C  NAT, icmp only
       198.18.8.5 D  not a client

The tunnel is a veth with several client addresses on the far end; the dataplane cannot tell
the difference, it only sees forwarded packets. The backend routes the tunnel network back to
the gateway, so a NAT'd client shows up as 198.18.20.1 and a gateway client as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.e2e.netns import Netns, NetnsPool, existing_namespaces, requires_netns, veth
from vpnfleet.agent.dataplane import Dataplane
from vpnfleet.agent.netcommands import DataplaneError
from vpnfleet.core import fwnames
from vpnfleet.core.fwkernel import parse_conntrack
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant
from vpnfleet.core.revocation import Flow, RevokedFlow

pytestmark = [pytest.mark.e2e, requires_netns("iptables", "ipset", "conntrack", "sysctl")]

PREFIX = "vpnf"
NS_PREFIX = "vft-dp-"
TUN = IPv4Network("198.18.8.0/24")
A, B, C, D = (IPv4Address(f"198.18.8.{i}") for i in (2, 3, 4, 5))
GW_UP = "198.18.20.1"
BE1, BE2 = "198.18.20.2", "198.18.20.3"
PY = sys.executable
DENY_TIMEOUT = 1.0  # seconds a probe waits before calling a destination unreachable

SERVER = r"""
import asyncio, sys

async def handle(reader, writer):
    peer = writer.get_extra_info("peername")[0]
    try:
        while line := await reader.readline():
            text = line.decode().strip()
            if text.startswith("later "):  # answer after a delay: a server-sent segment
                await asyncio.sleep(float(text.split()[1]))
            writer.write(f"{peer} {text}\n".encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        self.transport.sendto(f"{addr[0]} {data.decode().strip()}\n".encode(), addr)

async def main():
    loop = asyncio.get_running_loop()
    for spec in sys.argv[1:]:
        addr, proto = spec.split("/")
        host, port = addr.rsplit(":", 1)
        if proto == "tcp":
            await asyncio.start_server(handle, host, int(port))
        else:
            await loop.create_datagram_endpoint(Echo, local_addr=(host, int(port)))
    print("ready", flush=True)
    await asyncio.sleep(600)  # the fixture kills it long before

asyncio.run(main())
"""

# One-shot probe: prints "ok <server's view of our address>" or "fail <reason>".
PROBE = r"""
import os, socket, struct, sys, time
proto, src, dst, port, timeout = sys.argv[1:6]
port, timeout = int(port), float(timeout)

def checksum(data):
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

try:
    if proto == "tcp":
        s = socket.socket()
        s.settimeout(timeout)
        s.bind((src, 0))
        s.connect((dst, port))
        s.sendall(b"hello\n")
        data = s.makefile().readline().strip()
    elif proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.bind((src, 0))
        s.sendto(b"hello\n", (dst, port))
        data = s.recv(256).decode().strip()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.bind((src, 0))
        ident = os.getpid() & 0xFFFF
        head = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"vpnfleet"
        packet = head[:2] + struct.pack("!H", checksum(head)) + head[4:]
        s.sendto(packet, (dst, 0))
        deadline = time.monotonic() + timeout
        data = None
        while data is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            pkt, addr = s.recvfrom(2048)
            ihl = (pkt[0] & 0x0F) * 4
            kind, _, _, pid = struct.unpack("!BBHH", pkt[ihl:ihl + 6])
            if kind == 0 and pid == ident and addr[0] == dst:
                data = "echo-reply"
    print("ok", data)
except Exception as exc:
    print("fail", type(exc).__name__)
"""

# Long-lived TCP client: one request per stdin line, prints "ok ...", "timeout" or "closed".
CONN = r"""
import socket, sys
src, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((dst, port), timeout=3, source_address=(src, 0))
print("connected", flush=True)
buf = b""
for line in sys.stdin:
    s.settimeout(timeout)
    try:
        s.sendall(line.encode())
        while b"\n" not in buf:
            chunk = s.recv(256)
            if not chunk:
                raise EOFError
            buf += chunk
        reply, buf = buf.split(b"\n", 1)
        print("ok", reply.decode(), flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except (EOFError, OSError):
        print("closed", flush=True)
"""


@dataclass
class Lab:
    gw: Netns
    cl: Netns
    be: Netns

    async def probe(
        self, proto: str, src: IPv4Address | str, dst: str, port: int = 0, ns: Netns | None = None
    ) -> str:
        """'ok <address the server saw>' / 'ok echo-reply', or 'fail <reason>'.

        Runs in the client namespace unless ``ns`` says otherwise.
        """
        where = ns or self.cl
        r = await where.arun(PY, "-c", PROBE, proto, str(src), dst, str(port), str(DENY_TIMEOUT))
        return r.stdout.strip()

    def conntrack(self, *args: str) -> str:
        return self.gw.run("conntrack", "-L", *args, check=False).stdout


def _ids(conntrack_output: str) -> set[str]:
    return {t for t in conntrack_output.split() if t.startswith("id=")}


class Conn:
    """A TCP connection kept open by a client process, driven one request at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, text: str = "ping") -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{text}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        return line.decode().strip()


@contextlib.asynccontextmanager
async def open_conn(
    ns: Netns, src: IPv4Address, dst: str, port: int, wait: float = DENY_TIMEOUT
) -> AsyncIterator[Conn]:
    """Keep a TCP connection open; each request waits ``wait`` seconds for its answer."""
    proc = await asyncio.create_subprocess_exec(
        *ns.argv(PY, "-c", CONN, str(src), dst, str(port), str(wait)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert first.decode().strip() == "connected", first
        yield Conn(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def start_server(ns: Netns, *specs: str) -> None:
    proc = ns.popen(PY, "-c", SERVER, *specs)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the process prints "ready" or dies (EOF)
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line


@pytest.fixture
def lab() -> Iterator[Lab]:
    with NetnsPool(NS_PREFIX) as pool:
        gw, cl, be = pool.create("gw"), pool.create("cl"), pool.create("be")
        veth(cl, "c0", gw, "tun0")
        veth(gw, "up0", be, "b0")
        gw.add_addr("tun0", f"{TUN[1]}/24")
        gw.add_addr("up0", f"{GW_UP}/24")
        for ip in (A, B, C, D):
            cl.add_addr("c0", f"{ip}/24")
        cl.add_route("default", str(TUN[1]))
        be.add_addr("b0", f"{BE1}/24")
        be.add_addr("b0", f"{BE2}/24")
        be.add_route(str(TUN), GW_UP)
        start_server(be, f"{BE1}:8080/tcp", f"{BE1}:8081/tcp", f"{BE1}:9000/tcp",
                     f"{BE1}:5353/udp", f"{BE2}:8080/tcp")  # fmt: skip
        start_server(cl, "0.0.0.0:7000/tcp")  # for backend -> client (gateway mode)
        yield Lab(gw, cl, be)
    assert not [n for n in existing_namespaces(pool.base)], "namespaces left behind"


@pytest.fixture
async def dp(lab: Lab) -> Dataplane:
    plane = Dataplane(PREFIX, netns=lab.gw.name, timeout=20)
    await plane.ensure_sysctls()
    return plane


def make_state(
    groups: dict[int, tuple[set[IPv4Address], list[Grant]]],
    *,
    clients: set[IPv4Address] | None = None,
    nat: set[IPv4Address] | None = None,
    allow_all: bool = False,
) -> DesiredState:
    members = {ip for m, _ in groups.values() for ip in m}
    return DesiredState(
        prefix=PREFIX,
        tunnel_networks=(TUN,),
        uplink="up0",
        nat_members=frozenset({A, C} if nat is None else nat),
        all_clients=frozenset(members | {A, B, C} if clients is None else clients),
        groups=tuple(
            GroupAccess(gid, frozenset(m), tuple(g)) for gid, (m, g) in sorted(groups.items())
        ),
        allow_all=allow_all,
    )


def web(lo: int = 8080, hi: int = 8081) -> Grant:
    return Grant(IPv4Network(f"{BE1}/32"), "tcp", lo, hi)


BASE = {
    1: ({A, B}, [web(), Grant(IPv4Network(f"{BE1}/32"), "udp", 5353)]),
    2: ({C}, [Grant(IPv4Network("198.18.20.0/24"), "icmp")]),
}


async def test_policy_nat_and_gateway_with_real_traffic(lab: Lab, dp: Dataplane) -> None:
    await dp.apply_full(make_state(BASE))
    assert await dp.check_drift(make_state(BASE)) == []

    probes = {
        "A web (NAT)": lab.probe("tcp", A, BE1, 8080),
        "B web (gateway)": lab.probe("tcp", B, BE1, 8081),
        "A udp 5353": lab.probe("udp", A, BE1, 5353),
        "C ping": lab.probe("icmp", C, BE2),
        "A port not granted": lab.probe("tcp", A, BE1, 9000),
        "A other host": lab.probe("tcp", A, BE2, 8080),
        "A ping not granted": lab.probe("icmp", A, BE1),
        "C web not granted": lab.probe("tcp", C, BE1, 8080),
        "D not a client": lab.probe("tcp", D, BE1, 8080),
        "backend -> B (gateway)": lab.probe("tcp", BE1, str(B), 7000, ns=lab.be),
        "backend -> A (NAT)": lab.probe("tcp", BE1, str(A), 7000, ns=lab.be),
    }
    got = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
    assert got["A web (NAT)"] == f"ok {GW_UP} hello"  # masqueraded to the uplink address
    assert got["B web (gateway)"] == f"ok {B} hello"  # keeps its tunnel address
    assert got["A udp 5353"] == f"ok {GW_UP} hello"
    assert got["C ping"] == "ok echo-reply"
    assert got["backend -> B (gateway)"] == f"ok {BE1} hello"
    for denied in (
        "A port not granted",
        "A other host",
        "A ping not granted",
        "C web not granted",
        "D not a client",
        "backend -> A (NAT)",
    ):
        assert got[denied].startswith("fail"), (denied, got[denied])


async def root_ipsets() -> str:
    """Set names in the host's namespace (read only)."""
    proc = await asyncio.create_subprocess_exec(
        "ipset", "list", "-n", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    return out.decode()


async def test_sets_and_rules_stay_inside_the_namespace(lab: Lab, dp: Dataplane) -> None:
    root_before = await root_ipsets()
    await dp.apply_full(make_state(BASE))
    inside = lab.gw.run("ipset", "list", "-n").stdout.split()
    assert fwnames.clients_set(PREFIX) in inside
    assert await root_ipsets() == root_before  # ipsets are per network namespace


async def test_revoking_a_grant_cuts_open_connections_but_spares_allowed_ones(
    lab: Lab, dp: Dataplane
) -> None:
    old = make_state(BASE)
    await dp.apply_full(old)
    async with (
        open_conn(lab.cl, A, BE1, 8080) as a80,
        open_conn(lab.cl, A, BE1, 8081) as a81,
        open_conn(lab.cl, B, BE1, 8080) as b80,
    ):
        for conn in (a80, a81, b80):
            assert (await conn.ask()).startswith("ok")
        assert "dport=8080" in lab.conntrack("-s", str(A))
        a81_flow = lab.conntrack("-s", str(A), "-p", "tcp", "--dport", "8081", "-o", "id")
        assert "id=" in a81_flow

        narrowed = {**BASE, 1: ({A, B}, [web(8081, 8081), BASE[1][1][1]])}
        new = make_state(narrowed)
        d = await dp.apply_diff(old, new)
        assert not d.needs_full
        assert {rf.client for rf in d.revoked_flows} == {A, B}

        assert await a80.ask() == "timeout"
        assert await b80.ask() == "timeout"
        assert (await a81.ask()).startswith("ok")  # 8081 is still granted: not cut ...
        same = lab.conntrack("-s", str(A), "-p", "tcp", "--dport", "8081", "-o", "id")
        assert _ids(same) == _ids(a81_flow)  # ... not even briefly (same conntrack entry)
        assert "dport=8080" not in lab.conntrack("-s", str(A), "-p", "tcp")
        assert (await lab.probe("tcp", A, BE1, 8080)).startswith("fail")
        assert dp.stats.flows_killed >= 2
        assert await dp.check_drift(new) == []


async def test_revoking_several_grants_of_several_clients_at_once(lab: Lab, dp: Dataplane) -> None:
    # Group 1 loses both its grants: A and B each lose web and udp/5353 in one apply. A keeps
    # tcp/8081 through group 3, so that connection must survive.
    groups = {**BASE, 3: ({A}, [web(8081, 8081)])}
    old = make_state(groups)
    await dp.apply_full(old)
    assert (await lab.probe("udp", A, BE1, 5353)) == f"ok {GW_UP} hello"
    assert "dport=5353" in lab.conntrack("-s", str(A), "-p", "udp")
    async with (
        open_conn(lab.cl, A, BE1, 8080) as a80,
        open_conn(lab.cl, A, BE1, 8081) as a81,
        open_conn(lab.cl, B, BE1, 8081) as b81,
    ):
        for conn in (a80, a81, b81):
            assert (await conn.ask()).startswith("ok")
        new = make_state({**groups, 1: ({A, B}, [])})
        d = await dp.apply_diff(old, new)
        assert not d.needs_full
        assert {(rf.client, rf.grant) for rf in d.revoked_flows} == {
            (client, grant) for client in (A, B) for grant in BASE[1][1]
        }
        assert await a80.ask() == "timeout"
        assert await b81.ask() == "timeout"
        assert (await a81.ask()).startswith("ok")
        assert "dport=5353" not in lab.conntrack("-s", str(A), "-p", "udp")
        assert await dp.check_drift(new) == []


async def test_revoked_flow_stays_dead_when_the_server_speaks_next(lab: Lab, dp: Dataplane) -> None:
    # After its conntrack entry is gone, the server's next segment arrives as a NEW non-SYN
    # packet. For a gateway client it must not re-create the flow in the inbound direction
    # (gateway clients accept new inbound connections, but only from a SYN).
    old = make_state(BASE)
    await dp.apply_full(old)
    async with (
        open_conn(lab.cl, A, BE1, 8080, wait=3.0) as a_nat,
        open_conn(lab.cl, B, BE1, 8080, wait=3.0) as b_gw,
    ):
        assert (await a_nat.ask()).startswith("ok") and (await b_gw.ask()).startswith("ok")
        pending = [asyncio.create_task(c.ask("later 1.0")) for c in (a_nat, b_gw)]
        await asyncio.sleep(0.3)  # both requests reached the server and were acknowledged
        await dp.apply_diff(old, make_state({**BASE, 1: ({A, B}, [BASE[1][1][1]])}))
        assert await asyncio.gather(*pending) == ["timeout", "timeout"]


async def test_restarted_agent_reconciles_flows_it_could_not_diff(lab: Lab, dp: Dataplane) -> None:
    await dp.apply_full(make_state(BASE))
    async with (
        open_conn(lab.cl, A, BE1, 8080) as a80,
        open_conn(lab.cl, A, BE1, 8081) as a81,
        open_conn(lab.be, IPv4Address(BE1), str(B), 7000) as to_b,
    ):
        for conn in (a80, a81, to_b):
            assert (await conn.ask()).startswith("ok")
        # A new agent process knows no previous state: its first apply is a full resync, which
        # changes the rules but cannot know which flows lost access ...
        restarted = Dataplane(PREFIX, netns=lab.gw.name)
        narrowed = make_state({**BASE, 1: ({A, B}, [web(8081, 8081)])}, nat={A, B, C})
        assert await restarted.apply(narrowed) is None
        assert (await a80.ask()).startswith("ok")
        # ... so it reconciles: A's 8080 flow and the inbound flow to B (now NAT) go.
        assert await restarted.flows.reconcile_flows(narrowed) >= 2
        assert await a80.ask() == "timeout"
        assert await to_b.ask() == "timeout"
        assert (await a81.ask()).startswith("ok")


async def test_kill_flows_by_network_and_protocol(lab: Lab, dp: Dataplane) -> None:
    await dp.apply_full(make_state(BASE))
    async with open_conn(lab.cl, A, BE1, 8080) as conn:
        assert (await conn.ask()).startswith("ok")
        assert await dp.flows.kill_flows(A, Grant(IPv4Network("198.18.20.0/24"), "udp")) == 0
        assert await dp.flows.kill_flows(A, Grant(IPv4Network("198.18.21.0/24"), "tcp")) == 0
        # Still allowed by the applied state: spared.
        keep = make_state(BASE)
        assert (
            await dp.flows.kill_flows(A, Grant(IPv4Network("198.18.20.0/24"), "tcp"), keep=keep)
            == 0
        )
        assert (await conn.ask()).startswith("ok")
        assert await dp.flows.kill_flows(A, Grant(IPv4Network("198.18.20.0/24"), "tcp")) == 1
        # The flow is gone; the policy still allows it, so the client's next segment simply
        # starts a new entry (tcp_loose) -- the kill itself is what is measured here.
        assert "dport=8080" not in lab.conntrack("-s", str(A), "-p", "tcp", "--dport", "8080") or (
            await conn.ask()
        ).startswith("ok")


# Deletes entries by tuple from inside the namespace, as the agent does in its pod: over
# ctnetlink, whose socket sees the namespace of the process that opens it. Prints the count
# returned and the count in the stats.
DELETE_EXACT = r"""
import asyncio, json, sys
from ipaddress import IPv4Address
from vpnfleet.agent.dataplane import Dataplane
from vpnfleet.core.revocation import Flow

dataplane = Dataplane(sys.argv[1])
flows = [Flow(p, n, IPv4Address(s), IPv4Address(d), sp, dp) for p, n, s, d, sp, dp in
         json.loads(sys.argv[2])]
first = asyncio.run(dataplane.flows.delete_flows_exact(flows))
again = asyncio.run(dataplane.flows.delete_flows_exact(flows))  # already gone: nothing to count
print(first, again, dataplane.stats.flows_killed)
"""


@pytest.mark.parametrize("where", ["netlink, in the namespace", "conntrack -D, from outside"])
async def test_exact_deletion_cuts_those_connections_and_no_other(
    lab: Lab, dp: Dataplane, where: str
) -> None:
    def web_flows() -> dict[int | None, Flow]:
        listed = lab.conntrack("-p", "tcp", "-s", str(A), "-d", BE1, "--dport", "8080")
        return {f.sport: f for f in parse_conntrack(listed)}

    await dp.apply_full(make_state(BASE))
    async with contextlib.AsyncExitStack() as stack:
        # Three connections between the same two addresses and ports, told apart by their
        # source ports (learned one at a time): only a whole tuple separates them.
        conns: dict[int | None, Conn] = {}
        for _ in range(3):
            conn = await stack.enter_async_context(open_conn(lab.cl, A, BE1, 8080))
            assert (await conn.ask()).startswith("ok")
            (sport,) = web_flows().keys() - conns.keys()
            conns[sport] = conn
        *doomed, spared = conns
        flows = web_flows()
        spared_id = _ids(lab.conntrack("-p", "tcp", "--sport", str(spared), "-o", "id"))
        assert len(spared_id) == 1
        # A loses port 8080: open connections would keep going (ESTABLISHED) until deleted.
        await dp.apply_full(make_state({**BASE, 1: ({A, B}, [web(8081, 8081)])}))

        if where.startswith("netlink"):
            payload = json.dumps([
                [f.proto, f.protonum, str(f.src), str(f.dst), f.sport, f.dport]
                for f in (flows[sport] for sport in doomed)
            ])  # fmt: skip
            out = await lab.gw.arun(PY, "-c", DELETE_EXACT, PREFIX, payload)
            assert out.stdout.split() == ["2", "0", "2"], out.stderr
        else:
            assert dp.netns is not None  # so the runner cannot use its own netlink socket
            assert await dp.flows.delete_flows_exact([flows[sport] for sport in doomed]) == 2
            assert await dp.flows.delete_flows_exact([flows[sport] for sport in doomed]) == 0
            assert dp.stats.flows_killed == 2

        assert web_flows().keys() == {spared}
        same = lab.conntrack("-p", "tcp", "--sport", str(spared), "-o", "id")
        assert _ids(same) == spared_id  # the very same entry, untouched
        answers = await asyncio.gather(*(conns[sport].ask() for sport in conns))
        assert dict(zip(conns, answers, strict=True)) == {
            doomed[0]: "timeout",
            doomed[1]: "timeout",
            spared: f"ok {GW_UP} ping",
        }


async def test_disconnect_removes_client_and_its_flows(lab: Lab, dp: Dataplane) -> None:
    old = make_state(BASE)
    await dp.apply_full(old)
    async with (
        open_conn(lab.cl, A, BE1, 8080) as a_out,
        open_conn(lab.cl, B, BE1, 8080) as b_out,
        open_conn(lab.be, IPv4Address(BE1), str(B), 7000) as b_in,
    ):
        for conn in (a_out, b_out, b_in):
            assert (await conn.ask()).startswith("ok")
        # B disconnects.
        new = make_state({1: ({A}, BASE[1][1]), 2: BASE[2]}, clients={A, C})
        d = await dp.apply_diff(old, new)
        assert RevokedFlow(B, None) in d.revoked_flows
        assert await b_out.ask() == "timeout"
        assert await b_in.ask() == "timeout"  # inbound flows to a gone client end too
        assert (await a_out.ask()).startswith("ok")
        assert lab.conntrack("-d", str(B)).strip() == ""
    assert (await lab.probe("tcp", B, BE1, 8080)).startswith("fail")
    assert await dp.check_drift(new) == []


async def test_allow_all_lets_connected_clients_anywhere(lab: Lab, dp: Dataplane) -> None:
    state = make_state({}, clients={A, B}, nat={A}, allow_all=True)
    await dp.apply_full(state)
    a, b, d = await asyncio.gather(
        lab.probe("tcp", A, BE2, 8080),
        lab.probe("tcp", B, BE1, 9000),
        lab.probe("tcp", D, BE1, 9000),
    )
    assert a == f"ok {GW_UP} hello"
    assert b == f"ok {B} hello"
    assert d.startswith("fail")

    # Permissions arrive: rules change, so apply_diff falls back to a full apply, and open
    # flows that the new policy does not allow are cut.
    async with open_conn(lab.cl, A, BE1, 9000) as conn:
        assert (await conn.ask()).startswith("ok")
        full_before = dp.stats.full_applies
        restricted = make_state({1: ({A, B}, [web()])}, clients={A, B}, nat={A})
        diff = await dp.apply_diff(state, restricted)
        assert diff.needs_full and dp.stats.full_applies == full_before + 1
        assert await conn.ask() == "timeout"
    assert (await lab.probe("tcp", A, BE1, 8080)).startswith("ok")
    assert await dp.check_drift(restricted) == []


async def test_groups_added_and_removed_through_diff(lab: Lab, dp: Dataplane) -> None:
    old = make_state(BASE)
    await dp.apply_full(old)
    new = make_state({**BASE, 7: ({A}, [Grant(IPv4Network(f"{BE2}/32"), "tcp")])})
    d = await dp.apply_diff(old, new)
    assert d.needs_full
    assert (await lab.probe("tcp", A, BE2, 8080)) == f"ok {GW_UP} hello"
    assert await dp.check_drift(new) == []

    d = await dp.apply_diff(new, old)
    assert d.needs_full
    assert (await lab.probe("tcp", A, BE2, 8080)).startswith("fail")
    sets = lab.gw.run("ipset", "list", "-n").stdout.split()
    assert not [s for s in sets if s.startswith(f"{PREFIX}-g7-")]  # stale sets destroyed
    assert await dp.check_drift(old) == []


async def test_drift_is_reported_and_repaired(lab: Lab, dp: Dataplane) -> None:
    state = make_state(BASE)
    await dp.apply_full(state)
    gw = lab.gw
    fwd = fwnames.fwd_chain(PREFIX)
    gw.run("ipset", "del", fwnames.group_set(PREFIX, 1, "d"), f"{BE1},tcp:8080")
    gw.run("ipset", "add", fwnames.group_set(PREFIX, 1, "m"), str(C))
    gw.run("iptables", "-D", "FORWARD", "-j", fwd)
    gw.run("iptables", "-D", fwd, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    gw.run("ipset", "create", f"{PREFIX}-g99-m", "hash:ip")
    gw.run("iptables", "-t", "nat", "-F", fwnames.post_chain(PREFIX))

    report = "\n".join(await dp.check_drift(state))
    assert f"{PREFIX}-g1-d lacks 1 element(s): {BE1},tcp:8080" in report
    assert f"{PREFIX}-g1-m has 1 unexpected element(s): {C}" in report
    assert f"jump FORWARD -> {fwd} (filter) is missing" in report
    assert "--ctstate INVALID -j DROP" in report
    assert f"ipset {PREFIX}-g99-m is stale" in report
    assert "MASQUERADE" in report

    await dp.apply_full(state)
    assert await dp.check_drift(state) == []
    assert (await lab.probe("tcp", A, BE1, 8080)) == f"ok {GW_UP} hello"

    # A set destroyed by hand (after unhooking the rules that referenced it) is noticed too.
    gw.run("iptables", "-F", fwd)
    gw.run("ipset", "destroy", fwnames.group_set(PREFIX, 2, "i"))
    report = "\n".join(await dp.check_drift(state))
    assert f"ipset {PREFIX}-g2-i is missing" in report
    await dp.apply_full(state)
    assert await dp.check_drift(state) == []
    assert (await lab.probe("icmp", C, BE2)) == "ok echo-reply"


async def test_wrong_set_type_is_recreated_without_failing_open(lab: Lab, dp: Dataplane) -> None:
    state = make_state(BASE)
    lab.gw.run("ipset", "create", fwnames.group_set(PREFIX, 1, "d"), "hash:ip")
    await dp.apply_full(state)
    assert await dp.check_drift(state) == []
    assert (await lab.probe("tcp", A, BE1, 8080)).startswith("ok")


async def test_remove_all_leaves_nothing_and_keeps_foreign_rules(lab: Lab, dp: Dataplane) -> None:
    gw = lab.gw
    gw.run("iptables", "-A", "FORWARD", "-s", "192.0.2.1/32", "-j", "ACCEPT")
    gw.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.1/32", "-j", "ACCEPT")
    gw.run("ipset", "create", "someone-else", "hash:ip")
    foreign = "-A FORWARD -s 192.0.2.1/32 -j ACCEPT"

    state = make_state(BASE)
    await dp.apply_full(state)
    await dp.apply_full(state)  # idempotent: no duplicate jump
    forward = gw.run("iptables", "-S", "FORWARD").stdout.splitlines()
    assert forward[1:] == [f"-A FORWARD -j {fwnames.fwd_chain(PREFIX)}", foreign]

    await dp.remove_all()
    filter_rules = gw.run("iptables", "-S").stdout
    nat_rules = gw.run("iptables", "-t", "nat", "-S").stdout
    assert PREFIX.upper() not in filter_rules + nat_rules
    assert foreign in filter_rules
    assert "-A POSTROUTING -s 192.0.2.1/32 -j ACCEPT" in nat_rules
    assert gw.run("ipset", "list", "-n").stdout.split() == ["someone-else"]
    assert (await dp.read_kernel()).is_empty
    await dp.remove_all()  # nothing left to remove: still fine


async def test_failure_raises_and_fails_closed(lab: Lab, dp: Dataplane) -> None:
    # A set of ours with the wrong type, pinned by someone else's rule: the dataplane locks
    # the tunnel down (no set references), cannot recreate the set, and says so.
    state = make_state(BASE)
    pinned = fwnames.group_set(PREFIX, 1, "d")
    lab.gw.run("ipset", "create", pinned, "hash:ip")
    foreign = ("INPUT", "-m", "set", "--match-set", pinned, "src", "-j", "ACCEPT")
    lab.gw.run("iptables", "-A", *foreign)
    with pytest.raises(DataplaneError) as info:
        await dp.apply_full(state)
    assert info.value.command == "ipset"
    assert "in use" in str(info.value)
    assert dp.applied is None and dp.stats.failures == 1
    assert (await lab.probe("tcp", A, BE1, 8080)).startswith("fail")  # closed, not open

    lab.gw.run("iptables", "-D", *foreign)
    await dp.apply(state)  # nothing applied yet: a full resync
    assert dp.applied == state
    assert (await lab.probe("tcp", A, BE1, 8080)).startswith("ok")


async def test_large_state_keeps_rule_count_per_group(lab: Lab, dp: Dataplane) -> None:
    big_tun = IPv4Network("198.18.64.0/18")
    clients = [big_tun[i] for i in range(2, 5002)]
    groups = tuple(
        GroupAccess(
            gid,
            frozenset(clients[(gid * 25) % 5000 : (gid * 25) % 5000 + 25]),
            (
                Grant(IPv4Network(f"198.19.{gid}.0/24"), "tcp", 443),
                Grant(IPv4Network(f"198.19.{gid}.0/24"), "tcp", 1000, 1099),
                Grant(IPv4Network(f"198.19.{gid}.0/24"), "udp"),
                Grant(IPv4Network("198.19.255.0/24"), "any"),
            ),
        )
        for gid in range(200)
    )
    state = DesiredState(
        prefix=PREFIX,
        tunnel_networks=(TUN, big_tun),
        uplink="up0",
        nat_members=frozenset(clients[:2500]),
        all_clients=frozenset(clients),
        groups=groups,
    )
    timings = {}
    t0 = time.monotonic()
    await dp.apply_full(state)
    timings["first full apply"] = time.monotonic() - t0
    t0 = time.monotonic()
    await dp.apply_full(state)
    timings["full resync (swap)"] = time.monotonic() - t0
    newcomer = big_tun[6000]
    grown = DesiredState(
        prefix=PREFIX,
        tunnel_networks=state.tunnel_networks,
        uplink="up0",
        nat_members=state.nat_members | {newcomer},
        all_clients=state.all_clients | {newcomer},
        groups=(
            GroupAccess(0, groups[0].members | {newcomer}, groups[0].grants),
            *groups[1:],
        ),
    )
    t0 = time.monotonic()
    d = await dp.apply_diff(state, grown)
    timings["connect one client (diff)"] = time.monotonic() - t0
    assert not d.needs_full and len(d.ops) == 3
    t0 = time.monotonic()
    drift = await dp.check_drift(grown)
    timings["drift check"] = time.monotonic() - t0
    assert drift == []
    rules = lab.gw.run("iptables", "-S", fwnames.fwd_chain(PREFIX)).stdout.splitlines()
    assert len([r for r in rules if r.startswith("-A")]) == 6 + 5 * 200 + 2
    print("\n" + "\n".join(f"{k}: {v * 1000:.0f} ms" for k, v in timings.items()))


async def test_an_over_limit_group_is_denied_and_the_firewall_still_becomes_ready(
    lab: Lab, dp: Dataplane
) -> None:
    # The reproducer as a pod receives it from data stored before the write-time
    # check: "web" has 17 x "tcp 2-65535" (1,114,078 elements, over the limit). The agent's
    # own builder and sync against the real ipset: ready at once, "ops" enforced, "web"
    # grants nothing (before: every apply failed and the pod never became ready).
    from tests.unit.test_sessionbook import user
    from vpnfleet.agent.firewall import FirewallSync
    from vpnfleet.core.fleet import FleetView
    from vpnfleet.core.fwdesired import DesiredStateBuilder
    from vpnfleet.core.sessionbook import Client
    from vpnfleet.wire import GroupState, RuleState, Snapshot

    wide = [
        RuleState(id=100 + n, group_id=1, destination=f"198.18.{20 + n}.0/24", proto="tcp",
                  ports="2-65535")
        for n in range(17)
    ]  # fmt: skip
    ping = RuleState(id=200, group_id=2, destination="198.18.20.0/24", proto="icmp", ports=None)
    view = FleetView.from_snapshot(
        Snapshot(
            revision=5,
            users=[user("ann", groups=["ops", "web"])],
            groups=[GroupState(id=1, name="web"), GroupState(id=2, name="ops")],
            rules=[*wide, ping],
            pools=[], sessions=[], pods=[],
        )
    )  # fmt: skip
    ann = Client(1, "ann", "nat", str(A), None, None, "u1", "2026-01-01T00:00:00Z",
                 established=True)  # fmt: skip
    builder = DesiredStateBuilder(PREFIX, (TUN,), uplink="up0")
    sync = FirewallSync(dp, lambda: (view.revision, builder.build(view, [ann])))
    task = asyncio.create_task(sync.run())
    try:
        sync.start()
        await asyncio.wait_for(sync.wait_ready(), 30)
        assert sync.failures == 0 and sync.applied_revision == 5
        assert builder.over_limit == {"web": 17 * 65534}
        assert await lab.probe("icmp", A, BE1) == "ok echo-reply"  # ops
        assert (await lab.probe("tcp", A, BE1, 8080)).startswith("fail")  # web: denied
        out = lab.gw.run("ipset", "list", "-t", fwnames.group_set(PREFIX, 1, "d")).stdout
        assert "Number of entries: 0" in out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
