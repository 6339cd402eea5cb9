"""Pure parts of the LDAP reader: DN comparison, nesting walks, URL checks."""

from __future__ import annotations

import pytest

from vpnfleet.controlplane.ldapsource import _walk, check_url, norm_dn


def test_dns_compare_without_case_or_spaces_around_separators() -> None:
    assert norm_dn("CN=VPN Users, OU=Groups,DC=Corp, DC=Example") == norm_dn(
        "cn=vpn users,ou=groups,dc=corp,dc=example"
    )
    # An escaped comma belongs to the value.
    assert norm_dn(r"CN=Smith\, John,OU=Staff") == r"cn=smith\, john,ou=staff"


def test_nesting_is_walked_through_member_groups_and_cycles_end() -> None:
    edges = {
        "cn=eng": {"uid=ann", "cn=ops"},
        "cn=ops": {"uid=bo", "cn=oncall"},
        "cn=oncall": {"uid=cy", "cn=eng"},  # a cycle back to the top
    }
    everyone = {"uid=ann", "uid=bo", "uid=cy", "cn=ops", "cn=oncall", "cn=eng"}
    assert _walk(edges, "cn=eng", nested=True) == everyone
    assert _walk(edges, "cn=eng", nested=False) == {"uid=ann", "cn=ops"}
    assert _walk(edges, "cn=empty", nested=True) == set()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ldap://dc1.example.com", ("dc1.example.com", 389, False)),
        ("ldaps://dc1.example.com", ("dc1.example.com", 636, True)),
        ("ldap://127.0.0.1:3890", ("127.0.0.1", 3890, False)),
    ],
)
def test_ldap_urls(url: str, expected: tuple[str, int, bool]) -> None:
    assert check_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["http://dc1", "ldap://", "ldap://dc1/dc=example", "ldap://user@dc1", "ldap://dc1:99999"],
)
def test_bad_ldap_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)
