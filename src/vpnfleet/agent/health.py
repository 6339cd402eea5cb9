"""The agent's HTTP endpoints: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vpnfleet.core.netparse import parse_listen

if TYPE_CHECKING:
    from vpnfleet.agent.pod import PodAgent


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
        # Rendering thousands of series takes tens of ms: keep it off the event loop so a
        # scrape never delays CONNECT decisions (the collectors read copies, thread-safe).
        body = await asyncio.to_thread(generate_latest, agent.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


async def serve_http(agent: PodAgent) -> None:
    """Serve probes and metrics inside the agent's own event loop."""
    host, port = parse_listen(agent.s.http)
    config = uvicorn.Config(
        build_app(agent), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    # serve() would take over SIGTERM/SIGINT; the agent handles those itself (drain).
    await server._serve()
