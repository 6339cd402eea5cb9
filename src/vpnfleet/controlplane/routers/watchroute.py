"""The watch stream: newline-delimited JSON change events, resumable from a revision."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from vpnfleet.controlplane.state import State, Watcher
from vpnfleet.controlplane.watch import ndjson

router = APIRouter(prefix="/api/v1", tags=["watch"])


@router.get("/watch")
async def watch(
    state: State,
    _who: Watcher,
    since: int = Query(default=0, ge=0, description="last revision the client has applied"),
) -> StreamingResponse:
    """Stream `change` events after `since`, `heartbeat`s while idle, `resync` if too far behind.

    A client that gets `resync` must fetch a full snapshot and resume from its revision.
    """

    async def body() -> AsyncIterator[bytes]:
        async for event in state.hub.subscribe(since, state.settings.heartbeat_interval):
            yield ndjson(event)

    return StreamingResponse(body(), media_type="application/x-ndjson")
