"""The VPN single sign-on login flow through the control plane, against a real OpenID provider
(django-oauth-toolkit, tests/oidcidp) on loopback, on SQLite and PostgreSQL: a pod registers a
waiting connection, a plain HTTP client follows the short login URL to the IdP's login form
and back to the callback as a browser would, and the pod gets the decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, update
from sqlalchemy.pool import Pool

from tests.conftest import RunningServer, Server, free_port
from tests.oidcidp import Idp, browser_login, running_idp
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.ssologin import REGISTER_AT_ONCE, TIMED_OUT, LoginOutcome, SsoLogins
from vpnfleet.controlplane.models import SsoLogin
from vpnfleet.controlplane.services import sso

USERS: dict[str, tuple[str, str] | tuple[str, str, bool]] = {
    "alice": ("alice-pw-7Hd", "alice@example.test"),
    "bob": ("bob-pw-2Wz", "bob@corp.test"),
    "carol": ("carol-pw-5Tq", "carol@corp.test", False),  # e-mail not verified at the IdP
}


@pytest.fixture(scope="module")
def cp_port() -> int:
    """The control plane's port, fixed for the module: the IdP's registered redirect URI
    names it."""
    return free_port()


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory, cp_port: int) -> Iterator[Idp]:
    callback = f"http://127.0.0.1:{cp_port}/sso/callback"
    with running_idp(tmp_path_factory.mktemp("idp"), callback, USERS) as running:
        yield running


@pytest.fixture
def server(database_url: str, tmp_path: Path, cp_port: int) -> Iterator[Server]:
    running = RunningServer(database_url, tmp_path / "data", port=cp_port)
    try:
        yield running.server
    finally:
        running.stop()


@pytest.fixture
def fleet(server: Server, admin: httpx.Client, idp: Idp) -> str:
    """The IdP configured, users alice and bob; the pod credential of pod1."""
    body = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "public_url": server.url,
        "login_timeout_seconds": 60,
    }
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    for name, (_, mail, *_verified) in USERS.items():
        r = admin.post("/api/v1/users", json={"name": name, "email": mail})
        assert r.status_code == 201, r.text
    return server.pod_token("pod1")


def register(
    server: Server, pod_token: str, user: str, cid: int, real_ip: str = "192.0.2.7"
) -> dict[str, object]:
    with server.client(pod_token) as pod:
        r = pod.post(
            "/api/v1/agent/sso-logins",
            json={"server": "udp", "cid": cid, "kid": 1, "user": user, "real_ip": real_ip},
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


def decisions(server: Server, pod_token: str) -> list[dict[str, object]]:
    with server.client(pod_token) as pod:
        r = pod.get("/api/v1/agent/sso-decisions")
    assert r.status_code == 200, r.text
    return list(r.json()["decisions"])


def follow(server: Server, login_url: str, user: str) -> str:
    """Open the login URL and log in at the IdP as `user`: the callback URL it sends back."""
    return browser_login(login_url, user, USERS[user][0], stop_at=f"{server.url}/sso/callback")


def test_the_certificates_user_logs_in_and_the_pod_admits(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    login = register(server, fleet, "alice", cid=11)
    url = str(login["url"])
    # Short enough for OpenVPN's management line limit, on the control plane's public URL.
    assert url.startswith(f"{server.url}/sso/login/") and len(url) < 120
    assert login["timeout_seconds"] == 60
    assert decisions(server, fleet) == []  # nothing decided yet

    back = follow(server, url, "alice")
    page = httpx.get(back)
    assert page.status_code == 200 and "Signed in" in page.text
    got = decisions(server, fleet)
    assert got == [
        {
            "id": login["id"],
            "server": "udp",
            "cid": 11,
            "kid": 1,
            "user": "alice",
            "admitted": True,
            "reason": None,
        }
    ]
    assert decisions(server, fleet) == []  # handed out once

    # The callback replayed (a browser's back button, or someone who saw the URL): refused,
    # nothing new for the pod.
    again = httpx.get(back)
    assert again.status_code == 409 and "already completed" in again.text
    # The login URL cannot be used for a second login either.
    reopened = httpx.get(url)
    assert reopened.status_code == 409 and "already used" in reopened.text
    assert decisions(server, fleet) == []

    audit = admin.get("/api/v1/audit/admin", params={"action": "sso.login"}).json()
    assert len(audit) == 1
    entry = audit[0]
    assert entry["target"] == "alice" and entry["actor"] == "sso-callback"
    assert entry["after"]["admitted"] is True and entry["after"]["idp_user"] == "alice"
    assert entry["after"]["pod"] == "pod1" and entry["after"]["cid"] == 11
    refused = admin.get("/api/v1/audit/admin", params={"action": "sso.refused"}).json()
    assert [a["after"]["why"] for a in refused] == ["replayed callback"]
    text = json.dumps(audit + refused)
    code = httpx.URL(back).params["code"]
    state = httpx.URL(back).params["state"]
    for secret in (code, state, idp.client_secret):
        assert secret not in text


def test_another_user_at_the_idp_is_refused(
    server: Server, admin: httpx.Client, fleet: str
) -> None:
    """Alice's profile with bob's login (a stolen profile) is refused, with the reason."""
    login = register(server, fleet, "alice", cid=12)
    page = httpx.get(follow(server, str(login["url"]), "bob"))
    assert page.status_code == 403 and "another user" in page.text
    [decision] = decisions(server, fleet)
    assert decision["cid"] == 12 and decision["admitted"] is False
    assert "another user than the certificate" in str(decision["reason"])
    [entry] = admin.get("/api/v1/audit/admin", params={"action": "sso.login"}).json()
    assert entry["after"]["idp_user"] == "bob" and entry["after"]["admitted"] is False


def test_matching_by_email(server: Server, admin: httpx.Client, fleet: str, idp: Idp) -> None:
    body = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "public_url": server.url,
        "user_claim": "email",
        "match": "email",
    }
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    login = register(server, fleet, "bob", cid=13)
    assert httpx.get(follow(server, str(login["url"]), "bob")).status_code == 200
    assert [d["admitted"] for d in decisions(server, fleet)] == [True]
    # An address the IdP has not verified proves nothing: refused, with the reason.
    login = register(server, fleet, "carol", cid=14)
    page = httpx.get(follow(server, str(login["url"]), "carol"))
    assert page.status_code == 403 and "not verified" in page.text
    [refused] = decisions(server, fleet)
    assert refused["admitted"] is False and "not verified" in str(refused["reason"])


def test_same_address_refuses_a_browser_elsewhere(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    """With same_address, the login must come from the VPN client's own address: a profile
    stolen and used elsewhere cannot be completed by its owner's (phished) login."""
    body = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "public_url": server.url,
        "same_address": True,
    }
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    elsewhere = register(server, fleet, "alice", cid=21, real_ip="192.0.2.7")
    page = httpx.get(follow(server, str(elsewhere["url"]), "alice"))
    assert page.status_code == 403 and "another address" in page.text
    [refused] = decisions(server, fleet)
    assert refused["admitted"] is False
    # The browser here is on 127.0.0.1, as is this VPN client.
    here = register(server, fleet, "alice", cid=22, real_ip="127.0.0.1")
    assert httpx.get(follow(server, str(here["url"]), "alice")).status_code == 200
    assert [d["admitted"] for d in decisions(server, fleet)] == [True]


