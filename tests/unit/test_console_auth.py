"""Console passwords (scrypt) and the sign-in throttle."""

from __future__ import annotations

import pytest

from vpnfleet.core import passwords
from vpnfleet.core.loginthrottle import PER_ADDRESS, PER_NAME, WINDOW, LoginThrottle


def test_a_hash_verifies_only_its_password_and_names_its_parameters() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith(f"scrypt${passwords.N}${passwords.R}${passwords.P}$")
    assert "correct" not in stored
    assert passwords.verify("correct horse battery", stored)
    assert not passwords.verify("correct horse batterz", stored)
    assert not passwords.verify("", stored)
    # Same password, new salt: the stored forms differ.
    assert passwords.hash_password("correct horse battery") != stored
    assert not passwords.needs_rehash(stored)


@pytest.mark.parametrize(
    "stored",
    [None, "", "plain", "scrypt$1$8$1$AAAA$AAAA", "scrypt$32768$8$1$!!$AAAA",
     "scrypt$3$8$1$AAAA$AAAA", "bcrypt$x", "scrypt$2097152$8$1$AAAA$AAAA"],
)  # fmt: skip
def test_unusable_stored_forms_never_verify(stored: str | None) -> None:
    assert not passwords.verify("anything at all", stored)


def test_older_parameters_still_verify_and_ask_for_a_rehash() -> None:
    import base64
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"an older secret", salt=salt, n=2**14, r=8, p=1, dklen=32)
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()  # noqa: E731
    stored = f"scrypt${2**14}$8$1${b64(salt)}${b64(digest)}"
    assert passwords.verify("an older secret", stored)
    assert passwords.needs_rehash(stored)


@pytest.mark.parametrize(
    ("password", "reason"),
    [("short", "at least 12"), ("aaaaaaaaaaaaaaaa", "different characters"),
     ("x" * 1025, "longer than"), ("olga-is-my-password", "account's name")],
)  # fmt: skip
def test_weak_passwords_are_refused_without_repeating_them(password: str, reason: str) -> None:
    found = passwords.weakness(password, "olga")
    assert found is not None and reason in found
    assert password not in found
    assert passwords.weakness("correct horse battery", "olga") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_per_name_and_address_block_until_the_window_passes() -> None:
    clock = Clock()
    t = LoginThrottle(clock)
    for _ in range(PER_NAME):
        assert t.wait("olga", "10.0.0.1") == 0
        t.failed("olga", "10.0.0.1")
        clock.now += 1
    assert t.wait("olga", "10.0.0.1") == pytest.approx(WINDOW - PER_NAME)
    assert t.wait("olga", "10.0.0.2") == 0  # another address
    assert t.wait("bob", "10.0.0.1") == 0  # another name from there
    clock.now += WINDOW
    assert t.wait("olga", "10.0.0.1") == 0


def test_one_address_guessing_many_names_is_blocked_too() -> None:
    clock = Clock()
    t = LoginThrottle(clock)
    for i in range(PER_ADDRESS):
        t.failed(f"user{i}", "10.0.0.9")
    assert t.wait("someone-new", "10.0.0.9") > 0
    assert t.wait("someone-new", "10.0.0.8") == 0


def test_a_success_clears_the_names_failures() -> None:
    t = LoginThrottle(Clock())
    for _ in range(PER_NAME - 1):
        t.failed("olga", "10.0.0.1")
    t.succeeded("olga", "10.0.0.1")
    t.failed("olga", "10.0.0.1")
    assert t.wait("olga", "10.0.0.1") == 0


def test_an_attempt_counts_before_its_check_and_a_success_takes_it_back() -> None:
    clock = Clock()
    t = LoginThrottle(clock)
    marks = [t.failed("olga", "10.0.0.1") for _ in range(PER_NAME)]  # 5 checks in flight
    assert t.wait("olga", "10.0.0.1") > 0  # a 6th waits, whatever the 5 turn out to be
    clock.now += 1
    # Many people behind one NAT signing in fine never fill the address's budget.
    for i in range(PER_ADDRESS * 2):
        t.succeeded(f"user{i}", "10.0.0.2", t.failed(f"user{i}", "10.0.0.2"))
    assert t.wait("someone", "10.0.0.2") == 0
    assert marks


def test_ipv6_clients_are_counted_by_their_64() -> None:
    t = LoginThrottle(Clock())
    for i in range(PER_NAME):
        t.failed("olga", f"2001:db8:1:2::{i + 1}")
    assert t.wait("olga", "2001:db8:1:2:ffff::9") > 0
    assert t.wait("olga", "2001:db8:1:3::1") == 0
