"""In-memory stand-ins for the agent's runners, for unit and API tests.

Each fake speaks its runner's interface (:mod:`vpnfleet.agent.runners`) and models just
enough of the real thing to make decision code observable:

- :class:`FakeFirewall` keeps the state "in the kernel" and a table of open flows; applies
  can be made to fail or to block midway, and the kernel can be tampered with (drift).
- :class:`FakeManagement` is an OpenVPN management session: the test pushes ``>CLIENT:``
  notifications, the fake records every answer, keeps OpenVPN's client list (``status 3``)
  and, like OpenVPN, reports a DISCONNECT shortly after a ``client-kill``.
- :class:`FakeProcess` is an openvpn process that starts, runs, can be "adopted" and dies.
- :class:`FakeBgpSpeaker` is BIRD: it announces what it is told, fails or dies on demand.

The real runners are tested for real in the end-to-end tests; these let the agent's logic be
tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from vpnfleet.agent.bird import BgpError
from vpnfleet.agent.management import CommandError, ManagementClosed
from vpnfleet.agent.netcommands import DataplaneError, DataplaneStats
from vpnfleet.agent.runners import FirewallRunner, ManagementSession, ProcessRunner
from vpnfleet.agent.sysctls import Shortfall, SysctlsMissing
from vpnfleet.core import bgpplan, fwdiff, fwstate, revocation
from vpnfleet.core.mgmt_protocol import (
    ClientEvent,
    ClientEventKind,
    Event,
    StatusClient,
    VersionInfo,
)

# ------------------------------------------------------------------ firewall


class FakeFirewall:
    """A firewall runner over an in-memory "kernel"."""

    def __init__(self) -> None:
        self.applied: fwstate.DesiredState | None = None
        self.kernel: fwstate.DesiredState | None = None  # what the "kernel" enforces
        self.stats = DataplaneStats()
        self.flows: list[revocation.Flow] = []  # the conntrack table
        self.fail_next = 0  # applies that raise DataplaneError
        self.fail_cuts = 0  # conntrack cuts that raise DataplaneError
        self.gate: asyncio.Event | None = None  # when set (not yet released), applies block
        self.entered = asyncio.Event()  # set when an apply reached the gate
        self.applies: list[str] = []  # "full" / "diff", in order
        self.cuts: list[str] = []  # "revoked" / "index" / "walk", in order
        self.sysctls = False
        # Settings "the pod was created without" (and cannot set): ensure_sysctls raises.
        self.missing_sysctls: list[Shortfall] = []
        self.removed = False
        self.routes: dict[str, str] = {}  # network -> device
        self.host_routes_: dict[str, str] = {}  # gateway address -> device (our /32s)

    async def _maybe_block(self) -> None:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()

    def _fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            self.applied = None
            self.stats.failures += 1
            raise DataplaneError("ipset", 1, "forced failure (fake)")

    async def apply(self, state: fwstate.DesiredState) -> fwdiff.StateDiff | None:
        if self.applied is None:
            await self.apply_full(state)
            return None
        await self._maybe_block()
        self._fail()
        d = fwdiff.diff(self.applied, state)
        self.applies.append("full" if d.needs_full else "diff")
        self.applied = self.kernel = state
        self.stats.diff_applies += 1
        return d

    async def apply_full(self, state: fwstate.DesiredState) -> None:
        await self._maybe_block()
        self._fail()
        self.applies.append("full")
        self.applied = self.kernel = state
        self.stats.full_applies += 1

    def _cut_fail(self) -> None:
        if self.fail_cuts:
            self.fail_cuts -= 1
            raise DataplaneError("conntrack", 1, "forced failure (fake)")

    async def cut_revoked(self, diff: fwdiff.StateDiff, keep: fwstate.DesiredState) -> int:
        self._cut_fail()
        self.cuts.append("revoked")
        victims = []
        for f in self.flows:
            for rf in diff.revoked_flows:
                ours = f.src == rf.client or (rf.grant is None and f.dst == rf.client)
                if not ours:
                    continue
                if rf.grant is not None and not rf.grant.matches(f.proto, f.dst, f.dport):
                    continue
                if f.src == rf.client and fwstate.is_allowed(keep, f.src, f.proto, f.dst, f.dport):
                    continue
                victims.append(f)
                break
        return self._delete(victims)

    async def cut_disallowed(
        self, state: fwstate.DesiredState, open_flows: Sequence[revocation.Flow] | None
    ) -> int:
        self._cut_fail()
        self.cuts.append("walk" if open_flows is None else "index")
        pool = self.flows if open_flows is None else [f for f in open_flows if f in self.flows]
        return self._delete(revocation.flows_to_cut(state, pool))

    def _delete(self, victims: Iterable[revocation.Flow]) -> int:
        gone = set(victims)
        self.flows = [f for f in self.flows if f not in gone]
        self.stats.flows_killed += len(gone)
        return len(gone)

    async def check_drift(self, state: fwstate.DesiredState) -> list[str]:
        if self.kernel is None:
            return ["nothing of ours is in the kernel"]
        d = fwdiff.diff(self.kernel, state)
        if d.needs_full:
            return [f"rules differ: {', '.join(d.reasons)}"]
        return [op.line() for op in d.ops]

    async def remove_all(self) -> None:
        self.removed = True
        self.applied = self.kernel = None

    async def ensure_sysctls(self) -> None:
        if self.missing_sysctls:
            raise SysctlsMissing(self.missing_sysctls, "read-only file system (fake)")
        self.sysctls = True

    async def route_into(self, network: ipaddress.IPv4Network, dev: str) -> None:
        self.routes[str(network)] = dev

    async def host_routes(self) -> dict[str, str]:
        return dict(self.host_routes_)

    async def set_host_route(self, address: str, dev: str) -> None:
        self.host_routes_[address] = dev

    async def del_host_route(self, address: str) -> None:
        self.host_routes_.pop(address, None)

    def tamper(self, state: fwstate.DesiredState) -> None:
        """Someone changed the kernel behind the agent's back: it now enforces ``state``."""
        self.kernel = state


