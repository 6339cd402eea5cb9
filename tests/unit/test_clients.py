"""The client handler against a fake OpenVPN management session: answers, kicks, session
records, the journal across a restart, and convergence to the fleet view."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_sessionbook import GWPOOL, NAT, session, user, view
from vpnfleet.agent.clientjournal import ClientJournal
from vpnfleet.agent.clients import ClientHandler
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.fakes import FakeClient, FakeManagement
from vpnfleet.agent.sessionship import SessionShipper
from vpnfleet.agent.spool import Spool
from vpnfleet.agent.ssologin import LoginOutcome, PendingLogin, SsoLogins
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.sessionbook import BookConfig, Client, SessionBook
from vpnfleet.core.webauth import token_signed_in_at


class Pod:
    """A client handler wired to a fake management session, a spool and a fleet view."""

    def __init__(self, state: Path, fleet: FleetView) -> None:
        self.fleet = fleet
        self.mgmt = FakeManagement()
        self.pokes = 0
        self.spool = Spool(state, "sessions")
        self.shipper = SessionShipper(self.spool, ControlPlane("http://127.0.0.1:9", "t"), "pod1")
        self.handler = ClientHandler(
            SessionBook(BookConfig(NAT, GWPOOL)),
            ClientJournal(state / "clients.journal"),
            self.shipper,
            pod="pod1",
            view=lambda: self.fleet,
            mgmt=lambda _server: self.mgmt,
            changed=self._poke,
        )
        self.handler.load_journal()

    def _poke(self) -> None:
        self.pokes += 1

    async def pump(self) -> None:
        """Hand every queued notification to the handler, as the supervisor would."""
        while not self.mgmt._events.empty():
            ev = self.mgmt._events.get_nowait()
            assert ev is not None
            await self.handler.on_event(ev)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # let DISCONNECTs scheduled by client-kill arrive
        while not self.mgmt._events.empty():
            ev = self.mgmt._events.get_nowait()
            assert ev is not None
            await self.handler.on_event(ev)  # type: ignore[arg-type]

    async def join(self, name: str, ip: str = "198.51.100.7") -> int:
        cid = self.mgmt.connect(name, real_ip=ip, serial="7")
        await self.pump()
        self.mgmt.establish(cid)
        await self.pump()
        return cid

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r["kind"], r["body"]) for r in self.spool.peek(1000)]

    def close(self) -> None:
        self.spool.close()
        self.handler.close()


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path, view(user("alice", max_sessions=1), user("bob", max_sessions=2)))
    try:
        yield p
    finally:
        p.close()


async def test_an_allowed_client_gets_its_address_and_a_session_record(pod: Pod) -> None:
    cid = await pod.join("alice")
    (auth,) = pod.mgmt.answers_for(cid)
    assert auth[0] == "auth" and auth[3] == ["ifconfig-push 10.200.0.2 255.255.255.0"]
    ((kind, body),) = pod.records()
    assert kind == "open" and body["user"] == "alice" and body["tunnel_ip"] == "10.200.0.2"
    assert pod.pokes >= 1 and pod.handler.owner("10.200.0.2") == ("alice", body["uid"])


async def test_a_refused_client_hears_why(pod: Pod) -> None:
    cid = pod.mgmt.connect("mallory")
    await pod.pump()
    assert pod.mgmt.answers_for(cid) == [("deny", cid, 1, "unknown user", "unknown account")]
    assert len(pod.handler.book) == 0 and pod.records() == []


async def test_the_same_device_reconnecting_replaces_its_session(pod: Pod) -> None:
    first = await pod.join("alice")
    second = await pod.join("alice")  # same public address, limit 1
    assert ("kill", first, "HALT") in pod.mgmt.answers
    assert pod.mgmt.answers_for(second)[0][0] == "auth"
    kinds = [(k, b.get("reason")) for k, b in pod.records()]
    assert kinds == [("open", None), ("close", "replaced by a new connection"), ("open", None)]
    assert [c.cid for c in pod.handler.established()] == [second]


async def test_a_disable_ends_the_session_and_closes_the_record(pod: Pod) -> None:
    cid = await pod.join("alice")
    pod.fleet = view(user("alice", enabled=False), user("bob"))
    await pod.handler.converge(["alice"])
    assert ("kill", cid, "HALT") in pod.mgmt.answers
    assert pod.records()[-1][0] == "close"
    assert pod.records()[-1][1]["reason"] == "account disabled"
    assert pod.handler.established() == []


async def test_a_kill_made_while_the_agent_was_down_applies_at_restart(tmp_path: Path) -> None:
    before = Pod(tmp_path, view(user("alice"), user("bob")))
    cid = await before.join("alice")
    uid = before.handler.established()[0].uid
    mgmt = before.mgmt
    before.close()  # the agent dies; OpenVPN and alice carry on
    # Meanwhile an operator kills alice's session: the next agent learns it from its view.
    killed = view(
        user("alice"),
        user("bob"),
        sessions=(session(uid, "alice", "198.51.100.7", kill="disconnected by an administrator"),),
    )
    after = Pod(tmp_path, killed)
    after.mgmt = mgmt.reopen()
    try:
        assert await after.handler.reconcile()
        assert ("kill", cid, "HALT") in after.mgmt.answers
        kinds = [(k, b["uid"], b.get("reason")) for k, b in after.records()]
        # Re-opened under the same uid (idempotent), then closed with the kill's reason.
        assert kinds[-2:] == [
            ("open", uid, None),
            ("close", uid, "disconnected by an administrator"),
        ]
    finally:
        after.close()


async def test_a_restarted_agent_keeps_session_ids_and_notices_missed_disconnects(
    tmp_path: Path,
) -> None:
    before = Pod(tmp_path, view(user("alice"), user("bob", max_sessions=2)))
    a = await before.join("alice", ip="192.0.2.1")
    b = await before.join("bob", ip="192.0.2.2")
    uids = {c.user: c.uid for c in before.handler.established()}
    mgmt = before.mgmt
    before.close()
    mgmt.disconnect(a, notify=False)  # alice leaves while nobody listens
    after = Pod(tmp_path, before.fleet)
    after.mgmt = mgmt.reopen()
    try:
        assert await after.handler.reconcile()
        live = after.handler.established()
        assert [(c.cid, c.uid) for c in live] == [(b, uids["bob"])]
        assert after.handler.owner(live[0].tunnel_ip) == ("bob", uids["bob"])
        # The journal now holds exactly bob: a third agent would not resurrect alice.
        assert set(ClientJournal(tmp_path / "clients.journal").load()) == {
            ("bob", live[0].tunnel_ip)
        }
    finally:
        after.close()


async def test_a_session_refused_by_the_control_plane_is_kicked(pod: Pod) -> None:
    cid = await pod.join("bob")
    uid = pod.handler.established()[0].uid
    await pod.handler.kick_uid(uid, "session limit reached (2)")
    assert ("kill", cid, "HALT") in pod.mgmt.answers
    await pod.pump()
    assert len(pod.handler.book) == 0  # OpenVPN's DISCONNECT arrived and was absorbed


class Freshness:
    """Whether the fleet view is current, as the view follower would say."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waits: list[float] = []

    async def wait_current(self, seconds: float) -> bool:
        self.waits.append(seconds)
        if not self.event.is_set() and seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.event.wait()
        return self.event.is_set()


