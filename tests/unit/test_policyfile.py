"""The policy file: parsing, every kind of bad input with its line, rendering and diffing."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core import netparse, policyfile
from vpnfleet.core.policyfile import (
    FieldChange,
    GrantSpec,
    GroupSpec,
    MembershipRef,
    Policy,
    PolicyError,
    UserSpec,
)

EXAMPLE = """\
version: 1
users:
  alice: {email: alice@example.com, mode: nat, max_sessions: 2, enabled: true, groups: [devs]}
  gary: {mode: gateway, groups: [devs, ops]}
groups:
  devs:
    description: Developers
    grants:
      - {destination: 10.10.0.0/16, proto: tcp, ports: "22,443,8000-8100"}
      - {destination: 10.20.0.5, proto: any}
  ops: {grants: [{destination: 10.0.0.0/8, proto: icmp}]}
"""


def errors(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as info:
        policyfile.parse(textwrap.dedent(text))
    return [(i.line, i.field, i.message) for i in info.value.issues]


def one_error(text: str) -> tuple[int | None, str, str]:
    found = errors(text)
    assert len(found) == 1, found
    return found[0]


def test_example_parses_to_normalized_objects() -> None:
    policy = policyfile.parse(EXAMPLE)
    assert policy.users["alice"] == UserSpec(
        name="alice", email="alice@example.com", mode="nat", max_sessions=2, groups=("devs",)
    )
    gary = policy.users["gary"]
    assert (gary.mode, gary.max_sessions, gary.enabled, gary.email) == ("gateway", 1, True, None)
    assert gary.groups == ("devs", "ops") and gary.line == 4
    devs = policy.groups["devs"]
    assert devs.description == "Developers"
    assert [g.key for g in devs.grants] == [
        ("10.10.0.0/16", "tcp", "22,443,8000-8100"),
        ("10.20.0.5/32", "any", None),
    ]
    assert [g.line for g in devs.grants] == [9, 10]
    assert policy.groups["ops"].grants[0].key == ("10.0.0.0/8", "icmp", None)
    assert policy.warnings == ()
    assert policy.counts() == {"users": 2, "groups": 2, "grants": 3}


def test_error_message_names_file_line_and_field() -> None:
    text = EXAMPLE.replace(
        "      - {destination: 10.20.0.5, proto: any}\n",
        "      - {destination: 10.20.0.5, proto: tcp,\n         ports: 70000}\n",
    ).replace("  ops: {grants", "\n  ops: {grants")
    with pytest.raises(PolicyError) as info:
        policyfile.parse(text, "policy.yaml")
    assert str(info.value) == (
        "policy.yaml:11: groups.devs.grants[1].ports: port 70000 is out of range 1-65535"
    )


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        pytest.param("version: 1\nusers: [alice\n", 3, "", "not valid YAML", id="not-yaml"),
        pytest.param("version: 1\n\tusers: {}\n", 2, "", "not valid YAML", id="tab"),
        pytest.param("- version\n- 1\n", 1, "", "must be a mapping", id="list-root"),
        pytest.param("just text\n", 1, "", "must be a mapping", id="scalar-root"),
        pytest.param("# nothing\n", 1, "", "the file is empty", id="empty"),
        pytest.param(
            "version: 1\n---\nversion: 1\n", 2, "", "more than one document", id="two-docs"
        ),
        pytest.param("users: {}\n", 1, "version", "is missing", id="no-version"),
        pytest.param("version: 2\n", 1, "version", "unsupported version 2", id="version-2"),
        pytest.param("version: '1'\n", 1, "version", "unsupported version 1", id="version-str"),
        pytest.param(
            "version: 1\nuser:\n  a: {}\n", 2, "user", "did you mean 'users'", id="unknown-root"
        ),
        pytest.param(
            "version: 1\nusers:\n  alice: {mail: a@b.c}\n",
            3,
            "users.alice.mail",
            "did you mean 'email'",
            id="unknown-user-key",
        ),
        pytest.param(
            "version: 1\ngroups:\n  devs: {desc: x}\n",
            3,
            "groups.devs.desc",
            "unknown key 'desc'",
            id="unknown-group-key",
        ),
        pytest.param(
            "version: 1\ngroups:\n  devs:\n    grants:\n"
            "      - {destination: 10.0.0.0/8, port: 22}\n",
            5,
            "groups.devs.grants[0].port",
            "did you mean 'ports'",
            id="unknown-grant-key",
        ),
        pytest.param(
            "version: 1\nusers:\n  Alice: {}\n", 3, "users.Alice", "invalid user name", id="name"
        ),
        pytest.param(
            "version: 1\ngroups:\n  dev ops: {}\n",
            3,
            "groups.dev ops",
            "invalid group name",
            id="group-name",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - {destination: 10.0.0.300}\n",
            5,
            "groups.g.grants[0].destination",
            "is not an IPv4 address or CIDR",
            id="bad-cidr",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - {destination: 10.0.0.1/24}\n",
            5,
            "groups.g.grants[0].destination",
            "has host bits set; did you mean 10.0.0.0/24?",
            id="host-bits",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - {destination: '2001:db8::/32'}\n",
            5,
            "groups.g.grants[0].destination",
            "IPv6",
            id="ipv6",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - {proto: tcp}\n",
            5,
            "groups.g.grants[0]",
            "destination is missing",
            id="no-destination",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    -\n",
            5,
            "groups.g.grants[0]",
            "not null",
            id="null-grant",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: tcp, ports: 0}\n",
            5,
            "groups.g.grants[0].ports",
            "port 0 is out of range 1-65535",
            id="port-0",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: udp, ports: '53,65536'}\n",
            5,
            "groups.g.grants[0].ports",
            "port 65536 is out of range 1-65535",
            id="port-65536",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: tcp, ports: 9000-8000}\n",
            5,
            "groups.g.grants[0].ports",
            "port range '9000-8000' is reversed; write 8000-9000",
            id="reversed",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: tcp, ports: '22:30'}\n",
            5,
            "groups.g.grants[0].ports",
            "is not a number",
            id="sexagesimal",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - destination: 10.0.0.0/8\n"
            "      proto: tcp\n      ports: ["
            + ", ".join(str(p) for p in range(1, 600, 2))
            + "]\n",
            7,
            "groups.g.grants[0].ports",
            "too many port ranges",
            id="ports-too-long",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: sctp}\n",
            5,
            "groups.g.grants[0].proto",
            "unknown protocol 'sctp'",
            id="proto",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8, proto: icmp, ports: 22}\n",
            5,
            "groups.g.grants[0].ports",
            "ports can only be given for tcp or udp, not icmp",
            id="ports-icmp",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n    - {destination: 10.0.0.0/8, ports: 22}\n",
            5,
            "groups.g.grants[0].ports",
            "not any",
            id="ports-default-any",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g:\n    grants:\n"
            "    - {destination: 10.0.0.0/8}\n    - {destination: 10.0.0.0/8, proto: any}\n",
            6,
            "groups.g.grants[1]",
            "duplicate grant: same as grants[0]",
            id="duplicate-grant",
        ),
        pytest.param(
            "version: 1\ngroups: {devs: {}}\nusers:\n  a: {groups: [devs, ops]}\n",
            4,
            "users.a.groups[1]",
            "group 'ops' is not defined under 'groups'",
            id="undefined-group",
        ),
        pytest.param(
            "version: 1\ngroups: {devs: {}}\nusers:\n  a:\n    groups:\n    - devs\n    - devs\n",
            7,
            "users.a.groups[1]",
            "listed twice",
            id="group-twice",
        ),
        pytest.param(
            "version: 1\nusers: {}\nusers: {}\n", 3, "users", "duplicate key 'users'", id="dup-root"
        ),
        pytest.param(
            "version: 1\nusers:\n  alice: {}\n  bob: {}\n  alice: {mode: gateway}\n",
            5,
            "users.alice",
            "duplicate key 'alice' (first given on line 3)",
            id="dup-user",
        ),
        pytest.param(
            "version: 1\ngroups:\n  g: {}\n  g: {}\n",
            4,
            "groups.g",
            "duplicate key",
            id="dup-group",
        ),
        pytest.param(
            "version: 1\nusers:\n  alice:\n    mode: nat\n    mode: gateway\n",
            5,
            "users.alice.mode",
            "duplicate key 'mode'",
            id="dup-field",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {mode: bridge}\n",
            3,
            "users.a.mode",
            "unknown mode",
            id="mode",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {max_sessions: 0}\n",
            3,
            "users.a.max_sessions",
            "0 is out of range 1-100",
            id="sessions-0",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {max_sessions: two}\n",
            3,
            "users.a.max_sessions",
            "must be a whole number",
            id="sessions-text",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {enabled: maybe}\n",
            3,
            "users.a.enabled",
            "must be true or false",
            id="enabled",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {email: not-an-address}\n",
            3,
            "users.a.email",
            "is not an email address",
            id="email",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {groups: devs}\ngroups: {devs: {}}\n",
            3,
            "users.a.groups",
            "must be a list",
            id="groups-not-list",
        ),
        pytest.param(
            "version: 1\nusers: [alice]\n", 2, "users", "must be a mapping", id="users-list"
        ),
        pytest.param(
            "version: 1\ngroups:\n  g: {description: " + "x" * 501 + "}\n",
            3,
            "groups.g.description",
            "longer than 500",
            id="long-description",
        ),
        pytest.param(
            "version: 1\ngroups:\n  a: {grants: &g [{destination: 10.0.0.0/8}]}\n"
            "  b: {grants: *g}\n",
            3,
            "groups.b.grants",
            "aliases are not supported",
            id="alias",
        ),
        pytest.param(
            "version: 1\nusers:\n  a: {<<: {mode: nat}}\n",
            3,
            "users.a",
            "merge keys (<<) are not supported",
            id="merge-key",
        ),
    ],
)
def test_bad_input(text: str, line: int, field: str, message: str) -> None:
    got_line, got_field, got_message = one_error(text)
    assert (got_line, got_field) == (line, field)
    assert message in got_message


def test_every_problem_is_reported_in_line_order() -> None:
    found = errors(
        """\
        version: 1
        users:
          bob: {groups: [nope]}
          Carol: {}
        groups:
          g:
            grants:
              - {destination: 10.0.0.1/8}
              - {destination: 10.0.0.0/8, proto: tcp, ports: 70000}
        """
    )
    assert [(line, field) for line, field, _ in found] == [
        (3, "users.bob.groups[0]"),
        (4, "users.Carol"),
        (8, "groups.g.grants[0].destination"),
        (9, "groups.g.grants[1].ports"),
    ]


def test_a_broken_group_does_not_also_make_its_users_fail() -> None:
    found = errors("version: 1\nusers: {a: {groups: [g]}}\ngroups:\n  g: {description: [x]}\n")
    assert found == [(4, "groups.g.description", "must be text, not a list")]


def test_yaml_literals_stay_text() -> None:
    policy = policyfile.parse(
        "version: 1\n"
        "users:\n  no: {groups: [007]}\n  '123': {enabled: no}\n"
        "groups:\n  007:\n    grants:\n"
        "    - {destination: 10.20.0.5, proto: TCP, ports: [22, 8000-8100]}\n"
    )
    assert set(policy.users) == {"no", "123"}
    assert policy.users["no"].groups == ("007",)
    assert policy.users["123"].enabled is False
    grant = policy.groups["007"].grants[0]
    assert grant.key == ("10.20.0.5/32", "tcp", "22,8000-8100")


def test_sections_may_be_empty_or_null() -> None:
    assert policyfile.parse("version: 1\n") == Policy()
    policy = policyfile.parse("version: 1\nusers:\n  a:\ngroups:\n  g:\n")
    assert policy.users["a"] == UserSpec(name="a")
    assert policy.groups["g"] == GroupSpec(name="g")


def test_overlapping_grants_warn_but_parse() -> None:
    policy = policyfile.parse(
        textwrap.dedent(
            """\
            version: 1
            groups:
              g:
                grants:
                  - {destination: 10.0.0.0/8, proto: tcp, ports: "22,443"}
                  - {destination: 10.1.0.0/16, proto: icmp}
                  - {destination: 10.2.0.0/16, proto: tcp, ports: 80}
                  - {destination: 10.3.0.0/16, proto: any}
              other:
                grants:
                  - {destination: 10.0.0.0/8, proto: tcp}
            """
        )
    )
    assert [(w.line, w.field) for w in policy.warnings] == [(8, "groups.g.grants[3]")]
    assert "overlaps grants[0] (10.0.0.0/8 tcp 22,443)" in policy.warnings[0].message
    assert policy.warnings[0].format("p.yaml", "warning").startswith("p.yaml:8: warning: ")


# --- render and round trip ------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}[a-z0-9]", fullmatch=True)
texts = st.text(
    st.characters(whitelist_categories=("L", "N", "P", "Zs"), max_codepoint=0x2FFF),
    max_size=40,
)


@st.composite
def grants(draw: st.DrawFn) -> GrantSpec:
    prefix = draw(st.integers(8, 32))
    addr = draw(st.integers(0, 2**32 - 1))
    net = ipaddress.IPv4Network((addr, prefix), strict=False)
    proto = draw(st.sampled_from(netparse.PROTOCOLS))
    ports = None
    if proto in ("tcp", "udp") and draw(st.booleans()):
        pairs = draw(
            st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 500)), min_size=1, max_size=4)
        )
        spec = ",".join(f"{lo}-{min(lo + n, 65535)}" if n else str(lo) for lo, n in pairs)
        ports = netparse.format_ports(netparse.parse_ports(spec))
    return GrantSpec(str(net), proto, ports, draw(st.none() | texts))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    group_names = draw(st.lists(names, max_size=4, unique=True))
    groups = {
        n: GroupSpec(
            n,
            draw(st.none() | texts),
            tuple(draw(st.lists(grants(), max_size=4, unique_by=lambda g: g.key))),
            draw(st.none() | st.sampled_from(policyfile.GROUP_AUTH_POLICIES)),
        )
        for n in group_names
    }
    users = {
        n: UserSpec(
            n,
            draw(
                st.none()
                | st.from_regex(r"[a-z0-9.]{1,8}@[a-z0-9]{1,8}\.[a-z]{2,4}", fullmatch=True)
            ),
            draw(st.sampled_from(netparse.MODES)),
            draw(st.integers(1, 100)),
            draw(st.booleans()),
            tuple(
                sorted(
                    draw(st.sets(st.sampled_from(group_names)) if group_names else st.just(set()))
                )
            ),
            draw(st.none() | st.sampled_from(policyfile.USER_AUTH_POLICIES)),
        )
        for n in draw(st.lists(names, max_size=5, unique=True))
    }
    return Policy(users=users, groups=groups)


@settings(max_examples=150, deadline=None)
@given(policies())
def test_render_then_parse_is_identity(policy: Policy) -> None:
    assert policyfile.parse(policyfile.render(policy)) == policy


def test_render_example_is_stable() -> None:
    policy = policyfile.parse(EXAMPLE)
    text = policyfile.render(policy)
    assert "  gary: {mode: gateway, max_sessions: 1, enabled: true, groups: [devs, ops]}" in text
    assert "{destination: 10.20.0.5, proto: any}" in text  # hosts without /32
    assert policyfile.render(policyfile.parse(text)) == text


def test_auth_policies_are_read_only_where_the_file_sets_them() -> None:
    policy = policyfile.parse(
        textwrap.dedent(
            """\
            version: 1
            users:
              ann: {auth_policy: inherit, groups: [staff]}
              bot: {auth_policy: cert, groups: [staff]}
              cat: {groups: [staff]}
            groups:
              staff: {auth_policy: cert+sso}
              lab: {}
            """
        )
    )
    assert [policy.users[n].auth_policy for n in ("ann", "bot", "cat")] == ["inherit", "cert", None]
    assert policy.groups["staff"].auth_policy == "cert+sso"
    assert policy.groups["lab"].auth_policy is None
    text = policyfile.render(policy)
    assert (
        "bot: {mode: nat, max_sessions: 1, enabled: true, auth_policy: cert, groups: [staff]}"
        in text
    )
    assert "cat: {mode: nat, max_sessions: 1, enabled: true, groups: [staff]}" in text


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (
            "users: {a: {auth_policy: sso}}",
            "users.a.auth_policy",
            "must be one of cert, cert+sso, inherit, not 'sso'",
        ),
        ("users: {a: {auth_policy: }}", "users.a.auth_policy", "not null"),
        ("users: {a: {auth_policy: none}}", "users.a.auth_policy", "not 'none'"),
        (
            "groups: {g: {auth_policy: inherit}}",
            "groups.g.auth_policy",
            "must be one of cert, cert+sso, none, not 'inherit'",
        ),
    ],
)
def test_bad_auth_policies(text: str, field: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        policyfile.parse("version: 1\n" + text + "\n")
    (issue,) = err.value.issues
    assert issue.field == field and message in issue.message


def test_a_file_without_auth_policies_leaves_them_alone() -> None:
    """An older file applied again must not drop a group's single sign-on requirement."""
    current = policyfile.parse(
        "version: 1\nusers: {a: {auth_policy: cert, groups: [g]}}\n"
        "groups: {g: {auth_policy: cert+sso}}\n"
    )
    old_file = policyfile.parse("version: 1\nusers: {a: {groups: [g]}}\ngroups: {g: {}}\n")
    assert policyfile.diff(current, old_file).empty
    lifted = policyfile.parse(
        "version: 1\nusers: {a: {auth_policy: inherit, groups: [g]}}\n"
        "groups: {g: {auth_policy: none}}\n"
    )
    out = policyfile.diff(current, lifted)
    assert [(u.name, [(c.field, c.old, c.new) for c in u.changes]) for u in out.users_updated] == [
        ("a", [("auth_policy", "cert", "inherit")])
    ]
    assert [(g.name, [(c.field, c.new) for c in g.changes]) for g in out.groups_updated] == [
        ("g", [("auth_policy", "none")])
    ]


