"""Host routes of gateway users connected to the TCP server.

A gateway user keeps its fleet-wide address wherever it connects. The gateway pool is routed
into the UDP server's tunnel device (``tun0``); a gateway user on the TCP server (``tun1``)
needs its ``/32`` routed into that device instead, or the replies to it would go into the
wrong OpenVPN. Which addresses need which route is the session book's
(:meth:`~vpnfleet.core.sessionbook.SessionBook.gateway_routes`); this part makes the kernel
agree, level-triggered: every sync reads the agent's routes back (they carry their own
``proto`` mark, so a route left by an earlier agent, or lost with a restarted device, is
seen) and fixes the difference.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from vpnfleet.agent.netcommands import DataplaneError
from vpnfleet.agent.runners import FirewallRunner

log = logging.getLogger("vpnfleet.agent")


def route_plan(
    want: Mapping[str, str], have: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """(routes to set: address -> device, addresses whose route goes): ``have`` -> ``want``."""
    add = {ip: dev for ip, dev in want.items() if have.get(ip) != dev}
    remove = sorted(ip for ip in have if ip not in want)
    return add, remove


class HostRoutes:
    """Keeps the kernel's gateway host routes equal to what the session book needs."""

    def __init__(
        self,
        runner: FirewallRunner,
        desired: Callable[[], Mapping[str, str]],
        devices: Mapping[str, str],
    ) -> None:
        self._runner = runner
        self._desired = desired  # address -> server
        self._devices = devices  # server -> tunnel device
        self._wake = asyncio.Event()
        self._last: dict[str, str] = {}

    def poke(self) -> None:
        """The clients changed: sync soon if the routes they need changed."""
        if dict(self._desired()) != self._last:
            self._wake.set()

    def check_soon(self) -> None:
        """Sync soon even if nothing seems to have changed (drift, a restarted device)."""
        self._wake.set()

    async def sync(self) -> None:
        want_servers = dict(self._desired())
        want = {ip: self._devices[s] for ip, s in want_servers.items()}
        have = await self._runner.host_routes()
        add, remove = route_plan(want, have)
        for ip, dev in add.items():
            try:
                await self._runner.set_host_route(ip, dev)
                log.info("gateway address %s routed into %s", ip, dev)
            except DataplaneError as exc:  # the device is being recreated: next sync
                log.warning("could not route %s into %s: %s", ip, dev, exc)
                want_servers.pop(ip, None)
        for ip in remove:
            try:
                await self._runner.del_host_route(ip)
            except DataplaneError as exc:
                log.warning("could not remove the route of %s: %s", ip, exc)
        self._last = want_servers

    async def run(self) -> None:
        """Until cancelled: sync whenever poked."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
            except DataplaneError as exc:
                log.warning("gateway host routes not synced: %s", exc)