# ------------------------------------------------------------------ management session


@dataclass
class FakeClient:
    """A client as the fake OpenVPN knows it."""

    cid: int
    common_name: str
    real_ip: str
    real_port: int
    virtual_address: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    connected_since: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


class FakeManagement:
    """An OpenVPN management session in memory."""

    def __init__(self, *, disconnect_after_kill: float | None = 0.0) -> None:
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed = False
        self.answers: list[tuple[object, ...]] = []  # ("auth"|"deny"|"kill", cid, ...)
        self.clients: dict[int, FakeClient] = {}
        self.disconnect_after_kill = disconnect_after_kill
        self.held = True
        self._next_cid = 0
        self._next_kid = 0
        self._serials: dict[int, str] = {}  # cid -> the certificate serial it connected with

    # -- the interface

    @property
    def closed(self) -> bool:
        return self._closed

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)
                return
            yield event

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.put_nowait(None)

    def _check(self) -> None:
        if self._closed:
            raise ManagementClosed("management session ended (fake)")

    async def client_auth(self, cid: int, kid: int, config_lines: Iterable[str] = ()) -> None:
        self._check()
        lines = list(config_lines)
        if cid not in self.clients:
            raise CommandError("client-auth", "client-auth command failed (unknown cid)")
        self.answers.append(("auth", cid, kid, lines))
        for line in lines:
            if line.startswith("ifconfig-push "):
                self.clients[cid].virtual_address = line.split()[1]

    async def client_deny(
        self, cid: int, kid: int, reason: str, client_reason: str | None = None
    ) -> None:
        self._check()
        self.answers.append(("deny", cid, kid, reason, client_reason))
        self.clients.pop(cid, None)

    async def client_pending_auth(
        self, cid: int, kid: int, extra: str, pending_timeout: int
    ) -> None:
        self._check()
        if cid not in self.clients:
            raise CommandError("client-pending-auth", "client-pending-auth failed (unknown cid)")
        self.answers.append(("pending", cid, kid, extra, pending_timeout))

    async def client_kill(self, cid: int, message: str = "RESTART") -> None:
        self._check()
        if cid not in self.clients:
            raise CommandError("client-kill", "client-kill command failed (unknown cid)")
        self.answers.append(("kill", cid, message))
        if self.disconnect_after_kill is not None:
            asyncio.get_running_loop().call_later(self.disconnect_after_kill, self.disconnect, cid)

    async def status(self) -> list[StatusClient]:
        self._check()
        return [
            StatusClient(
                common_name=c.common_name,
                real_address=f"{c.real_ip}:{c.real_port}",
                virtual_address=c.virtual_address,
                virtual_ipv6_address=None,
                bytes_received=c.bytes_received,
                bytes_sent=c.bytes_sent,
                connected_since=c.connected_since,
                username=None,
                client_id=c.cid,
                peer_id=c.cid,
                data_channel_cipher="AES-256-GCM",
            )
            for c in self.clients.values()
        ]

    async def hold_release(self) -> None:
        self._check()
        self.held = False

    async def version(self) -> VersionInfo:
        self._check()
        return VersionInfo(openvpn="OpenVPN 2.6.14 x86_64-pc-linux-gnu [fake]", management=5)

    async def pid(self, timeout: float = 10.0) -> int:
        self._check()
        return 4242

    # -- what a test does (what a client or OpenVPN would)

    def connect(
        self,
        user: str,
        real_ip: str = "198.51.100.7",
        serial: str = "1",
        peer_info: dict[str, str] | None = None,
    ) -> int:
        """A client connects: OpenVPN sends CONNECT (with ``peer_info``, e.g. ``IV_SSO``, in
        its environment). Returns its cid."""
        cid = self._next_cid
        self._next_cid += 1
        self._next_kid += 1
        port = 40000 + cid
        self.clients[cid] = FakeClient(cid, user, real_ip, port)
        self._serials[cid] = serial
        env = {
            "common_name": user,
            "tls_serial_0": serial,
            "untrusted_ip": real_ip,
            "untrusted_port": str(port),
            **(peer_info or {}),
        }
        self._events.put_nowait(ClientEvent(ClientEventKind.CONNECT, cid, self._next_kid, env))
        return cid

    def start_over(self, cid: int, peer_info: dict[str, str] | None = None) -> int:
        """``cid`` begins a new TLS handshake (a new key) before its CONNECT was answered:
        OpenVPN sends CONNECT again for the same cid. Returns the new key id."""
        c = self.clients[cid]
        self._next_kid += 1
        env = {
            "common_name": c.common_name,
            "tls_serial_0": self._serials.get(cid, "1"),
            "untrusted_ip": c.real_ip,
            "untrusted_port": str(c.real_port),
            **(peer_info or {}),
        }
        self._events.put_nowait(ClientEvent(ClientEventKind.CONNECT, cid, self._next_kid, env))
        return self._next_kid

    def establish(self, cid: int) -> None:
        """The tunnel of ``cid`` comes up: OpenVPN sends ESTABLISHED."""
        c = self.clients[cid]
        env = {"common_name": c.common_name, "ifconfig_pool_remote_ip": c.virtual_address or ""}
        self._events.put_nowait(ClientEvent(ClientEventKind.ESTABLISHED, cid, None, env))

    def reauth(self, cid: int, serial: str = "1", extra: dict[str, str] | None = None) -> None:
        """TLS renegotiation of ``cid``: OpenVPN sends REAUTH (``extra`` in its environment,
        e.g. the ``session_state`` of an auth token)."""
        c = self.clients[cid]
        self._next_kid += 1
        env = {"common_name": c.common_name, "tls_serial_0": serial, "untrusted_ip": c.real_ip}
        env.update(extra or {})
        self._events.put_nowait(ClientEvent(ClientEventKind.REAUTH, cid, self._next_kid, env))

    def disconnect(self, cid: int, *, notify: bool = True) -> None:
        """``cid`` goes away; ``notify=False`` loses the DISCONNECT (no agent was listening)."""
        c = self.clients.pop(cid, None)
        if c is None or not notify or self._closed:
            return
        env = {
            "common_name": c.common_name,
            "bytes_received": str(c.bytes_received),
            "bytes_sent": str(c.bytes_sent),
        }
        self._events.put_nowait(ClientEvent(ClientEventKind.DISCONNECT, cid, None, env))

    def answers_for(self, cid: int) -> list[tuple[object, ...]]:
        return [a for a in self.answers if a[1] == cid]

    def address_of(self, cid: int) -> ipaddress.IPv4Address | None:
        c = self.clients.get(cid)
        return ipaddress.IPv4Address(c.virtual_address) if c and c.virtual_address else None

    def reopen(self) -> FakeManagement:
        """A new session on the same OpenVPN (a restarted agent attaching): same clients."""
        other = FakeManagement(disconnect_after_kill=self.disconnect_after_kill)
        other.clients = self.clients
        other.held = self.held
        other._next_cid = self._next_cid
        other._next_kid = self._next_kid
        return other


