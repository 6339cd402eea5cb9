"""The agent's side of VPN single sign-on logins (docs/sso.md): register a waiting connection
with the control plane (the short login URL for the client's WEB_AUTH) and wait for the
decision the control plane records when the user's browser comes back from the IdP.

Decisions are fetched by one poll loop per agent that runs only while at least one login
waits (every `poll_interval` seconds, one request whatever the number of waiting logins),
so many pending logins cost one request per interval and never hold up other CONNECTs:
each wait is its own future. A login whose decision does not arrive within its timeout is
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

    def __init__(self, cp: ControlPlane, *, poll_interval: float = 0.5) -> None:
        self._cp = cp
        self._interval = poll_interval
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

    async def _poll(self) -> None:
        while self._waiting:
            try:
                got = await self._cp.sso_decisions()
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
            if self._waiting:
                await asyncio.sleep(self._interval)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
