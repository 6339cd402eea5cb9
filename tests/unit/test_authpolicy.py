"""Which auth policy a user's connections must meet (core/authpolicy.py)."""

from __future__ import annotations

import pytest

from vpnfleet.core.authpolicy import effective, parse_policy


def test_the_users_own_policy_wins() -> None:
    assert effective("cert", ["cert+sso"]) == "cert"  # a service account exempted
    assert effective("cert+sso", []) == "cert+sso"
    assert effective("cert+sso", ["cert"]) == "cert+sso"


def test_otherwise_the_strictest_group_wins() -> None:
    assert effective(None, []) == "cert"
    assert effective(None, [None, None]) == "cert"
    assert effective(None, ["cert", None]) == "cert"
    assert effective(None, ["cert", "cert+sso", None]) == "cert+sso"


def test_unknown_policies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cert, cert\\+sso, not 'sso'"):
        parse_policy("sso")
    with pytest.raises(ValueError, match="auth policy"):
        effective(None, ["password"])
