"""The watch stream: newline-delimited JSON change events, resumable from a revision."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from vpnfleet.controlplane.errors import PROBLEM, problem_response
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import State, StreamWatcher
from vpnfleet.controlplane.watch import RETRY_AFTER, ChangeHub

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1", tags=["watch"])

LIMIT_SETTING = "VPNFLEET_WATCH_MAX_SUBSCRIBERS"


class WatchResponse(StreamingResponse):
    """A stream that gives its slot back when it ends, however it ends (client gone,
    server stopping): released around the whole response, not inside the body generator,
    whose `finally` would never run if the stream were cancelled before it started."""

    def __init__(self, body: AsyncIterator[bytes], hub: ChangeHub, token_id: int) -> None:
        super().__init__(body, media_type="application/x-ndjson")
        self._hub = hub
        self._token_id = token_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.release(self._token_id)


@router.get(
    "/watch",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "the change stream"},
        503: {
            "content": {PROBLEM: {}},
            "description": f"this replica serves its most watch streams ({LIMIT_SETTING}); "
            "retry after the Retry-After header's seconds",
        },
    },
)
async def watch(
    state: State,
    who: StreamWatcher,
    since: int = Query(default=0, ge=0, description="last revision the client has applied"),
) -> Response:
    """Stream `change` events after `since`, `heartbeat`s while idle, `resync` if too far behind.

    A client that gets `resync` must fetch a full snapshot and resume from its revision. The
    token is checked before anything streams; past the replica's stream limit the answer is
    503 with `Retry-After`. The stream ends within about a second of its token's revocation.
    """
    hub = state.hub
    if not hub.admit(who.token_id):
        response = problem_response(
            503,
            "Too many watch streams",
            f"this control plane serves at most {hub.max_subscribers} watch streams at once "
            f"({LIMIT_SETTING}); retry in {RETRY_AFTER} s",
        )
        response.headers["Retry-After"] = str(RETRY_AFTER)
        return response
    return WatchResponse(
        hub.lines(since, state.settings.heartbeat_interval, who.token_id), hub, who.token_id
    )
