"""The view follower: the agent's replica of the control plane's state, kept current.

It owns the :class:`~vpnfleet.core.fleet.FleetView`: loaded from a snapshot at start (or from
the copy on disk when the control plane is away, so decisions go on), then kept current from
the watch stream, resumed from the view's revision after every break (after the control
plane's Retry-After when it refused the stream at its limit). A ``resync`` message, or
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

OnChange = Callable[[Effects | None], Awaitable[None]]


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
        self.last_event = 0.0  # monotonic time the stream last delivered anything
        self._saved_revision = -1

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
        delay = 0.5
        try:
            while True:
                try:
                    async for msg in self._cp.watch(self.view.revision):
                        self.connected = True
                        self.last_event = time.monotonic()
                        delay = 0.5
                        if isinstance(msg, WatchResync):
                            await self.resync()
                        elif not isinstance(msg, WatchHeartbeat):
                            effects = self.view.apply(msg)
                            await self._on_change(effects)
                except WatchProtocolError as exc:
                    # Refused, not guessed: start over from a snapshot.
                    log.error("watch stream sent something unreadable (%s); resyncing", exc)
                    with contextlib.suppress(ControlPlaneError):
                        await self.resync()
                except ControlPlaneError as exc:
                    wait = retry_wait(exc, delay)
                    log.warning("watch stream lost (%s); retrying in %.1fs", exc, wait)
                    delay = max(delay, wait)
                self.connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
        finally:
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
            self.save()

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            self.save()
