"""The agent's loop collecting single sign-on decisions, against control planes played by the
test where a real one cannot show the case (one from before long polls, one failing); the
loop against a real control plane and IdP: tests/api/test_sso_login.py."""

from __future__ import annotations

import asyncio

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.ssologin import LONG_POLL, TIMED_OUT, LoginOutcome, PendingLogin, SsoLogins


class AnswersAtOnce(ControlPlane):
    """A control plane that ignores `wait` (as one from before long polls does), or fails."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__("http://127.0.0.1:9", "t")
        self.fail = fail
        self.asked: list[float] = []

    async def sso_decisions(self, wait: float = 0) -> list[dict[str, object]]:
        self.asked.append(wait)
        if self.fail:
            raise ControlPlaneError("GET /api/v1/agent/sso-decisions: 503 stopping", 503)
        return []


async def test_a_control_plane_that_answers_at_once_is_asked_every_interval() -> None:
    for fail in (False, True):
        cp = AnswersAtOnce(fail)
        logins = SsoLogins(cp, poll_interval=0.1)
        try:
            out = await logins.wait(PendingLogin("a", "https://cp.test/sso/login/a", 60), 0.55)
        finally:
            await logins.close()
            await cp.close()
        assert out == LoginOutcome(False, TIMED_OUT)
        # About one request per interval (not a tight loop), each asking for a long poll.
        assert 3 <= len(cp.asked) <= 7, (fail, cp.asked)
        assert set(cp.asked) == {LONG_POLL}


class WaitsLong(ControlPlane):
    """A control plane whose long poll never answers within the test."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "t")
        self.cancelled = 0

    async def sso_decisions(self, wait: float = 0) -> list[dict[str, object]]:
        try:
            await asyncio.sleep(wait)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return []


async def test_the_long_poll_ends_when_no_login_waits_any_more() -> None:
    cp = WaitsLong()
    logins = SsoLogins(cp)
    try:
        first = PendingLogin("a", "https://cp.test/sso/login/a", 60)
        assert await logins.wait(first, 0.2) == LoginOutcome(False, TIMED_OUT)
        await asyncio.sleep(0)
        assert not logins.polling and cp.cancelled == 1
        # A login that waits next starts a new long poll at once.
        waiting = asyncio.create_task(logins.wait(PendingLogin("b", "u", 60), 0.2))
        await asyncio.sleep(0.05)
        assert logins.polling
        assert await waiting == LoginOutcome(False, TIMED_OUT)
    finally:
        await logins.close()
        await cp.close()
