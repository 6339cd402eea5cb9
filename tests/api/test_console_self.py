"""Self-service: a one-time sign-in link, a user's own devices (each its own certificate),
profiles and OpenVPN Connect import links, and what agents are told about devices."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509

from tests.api.test_console import CSRF, browser, make_account, sign_in
from tests.conftest import Server

LINK = re.compile(r'value="(http://[^"]+/console/me/enter/[^"]+)"')


def sign_in_link(server: Server, user: str) -> str:
    with server.client() as api:
        if not any(a["name"] == "olga" for a in api.get("/api/v1/console-accounts").json()):
            make_account(server, "olga", "operator")
    with browser(server) as op:
        assert sign_in(op, "olga").status_code == 303
        page = op.get(f"/console/users/{user}")
        token = CSRF.search(page.text)
        assert token
        r = op.post(f"/console/users/{user}/sign-in-link", data={"csrf": token.group(1)})
        assert r.status_code == 200
        found = LINK.search(r.text)
        assert found, r.text
        return found.group(1)


def enter(client: httpx.Client, link: str) -> httpx.Response:
    path = link.split("127.0.0.1", 1)[1].split("/", 1)[1]
    return client.post("/" + path)


def csrf(client: httpx.Client) -> str:
    r = client.get("/console/me/")
    assert r.status_code == 200, r.text
    found = CSRF.search(r.text)
    assert found
    return found.group(1)


def agent_view(server: Server, user: str) -> dict[str, object]:
    with server.client(server.pod_token(f"pod-{secrets.token_hex(3)}")) as agent:
        snap = agent.get("/api/v1/agent/snapshot").json()
    return next(u for u in snap["users"] if u["name"] == user)


def profile_serial(profile: str) -> int:
    pem = profile.split("<cert>")[1].split("</cert>")[0].strip()
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


@pytest.fixture
def carol(server: Server) -> Iterator[httpx.Client]:
    with server.client() as api:
        api.post("/api/v1/users", json={"name": "carol"}).raise_for_status()
    link = sign_in_link(server, "carol")
    with browser(server) as c:
        r = enter(c, link)
        assert r.status_code == 303 and r.headers["location"] == "/console/me/"
        yield c


def test_a_sign_in_link_works_once_and_is_not_spent_by_opening_it(server: Server) -> None:
    with server.client() as api:
        api.post("/api/v1/users", json={"name": "carol"}).raise_for_status()
    link = sign_in_link(server, "carol")
    path = "/" + link.split("127.0.0.1", 1)[1].split("/", 1)[1]
    with browser(server) as c:
        assert c.get(path).status_code == 200  # a mail scanner opening it spends nothing
        assert c.get(path).status_code == 200
        r = c.post(path)
        assert r.status_code == 303
        cookie = next(h for h in r.headers.get_list("set-cookie") if "vpnfleet_me=" in h)
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        page = c.get("/console/me/")
        assert page.status_code == 200 and "Hello, carol" in page.text
        # The user's session opens none of the operators' pages.
        assert c.get("/console/users").status_code == 303
    with browser(server) as other:
        assert other.post(path).status_code == 410
        assert other.get(path).status_code == 410
        assert other.get("/console/me/").status_code == 401
    with server.client() as api:
        log = api.get("/api/v1/audit/admin", params={"action": "user.sign-in-link"}).json()
        assert [(e["actor"], e["target"]) for e in log] == [("console:olga", "carol")]


def test_each_device_has_its_own_certificate_and_agents_admit_it(
    server: Server, carol: httpx.Client
) -> None:
    token = csrf(carol)
    for label in ("work laptop", "phone"):
        r = carol.post("/console/me/devices", data={"csrf": token, "device": label})
        assert r.status_code == 303
    page = carol.get("/console/me/")
    serials = re.findall(r"/console/me/devices/(\d+)/profile", page.text)
    assert len(serials) == 2 and "work laptop" in page.text and "phone" in page.text
    view = agent_view(server, "carol")
    assert sorted(view["device_serials"]) == sorted(serials)  # type: ignore[arg-type]
    main = view["cert_serial"]
    assert main not in serials
    r = carol.post(f"/console/me/devices/{serials[0]}/profile", data={"csrf": token})
    assert r.status_code == 200
    assert r.headers["content-disposition"].startswith('attachment; filename="carol-')
    assert profile_serial(r.text) == int(serials[0])
    # Removing one device: gone from what agents admit and in the CRL; the other stays.
    r = carol.post(f"/console/me/devices/{serials[0]}/revoke", data={"csrf": token})
    assert r.status_code == 303
    view = agent_view(server, "carol")
    assert view["device_serials"] == [serials[1]]
    assert view["cert_serial"] == main
    with server.client() as api:
        crl = x509.load_pem_x509_crl(api.get("/api/v1/pki/crl").content)
        assert crl.get_revoked_certificate_by_serial_number(int(serials[0])) is not None
        assert crl.get_revoked_certificate_by_serial_number(int(serials[1])) is None
        actions = [e["action"] for e in api.get("/api/v1/audit/admin").json()]
        assert {"device.add", "device.revoke", "user.profile"} <= set(actions)
    r = carol.post(f"/console/me/devices/{serials[0]}/profile", data={"csrf": token})
    assert r.status_code == 409  # a removed device's key is not handed out


def test_an_import_link_serves_the_profile_once(server: Server, carol: httpx.Client) -> None:
    token = csrf(carol)
    carol.post("/console/me/devices", data={"csrf": token, "device": "tablet"})
    serial = re.findall(r"/console/me/devices/(\d+)/profile", carol.get("/console/me/").text)[0]
    r = carol.post(f"/console/me/devices/{serial}/import-link", data={"csrf": token})
    assert r.status_code == 200
    found = re.search(r'href="(openvpn://import-profile/http://[^"]+)"', r.text)
    assert found
    url = found.group(1).removeprefix("openvpn://import-profile/")
    with httpx.Client(timeout=30) as app:  # OpenVPN Connect: no cookie, only the link
        first = app.get(url)
        assert first.status_code == 200
        assert profile_serial(first.text) == int(serial)
        assert app.get(url).status_code == 410


def test_a_user_cannot_touch_another_users_device_or_post_without_csrf(
    server: Server, carol: httpx.Client
) -> None:
    with server.client() as api:
        api.post("/api/v1/users", json={"name": "bob"}).raise_for_status()
    token = csrf(carol)
    assert carol.post("/console/me/devices", data={"device": "x"}).status_code == 403
    assert (
        carol.post("/console/me/devices", data={"csrf": token, "device": "  "}).status_code == 422
    )
    carol.post("/console/me/devices", data={"csrf": token, "device": "laptop"})
    carol_serial = re.findall(r"/devices/(\d+)/profile", carol.get("/console/me/").text)[0]
    link = sign_in_link(server, "bob")
    with browser(server) as bob:
        assert enter(bob, link).status_code == 303
        bob_token = csrf(bob)
        r = bob.post(f"/console/me/devices/{carol_serial}/revoke", data={"csrf": bob_token})
        assert r.status_code == 404
        r = bob.post(f"/console/me/devices/{carol_serial}/profile", data={"csrf": bob_token})
        assert r.status_code == 404
    assert agent_view(server, "carol")["device_serials"] == [carol_serial]


def test_a_disabled_user_is_signed_out_and_cannot_add_devices(
    server: Server, carol: httpx.Client
) -> None:
    assert carol.get("/console/me/").status_code == 200
    with server.client() as api:
        api.post("/api/v1/users/carol/disable").raise_for_status()
    assert carol.get("/console/me/").status_code == 401


def test_devices_are_limited(server: Server, carol: httpx.Client) -> None:
    from vpnfleet.controlplane.services.devices import MAX_DEVICES

    token = csrf(carol)
    for i in range(MAX_DEVICES):
        r = carol.post("/console/me/devices", data={"csrf": token, "device": f"d{i}"})
        assert r.status_code == 303
    r = carol.post("/console/me/devices", data={"csrf": token, "device": "one more"})
    assert r.status_code == 409
    assert f"at most {MAX_DEVICES} devices" in r.text


def test_an_operator_removes_a_device_or_revokes_everything(
    server: Server, carol: httpx.Client
) -> None:
    token = csrf(carol)
    for label in ("laptop", "phone"):
        carol.post("/console/me/devices", data={"csrf": token, "device": label})
    serials = re.findall(r"/console/me/devices/(\d+)/profile", carol.get("/console/me/").text)
    with browser(server) as op:
        assert sign_in(op, "olga").status_code == 303
        page = op.get("/console/users/carol")
        assert f"/console/users/carol/devices/{serials[0]}/revoke" in page.text
        found = CSRF.search(page.text)
        assert found
        r = op.post(f"/console/users/carol/devices/{serials[0]}/revoke",
                    data={"csrf": found.group(1)})  # fmt: skip
        assert r.status_code == 303
        assert agent_view(server, "carol")["device_serials"] == [serials[1]]
    with server.client() as api:
        # A compromise: the main certificate and every device go.
        assert api.post("/api/v1/users/carol/revoke").status_code == 200
    view = agent_view(server, "carol")
    assert view["cert_serial"] is None and view.get("device_serials", []) == []
