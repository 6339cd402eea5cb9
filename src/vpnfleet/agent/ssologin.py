"""The agent's side of VPN single sign-on logins (docs/sso.md): register a waiting connection
with the control plane (the short login URL for the client's WEB_AUTH) and wait for the
decision the control plane records when the user's browser comes back from the IdP.

Decisions are fetched by one loop per agent that runs only while at least one login waits:
a long poll (`GET /api/v1/agent/sso-decisions?wait=`) that the control plane answers as soon
as one of this pod's logins is decided on any replica (controlplane/ssobell.py), so the
client is admitted a moment after the user's browser comes back, and many pending logins
cost one open request, never holding up other CONNECTs: each wait is its own future. Against
a control plane that answers at once (one from before long polls), the loop asks every
`poll_interval` seconds instead. A login whose decision does not arrive within its timeout is
refused here ("single sign-on login timed out"), whatever the control plane says later.

Registrations go to the control plane at most :data:`REGISTER_AT_ONCE` at a time, the others
queue here: a burst of connects (a morning rush, clients of a restarted pod) must not take
every connection of the agent's one client to the control plane, which the heartbeat and the
session records also need (500 at once exhausted its pool: every one failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError

log = logging.getLogger("vpnfleet.agent")

TIMED_OUT = "single sign-on login timed out"
REGISTER_AT_ONCE = 4
# How long one decisions request may wait at the control plane (at most its MAX_WAIT).
LONG_POLL = 20.0


@dataclass(frozen=True)
class PendingLogin:
    id: str
    url: str
    timeout_seconds: int


@dataclass(frozen=True)
class LoginOutcome:
    admitted: bool
    reason: str | None


class SsoLogins:
    """Pending logins of one agent and the loop that collects their decisions."""

    def __init__(
        self, cp: ControlPlane, *, poll_interval: float = 0.5, long_poll: float = LONG_POLL
    ) -> None:
        self._cp = cp
        self._interval = poll_interval
        self._long_poll = long_poll
        self._waiting: dict[str, asyncio.Future[LoginOutcome]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._registering = asyncio.Semaphore(REGISTER_AT_ONCE)
        self.polls = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def polling(self) -> bool:
        """Whether the decision poller runs (it ends after its last request once nothing
        waits)."""
        return self._poller is not None and not self._poller.done()

    async def register(
        self, server: str, cid: int, kid: int, user: str, real_ip: str | None
    ) -> PendingLogin:
        """Register a waiting connection; ControlPlaneError when the control plane refuses
        (no IdP: 409, unknown user: 404) or cannot be reached."""
        async with self._registering:
            out = await self._cp.sso_login(
                {"server": server, "cid": cid, "kid": kid, "user": user, "real_ip": real_ip}
            )
        return PendingLogin(str(out["id"]), str(out["url"]), int(out["timeout_seconds"]))

    async def wait(self, login: PendingLogin, timeout: float | None = None) -> LoginOutcome:
        """The decision on `login`, or a refusal when none arrives within `timeout` seconds
        (default: the login's own timeout)."""
        fut: asyncio.Future[LoginOutcome] = asyncio.get_running_loop().create_future()
        self._waiting[login.id] = fut
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="sso-decisions")
        try:
            limit = login.timeout_seconds if timeout is None else timeout
            return await asyncio.wait_for(fut, limit)
        except TimeoutError:
            return LoginOutcome(False, TIMED_OUT)
        finally:
            self._waiting.pop(login.id, None)
            if not self._waiting and self._poller is not None:
                # Nothing waits any more: end the long poll on its way rather than keep a
                # connection to the control plane open for nobody. (A login that starts
                # waiting next starts a new loop: this one is forgotten at once.)
                self._poller.cancel()
                self._poller = None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            asked = loop.time()
            try:
                got = await self._cp.sso_decisions(wait=self._long_poll)
                self.polls += 1
            except ControlPlaneError as exc:
                log.info("single sign-on decisions: %s", exc)
                got = []
            for d in got:
                fut = self._waiting.get(str(d.get("id")))
                if fut is not None and not fut.done():
                    reason = d.get("reason")
                    fut.set_result(
                        LoginOutcome(
                            bool(d.get("admitted")), None if reason is None else str(reason)
                        )
                    )
            if self._waiting and not got and loop.time() - asked < self._interval:
                # Answered at once with nothing (an error, a control plane that does not
                # wait, one stopping): ask again after the interval, not in a tight loop.
                await asyncio.sleep(self._interval)

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