@pytest.fixture
def stale(tmp_path: Path) -> Iterator[tuple[Pod, Freshness]]:
    p = Pod(tmp_path, view(user("alice", enabled=False), user("bob")))
    fresh = Freshness()
    p.handler._wait_current = fresh.wait_current
    try:
        yield p, fresh
    finally:
        p.close()


async def test_a_refusal_from_a_view_that_is_not_current_waits_for_it(
    stale: tuple[Pod, Freshness],
) -> None:
    pod, fresh = stale
    cid = pod.mgmt.connect("alice", serial="7")
    await pod.pump()
    assert pod.mgmt.answers_for(cid) == []  # held
    other = await pod.join("bob")  # clients behind the held one are answered meanwhile
    assert pod.mgmt.answers_for(other)[0][0] == "auth"
    pod.fleet = view(user("alice"), user("bob"))  # the view catches up: alice is enabled
    fresh.event.set()
    await asyncio.sleep(0.01)
    assert pod.mgmt.answers_for(cid)[0][0] == "auth"


async def test_a_held_refusal_is_given_once_the_hold_runs_out(
    stale: tuple[Pod, Freshness], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, _ = stale
    monkeypatch.setattr("vpnfleet.agent.clients.HOLD_REFUSAL", 0.05)
    cid = pod.mgmt.connect("alice", serial="7")
    await pod.pump()
    assert pod.mgmt.answers_for(cid) == []
    await asyncio.sleep(0.1)
    assert pod.mgmt.answers_for(cid) == [("deny", cid, 1, "user disabled", "account disabled")]


async def test_a_held_connect_started_over_is_held_once(stale: tuple[Pod, Freshness]) -> None:
    """The client starts over (a new key) while its refusal is held: the first hold ends
    without dropping the second, which is answered once the view is current."""
    pod, fresh = stale
    cid = pod.mgmt.connect("alice", serial="7")
    await pod.pump()
    first = pod.handler._holding[("udp", cid)]
    kid = pod.mgmt.start_over(cid)
    await pod.pump()
    await settle()
    assert first.cancelled()
    second = pod.handler._holding[("udp", cid)]
    assert second is not first and not second.done()
    pod.fleet = view(user("alice"), user("bob"))
    fresh.event.set()
    await asyncio.sleep(0.01)
    assert [(a[0], a[2]) for a in pod.mgmt.answers_for(cid)] == [("auth", kid)]
    assert pod.handler._holding == {}


async def test_a_current_view_refuses_at_once(stale: tuple[Pod, Freshness]) -> None:
    pod, fresh = stale
    fresh.event.set()
    cid = pod.mgmt.connect("alice", serial="7")
    await pod.pump()
    assert pod.mgmt.answers_for(cid)[0][3] == "user disabled"
    assert fresh.waits == [0]  # asked, never waited


# ------------------------------------------------------------------ single sign-on logins


class Logins(SsoLogins):
    """The agent's SSO registry with the control plane's answers played by the test (the
    real registry against a real control plane and IdP: tests/api/test_sso_login.py)."""

    def __init__(self, url: str = "https://vpn.example.test/sso/login/abc") -> None:
        super().__init__(ControlPlane("http://127.0.0.1:9", "t"))
        self.url = url
        self.registered: list[tuple[str, int, int, str, str | None]] = []
        self.outcomes: dict[str, asyncio.Future[LoginOutcome]] = {}
        self.fail: ControlPlaneError | None = None

    async def register(
        self, server: str, cid: int, kid: int, user: str, real_ip: str | None
    ) -> PendingLogin:
        if self.fail is not None:
            raise self.fail
        self.registered.append((server, cid, kid, user, real_ip))
        login_id = f"login-{cid}"
        self.outcomes[login_id] = asyncio.get_running_loop().create_future()
        return PendingLogin(login_id, self.url, 180)

    async def wait(self, login: PendingLogin, timeout: float | None = None) -> LoginOutcome:
        return await self.outcomes[login.id]

    def decide(self, cid: int, admitted: bool, reason: str | None = None) -> None:
        self.outcomes[f"login-{cid}"].set_result(LoginOutcome(admitted, reason))


WEBAUTH = {"IV_SSO": "openurl,webauth,crtext"}


@pytest.fixture
def sso(tmp_path: Path) -> Iterator[tuple[Pod, Logins]]:
    yield from sso_pod(
        tmp_path,
        view(user("alice", auth="cert+sso"), user("bob"), user("carol", auth="cert+sso")),
    )


def sso_pod(
    tmp_path: Path, fleet: FleetView, config: BookConfig | None = None
) -> Iterator[tuple[Pod, Logins]]:
    """A pod on `fleet` whose SSO logins the test decides (`config`: its book's, if not the
    default), closed after the test."""
    p = Pod(tmp_path, fleet)
    if config is not None:
        p.handler.book = SessionBook(config)
    logins = Logins()
    p.handler._sso = logins
    try:
        yield p, logins
    finally:
        p.close()


async def waiting_login(pod: Pod) -> int:
    """alice (cert+sso) connects with a client that can open a web login; her cid."""
    cid = pod.mgmt.connect("alice", serial="7", peer_info=WEBAUTH)
    await pod.pump()
    await settle()
    return cid


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_sso_user_is_sent_the_login_url_and_admitted_after_the_login(
    sso: tuple[Pod, Logins],
) -> None:
    pod, logins = sso
    cid = await waiting_login(pod)
    assert logins.registered == [("udp", cid, 1, "alice", "198.51.100.7")]
    assert pod.mgmt.answers_for(cid) == [
        ("pending", cid, 1, "WEB_AUTH::https://vpn.example.test/sso/login/abc", 190)
    ]
    assert len(pod.handler.book) == 0 and pod.records() == []
    # Another user's CONNECT is answered while alice's login waits.
    other = await pod.join("bob")
    assert pod.mgmt.answers_for(other)[0][0] == "auth"
    logins.decide(cid, True)
    await settle()
    answer = pod.mgmt.answers_for(cid)[-1]
    assert answer[0] == "auth" and answer[3] == ["ifconfig-push 10.200.0.3 255.255.255.0"]
    pod.mgmt.establish(cid)
    await pod.pump()
    assert [b["user"] for k, b in pod.records() if k == "open"] == ["bob", "alice"]


async def test_a_refused_login_is_denied_with_its_reason(sso: tuple[Pod, Logins]) -> None:
    pod, logins = sso
    cid = await waiting_login(pod)
    logins.decide(cid, False, "signed in as another user than the certificate's")
    await settle()
    reason = "signed in as another user than the certificate's"
    assert pod.mgmt.answers_for(cid)[-1] == (
        "deny",
        cid,
        1,
        f"single sign-on refused ({reason})",
        reason,
    )
    assert len(pod.handler.book) == 0 and pod.records() == []


async def test_a_user_disabled_during_the_login_is_refused_after_it(
    sso: tuple[Pod, Logins],
) -> None:
    pod, logins = sso
    cid = await waiting_login(pod)
    pod.fleet = view(user("alice", auth="cert+sso", enabled=False), user("bob"))
    logins.decide(cid, True)
    await settle()
    assert pod.mgmt.answers_for(cid)[-1] == ("deny", cid, 1, "user disabled", "account disabled")


async def test_a_client_without_web_auth_is_refused_at_once(sso: tuple[Pod, Logins]) -> None:
    pod, logins = sso
    cid = pod.mgmt.connect("alice", serial="7")
    await pod.pump()
    (deny,) = pod.mgmt.answers_for(cid)
    assert deny[0] == "deny" and "web login" in str(deny[4])
    assert logins.registered == []


async def test_checks_other_than_the_login_come_first(sso: tuple[Pod, Logins]) -> None:
    """A certificate that is not current is refused without a login."""
    pod, logins = sso
    cid = pod.mgmt.connect("alice", serial="8", peer_info=WEBAUTH)
    await pod.pump()
    assert pod.mgmt.answers_for(cid)[0][:4] == ("deny", cid, 1, "certificate not current")
    assert logins.registered == []


async def test_a_control_plane_that_cannot_register_the_login_means_a_clear_refusal(
    sso: tuple[Pod, Logins],
) -> None:
    pod, logins = sso
    logins.fail = ControlPlaneError("POST /api/v1/agent/sso-logins: 409 no IdP", 409)
    cid = await waiting_login(pod)
    assert pod.mgmt.answers_for(cid) == [
        (
            "deny",
            cid,
            1,
            "single sign-on unavailable",
            "single sign-on login unavailable, try again later",
        )
    ]


async def test_a_client_that_leaves_during_its_login_is_forgotten(
    sso: tuple[Pod, Logins],
) -> None:
    pod, logins = sso
    cid = await waiting_login(pod)
    pod.mgmt.disconnect(cid)
    await pod.pump()
    assert pod.handler._holding == {}
    logins.outcomes[f"login-{cid}"].cancel()  # nobody waits for it any more
    await settle()
    assert [a[0] for a in pod.mgmt.answers_for(cid)] == ["pending"]
    assert len(pod.handler.book) == 0 and pod.records() == []


async def test_a_pending_login_is_not_restarted_by_the_reconcile(sso: tuple[Pod, Logins]) -> None:
    """OpenVPN lists a pending client without an address, like one that never got an answer;
    the reconcile must leave it to its login."""
    pod, logins = sso
    cid = await waiting_login(pod)
    for _ in range(3):
        assert await pod.handler.reconcile("udp")
    assert [a[0] for a in pod.mgmt.answers_for(cid)] == ["pending"]
    logins.decide(cid, True)
    await settle()
    assert pod.mgmt.answers_for(cid)[-1][0] == "auth"


async def test_a_refused_client_is_not_restarted_before_it_hears_why(
    sso: tuple[Pod, Logins],
) -> None:
    """OpenVPN lists a refused client until its next PUSH_REQUEST gets the AUTH_FAILED; a
    restart meanwhile would make it reconnect instead of showing the reason."""
    pod, logins = sso
    cid = await waiting_login(pod)
    logins.decide(cid, False, "signed in as another user than the certificate's")
    await settle()
    pod.mgmt.clients[cid] = FakeClient(cid, "alice", "198.51.100.7", 40000)  # still listed
    for _ in range(3):
        assert await pod.handler.reconcile("udp")
    assert [a[0] for a in pod.mgmt.answers_for(cid)] == ["pending", "deny"]


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[tuple[Pod, Logins]]:
    """A pod whose servers hand out auth tokens (auth-gen-token)."""
    yield from sso_pod(
        tmp_path,
        view(user("alice", auth="cert+sso"), user("bob")),
        BookConfig(NAT, GWPOOL, auth_tokens=True),
    )


@pytest.mark.parametrize(
    ("token", "answer"),
    [
        # A token made for no user name (an older profile) would be good with any
        # certificate: it does not stand for alice's login.
        ({"session_state": "AuthenticatedEmptyUser", "username": ""}, "pending"),
        ({"session_state": "AuthenticatedEmptyUser", "username": "alice"}, "pending"),
        ({"session_state": "Authenticated", "username": "alice"}, "auth"),
        ({"session_state": "Authenticated", "username": "mallory"}, "pending"),
        # A token that ran out is refused, not sent to log in: OpenVPN would carry its
        # first-issue time into the next token, expired from the start. Refused, the client
        # drops it and comes back without one.
        ({"session_state": "Expired", "username": "alice"}, "deny"),
        ({"session_state": "ExpiredEmptyUser", "username": ""}, "deny"),
        ({"session_state": "Invalid", "username": "alice"}, "pending"),
        ({"session_state": "Initial"}, "pending"),
    ],
)
async def test_a_valid_token_stands_for_the_login(
    tokens: tuple[Pod, Logins], token: dict[str, str], answer: str
) -> None:
    pod, logins = tokens
    cid = pod.mgmt.connect("alice", serial="7", peer_info={**WEBAUTH, **token})
    await pod.pump()
    await settle()
    first = pod.mgmt.answers_for(cid)[0]
    assert first[0] == answer
    if answer == "deny":
        assert first[3] == "single sign-on session expired"
    assert bool(logins.registered) is (answer == "pending")


async def test_a_renegotiation_with_an_expired_token_ends_the_session(
    tokens: tuple[Pod, Logins],
) -> None:
    pod, _ = tokens
    cid = pod.mgmt.connect(
        "alice",
        serial="7",
        peer_info={**WEBAUTH, "session_state": "Authenticated", "username": "alice"},
    )
    await pod.pump()
    pod.mgmt.establish(cid)
    await pod.pump()
    pod.mgmt.reauth(cid, serial="7", extra={"session_state": "Authenticated", "username": "alice"})
    await pod.pump()
    assert pod.mgmt.answers_for(cid)[-1][0] == "auth"
    pod.mgmt.reauth(cid, serial="7", extra={"session_state": "Expired", "username": "alice"})
    await pod.pump()
    deny = pod.mgmt.answers_for(cid)[-1]
    assert deny[0] == "deny" and deny[3] == "single sign-on session expired"
    assert pod.records()[-1][0] == "close"


@pytest.mark.parametrize(
    ("state", "kept"),
    [
        ("AuthenticatedEmptyUser", True),  # an older profile's token, still in its lifetime
        ("Initial", False),  # no token at all: a modified client
        ("Invalid", False),
    ],
)
async def test_a_renegotiation_must_present_a_live_token(
    tokens: tuple[Pod, Logins], state: str, kept: bool
) -> None:
    pod, _ = tokens
    valid = {"session_state": "Authenticated", "username": "alice"}
    cid = pod.mgmt.connect("alice", serial="7", peer_info={**WEBAUTH, **valid})
    await pod.pump()
    pod.mgmt.establish(cid)
    await pod.pump()
    pod.mgmt.reauth(cid, serial="7", extra={"session_state": state, "username": ""})
    await pod.pump()
    assert pod.mgmt.answers_for(cid)[-1][0] == ("auth" if kept else "deny")


async def test_without_tokens_a_renegotiation_needs_none(sso: tuple[Pod, Logins]) -> None:
    """A pod whose control plane sends no token secret (older) hands out no tokens."""
    pod, logins = sso
    cid = await waiting_login(pod)
    logins.decide(cid, True)
    await settle()
    pod.mgmt.establish(cid)
    await pod.pump()
    pod.mgmt.reauth(cid, serial="7")
    await pod.pump()
    assert pod.mgmt.answers_for(cid)[-1][0] == "auth"


async def test_an_openvpn_restart_drops_the_answers_still_waiting(
    sso: tuple[Pod, Logins],
) -> None:
    """The restarted OpenVPN numbers clients from 0 again: a login decided after the restart
    must not answer the new client that has its old id."""
    pod, logins = sso
    cid = await waiting_login(pod)
    pod.handler.reset("OpenVPN restarted", "udp")
    assert pod.handler._holding == {}
    decision = logins.outcomes[f"login-{cid}"]
    if not decision.done():  # the wait was cancelled with its task, or it arrives late
        decision.set_result(LoginOutcome(True, None))
    await settle()
    assert [a[0] for a in pod.mgmt.answers_for(cid)] == ["pending"]


async def test_a_client_that_starts_over_gets_one_answer(sso: tuple[Pod, Logins]) -> None:
    """A second CONNECT on the same client id (a new key) while the first one's login waits:
    only the second is answered."""
    pod, logins = sso
    cid = await waiting_login(pod)
    first = logins.outcomes[f"login-{cid}"]
    kid = pod.mgmt.start_over(cid, WEBAUTH)
    await pod.pump()
    await settle()
    assert first.cancelled() or not first.done()
    logins.decide(cid, True)  # the second login (the same test id) is decided
    await settle()
    answers = [a for a in pod.mgmt.answers_for(cid) if a[0] != "pending"]
    assert [(a[0], a[2]) for a in answers] == [("auth", kid)]


def auth_token(signed_in_at: int, issued_at: int | None = None) -> str:
    """An OpenVPN auth token's layout (auth_token.c): session id, first issue, this issue,
    HMAC. The HMAC is OpenVPN's to check (the agent sees only tokens it has accepted)."""
    raw = (
        secrets.token_bytes(12)
        + signed_in_at.to_bytes(8, "big")
        + (issued_at or signed_in_at).to_bytes(8, "big")
        + secrets.token_bytes(32)
    )
    return "SESS_ID_AT_" + base64.b64encode(raw).decode()


@pytest.fixture
def lifetimes(tmp_path: Path) -> Iterator[tuple[Pod, Logins]]:
    """A pod whose servers hand out auth tokens that last an hour."""
    yield from sso_pod(
        tmp_path,
        view(user("alice", auth="cert+sso", max_sessions=2), user("bob")),
        BookConfig(NAT, GWPOOL, auth_tokens=True, sso_lifetime=3600),
    )


async def test_a_single_sign_on_session_ends_when_its_login_is_a_lifetime_old(
    lifetimes: tuple[Pod, Logins],
) -> None:
    """Not at the next renegotiation (up to an hour later): the session of a login made now
    lapses a lifetime from now; one resumed with a token lapses a lifetime after the login
    behind the token (its first issue, kept through renewals and reconnects to any pod).
    Lapsed clients are restarted, so they come back and their users log in again; a
    certificate-only user's session has no such end."""
    pod, logins = lifetimes
    now = time.time()
    cid = await waiting_login(pod)
    logins.decide(cid, True)
    await settle()
    pod.mgmt.establish(cid)
    resumed = pod.mgmt.connect(
        "alice",
        serial="7",
        real_ip="198.51.100.20",
        peer_info={
            **WEBAUTH,
            "session_state": "Authenticated",
            "username": "alice",
            "password": auth_token(int(now) - 3000, int(now) - 60),
        },
    )
    bob = pod.mgmt.connect("bob", serial="7", real_ip="198.51.100.21")
    await pod.pump()
    for c in (resumed, bob):
        pod.mgmt.establish(c)
    await pod.pump()
    assert [pod.mgmt.answers_for(c)[-1][0] for c in (cid, resumed, bob)] == ["auth"] * 3
    book = pod.handler.book

    def lapsing(at: float) -> list[int]:
        return sorted(k.client.cid for k in book.lapsed(at))

    assert lapsing(now + 599) == []
    assert lapsing(now + 601) == [resumed]  # logged in 3000 s ago
    assert lapsing(now + 3602) == [cid, resumed]  # bob never lapses
    assert book.get(cid, "udp") is not None
    # The handler's periodic check restarts what lapsed and closes the session record.
    await pod.handler.end_lapsed_logins(now + 601)
    assert pod.mgmt.answers_for(resumed)[-1] == ("kill", resumed, "RESTART")
    assert pod.records()[-1][0] == "close"
    assert all(a[0] != "kill" for a in pod.mgmt.answers_for(cid))
    await pod.handler.end_lapsed_logins(now + 602)  # once: restarted, not asked again
    assert sum(a[0] == "kill" for a in pod.mgmt.answers_for(resumed)) == 1


async def test_a_token_older_than_the_lifetime_is_refused_at_connect(
    lifetimes: tuple[Pod, Logins],
) -> None:
    """OpenVPN still takes the token (its lifetime was longer, or a second's rounding), but
    the login behind it is older than the lifetime: refused like an expired one, so the
    client comes back without it and logs in; a younger one is admitted without a login."""
    pod, logins = lifetimes
    now = int(time.time())
    answers = []
    for age in (3601, 3500):
        cid = pod.mgmt.connect(
            "alice",
            serial="7",
            real_ip=f"198.51.100.{age % 200}",
            peer_info={
                **WEBAUTH,
                "session_state": "Authenticated",
                "username": "alice",
                "password": auth_token(now - age),
            },
        )
        await pod.pump()
        await settle()
        answers.append(pod.mgmt.answers_for(cid)[0][0])
    assert answers == ["deny", "auth"]
    assert logins.registered == []


def test_the_login_time_is_read_from_an_auth_token() -> None:
    assert token_signed_in_at(auth_token(1_800_000_000, 1_800_003_600)) == 1_800_000_000
    for bad in (None, "", "certificate-only", "SESS_ID_AT_", "SESS_ID_AT_!!!", "SESS_ID_AT_QUJD"):
        assert token_signed_in_at(bad) is None
    # The journal keeps the end across an agent restart.
    record = Client(1, "alice", "nat", "10.8.0.9", None, None, "u1", "t", sso_until=5.0)
    assert Client.from_record(record.to_record()).sso_until == 5.0
    assert Client.from_record({**record.to_record(), "sso_until": None}).sso_until is None
