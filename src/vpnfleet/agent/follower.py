"""The view follower: the agent's replica of the control plane's state, kept current.

It owns the :class:`~vpnfleet.core.fleet.FleetView`: loaded from a snapshot at start (or from
the copy on disk when the control plane is away, so decisions go on), then kept current from
the watch stream, resumed from the view's revision after every break. A stream that ended or
broke after it delivered something is resumed at once (after a short random spread, so that
the streams of a stopped replica do not all land on the next one in the same millisecond), on
the next replica when the agent knows several; only attempts that deliver nothing back off,
once every replica was tried, up to :data:`MAX_BACKOFF` (or the control plane's Retry-After
when it refused the stream at its limit). ``current`` says the stream is up and has caught up
with the head (the control plane says so with a heartbeat). A ``resync`` message, or
a message the parser refuses, replaces the view with a fresh snapshot. Every change is handed
to ``on_change`` with its :class:`~vpnfleet.core.fleet.Effects` (None after a resync: anything
may have changed). The copy on disk is rewritten at most every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError, WatchProtocolError
from vpnfleet.agent.statedir import write_private
from vpnfleet.core.fleet import Effects, FleetView
from vpnfleet.wire import Snapshot, WatchHeartbeat, WatchResync

log = logging.getLogger("vpnfleet.agent")

SAVE_INTERVAL = 5.0
SPREAD = 0.1  # seconds: a resumed stream waits a random part of this
FIRST_BACKOFF = 0.2  # seconds after the first round of replicas that delivered nothing
MAX_BACKOFF = 1.0  # a control plane back from a restart is followed within about this

OnChange = Callable[[Effects | None], Awaitable[None]]


def reconnect_delay(failures: int, replicas: int) -> float:
    """Seconds before the next watch attempt after `failures` attempts in a row that delivered
    nothing: none but the spread while some replica is still untried, then doubling from
    FIRST_BACKOFF up to MAX_BACKOFF, each spread by up to half."""
    rounds = failures - replicas + 1
    if rounds <= 0:
        return random.uniform(0, SPREAD)  # noqa: S311 - jitter
    base = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** min(rounds - 1, 16))
    return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter


def retry_wait(exc: ControlPlaneError, delay: float) -> float:
    """How long to wait before the next watch attempt: the backoff `delay`, or longer when the
    control plane said so (Retry-After: a replica serving its most streams), spread by up to
    half again so that the refused agents do not all come back at the same moment."""
    if exc.retry_after is None:
        return delay
    return max(delay, exc.retry_after * random.uniform(1.0, 1.5))  # noqa: S311 - jitter


class ViewFollower:
    """Follows the control plane's watch stream into a FleetView."""

    def __init__(self, cp: ControlPlane, cache: Path, on_change: OnChange) -> None:
        self._cp = cp
        self._cache = cache
        self._on_change = on_change
        self.view = FleetView()
        self.connected = False
        # Set while the stream is up and has caught up with the control plane's head.
        self._current = asyncio.Event()
        self.last_event = 0.0  # monotonic time the stream last delivered anything
        self._saved_revision = -1

    @property
    def current(self) -> bool:
        """Is the view known to be the control plane's latest (stream up, caught up)?"""
        return self._current.is_set()

    def _set_current(self, current: bool) -> None:
        if current:
            self._current.set()
        else:
            self._current.clear()

    async def wait_current(self, seconds: float) -> bool:
        """Wait up to `seconds` for the view to be current; whether it is."""
        if not self._current.is_set() and seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._current.wait()
        return self._current.is_set()

    async def load(self) -> None:
        """The first view: a snapshot, else the cached copy. Raises ControlPlaneError when
        neither is available (a pod that never saw the control plane cannot decide)."""
        try:
            self.view = FleetView.from_snapshot(await self._cp.snapshot())
        except ControlPlaneError as exc:
            cached = self._load_cache()
            if cached is None:
                raise
            log.warning(
                "snapshot unavailable (%s); deciding from cached revision %d", exc, cached.revision
            )
            self.view = cached
            self._saved_revision = cached.revision
            return
        self.save()

    def _load_cache(self) -> FleetView | None:
        try:
            return FleetView.from_snapshot(Snapshot.model_validate_json(self._cache.read_text()))
        except (OSError, ValueError):
            return None

    def save(self) -> None:
        """Write the view to disk if it moved since the last write."""
        if self.view.revision == self._saved_revision:
            return
        try:
            write_private(self._cache, self.view.to_snapshot().model_dump_json())
        except OSError as exc:
            log.error("could not save the fleet view: %s", exc)
            return
        self._saved_revision = self.view.revision

    async def resync(self) -> None:
        """Replace the view with a fresh snapshot."""
        self.view = FleetView.from_snapshot(await self._cp.snapshot())
        log.info("resynced the fleet view at revision %d", self.view.revision)
        await self._on_change(None)

    async def run(self) -> None:
        """Follow the stream until cancelled; survive outages and malformed messages."""
        saver = asyncio.create_task(self._save_loop(), name="view-save")
        failures = 0  # attempts in a row that delivered nothing
        try:
            while True:
                delivered = False
                refused: ControlPlaneError | None = None
                try:
                    async for msg in self._cp.watch(self.view.revision):
                        self.connected = True
                        self.last_event = time.monotonic()
                        delivered = True
                        if isinstance(msg, WatchResync):
                            await self.resync()
                        elif isinstance(msg, WatchHeartbeat):
                            self._set_current(msg.revision <= self.view.revision)
                        else:
                            effects = self.view.apply(msg)
                            await self._on_change(effects)
                    log.info("the control plane ended the watch stream; resuming")
                except WatchProtocolError as exc:
                    # Refused, not guessed: start over from a snapshot.
                    log.error("watch stream sent something unreadable (%s); resyncing", exc)
                    delivered = False  # the same line again must not loop without a pause
                    with contextlib.suppress(ControlPlaneError):
                        await self.resync()
                except ControlPlaneError as exc:
                    refused = exc
                self.connected = False
                self._set_current(False)
                failures = 0 if delivered else failures + 1
                delay = reconnect_delay(failures, len(self._cp.urls))
                if refused is not None:
                    if failures >= len(self._cp.urls):  # every replica refused: as told
                        delay = retry_wait(refused, delay)
                    log.warning("watch stream lost (%s); retrying in %.1fs", refused, delay)
                await asyncio.sleep(delay)
        finally:
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
            self.save()

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            self.save()