# ------------------------------------------------------------------ process


class FakeProcess:
    """An openvpn process: started, or adopted from a previous agent via ``recorded``."""

    def __init__(self, recorded: int | None = None) -> None:
        self.recorded = recorded
        self.started = False
        self.adopted: int | None = None
        self.stopped = False
        self._exit = asyncio.Event()

    @property
    def running(self) -> bool:
        return (self.started or self.adopted is not None) and not self._exit.is_set()

    def recorded_pid(self) -> int | None:
        return self.recorded

    def adopt(self, pid: int) -> None:
        self.adopted = pid

    async def start(self) -> None:
        self.started = True

    async def wait(self) -> int:
        await self._exit.wait()
        return 0

    async def stop(self, grace: float = 5.0) -> None:
        self.stopped = True
        self._exit.set()

    def die(self) -> None:
        """openvpn exits on its own."""
        self._exit.set()


def _conforms(
    f: FakeFirewall, m: FakeManagement, p: FakeProcess
) -> tuple[FirewallRunner, ManagementSession, ProcessRunner]:
    # Never called: mypy checks here that each fake speaks its runner's interface.
    return f, m, p


# ------------------------------------------------------------------ BGP speaker


class FakeBgpSpeaker:
    """A BGP speaker whose announced set the test reads (``routes``, ``history``).

    ``fail`` makes the next calls raise as a dead or refusing BIRD would; ``die()`` makes it
    stop running, as if BIRD crashed."""

    def __init__(self) -> None:
        self.routes: dict[ipaddress.IPv4Network, bgpplan.Announcement] | None = None
        self.history: list[frozenset[ipaddress.IPv4Network]] = []
        self.starts = 0
        self.stopped = False
        self.fail = False
        self.sessions = 1
        self._running = False

    def alive(self) -> bool:
        return self._running

    def die(self) -> None:
        self._running = False
        self.routes = None

    def _check(self) -> None:
        if self.fail:
            raise BgpError("fake BIRD refused")

    def _set(self, routes: bgpplan.Announced) -> None:
        self.routes = dict(routes)
        self.history.append(frozenset(routes))

    async def start(self, routes: bgpplan.Announced) -> None:
        self._check()
        self.starts += 1
        self._running = True
        self.stopped = False
        self._set(routes)

    async def announce(self, routes: bgpplan.Announced) -> None:
        self._check()
        if not self._running:
            raise BgpError("fake BIRD is not running")
        self._set(routes)

    async def established(self) -> int:
        self._check()
        return self.sessions if self._running else 0

    async def stop(self, grace: float = 5.0) -> None:
        self._running = False
        self.stopped = True
        self.routes = None