def test_a_login_completed_too_late_is_refused(server: Server, fleet: str) -> None:
    """The browser gets to the IdP in time but comes back after the login's lifetime. Time
    passing is forced by moving the login's expiry into the past in the database (waiting
    the 30 s minimum would only slow the test)."""
    login = register(server, fleet, "alice", cid=14)
    back = follow(server, str(login["url"]), "alice")
    engine = create_engine(server.database_url)
    try:
        with engine.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(update(SsoLogin).where(SsoLogin.id == login["id"]).values(expires_at=past))
    finally:
        engine.dispose()
    page = httpx.get(back)
    assert page.status_code == 403 and "took too long" in page.text
    [decision] = decisions(server, fleet)
    assert decision["admitted"] is False and decision["reason"] == "the login took too long"
    # An expired login URL is not sent to the IdP at all.
    late = register(server, fleet, "alice", cid=15)
    engine = create_engine(server.database_url)
    try:
        with engine.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(update(SsoLogin).where(SsoLogin.id == late["id"]).values(expires_at=past))
    finally:
        engine.dispose()
    page = httpx.get(str(late["url"]))
    assert page.status_code == 410 and "expired" in page.text


def test_bad_requests_are_refused(server: Server, admin: httpx.Client, fleet: str) -> None:
    assert httpx.get(f"{server.url}/sso/login/nonexistent").status_code == 404
    assert httpx.get(f"{server.url}/sso/callback").status_code == 400
    r = httpx.get(f"{server.url}/sso/callback", params={"state": "made-up", "code": "x"})
    assert r.status_code == 400 and "unknown" in r.text
    # A pod sees only its own logins' decisions.
    login = register(server, fleet, "alice", cid=16)
    other = server.pod_token("pod2")
    assert httpx.get(follow(server, str(login["url"]), "alice")).status_code == 200
    assert decisions(server, other) == []
    assert [d["cid"] for d in decisions(server, fleet)] == [16]
    # Only a pod credential registers logins; an unknown user and bad fields are refused.
    body = {"server": "udp", "cid": 1, "kid": 1, "user": "alice"}
    assert admin.post("/api/v1/agent/sso-logins", json=body).status_code == 403
    with server.client(fleet) as pod:
        r = pod.post("/api/v1/agent/sso-logins", json={**body, "user": "nobody"})
        assert r.status_code == 404
        r = pod.post("/api/v1/agent/sso-logins", json={**body, "cid": -1})
        assert r.status_code == 422
        r = pod.post("/api/v1/agent/sso-logins", json={**body, "extra": 1})
        assert r.status_code == 422


