"""NAT audit on the pod: conntrack events in, attributed flow records out (stdout, spool, API).

The conntrack listener feeds every NEW/DESTROY event to the flow tracker on the listener's
fast path; each record the tracker emits is printed as one JSON line (``"event": "flow"``, for
log pipelines) and spooled on disk, and a delivery task sends the spool to the control plane
in batches of up to 5,000, oldest first, keeping records while the control plane is away.

The tracker also serves as the pod's flow index: once its first table dump has completed it
knows every open flow from or to a tunnel address, which the firewall sync uses to cut the
connections a revocation disallows without walking the kernel's whole conntrack table.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TextIO

from vpnfleet.agent.conntrack import ConntrackError, ConntrackListener
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.spool import Spool
from vpnfleet.core import revocation
from vpnfleet.core.flowevents import FlowItem
from vpnfleet.core.flowtracker import FlowRecord, FlowTracker

log = logging.getLogger("vpnfleet.agent.flows")

FLOW_BATCH = 5000  # records per POST /agent/flows (the API's limit)
FLOW_BATCH_BYTES = 4 << 20

Owner = Callable[[str], tuple[str, str] | None]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class FlowAudit:
    """Runs the conntrack listener and ships the flow records of one pod."""

    def __init__(
        self,
        cp: ControlPlane,
        pod: str,
        spool: Spool,
        networks: list[ipaddress.IPv4Network],
        owner: Owner,
        *,
        out: TextIO | None,
        record_destination: bool = True,
        listener: Callable[[], ConntrackListener] = ConntrackListener,
    ) -> None:
        self._cp = cp
        self._pod = pod
        self.spool = spool
        self._networks = networks
        self._out = out
        self._new_listener = listener
        self.tracker = FlowTracker(pod, networks, owner, record_destination=record_destination)
        self.listener: ConntrackListener | None = None
        self.listener_up = False
        self.delivered = 0
        self.refused = 0
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ the index

    def open_flows(self) -> list[revocation.Flow] | None:
        """Every open flow from or to a tunnel address, or None while the index is incomplete
        (listener down, or its first table dump not finished)."""
        if not self.listener_up or not self.tracker.synced:
            return None
        return self.tracker.open_flows()

    # ------------------------------------------------------------------ events -> records

    def _on_item(self, item: FlowItem) -> None:
        """Per conntrack event (the listener's fast path): attribute, print, spool."""
        records = self.tracker.feed(item)
        if records:
            self._emit(records)

    def _emit(self, records: list[FlowRecord]) -> None:
        out = self._out
        put = self.spool.put_line
        for record in records:
            # One JSON object per line, marked "event": "flow" for log pipelines (Loki,
            # ELK); the same text is spooled (first: the audit trail) and printed.
            line = record.to_log_line()
            put(line)
            if out is not None:
                try:
                    out.write(line)
                except (OSError, ValueError):
                    self._out = out = None  # stdout is gone; the spool still has it all
                    log.error("flow records can no longer be printed on stdout")
        self._wake.set()

    async def run_listener(self) -> None:
        """Run the conntrack listener; restart it with backoff if it fails."""
        delay = 1.0
        while True:
            listener = self._new_listener()
            self.listener = listener
            try:
                listener.open()
                self.listener_up = True
                log.info(
                    "flow audit on: conntrack events of %s",
                    ", ".join(str(n) for n in self._networks),
                )
                await listener.run(self._on_item)
                delay = 1.0
            except ConntrackError as exc:
                log.error("flow audit unavailable: %s; retrying in %.0fs", exc, delay)
            except Exception as exc:  # audit trouble must not stop the VPN
                log.error(
                    "flow listener failed: %r; restarting in %.0fs", exc, delay, exc_info=True
                )
            finally:
                self.listener_up = False
                listener.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)

    # ------------------------------------------------------------------ delivery

    async def _send(self, limit: int) -> int:
        """Send one batch of spooled records; returns how many left the spool.
        Raises ControlPlaneError when the control plane is unreachable (retry later)."""
        lines = self.spool.peek_lines(limit, max_bytes=FLOW_BATCH_BYTES)
        if not lines:
            return 0
        try:
            await self._cp.flows(self._pod, lines)
        except ControlPlaneError as exc:
            if exc.status == 413 and len(lines) > 1:
                return await self._send(max(1, len(lines) // 2))  # too big: smaller
            if exc.status not in (400, 422):
                raise  # unreachable, 5xx, or not allowed (a token problem): keep, retry
            if len(lines) > 1:
                # Something in the batch is refused: halve until the bad record is alone.
                return await self._send(max(1, len(lines) // 2))
            self.refused += 1
            log.error("dropped a flow record the control plane refused: %s", exc)
            self.spool.commit(1)
            return 1
        self.spool.commit(len(lines))
        self.delivered += len(lines)
        return len(lines)

    async def run_delivery(self) -> None:
        """Send records in batches, oldest first; keep them on disk while the control plane is
        away. The spool and stdout are flushed at least once a second."""
        delay = 0.5
        last_flush = time.monotonic()
        while True:
            sent = 0
            try:
                sent = await self._send(FLOW_BATCH)
                delay = 0.5
            except ControlPlaneError as exc:
                log.warning("flow delivery paused (%s); %d record(s) spooled", exc, len(self.spool))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            except OSError as exc:  # the spool's disk (full, read-only): keep trying
                log.error("flow spool: %s; retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            if time.monotonic() - last_flush >= 1.0:
                try:
                    self._flush_outputs()
                except OSError as exc:
                    log.error("flow spool cannot be flushed: %s", exc)
                last_flush = time.monotonic()
            if sent >= FLOW_BATCH:
                continue  # a backlog: next batch at once
            # Quiet or trickling: gather records for a moment (fewer, larger requests).
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            if sent or len(self.spool):
                await asyncio.sleep(0.2)

    def _flush_outputs(self) -> None:
        self.spool.flush()
        if self._out is not None:
            with contextlib.suppress(OSError, ValueError):
                self._out.flush()

    async def finish(self, budget: float) -> None:
        """At shutdown: end the flows still open (no client is left to use them), then give
        the records ``budget`` seconds to reach the control plane; the spool keeps the rest."""
        if self.listener is not None:
            self.listener.close()
        ended = self.tracker.end_all(_now())
        if ended:
            self._emit(ended)
            log.info("ended %d open flow(s) at shutdown", len(ended))
        deadline = time.monotonic() + budget
        while len(self.spool) and (left := deadline - time.monotonic()) > 0:
            try:
                # A hanging request must not eat the rest of the termination grace period.
                await asyncio.wait_for(self._send(FLOW_BATCH), left)
            except TimeoutError:
                break
            except (ControlPlaneError, OSError):
                await asyncio.sleep(0.2)
        with contextlib.suppress(OSError):
            self._flush_outputs()
        if len(self.spool):
            log.info("%d flow record(s) stay spooled for the next start", len(self.spool))
