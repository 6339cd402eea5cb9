"""VPN users sign in to their self-service page with the company's IdP: the real OpenID
provider of tests/oidcidp on loopback, the same IdP settings and redirect URI as VPN single
sign-on; a plain HTTP client follows the IdP's forms as a browser would."""

# ruff: noqa: F811 - the IdP fixtures are imported from test_sso_login and named as arguments

from __future__ import annotations

from contextlib import closing

import httpx

from tests.api.test_sso_login import (  # noqa: F401 - fixtures used by name
    USERS,
    cp_port,
    fleet,
    idp,
    server,
)
from tests.conftest import Server
from tests.oidcidp import Idp, browser_login


def sign_in_with_sso(server: Server, user: str) -> tuple[httpx.Client, httpx.Response]:
    """A browser that started at /console/me/sso, logged in as `user` at the IdP and came
    back: the browser (with its cookies) and the callback's answer."""
    browser = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    start = browser.get("/console/me/sso")
    assert start.status_code == 302
    back = browser_login(
        start.headers["location"], user, USERS[user][0], stop_at=f"{server.url}/sso/callback"
    )
    return browser, browser.get(back)


def test_a_user_signs_in_with_the_idp_and_sees_their_page(
    server: Server, fleet: str, admin: httpx.Client
) -> None:
    browser, answer = sign_in_with_sso(server, "alice")
    with closing(browser):
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/console/me/"
        cookie = next(h for h in answer.headers.get_list("set-cookie") if "vpnfleet_me=" in h)
        assert "HttpOnly" in cookie
        page = browser.get("/console/me/")
        assert page.status_code == 200 and "Hello, alice" in page.text
        # The operators' pages stay closed to a VPN user.
        assert browser.get("/console/users").status_code == 303
    # A VPN connection's login goes on working beside console logins (same callback URL).
    with server.client(fleet) as pod:
        r = pod.post(
            "/api/v1/agent/sso-logins",
            json={"server": "udp", "cid": 5, "kid": 1, "user": "bob", "real_ip": "192.0.2.7"},
        )
        assert r.status_code == 201
    back = browser_login(
        str(r.json()["url"]), "bob", USERS["bob"][0], stop_at=f"{server.url}/sso/callback"
    )
    assert httpx.get(back).status_code == 200


def test_a_replayed_callback_or_an_unknown_person_signs_nobody_in(
    server: Server, fleet: str, admin: httpx.Client
) -> None:
    browser, answer = sign_in_with_sso(server, "alice")
    with closing(browser):
        assert answer.status_code == 303
        again = browser.get(str(answer.request.url))
        # Refused: the browser's binding cookie went with the sign-in, and the login is used.
        assert again.status_code in (403, 409)
        assert "vpnfleet_me=" not in again.headers.get("set-cookie", "")
    assert admin.delete("/api/v1/users/bob").status_code == 204
    browser, answer = sign_in_with_sso(server, "bob")
    with closing(browser):
        assert answer.status_code == 403 and "has no VPN account here" in answer.text
        assert "vpnfleet_me=" not in answer.headers.get("set-cookie", "")
        assert browser.get("/console/me/").status_code == 401
    assert admin.post("/api/v1/users/alice/disable").status_code == 200
    browser, answer = sign_in_with_sso(server, "alice")
    with closing(browser):
        assert answer.status_code == 403 and "disabled" in answer.text


def test_the_sign_in_page_offers_sso_only_when_an_idp_is_configured(
    server: Server, admin: httpx.Client
) -> None:
    page = httpx.get(f"{server.url}/console/me/")
    assert page.status_code == 401 and "/console/me/sso" not in page.text
    assert httpx.get(f"{server.url}/console/me/sso").status_code == 409


def test_the_callback_signs_in_only_the_browser_that_started(server: Server, fleet: str) -> None:
    browser = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    with closing(browser):
        start = browser.get("/console/me/sso")
        back = browser_login(
            start.headers["location"], "alice", USERS["alice"][0],
            stop_at=f"{server.url}/sso/callback",
        )  # fmt: skip
        # The callback URL sent to somebody else (or read from a proxy's log): nobody signed in.
        elsewhere = httpx.get(back)
        assert elsewhere.status_code == 403 and "another browser" in elsewhere.text
        assert "vpnfleet_me=" not in elsewhere.headers.get("set-cookie", "")
        # The browser that started it still can.
        mine = browser.get(back)
        assert mine.status_code == 303
        assert browser.get("/console/me/").status_code == 200


def test_an_address_shared_by_two_users_signs_in_neither(
    server: Server, fleet: str, admin: httpx.Client, idp: Idp
) -> None:
    body = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "public_url": server.url,
        "user_claim": "email",
        "match": "email",
    }
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    _, answer = sign_in_with_sso(server, "bob")
    assert answer.status_code == 303  # bob@corp.test is bob's alone
    r = admin.post("/api/v1/users", json={"name": "shared", "email": "BOB@corp.test"})
    assert r.status_code == 201
    _, answer = sign_in_with_sso(server, "bob")
    assert answer.status_code == 403 and "more than one VPN account" in answer.text