def test_without_an_idp_no_login_is_registered(server: Server, admin: httpx.Client) -> None:
    assert admin.post("/api/v1/users", json={"name": "alice"}).status_code == 201
    pod = server.pod_token("pod1")
    with server.client(pod) as c:
        r = c.post(
            "/api/v1/agent/sso-logins",
            json={"server": "udp", "cid": 1, "kid": 1, "user": "alice"},
        )
    assert r.status_code == 409 and "no identity provider" in r.json()["detail"]


def long_poll(
    server: Server, pod_token: str, wait: float, client_timeout: float | None = None
) -> tuple[list[dict[str, object]], float]:
    """One long poll for decisions: what it got, and the monotonic time it was answered."""
    with server.client(pod_token) as pod:
        r = pod.get(
            "/api/v1/agent/sso-decisions",
            params={"wait": wait},
            timeout=client_timeout or wait + 10,
        )
    assert r.status_code == 200, r.text
    return list(r.json()["decisions"]), time.monotonic()


def test_a_long_poll_is_answered_as_soon_as_the_login_is_decided(
    server: Server, fleet: str
) -> None:
    """The agent's long poll gets a decision a moment after the user's browser comes back,
    whether the browser reached the replica the poll waits on or another replica of the same
    database; with nothing decided it answers empty when its wait is over; a stopping replica
    answers its waiting polls at once instead of holding them through its shutdown grace."""
    got, done = long_poll(server, fleet, 1.0)
    asked = done - 1.0
    assert got == [] and done - asked >= 0.9

    other = RunningServer(server.database_url, server.data_dir)
    try:
        for where in (server, other.server):  # the poll's replica, then the other one
            login = register(server, fleet, "alice", cid=41)
            back = follow(server, str(login["url"]), "alice")
            with ThreadPoolExecutor(1) as pool:
                polled = pool.submit(long_poll, where, fleet, 20.0)
                time.sleep(1.0)  # the poll is waiting
                assert not polled.done()
                assert httpx.get(back).status_code == 200
                called_back = time.monotonic()
                got, answered = polled.result(timeout=20)
            assert [d["id"] for d in got] == [login["id"]]
            # The same replica rings at once; the other one looks every 0.2 s.
            assert answered - called_back < 1.0, (where.url, answered - called_back)

        with ThreadPoolExecutor(1) as pool:
            polled = pool.submit(long_poll, other.server, fleet, 20.0)
            time.sleep(1.0)
            took = other.stop()
            got, answered = polled.result(timeout=20)
        assert got == [] and took < 3.0
    finally:
        other.stop()


