"""Which operator-supplied secrets are refused, and that the refusal never shows the value."""

from __future__ import annotations

import secrets

import pytest

from vpnfleet.core.secretstrength import require_strong, weakness

WEAK = [
    "x",
    "",
    "changeme",
    "vpf_x",
    "a" * 64,  # long, but one character
    "ab" * 40,  # long, two characters
    "0123456789abcdef0123456789abcde",  # 31 hex characters: 124 bits
    "Qx9LmPz4Rk8Vw2b7Tn5Hj",  # 21 base64 characters: 126 bits
    "pass word with spaces in it, long enough",
]
STRONG = [
    secrets.token_urlsafe(32),
    secrets.token_urlsafe(17),  # 23 characters
    secrets.token_hex(16),  # 32 hex characters: 128 bits
    "vpf_" + secrets.token_urlsafe(32),  # what `vpnfleet token create` makes
    "vpf_" + secrets.token_hex(24),  # deploy/README.md's admin token
    "Kx2+Jq8/Wm4=Rt7zPo1vLc9uN3yHd6sE0aGb5fQi==",  # openssl rand -base64 style, padded
]


@pytest.mark.parametrize("value", WEAK)
def test_weak_values_are_refused(value: str) -> None:
    assert weakness(value) is not None


@pytest.mark.parametrize("value", STRONG)
def test_generated_values_pass(value: str) -> None:
    assert weakness(value) is None


def test_the_refusal_names_the_setting_and_how_to_fix_it_but_not_the_value() -> None:
    with pytest.raises(ValueError) as err:
        require_strong("hunter2hunter2", "VPNFLEET_BOOTSTRAP_TOKEN")
    message = str(err.value)
    assert message.startswith("VPNFLEET_BOOTSTRAP_TOKEN is too weak")
    assert "hunter2" not in message
    assert "secrets.token_urlsafe(32)" in message and "openssl rand" in message
