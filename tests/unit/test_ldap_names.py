"""Pure parts of the LDAP reader: DN comparison, nesting walks, URL checks."""

from __future__ import annotations

import pytest

from vpnfleet.controlplane.ldapsource import LdapConfig, _is_disabled, _walk, check_url, norm_dn


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


def _cfg(**over: object) -> LdapConfig:
    base: dict[str, object] = {
        "url": "ldap://127.0.0.1",
        "bind_dn": "cn=x",
        "bind_password": "pw",
        "user_bases": ("dc=x",),
        "group_bases": ("dc=x",),
        "group_map": {"g": "g"},
    }
    base.update(over)
    return LdapConfig(**base)  # type: ignore[arg-type]


def test_disabled_accounts_by_ad_flag_attribute_value_or_presence() -> None:
    ad = _cfg(flavor="ad")
    assert _is_disabled(ad, {"userAccountControl": [b"514"]})  # 512 + ACCOUNTDISABLE
    assert not _is_disabled(ad, {"userAccountControl": [b"512"]})
    assert not _is_disabled(ad, {"userAccountControl": [b"garbage"]})
    # The AD flag is ignored for OpenLDAP; a configured attribute decides.
    assert not _is_disabled(_cfg(), {"userAccountControl": [b"514"]})
    by_value = _cfg(disabled_attribute="employeeType", disabled_value="Left")
    assert _is_disabled(by_value, {"employeetype": [b"left"]})  # names and values: any case
    assert not _is_disabled(by_value, {"employeeType": [b"staff"]})
    present = _cfg(disabled_attribute="pwdAccountLockedTime")
    assert _is_disabled(present, {"pwdAccountLockedTime": [b"000001010000Z"]})
    assert not _is_disabled(present, {"pwdAccountLockedTime": []})


def test_a_connection_that_breaks_inside_ldap3_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ldap3 raises KeyError (its answer lookup by message id) when the connection breaks
    before an answer: `directory sync` must say the directory could not be reached, not 500."""
    from vpnfleet.controlplane import ldapsource

    cfg = LdapConfig("ldap://127.0.0.1:9", "cn=r", "pw", ("dc=x",), ("dc=x",), {})
    reader = ldapsource._Reader(cfg)

    def broken(*_args: object) -> None:
        raise KeyError((1, 0))

    monkeypatch.setattr(reader, "_open", broken)
    with pytest.raises(ldapsource.DirectoryError, match="cannot reach the directory at ldap://"):
        reader.connect()
