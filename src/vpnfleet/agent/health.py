"""The agent's HTTP endpoints: /healthz, /readyz and /metrics, and the user-metrics listener.

Two listeners, because they face different audiences. ``--http`` (0.0.0.0:9176) is reached by
the kubelet's probes and by anything on the pod network; its /metrics carries fleet-level series
only, no user names. ``--user-metrics-listen`` (127.0.0.1:9177 by default, ``off`` to disable)
serves the full set, per-user ``openvpn_*{common_name}`` series included, and with a token
only to a request that presents it as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vpnfleet.core.netparse import parse_listen

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from vpnfleet.agent.pod import PodAgent

log = logging.getLogger("vpnfleet.agent")


async def _render(registry: CollectorRegistry) -> Response:
    # Rendering thousands of series takes tens of ms: keep it off the event loop so a
    # scrape never delays CONNECT decisions (the collectors read copies, thread-safe).
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def build_app(agent: PodAgent) -> Starlette:
    async def healthz(_req: Request) -> JSONResponse:
        ok, detail = agent.healthy()
        if ok and not agent.draining:
            detail["management"] = ok = await agent.probe_management()
        return JSONResponse({"ok": ok, **detail}, status_code=200 if ok else 503)

    async def readyz(_req: Request) -> JSONResponse:
        ok, detail = agent.ready()
        return JSONResponse({"ok": ok, **detail}, status_code=200 if ok else 503)

    async def metrics(_req: Request) -> Response:
        return await _render(agent.metrics.fleet_registry)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


def build_user_metrics_app(agent: PodAgent, token: str | None) -> Starlette:
    """/metrics with the per-user series; with ``token``, only for ``Bearer <token>``."""
    expected = None if token is None else f"Bearer {token}".encode()

    async def metrics(req: Request) -> Response:
        if expected is not None:
            given = req.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return Response(
                    "a bearer token is required for per-user metrics\n",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="vpnfleet-agent-metrics"'},
                    media_type="text/plain",
                )
        return await _render(agent.metrics.registry)

    return Starlette(routes=[Route("/metrics", metrics)])


async def _serve(app: Starlette, listen: str) -> None:
    host, port = parse_listen(listen)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    # serve() would take over SIGTERM/SIGINT; the agent handles those itself (drain).
    await server._serve()


def _loopback(listen: str) -> bool:
    host, _ = parse_listen(listen)
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def serve_http(agent: PodAgent) -> None:
    """Serve probes and metrics (and the user-metrics listener) in the agent's event loop."""
    s = agent.s
    servers = [_serve(build_app(agent), s.http)]
    if s.user_metrics_listen != "off":
        if s.user_metrics_token is None and not _loopback(s.user_metrics_listen):
            log.warning(
                "per-user metrics (user names) are served on %s without a token: restrict "
                "who reaches it (NetworkPolicy) or set VPNFLEET_USER_METRICS_TOKEN_FILE",
                s.user_metrics_listen,
            )
        app = build_user_metrics_app(agent, s.user_metrics_token)
        servers.append(_serve_optional(app, s.user_metrics_listen, "per-user metrics"))
    await asyncio.gather(*servers)


async def _serve_optional(app: Starlette, listen: str, what: str) -> None:
    """Serve ``app``; if it cannot (port taken), log it and carry on: metrics must never
    keep the VPN from running."""
    try:
        await _serve(app, listen)
    except (SystemExit, OSError) as exc:  # uvicorn exits when it cannot bind
        log.error("cannot serve %s on %s (%r); the agent runs without them", what, listen, exc)
