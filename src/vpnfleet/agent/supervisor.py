"""The OpenVPN supervisor: the openvpn process and the agent's management session on it.

It starts openvpn (held by ``management-hold`` until the agent is ready for clients) or adopts
the one a previous agent left running, attaches to the management socket, lets the owner of
the clients prepare (``prepare(adopted)``: forget the old clients, or adopt the running ones,
and put the firewall in place), releases the hold, routes the gateway pool into the tunnel
(through ``route``, the firewall runner's: no command runs from here),
and then feeds every ``>CLIENT:`` notification to ``on_event`` in arrival order. When openvpn
dies it is restarted with backoff (1 s doubling to 30 s; back to 1 s after a minute of
health). Process and session are reached through the runner interfaces, so the restart policy
is unit-tested against fakes.

A pod runs one supervisor per OpenVPN server (``server``: "udp", and "tcp" unless turned off).
Each has its own files (``StateDir.server``), tunnel device and management session, and tells
the one owner of the clients which server every notification came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from vpnfleet.agent.management import ManagementClient, ManagementError
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.netcommands import DataplaneError
from vpnfleet.agent.openvpn import OpenVPNProcess
from vpnfleet.agent.registration import TUN_DEVS
from vpnfleet.agent.runners import ManagementSession, ProcessRunner
from vpnfleet.agent.statedir import StateDir
from vpnfleet.core.mgmt_protocol import ClientEvent, Hold
from vpnfleet.core.sessionbook import PRIMARY

log = logging.getLogger("vpnfleet.agent")

ATTACH_TIMEOUT = 15.0


class Clients(Protocol):
    """What the supervisor needs from whoever owns the clients."""

    async def prepare(self, adopted: bool, server: str) -> None:
        """Before ``server``'s clients are let in: reset (fresh openvpn) or adopt them."""

    async def on_event(self, ev: ClientEvent, server: str) -> None:
        """One client notification of ``server``."""


class OpenVPNSupervisor:
    """Keeps openvpn running and one management session attached to it."""

    def __init__(
        self,
        paths: StateDir,
        *,
        server: str = PRIMARY,
        binary: str = "openvpn",
        gateway_pool: ipaddress.IPv4Network | None = None,
        process: Callable[[], ProcessRunner] | None = None,
        connect: Callable[[], Awaitable[ManagementSession]] | None = None,
        route: Callable[[ipaddress.IPv4Network, str], Awaitable[None]] | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.server = server
        self._files = files = paths.server(server)
        self._dev = TUN_DEVS[server]
        self._gateway_pool = gateway_pool
        self._route = route
        self._new_process = process or (
            lambda: OpenVPNProcess(
                binary,
                files.conf,
                paths.root,
                pid_file=files.pid_file,
                log_file=files.log_file,
                label=server,
            )
        )
        self._connect = connect or self._connect_socket
        self._metrics = metrics
        self._proc: ProcessRunner | None = None
        self._session: ManagementSession | None = None
        self.ready = False
        self.version: str | None = None

    @property
    def session(self) -> ManagementSession | None:
        """The current management session (None while detached)."""
        s = self._session
        return s if s is not None and not s.closed else None

    async def _connect_socket(self) -> ManagementSession:
        return await ManagementClient.connect(self._files.mgmt_socket, timeout=3)

    def _protect_socket(self) -> None:
        """Make the management socket 0600 (OpenVPN binds it 0777 whatever the umask).

        Whoever holds the socket decides every client, so it must be the agent alone. The
        state directory (0700) already keeps others out; this keeps the socket private even
        if the directory is loosened later.
        """
        with contextlib.suppress(FileNotFoundError):
            self._files.mgmt_socket.chmod(0o600)

    async def _attach(self) -> ManagementSession:
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while True:
            self._protect_socket()
            try:
                return await self._connect()
            except ManagementError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def run(self, clients: Clients) -> None:
        """Until cancelled: keep openvpn running and attached; restart it when it dies."""
        delay = 1.0
        while True:
            proc = self._new_process()
            pid = proc.recorded_pid()
            adopted = pid is not None and self._files.mgmt_socket.exists()
            if adopted:
                assert pid is not None
                proc.adopt(pid)
            else:
                with contextlib.suppress(OSError):
                    self._files.mgmt_socket.unlink()
                await proc.start()
            self._proc = proc
            started = time.monotonic()
            try:
                await self._serve(clients, adopted)
            except ManagementError as exc:
                log.error("openvpn (%s) management failed: %s", self.server, exc)
            finally:
                self.ready = False
                if self._session is not None:
                    await self._session.close()
                self._session = None
            code = -1
            if proc.running:
                with contextlib.suppress(TimeoutError):
                    code = await asyncio.wait_for(proc.wait(), 10)
            log.error(
                "openvpn (%s) stopped (exit %s); restarting in %.0fs", self.server, code, delay
            )
            if self._metrics is not None:
                self._metrics.openvpn_restarts.inc()
            await proc.stop()
            await asyncio.sleep(delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30)

    async def _serve(self, clients: Clients, adopted: bool) -> None:
        mgmt = await self._attach()
        self._session = mgmt
        events = asyncio.create_task(self._events(mgmt, clients), name="mgmt-events")
        try:
            await clients.prepare(adopted, self.server)
            await mgmt.hold_release()
            with contextlib.suppress(ManagementError):
                self.version = (await mgmt.version()).openvpn
            await self._routes_up()
            self.ready = True
            await events
        finally:
            if not events.done():
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events

    async def _events(self, mgmt: ManagementSession, clients: Clients) -> None:
        async for event in mgmt.events():
            if isinstance(event, ClientEvent):
                # A task per decision would reorder answers; decisions are fast and local.
                await clients.on_event(event, self.server)
            elif isinstance(event, Hold) and self.ready:
                # openvpn restarted itself (SIGUSR1) and waits again.
                with contextlib.suppress(ManagementError):
                    await mgmt.hold_release()

    async def _routes_up(self) -> None:
        """Route the gateway pool into the tunnel (its clients are on another subnet)."""
        if self._gateway_pool is None or self._route is None:
            return
        try:
            await self._route(self._gateway_pool, self._dev)
        except DataplaneError as exc:
            log.error("could not route %s into %s: %s", self._gateway_pool, self._dev, exc)

    async def probe(self) -> bool:
        """Liveness: does openvpn answer on its management socket?"""
        mgmt = self.session
        if mgmt is None:
            return False
        try:
            await mgmt.pid(timeout=2)
        except ManagementError:
            return False
        return True

    async def stop(self) -> None:
        """Detach and stop openvpn (drain)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._proc is not None:
            await self._proc.stop()
