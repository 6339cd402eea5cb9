"""The agent's three seams with the system, as small interfaces.

Everything that decides (the session book, the firewall sync, the client handler, the
supervisor's restart policy) talks to the outside through one of these. The real runners are
:class:`vpnfleet.agent.dataplane.Dataplane` (iptables, ipset, conntrack, routes),
:class:`vpnfleet.agent.management.ManagementClient` (OpenVPN's management socket) and
:class:`vpnfleet.agent.openvpn.OpenVPNProcess`; in-memory fakes of all three live in
:mod:`vpnfleet.agent.fakes`, so decision code is tested in milliseconds and the real runners are
tested once, for real, in the end-to-end tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

from vpnfleet.core import bgpplan, fwdiff, fwstate, revocation
from vpnfleet.core.mgmt_protocol import Event, StatusClient, VersionInfo


class FirewallRunner(Protocol):
    """Moves the pod's netfilter state (sets, chains, conntrack entries) to a desired state."""

    @property
    def applied(self) -> fwstate.DesiredState | None:
        """The state last applied in full success (None: the next apply is a full resync)."""

    @property
    def stats(self) -> Any:
        """Counters for metrics (see ``DataplaneStats``)."""

    async def apply(self, state: fwstate.DesiredState) -> fwdiff.StateDiff | None:
        """Sets and rules only: incrementally from :attr:`applied`, else a full resync (None).

        Open connections are left alone: cutting them is :meth:`cut_revoked`'s job, after the
        new policy is in place."""

    async def apply_full(self, state: fwstate.DesiredState) -> None:
        """A complete resync of sets, chains and jumps."""

    async def cut_revoked(self, diff: fwdiff.StateDiff, keep: fwstate.DesiredState) -> int:
        """Delete the conntrack entries of the flows ``diff`` revoked that ``keep`` disallows."""

    async def cut_disallowed(
        self, state: fwstate.DesiredState, open_flows: Sequence[revocation.Flow] | None
    ) -> int:
        """Delete every open flow ``state`` would not let start now; returns how many.

        ``open_flows``: the flow index (the conntrack listener's view of the table), so only
        those entries are examined and deleted one by one; None walks the kernel's table."""

    async def check_drift(self, state: fwstate.DesiredState) -> list[str]:
        """Every difference between the kernel and ``state`` (empty when in sync)."""

    async def remove_all(self) -> None:
        """Remove everything the agent owns (drain)."""

    async def ensure_sysctls(self) -> None:
        """Forwarding and conntrack accounting in this namespace: checked, written only where
        they differ; :class:`~vpnfleet.agent.sysctls.SysctlsMissing` names every setting that
        is still wrong (e.g. a read-only ``/proc/sys`` in an unprivileged container)."""

    async def route_into(self, network: ipaddress.IPv4Network, dev: str) -> None:
        """Route ``network`` into the tunnel device ``dev``."""

    async def host_routes(self) -> dict[str, str]:
        """The agent's host routes in the kernel: address -> tunnel device."""

    async def set_host_route(self, address: str, dev: str) -> None:
        """Route ``address``/32 into ``dev`` (replacing the agent's earlier route of it)."""

    async def del_host_route(self, address: str) -> None:
        """Remove the agent's host route of ``address`` (nothing if there is none)."""


class ManagementSession(Protocol):
    """One session on OpenVPN's management interface."""

    @property
    def closed(self) -> bool: ...

    def events(self) -> AsyncIterator[Event]:
        """Real-time notifications in arrival order; ends when the session closes."""

    async def close(self) -> None: ...

    async def client_auth(self, cid: int, kid: int, config_lines: Iterable[str] = ()) -> None: ...

    async def client_deny(
        self, cid: int, kid: int, reason: str, client_reason: str | None = None
    ) -> None: ...

    async def client_pending_auth(
        self, cid: int, kid: int, extra: str, pending_timeout: int
    ) -> None: ...

    async def client_kill(self, cid: int, message: str = "RESTART") -> None: ...

    async def status(self) -> list[StatusClient]: ...

    async def hold_release(self) -> None: ...

    async def version(self) -> VersionInfo: ...

    async def pid(self, timeout: float = ...) -> int: ...


class ProcessRunner(Protocol):
    """The openvpn process: started by this agent, or adopted from a previous one."""

    @property
    def running(self) -> bool: ...

    def recorded_pid(self) -> int | None:
        """The pid of a still-running openvpn from an earlier agent, if any."""

    def adopt(self, pid: int) -> None: ...

    async def start(self) -> None: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float = 5.0) -> None: ...


class BgpSpeaker(Protocol):
    """The pod's BGP speaker (:class:`vpnfleet.agent.bird.BirdSpeaker`): announces a route set.

    Every method raises :class:`vpnfleet.agent.bird.BgpError` when the speaker fails."""

    def alive(self) -> bool:
        """True while the speaker runs."""

    async def start(self, routes: bgpplan.Announced) -> None:
        """Start (or adopt a running speaker) announcing exactly ``routes``."""

    async def announce(self, routes: bgpplan.Announced) -> None:
        """Announce exactly ``routes`` from now on (withdrawing the rest)."""

    async def established(self) -> int:
        """How many BGP sessions are up."""

    async def stop(self, grace: float = 5.0) -> None:
        """Close the sessions (routers withdraw at once) and end the speaker."""
