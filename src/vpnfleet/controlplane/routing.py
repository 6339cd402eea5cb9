"""The route class of every API router: commit a change-log write in the handler's thread.

FastAPI runs a plain (``def``) handler in its threadpool, then validates the response in a
second threadpool call, and only then leaves the request's dependencies, where ``get_db``
commits. A write that took the change-log lock (``pg_advisory_xact_lock`` on PostgreSQL,
SQLite's database lock) would hold it while waiting for that second thread. Under a burst of
writes every thread can be waiting for the lock or for a pooled connection that such waiters
hold, and then nothing moves until the pool's 30 s timeout fails requests (100 concurrent
writes: none done in 120 s). Committing right after the handler returns, in the same thread,
means the lock holder never needs another thread before it lets go.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog


def commit_log_writes(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint``, committing its request's transaction as soon as it returns if it wrote
    to the change log. Coroutine handlers (which do not hold a transaction across awaits
    here) are left as they are."""
    if inspect.iscoroutinefunction(endpoint) or inspect.isasyncgenfunction(endpoint):
        return endpoint

    @functools.wraps(endpoint)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = endpoint(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, Session) and value.info.pop(changelog.LOCKED, False):
                value.commit()
        return result

    return call


class WriteThroughRoute(APIRoute):
    """An APIRoute whose handler commits its change-log writes in its own thread."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, commit_log_writes(endpoint), **kwargs)
