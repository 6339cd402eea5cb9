"""Denied attempts on the pod: the firewall's NFLOG of dropped packets, as audit records.

The firewall's last rule logs (rate-limited) what no grant allowed to an NFLOG group; this part
reads it, aggregates packets per user and destination over short windows
(:class:`~vpnfleet.core.denied.DeniedAggregator`), prints each record as a log line and hands it
to the session shipper, which stores it in the control plane (``vpnfleet audit denied``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.nflog import NflogError, NflogListener, pump_denied
from vpnfleet.agent.sessionship import SessionShipper
from vpnfleet.core.denied import DeniedAggregator, DeniedEvent

log = logging.getLogger("vpnfleet.agent")

NFLOG_GROUP = 7007  # where the firewall sends denied packets for the agent to record

Owner = Callable[[str], tuple[str, str] | None]


class DeniedAudit:
    """Reads the NFLOG group of denied packets and records attributed attempts."""

    def __init__(
        self,
        prefix: str,
        owner: Owner,
        shipper: SessionShipper,
        *,
        group: int = NFLOG_GROUP,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._prefix = prefix
        self._owner = owner
        self._shipper = shipper
        self._group = group
        self._metrics = metrics

    def _lookup(self, ip: ipaddress.IPv4Address) -> tuple[str, str] | None:
        return self._owner(str(ip))

    def _record(self, event: DeniedEvent) -> None:
        record = event.as_record()
        if self._metrics is not None:
            self._metrics.denied.inc(event.count)
        log.info(
            "denied %s -> %s %s/%s (%d packet(s))",
            event.user or event.src,
            event.dst,
            event.proto,
            event.dport,
            event.count,
            extra=record,
        )
        self._shipper.denied(record)

    async def run(self) -> None:
        """Until cancelled; an unavailable NFLOG is retried every 5 s (the VPN goes on)."""
        while True:
            listener = NflogListener(self._group, prefix=f"{self._prefix}-deny")
            try:
                listener.open()
                await pump_denied(listener, DeniedAggregator(self._lookup), self._record)
            except NflogError as exc:
                log.error("denied-attempt log unavailable: %s; retrying in 5s", exc)
            finally:
                listener.close()
            await asyncio.sleep(5)