def test_decisions_are_not_taken_by_a_poll_whose_agent_is_gone(server: Server, fleet: str) -> None:
    """An agent that gave up on its long poll (restarted, timed out) has not read what that
    poll would have answered: the decision stays for its next poll."""
    login = register(server, fleet, "alice", cid=42)
    back = follow(server, str(login["url"]), "alice")
    with server.client(fleet) as pod, pytest.raises(httpx.ReadTimeout):
        pod.get("/api/v1/agent/sso-decisions", params={"wait": 20}, timeout=0.5)
    time.sleep(0.3)
    assert httpx.get(back).status_code == 200
    time.sleep(0.5)  # the abandoned poll has woken and looked
    assert [d["id"] for d in decisions(server, fleet)] == [login["id"]]


def test_a_long_poll_may_not_wait_forever(server: Server, fleet: str) -> None:
    with server.client(fleet) as pod:
        for wait in (-1, 26, "soon"):
            r = pod.get("/api/v1/agent/sso-decisions", params={"wait": wait})
            assert r.status_code == 422, (wait, r.text)


def test_the_code_is_redeemed_at_the_idp_holding_no_connection(
    server: Server, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IdP's token endpoint can take seconds: meanwhile the callback holds no database
    connection, so no transaction (on SQLite every one takes the database's write lock: every
    other request, the pods' polls for decisions too, waited for the IdP). The server runs in
    this process, so its pool's check-outs and the exchange can be watched."""
    held: dict[int, int] = {}  # connection record -> thread holding it
    at_exchange: list[list[int]] = []
    real = sso.exchange_code

    def watched_exchange(*args: Any, **kwargs: Any) -> Any:
        me = threading.get_ident()
        at_exchange.append([rec for rec, thread in held.items() if thread == me])
        time.sleep(0.3)  # a slow IdP
        return real(*args, **kwargs)

    def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
        held[id(record)] = threading.get_ident()

    def checkin(_dbapi: Any, record: Any) -> None:
        held.pop(id(record), None)

    monkeypatch.setattr(sso, "exchange_code", watched_exchange)
    event.listen(Pool, "checkout", checkout)
    event.listen(Pool, "checkin", checkin)
    try:
        login = register(server, fleet, "alice", cid=43)
        back = follow(server, str(login["url"]), "alice")
        assert httpx.get(back).status_code == 200
    finally:
        event.remove(Pool, "checkout", checkout)
        event.remove(Pool, "checkin", checkin)
    assert at_exchange == [[]]
    assert [d["id"] for d in decisions(server, fleet)] == [login["id"]]


async def test_the_agents_side_waits_for_the_decision(server: Server, fleet: str) -> None:
    """The agent's own control-plane client and login waiter (agent/ssologin.py): 20 logins
    wait at once; the one whose user logs in (the browser runs in a thread) is admitted, a
    wrong user's is refused with the reason, and the others time out, refused, on their own
    clock. Polling runs only while logins wait."""
    cp = ControlPlane(server.url, fleet)
    logins = SsoLogins(cp, poll_interval=0.2)
    try:
        pending = [
            await logins.register("udp", 100 + i, 1, "alice", "192.0.2.9") for i in range(20)
        ]
        assert len({p.url for p in pending}) == 20 and all(len(p.url) < 120 for p in pending)
        ok, wrong, *rest = pending
        waits = [asyncio.create_task(logins.wait(p, timeout=60.0)) for p in (ok, wrong)]
        waits += [asyncio.create_task(logins.wait(p, timeout=2.0)) for p in rest]

        def browse(url: str, user: str) -> int:
            return httpx.get(follow(server, url, user)).status_code

        assert await asyncio.to_thread(browse, ok.url, "alice") == 200
        assert await asyncio.to_thread(browse, wrong.url, "bob") == 403
        outcomes = await asyncio.gather(*waits)
        assert outcomes[0] == LoginOutcome(True, None)
        assert outcomes[1].admitted is False and "another user" in str(outcomes[1].reason)
        assert all(o == LoginOutcome(False, TIMED_OUT) for o in outcomes[2:])
        assert logins.waiting == 0
        # Nothing waits: the poller ends (after a request that was on its way, if any) and
        # asks no more.
        for _ in range(100):
            if not logins.polling:
                break
            await asyncio.sleep(0.05)
        assert not logins.polling
        polls = logins.polls
        await asyncio.sleep(0.6)
        assert logins.polls == polls
        with pytest.raises(ControlPlaneError) as err:
            await logins.register("udp", 1, 1, "nobody", None)
        assert err.value.status == 404
    finally:
        await logins.close()
        await cp.close()


async def test_a_burst_of_connects_all_get_their_login_url(server: Server, fleet: str) -> None:
    """200 connections of SSO users at once on one pod (a morning rush): every one gets its
    URL, and the registrations never take more than a few of the agent's connections to the
    control plane at a time (500 at once used to exhaust its pool: all refused)."""
    cp = ControlPlane(server.url, fleet)
    logins = SsoLogins(cp)
    in_flight, most = 0, 0
    real = cp.sso_login

    async def counted(body: dict[str, object]) -> dict[str, object]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await real(body)
        finally:
            in_flight -= 1

    cp.sso_login = counted  # type: ignore[method-assign]
    try:
        got = await asyncio.gather(
            *(logins.register("udp", 1000 + i, 1, "alice", "192.0.2.9") for i in range(200))
        )
        assert len({p.url for p in got}) == 200
        assert most == REGISTER_AT_ONCE
    finally:
        await logins.close()
        await cp.close()


def test_concurrent_replays_decide_once(server: Server, fleet: str) -> None:
    """The same callback sent 6 times at once (a replay racing the real one): exactly one
    request decides the login, the others are refused, and the pod gets one decision."""
    login = register(server, fleet, "alice", cid=17)
    back = follow(server, str(login["url"]), "alice")
    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(lambda _: httpx.get(back, timeout=30).status_code, range(6)))
    assert codes == [200, 409, 409, 409, 409, 409]
    assert [d["admitted"] for d in decisions(server, fleet)] == [True]


def test_an_idp_away_at_login_leaves_the_link_usable(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    """The IdP cannot be reached when the browser opens the link (the settings point at a
    loopback port nothing listens on): a 502 page naming the cause; once the IdP is back the
    same link works."""
    good = admin.get("/api/v1/idp").json()
    dead = f"http://127.0.0.1:{free_port()}/o"
    body = {"issuer": dead, "client_id": idp.client_id, "public_url": server.url}
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    login = register(server, fleet, "alice", cid=18)
    page = httpx.get(str(login["url"]))
    assert page.status_code == 502 and "cannot reach the IdP" in page.text
    restore = {k: good[k] for k in ("issuer", "client_id", "public_url", "login_timeout_seconds")}
    assert admin.put("/api/v1/idp", json=restore).status_code == 200
    assert httpx.get(follow(server, str(login["url"]), "alice")).status_code == 200
    assert [d["cid"] for d in decisions(server, fleet)] == [18]
