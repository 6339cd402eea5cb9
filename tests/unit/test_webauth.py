"""Web authentication as OpenVPN speaks it (core/webauth.py)."""

from __future__ import annotations

import pytest

from vpnfleet.core import mgmt_protocol as mp
from vpnfleet.core.webauth import MAX_CONTROL_MESSAGE, announces_webauth, web_auth_extra


@pytest.mark.parametrize(
    ("iv_sso", "expected"),
    [
        ("webauth", True),
        ("openurl,webauth,crtext", True),
        ("crtext", False),
        ("openurl", False),
        ("", False),
        (None, False),
    ],
)
def test_only_clients_announcing_webauth_can_log_in(iv_sso: str | None, expected: bool) -> None:
    env = {"common_name": "alice"} if iv_sso is None else {"IV_SSO": iv_sso}
    assert announces_webauth(env) is expected


def test_the_extra_names_the_url_and_flags() -> None:
    url = "https://vpn.example.test/sso/login/q3Jx-9_Ab"
    assert web_auth_extra(url) == f"WEB_AUTH::{url}"
    assert web_auth_extra(url, ["external"]) == f"WEB_AUTH:external:{url}"
    with pytest.raises(ValueError, match="unknown web-auth flags: proxy"):
        web_auth_extra(url, ["proxy"])


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://vpn.example.test/x", "absolute http"),
        ("/sso/login/x", "absolute http"),
        ('https://vpn.example.test/"x', "could not open"),
        ("https://vpn.example.test/a b", "could not open"),
        ("https://vpn.example.test/a\\b", "could not open"),
        ("https://vpn.example.test/" + "a" * MAX_CONTROL_MESSAGE, "too long"),
    ],
)
def test_urls_a_client_could_not_use_are_refused(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        web_auth_extra(url)


def test_a_typical_login_url_fits_the_command_line() -> None:
    url = "https://vpnfleet-control-plane.corp.example.com:8443/sso/login/" + "A" * 43
    cmd = mp.client_pending_auth(4_000_000_000, 3, web_auth_extra(url), 180)
    assert len(cmd) < mp.MAX_COMMAND_LINE
