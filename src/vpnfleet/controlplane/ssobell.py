"""The bell that ends agents' long polls for single sign-on decisions (docs/sso.md).

An agent with logins waiting asks ``GET /api/v1/agent/sso-decisions?wait=S``: the answer comes
as soon as one of its pod's logins is decided, or after S seconds with nothing. The decision is
recorded by whichever replica the user's browser reached, so two ways wake a waiting poll:

- a callback on this replica rings the bell for the login's pod right after it commits
  (:meth:`DecisionBell.ring`, from the handler's worker thread): no delay at all;
- while any poll waits, one task per replica looks every ``interval`` seconds for undelivered
  decisions of the waiting pods (one small query, whatever the number of waiting polls), which
  catches decisions recorded by the other replicas, and any ring that raced a poll's start.

A waiting poll holds no database session, no worker thread and no request slot: only its
connection and one event. When the replica stops, :meth:`close` ends every waiting poll with
an empty answer at once, so the agent asks again on the next replica instead of waiting out
the shutdown grace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import anyio
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.controlplane.models import SsoLogin

log = logging.getLogger("vpnfleet.controlplane")

# The longest an agent may ask a poll to wait (its HTTP client's timeout must be longer).
MAX_WAIT = 25.0


class DecisionBell:
    """Waiting long polls per pod, and what wakes them."""

    def __init__(self, factory: sessionmaker[Session], interval: float = 0.2) -> None:
        self._factory = factory
        self._interval = interval
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        self.checks = 0  # queries of the tail since start (tests, the benchmark)

    @property
    def waiting(self) -> int:
        return sum(len(evs) for evs in self._waiters.values())

    @contextmanager
    def listen(self, pod: str) -> Iterator[asyncio.Event]:
        """An event set whenever `pod` may have a decision to collect (and when the replica
        stops); called on the event loop, before the poll first looks, so no decision can
        slip between its look and its wait."""
        event = asyncio.Event()
        if self.closing:
            event.set()
            yield event
            return
        self._loop = asyncio.get_running_loop()
        self._waiters.setdefault(pod, set()).add(event)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._tail(), name="sso-decision-bell")
        try:
            yield event
        finally:
            events = self._waiters.get(pod)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[pod]

    def ring(self, pod: str) -> None:
        """A login of `pod` was decided here (any thread, after the commit)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, pod)

    def _wake(self, pod: str) -> None:
        for event in self._waiters.get(pod, ()):
            event.set()

    async def _tail(self) -> None:
        while self._waiters and not self.closing:
            await asyncio.sleep(self._interval)
            pods = sorted(self._waiters)
            if not pods:
                break
            try:
                found = await anyio.to_thread.run_sync(self._decided, pods)
            except SQLAlchemyError as exc:
                # The polls still end at their own timeout; the next look may work.
                log.warning("single sign-on decisions: cannot look: %s", type(exc).__name__)
                continue
            for pod in found:
                self._wake(pod)

    def _decided(self, pods: list[str]) -> set[str]:
        """Which of `pods` have decided logins not yet handed out."""
        self.checks += 1
        with self._factory() as db:
            return set(
                db.scalars(
                    select(SsoLogin.pod)
                    .where(
                        SsoLogin.pod.in_(pods),
                        SsoLogin.status.in_(("admitted", "denied")),
                        SsoLogin.delivered.is_(False),
                    )
                    .distinct()
                )
            )

    def close(self) -> None:
        """The replica is stopping: every waiting poll (and every later one) answers now."""
        self.closing = True
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
