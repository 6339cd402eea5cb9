"""The HTTP server of `vpnfleet server`: uvicorn, told to end the watch streams when it stops.

uvicorn stops in this order: stop accepting, ask every connection to close once its response is
complete, wait up to the graceful-shutdown timeout for them, cancel what is left, then run the
application's shutdown. A watch stream never completes by itself, so each one used to be
cancelled at the timeout: the process always took the full grace and logged an ERROR with a
traceback per stream, and agents saw their streams cut. Here the listening sockets close first
(a follower that reconnects does not land on this replica again), then the change hub ends every
stream cleanly (and the long polls for single sign-on decisions answer), and the wait that
follows is only for requests still in flight.

uvicorn tells the connections it knows of once, when the stop begins. A connection accepted
just before that but not yet known to it (its TLS handshake still under way, or its
``connection_made`` not yet run) was missed: it was answered, stayed open for keep-alive, and
held the stop for the whole grace. Until the stop is over, every connection that shows up is
told too: once its first request has begun (it is answered, then closed), or after
``LATE_CONNECTION_IDLE`` seconds without one (closed). A new connection's first request is
almost always on its way; closing it at once would answer it with a reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import uvicorn

from vpnfleet.controlplane.servertls import SERVER_CIPHERS
from vpnfleet.controlplane.ssobell import DecisionBell
from vpnfleet.controlplane.watch import ChangeHub
from vpnfleet.core.netparse import parse_listen

if TYPE_CHECKING:
    from fastapi import FastAPI
    from uvicorn.server import Protocols

    from vpnfleet.controlplane.settings import ServerSettings
    from vpnfleet.controlplane.state import AppState

# Seconds requests still in flight get to finish once a stop is asked for (watch streams
# end at once and do not count).
SHUTDOWN_GRACE = 5
# How often a stopping server looks for connections that showed up after the stop began, and
# how long such a connection may stay without a request before it is closed.
LATE_CONNECTION_CHECK = 0.05
LATE_CONNECTION_IDLE = 1.0
# Seconds an idle connection is kept open for its next request. uvicorn's default is 5 s, the
# agents' heartbeat interval: every pod's connection was closed between two heartbeats, and
# each heartbeat paid a new TLS handshake (or met a connection closed under it: a failed
# request). Clients keep theirs for less (the agent: cpclient.KEEP_ALIVE_SECONDS), so the
# client, not the server, closes an idle connection.
KEEP_ALIVE_SECONDS = 75

log = logging.getLogger(__name__)


def server_config(app: FastAPI, settings: ServerSettings, state: AppState) -> uvicorn.Config:
    """How `vpnfleet server` serves `app`: its address, HTTPS when configured, the proxies it
    believes, and the keep-alive and shutdown times above."""
    host, port = parse_listen(settings.listen)
    tls: dict[str, Any] = {}
    if state.tls is not None:
        tls = {
            "ssl_certfile": str(state.tls.cert_file),
            "ssl_keyfile": str(state.tls.key_file),
            "ssl_ciphers": SERVER_CIPHERS,
        }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        **tls,
    )


class ControlPlaneServer(uvicorn.Server):
    """uvicorn's server that ends the change hub's streams before waiting for connections."""

    def __init__(self, config: uvicorn.Config, hub: ChangeHub, bell: DecisionBell) -> None:
        super().__init__(config)
        self._hub = hub
        self._bell = bell

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # closing twice (uvicorn does it again) is harmless
            server.close()
        for sock in sockets or []:
            sock.close()
        self._hub.close_streams()
        self._bell.close()  # long polls for login decisions answer now, empty
        told = set(self.server_state.connections)  # what uvicorn tells, right below
        late = asyncio.create_task(self._tell_late_connections(told))
        try:
            await super().shutdown(sockets)
        finally:
            late.cancel()

    async def _tell_late_connections(self, told: set[Protocols]) -> None:
        first_seen: dict[Protocols, float] = {}
        while True:
            await asyncio.sleep(LATE_CONNECTION_CHECK)
            now = time.monotonic()
            for connection in list(self.server_state.connections):
                if connection in told:
                    continue
                seen = first_seen.setdefault(connection, now)
                # A request begun: answered, then closed. None yet: closed once it is clear
                # none is coming.
                if getattr(connection, "cycle", None) is None and now - seen < LATE_CONNECTION_IDLE:
                    continue
                told.add(connection)
                try:
                    connection.shutdown()
                except Exception:  # one connection's trouble must not leave the rest untold
                    log.warning("closing a connection during the stop failed", exc_info=True)
