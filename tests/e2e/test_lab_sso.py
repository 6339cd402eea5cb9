"""Single sign-on for VPN connections end to end (docs/sso.md): the lab with real OpenVPN
servers and stock 2.6 clients, the control plane, and a real OpenID provider
(django-oauth-toolkit, tests/oidcidp) running in the control plane's namespace. A plain HTTP
client plays the user's browser: it opens the URL the stock client received (``WEB_AUTH::``),
logs in at the IdP's form and comes back to the control plane's callback. The lab group, which
may reach the backend, is managed by the IdP's group claim: sam is in it only through his
group at the IdP.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import api, fetch, sessions
from tests.oidcidp import browser_login, running_idp
from tests.polling import until
from vpnfleet import tlspin
from vpnfleet.lab import runner
from vpnfleet.lab.runner import LAB_GROUP, LabInfo, LabUser
from vpnfleet.lab.topology import LabCommandError

pytestmark = [pytest.mark.e2e]

USERS = (
    LabUser("sam", "nat", lab_access=False),  # logs in as himself; the lab group from the IdP
    LabUser("sid", "nat"),  # logs in at the IdP as sam: refused
    LabUser("sue", "nat"),  # a client that does not announce web auth
    LabUser("stu", "nat"),  # never finishes the login
    LabUser("ted", "nat"),  # certificate only (auth policy cert)
)
IDP_USERS = {
    "sam": ("sam-pw-4Kq", "sam@corp.test"),
    "sid": ("sid-pw-9Lm", "sid@corp.test"),
}
IDP_LAB_GROUP = "vpn-lab"  # the IdP group mapped to the lab group
LOGIN_TIMEOUT = 30  # the shortest the control plane allows
WEBAUTH = ("--setenv", "IV_SSO", "webauth")
_URL = re.compile(r"WEB_AUTH::([^\s']+)")  # the client logs it inside quotes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vs") as info:
        with running_idp(
            tmp_path_factory.mktemp("idp"),
            f"{info.url}/sso/callback",
            IDP_USERS,
            host=str(info.plan.admin.ns_address.ip),
            netns=info.plan.ns("cp"),
        ) as idp:
            idp.set_groups("sam", [IDP_LAB_GROUP, "idp-unmapped"])
            body = {
                "issuer": idp.issuer,
                "client_id": idp.client_id,
                "client_secret": idp.client_secret,
                "public_url": info.url,
                "login_timeout_seconds": LOGIN_TIMEOUT,
                "allow_http": True,  # the test IdP serves plain http inside the lab
                "scopes": ["openid", "profile", "email", "groups"],
                "groups_claim": "groups",
                "group_map": {IDP_LAB_GROUP: LAB_GROUP},
            }
            api(info, "PUT", "/api/v1/idp", body)
            for user in ("sam", "sid", "sue", "stu"):
                api(info, "PATCH", f"/api/v1/users/{user}", {"auth_policy": "cert+sso"})
            yield info


def client_log(info: LabInfo, user: str) -> str:
    path = info.dir / "clients" / f"{user}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def login_url(info: LabInfo, user: str) -> str | None:
    """The last login URL the user's client received (a client that reconnected has a new
    one: each is bound to one connection)."""
    found = _URL.findall(client_log(info, user))
    return str(found[-1]) if found else None


async def browse(info: LabInfo, url: str, as_user: str) -> httpx.Response:
    """The user's browser: the login URL, the IdP's form, back to the control plane."""
    ctx = tlspin.pinned_context(info.ca_file)
    password = IDP_USERS[as_user][0]
    back = await asyncio.to_thread(
        browser_login, url, as_user, password, f"{info.url}/sso/callback", ctx
    )
    return await asyncio.to_thread(httpx.get, back, verify=ctx, timeout=30)


def session_end(lab: LabInfo, session: dict[str, Any]) -> float | None:
    """When the agent of the session's pod will end it for its login's lifetime (Unix
    seconds), from the agent's client journal; None if it has no end (or is not there)."""
    path = lab.dir / session["pod"] / "clients.journal"
    end = None
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        client = entry.get("client") or {}
        if client.get("user") == session["user"] and client["tunnel_ip"] == session["tunnel_ip"]:
            end = client.get("sso_until")  # the latest record of that address
    return None if end is None else float(end)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_user_logs_in_and_the_tunnel_comes_up(lab: LabInfo) -> None:
    # The server's keepalive asks for a restart after 60 s of silence; 12 s here, so that the
    # move below is noticed sooner (the server pings every 10 s).
    fast_restart = ("--pull-filter", "ignore", "ping-restart", "--ping-restart", "12")
    await runner.start_client(lab, "sam", wait=False, extra=(*WEBAUTH, *fast_restart))
    try:
        url = await until(lambda: login_url(lab, "sam"), 20, "the login URL at sam's client")
        assert url.startswith(f"{lab.url}/sso/login/") and len(url) < 120
        assert "AUTH_PENDING" in client_log(lab, "sam")
        assert await runner.client_address(lab, "sam") is None  # nothing before the login
        assert api(lab, "GET", "/api/v1/users/sam")["groups"] == []
        page = await browse(lab, url, "sam")
        assert page.status_code == 200 and "Signed in" in page.text
        signed_in_at = time.time()
        back_at = time.monotonic()
        await until(lambda: runner.client_address(lab, "sam"), 10, "sam's tunnel")
        admitted = time.monotonic() - back_at
        assert admitted < 5, admitted  # the decision itself reaches the pod in ms (long poll)
        (session,) = await until(lambda: sessions(lab, user="sam"), 10, "sam's session")
        assert session["pod"] in {"pod1", "pod2"}
        # The session ends a lifetime after the login, whatever renegotiations come between.
        lifetime = api(lab, "GET", "/api/v1/idp")["session_lifetime_seconds"]
        end = await until(lambda: session_end(lab, session), 10, "sam's session end")
        assert abs(end - (signed_in_at + lifetime)) < 15, (end, signed_in_at, lifetime)
        # The login made him a member of the lab group (his group at the IdP), and the pod
        # lets him through for it: to the backend (NAT: the backend sees the pod's address).
        assert api(lab, "GET", "/api/v1/users/sam")["groups"] == [LAB_GROUP]

        async def through_tunnel() -> dict[str, Any] | None:
            try:
                return await fetch(lab, "sam")
            except LabCommandError:  # not let through (yet): try again
                return None

        seen = await until(through_tunnel, 25, "the backend through sam's tunnel")
        assert seen["remote_addr"] == str(lab.plan.pod_ip(int(session["pod"].removeprefix("pod"))))
        # The login URL was for this one connection: it cannot be used again; nor can the
        # IdP's answer (the callback, as a browser's history or someone who saw it has it).
        ctx = tlspin.pinned_context(lab.ca_file)
        again = await asyncio.to_thread(httpx.get, url, verify=ctx, timeout=30)
        assert again.status_code == 409
        replayed = await asyncio.to_thread(httpx.get, str(page.url), verify=ctx, timeout=30)
        assert replayed.status_code == 409 and "already completed" in replayed.text
        assert [s["id"] for s in sessions(lab, user="sam")] == [session["id"]]

        # The load balancer now sends sam's packets to the other pod (as when a node goes
        # away): the client hears nothing back, restarts (a soft restart, which keeps its
        # auth token) and reconnects there. The token the first pod handed out stands for
        # the login: no new one is asked.
        other = "pod2" if session["pod"] == "pod1" else "pod1"
        await runner.pin_client(lab, "sam", int(other.removeprefix("pod")))

        async def on_other_pod() -> list[dict[str, Any]]:
            return [s for s in sessions(lab, user="sam") if s["pod"] == other]

        (moved,) = await until(on_other_pod, 40, "sam's session on the other pod")
        assert moved["id"] != session["id"]
        assert len(_URL.findall(client_log(lab, "sam"))) == 1, "a second login was asked"
        # The other pod ends it at the same time: a lifetime after the login behind the token
        # (read from the token OpenVPN accepted), not after this reconnect.
        moved_end = await until(lambda: session_end(lab, moved), 10, "the moved session's end")
        assert abs(moved_end - end) <= 1, (moved_end, end)
        await until(lambda: runner.client_address(lab, "sam"), 10, "sam's tunnel again")
        assert (await fetch(lab, "sam"))["remote_addr"] == str(
            lab.plan.pod_ip(int(other.removeprefix("pod")))
        )
    finally:
        await runner.stop_client(lab, "sam")


