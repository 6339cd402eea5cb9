"""Reading the IdP's group claim and planning one login's membership changes
(core/groupclaim.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnfleet.core.groupclaim import (
    MAX_CLAIM_GROUPS,
    ClaimRefused,
    MembershipPlan,
    plan,
    read_claim,
)


def test_a_list_of_strings_is_read_as_a_set() -> None:
    claims = {"sub": "1", "groups": ["eng", "ops", "eng"]}
    assert read_claim(claims, "groups") == frozenset({"eng", "ops"})
    assert read_claim({"groups": []}, "groups") == frozenset()  # in no group: a valid answer
    assert read_claim({"roles": ["a"]}, "roles") == frozenset({"a"})


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        ({"sub": "1"}, "has no 'groups' claim"),
        ({"groups": None}, "has no 'groups' claim"),
        ({"groups": "eng"}, "not a list of groups"),
        ({"groups": {"eng": True}}, "not a list of groups"),
        ({"groups": ["eng", 7]}, "not a list of groups"),
        ({"groups": ["eng", ""]}, "not a list of groups"),
        ({"groups": [["eng"]]}, "not a list of groups"),
        ({"groups": ["x" * 1001]}, "not a list of groups"),
        ({"groups": [f"g{i}" for i in range(MAX_CLAIM_GROUPS + 1)]}, "lists 1001 groups"),
        (
            {"_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {"endpoint": "x"}}},
            "left the 'groups' claim out of the token (too many groups)",
        ),
        # Another claim distributed elsewhere says nothing about this one.
        ({"_claim_names": {"roles": "src1"}}, "has no 'groups' claim"),
    ],
)
def test_an_unusable_claim_is_refused_with_the_reason(claims: dict[str, Any], words: str) -> None:
    with pytest.raises(ClaimRefused, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_claim(claims, "groups")


def test_the_limit_itself_is_accepted() -> None:
    groups = [f"g{i}" for i in range(MAX_CLAIM_GROUPS)]
    assert len(read_claim({"groups": groups}, "groups")) == MAX_CLAIM_GROUPS


MAP = {"idp-eng": "eng", "idp-ops": "ops", "c-eu": "contractors", "c-us": "contractors"}
EVERY = {"eng", "ops", "contractors"}


def test_plan_joins_and_leaves_only_managed_groups() -> None:
    change = plan({"idp-eng", "c-us", "idp-hr"}, MAP, EVERY, {"ops", "local", "eng"})
    assert change == MembershipPlan(add=("contractors",), remove=("ops",))
    # Either of two IdP groups mapped to one vpnfleet group makes a member.
    assert plan({"c-eu"}, MAP, EVERY, {"contractors"}) == MembershipPlan((), ())
    assert not plan({"c-eu", "c-us"}, MAP, EVERY, {"contractors"})
    # In none of the mapped IdP groups: out of every managed group, unmanaged ones kept.
    assert plan(set(), MAP, EVERY, {"eng", "ops", "local"}) == MembershipPlan((), ("eng", "ops"))
    # A managed group deleted since the mapping was set is neither joined nor left.
    assert plan({"idp-eng", "idp-ops"}, MAP, {"ops"}, set()) == MembershipPlan(("ops",), ())
    # Values are matched exactly (Entra object ids, Keycloak paths are not case-folded).
    assert plan({"IDP-ENG"}, MAP, EVERY, set()) == MembershipPlan((), ())


names = st.sampled_from(["eng", "ops", "contractors", "local", "hr", "sales"])
idp_names = st.sampled_from(["idp-eng", "idp-ops", "c-eu", "c-us", "idp-hr", "x"])


@given(
    claimed=st.frozensets(idp_names),
    group_map=st.dictionaries(idp_names, names, max_size=6),
    existing=st.frozensets(names),
    current=st.frozensets(names),
)
def test_applying_the_plan_gives_the_claims_memberships(
    claimed: frozenset[str],
    group_map: dict[str, str],
    existing: frozenset[str],
    current: frozenset[str],
) -> None:
    change = plan(claimed, group_map, existing, current)
    after = (set(current) - set(change.remove)) | set(change.add)
    managed = set(group_map.values()) & existing
    # Managed groups: exactly those the claim maps to; everything else as it was.
    assert after & managed == {group_map[c] for c in claimed if c in group_map} & managed
    assert after - managed == set(current) - managed
    # Minimal: joins only groups not held, leaves only groups held.
    assert not set(change.add) & current and set(change.remove) <= current
    assert plan(claimed, group_map, existing, frozenset(after)) == MembershipPlan((), ())
