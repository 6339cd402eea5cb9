"""The heartbeat: tells the control plane this pod is alive, ready, and what it enforces.

Every few seconds it posts the revision whose firewall state is in the kernel (read from the
firewall sync, which records it together with the state it applied), readiness and a few
counts. The control plane shows them (``vpnfleet pod list``, ``vpnfleet user access``) and
derives policy lag from them. Its ticks double as the agent's liveness signal: an event loop
stuck for 30 s fails ``/healthz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.wire import Heartbeat

log = logging.getLogger("vpnfleet.agent")

STALL_AFTER = 30.0  # seconds without a tick before liveness fails


class HeartbeatSender:
    """Posts a heartbeat every ``interval`` seconds until cancelled."""

    def __init__(self, cp: ControlPlane, interval: float, build: Callable[[], Heartbeat]) -> None:
        self._cp = cp
        self._interval = interval
        self._build = build
        self.last_tick = time.monotonic()
        self.refused: ControlPlaneError | None = None

    @property
    def loop_alive(self) -> bool:
        return time.monotonic() - self.last_tick < STALL_AFTER

    async def run(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            await self.send(self._build())
            if self.refused is not None:
                # The pod's credential was revoked (or its record forgotten): it may no
                # longer speak for the pod, so the agent stops (the task failing stops it).
                raise self.refused
            await asyncio.sleep(self._interval)

    async def send(self, beat: Heartbeat) -> None:
        try:
            await self._cp.heartbeat(beat)
        except ControlPlaneError as exc:
            if exc.status in (401, 403, 404):
                log.error("the control plane refuses this pod: %s", exc)
                self.refused = exc
            else:
                log.debug("heartbeat failed: %s", exc)
