"""The BGP sync: keeps what the pod's speaker announces equal to its gateway sessions.

Like the firewall sync, one task owns the speaker; whoever changes what the announcements
depend on (the session book, sessions the control plane marks to end) calls
:meth:`BgpSync.poke`, and the loop asks ``source`` for the newest route set only when it is
about to apply, so a burst of connects costs one ``configure``. The diff
(:func:`vpnfleet.core.bgpplan.plan`) decides whether anything is sent and is logged route by
route. The loop also watches the speaker: a BIRD that died is started again announcing the
current set (its neighbours withdrew the old one when its sessions dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

from vpnfleet.agent.bird import BgpError
from vpnfleet.agent.runners import BgpSpeaker
from vpnfleet.core import bgpplan

log = logging.getLogger("vpnfleet.agent.bgp")

CHECK_INTERVAL = 2.0  # how often the speaker's liveness and sessions are looked at
RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0


class BgpSync:
    """Announces the newest route set through ``speaker``; restarts a dead speaker."""

    def __init__(
        self,
        speaker: BgpSpeaker,
        source: Callable[[], bgpplan.Announced],
        *,
        on_status: Callable[[int, int], None] | None = None,
    ) -> None:
        self.speaker = speaker
        self._source = source
        self._on_status = on_status  # (announced routes, established sessions)
        self._wake = asyncio.Event()
        self._allowed = asyncio.Event()
        self._lock = asyncio.Lock()
        self.announced: dict[ipaddress.IPv4Network, bgpplan.Announcement] = {}
        self.established = 0
        self.started = False
        self.closed = False  # finish() ran: nothing is started or announced any more
        self.failures = 0

    def allow(self) -> None:
        """Start syncing: the session book is complete (fresh start, or clients adopted).

        Until then nothing is sent, so a restarted agent never withdraws, even for a moment,
        the routes of clients it has not adopted yet from the running openvpn."""
        self._allowed.set()
        self._wake.set()

    def poke(self) -> None:
        """Something the announcements depend on changed."""
        self._wake.set()

    async def _sync(self) -> None:
        async with self._lock:
            if self.closed:
                return
            want = dict(self._source())
            if not self.started or not self.speaker.alive():
                if self.started:
                    log.error("BIRD is not running; starting it again")
                await self.speaker.start(want)
                self.started = True
                self._log(bgpplan.plan({}, want) if not self.announced else None)
                self.announced = want
                return
            diff = bgpplan.plan(self.announced, want)
            if not diff:
                return
            await self.speaker.announce(want)
            self._log(diff)
            self.announced = want

    def _log(self, diff: bgpplan.AnnouncementDiff | None) -> None:
        if diff is None:
            return
        for route in diff.add:
            log.info(
                "BGP announce %s (MED %d)",
                route.prefix,
                route.med,
                extra={"event": "bgp_announce", "prefix": str(route.prefix)},
            )
        for prefix in diff.withdraw:
            log.info(
                "BGP withdraw %s", prefix, extra={"event": "bgp_withdraw", "prefix": str(prefix)}
            )

    async def _check(self) -> None:
        try:
            self.established = await self.speaker.established()
        except BgpError:
            self.established = 0
        if self._on_status is not None:
            self._on_status(len(self.announced), self.established)

    async def run(self) -> None:
        """Sync on every poke (and every few seconds) until cancelled."""
        delay = RETRY_DELAY
        await self._allowed.wait()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_INTERVAL)
            self._wake.clear()
            try:
                await self._sync()
            except (BgpError, OSError) as exc:
                self.failures += 1
                log.error("BGP update failed: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                self._wake.set()
                continue
            delay = RETRY_DELAY
            await self._check()

    async def finish(self, grace: float = 5.0) -> None:
        """Drain: withdraw every route, then stop the speaker (its sessions close at once)."""
        async with self._lock:
            self.closed = True
            if not self.started:
                return
            try:
                if self.announced and self.speaker.alive():
                    await self.speaker.announce({})
                    self._log(bgpplan.plan(self.announced, {}))
                    self.announced = {}
            except BgpError as exc:
                log.error("BGP withdraw at drain failed: %s; stopping BIRD", exc)
            await self.speaker.stop(grace)
            self.started = False