# --- diff -----------------------------------------------------------------------------------


def test_diff_from_nothing_creates_everything_and_twice_is_empty() -> None:
    desired = policyfile.parse(EXAMPLE)
    d = policyfile.diff(Policy(), desired)
    assert [u.name for u in d.users_created] == ["alice", "gary"]
    assert [g.name for g in d.groups_created] == ["devs", "ops"]
    assert len(d.grants_added) == 3
    assert d.memberships_added == [
        MembershipRef("devs", "alice"),
        MembershipRef("devs", "gary"),
        MembershipRef("ops", "gary"),
    ]
    assert d.summary() == "2 users created, 2 groups created, 3 memberships added, 3 grants added"
    assert policyfile.diff(desired, desired).empty


def test_diff_updates_replaces_and_leaves_unnamed_objects_alone() -> None:
    current = Policy(
        users={
            "alice": UserSpec("alice", mode="nat", groups=("devs", "legacy")),
            "bob": UserSpec("bob", groups=("devs",)),
        },
        groups={
            "devs": GroupSpec(
                "devs",
                "old",
                (
                    GrantSpec("10.10.0.0/16", "tcp", "22,443,8000-8100", "x", rule_id=7),
                    GrantSpec("10.99.0.0/16", "any", rule_id=8),
                ),
            ),
            "legacy": GroupSpec("legacy"),
        },
    )
    desired = policyfile.parse(EXAMPLE.replace("mode: nat", "mode: gateway"))
    d = policyfile.diff(current, desired)
    assert [(u.name, u.changes) for u in d.users_updated] == [
        (
            "alice",
            (
                FieldChange("email", None, "alice@example.com"),
                FieldChange("mode", "nat", "gateway"),
                FieldChange("max_sessions", 1, 2),
            ),
        )
    ]
    assert [u.name for u in d.users_created] == ["gary"]
    assert d.groups_updated[0].changes == (FieldChange("description", "old", "Developers"),)
    assert [(g.rule_id, g.changes) for g in d.grants_updated] == [
        (7, (FieldChange("description", "x", None),))
    ]
    assert [(g.destination, g.rule_id) for g in d.grants_removed] == [("10.99.0.0/16", 8)]
    # alice stays in the unmanaged group legacy; bob (not in the file) keeps devs.
    assert MembershipRef("legacy", "alice") not in d.memberships_removed
    assert d.memberships_removed == []
    assert d.users_deleted == [] and d.groups_deleted == []
    pruned = policyfile.diff(current, desired, prune=True)
    assert pruned.users_deleted == ["bob"] and pruned.groups_deleted == ["legacy"]