@pytest.mark.asyncio(loop_scope="module")
async def test_someone_elses_login_is_refused(lab: LabInfo) -> None:
    """sid's profile, but sam's login at the IdP: a stolen profile does not get in."""
    await runner.start_client(lab, "sid", wait=False, extra=WEBAUTH)
    try:
        url = await until(lambda: login_url(lab, "sid"), 20, "the login URL at sid's client")
        page = await browse(lab, url, "sam")
        assert page.status_code == 403 and "another user" in page.text
        await until(
            lambda: "AUTH_FAILED,signed in as another user" in client_log(lab, "sid"),
            10,
            "the refusal in sid's client log",
        )
        assert await runner.client_address(lab, "sid") is None
        assert sessions(lab, user="sid") == []
    finally:
        await runner.stop_client(lab, "sid")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_without_web_login_is_told_why(lab: LabInfo) -> None:
    await runner.start_client(lab, "sue", wait=False)
    try:
        await until(
            lambda: "AUTH_FAILED,single sign-on login required" in client_log(lab, "sue"),
            20,
            "the refusal in sue's client log",
        )
        assert login_url(lab, "sue") is None
        assert await runner.client_address(lab, "sue") is None
    finally:
        await runner.stop_client(lab, "sue")


@pytest.mark.asyncio(loop_scope="module")
async def test_certificate_only_users_connect_without_a_login(lab: LabInfo) -> None:
    await runner.start_client(lab, "ted", extra=WEBAUTH)
    try:
        assert login_url(lab, "ted") is None
        await until(lambda: sessions(lab, user="ted"), 10, "ted's session")
    finally:
        await runner.stop_client(lab, "ted")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_login_never_completed_is_refused_at_the_timeout(lab: LabInfo) -> None:
    started = time.monotonic()
    await runner.start_client(lab, "stu", wait=False, extra=WEBAUTH)
    try:
        await until(lambda: login_url(lab, "stu"), 20, "the login URL at stu's client")
        await until(
            lambda: "AUTH_FAILED,single sign-on login timed out" in client_log(lab, "stu"),
            LOGIN_TIMEOUT + 20,
            "the timeout in stu's client log",
        )
        assert time.monotonic() - started >= LOGIN_TIMEOUT - 1
        assert await runner.client_address(lab, "stu") is None
    finally:
        await runner.stop_client(lab, "stu")
