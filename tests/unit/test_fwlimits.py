"""The firewall size check counts exactly what the renderer renders, and the limit's verdicts."""

from __future__ import annotations

from ipaddress import IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core import fwlimits, fwrender
from vpnfleet.core.grants import Grant

LIMIT = fwlimits.MAX_FIREWALL_ELEMENTS

# Few distinct networks and ports near each other, so that grants overlap and the renderer
# merges elements (the case a naive sum gets wrong).
_NETS = st.sampled_from(
    ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24"]
).map(IPv4Network)


@st.composite
def _grant(draw: st.DrawFn) -> Grant:
    net = draw(_NETS)
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "any"]))
    if proto in ("tcp", "udp") and draw(st.booleans()):
        lo = draw(st.sampled_from([0, 1, 2, 80, 443, 1000, 65000]))
        hi = min(65535, lo + draw(st.sampled_from([0, 1, 5, 100, 600, 65535])))
        return Grant(net, proto, lo, hi)
    return Grant(net, proto)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(_grant(), max_size=8))
def test_the_count_is_the_number_of_elements_the_renderer_produces(grants: list[Grant]) -> None:
    rendered = fwrender.group_destinations(grants)
    assert fwlimits.group_elements(grants) == sum(len(v) for v in rendered.values())


def test_the_issue_reproducer_is_over_the_limit_and_named() -> None:
    rules = [(f"10.1{nn:02d}.0.0/16", "tcp", "2-65535") for nn in range(17)]
    assert fwlimits.rules_elements(rules) == 17 * 65534 == 1_114_078
    over = fwlimits.check({"devs": fwlimits.rules_elements(rules)}, ["devs"])
    assert over is not None
    assert over.message() == (
        "group 'devs' would need 1,114,078 firewall set elements (limit 1,048,576 on every "
        "pod): grant all ports (one element per network) or narrow the port ranges or "
        "destinations"
    )
    # Sixteen fit; 1-65535 is "all ports": one element.
    assert fwlimits.check({"devs": fwlimits.rules_elements(rules[:16])}, ["devs"]) is None
    assert fwlimits.rules_elements([(d, "tcp", "1-65535") for d, _, _ in rules]) == 17


def test_the_limit_is_for_all_groups_together_and_names_the_changed_group() -> None:
    sizes = {"a": LIMIT // 2, "b": LIMIT // 2, "c": 1}
    over = fwlimits.check(sizes, ["c"])
    assert over is not None and (over.group, over.elements, over.total) == ("c", 1, LIMIT + 1)
    assert "group 'c' would need 1 firewall set elements, 1,048,577 with all other groups" in (
        over.message()
    )
    assert fwlimits.check({"a": LIMIT}, ["a"]) is None  # exactly the limit fits
    # Unknown changed names: the largest group is named.
    over = fwlimits.check({"a": 5, "b": LIMIT}, ["gone"])
    assert over is not None and over.group == "b"


def test_a_write_that_does_not_grow_an_overflowing_total_is_let_through() -> None:
    assert fwlimits.check({"a": LIMIT + 10}, ["a"], before=LIMIT + 20) is None
    assert fwlimits.check({"a": LIMIT + 10}, ["a"], before=LIMIT + 10) is None
    assert fwlimits.check({"a": LIMIT + 10}, ["a"], before=LIMIT + 9) is not None


def test_the_agent_denies_the_largest_groups_first_and_as_few_as_needed() -> None:
    assert fwlimits.groups_to_deny({"a": LIMIT, "b": 0}) == []
    assert fwlimits.groups_to_deny({"a": LIMIT, "b": 1, "c": 1}) == ["a"]
    assert fwlimits.groups_to_deny({"x": LIMIT - 1, "y": 2, "z": 3}) == ["x"]
    assert fwlimits.groups_to_deny({"x": LIMIT - 1, "y": LIMIT - 1, "z": 3}) == ["x", "y"]
    assert fwlimits.groups_to_deny({"a": 2 * LIMIT, "b": 2 * LIMIT, "c": 5}) == ["a", "b"]


def test_group_sizes_recount_only_what_changed_and_agree_with_a_fresh_count() -> None:
    calls: list[frozenset[fwlimits.StoredRule]] = []
    sizes = fwlimits.GroupSizes()
    real = fwlimits.rules_elements

    def counting(rules: frozenset[fwlimits.StoredRule]) -> int:
        calls.append(rules)
        return real(rules)

    groups = {
        "a": [("10.0.0.0/24", "tcp", "80-90")],
        "b": [("10.0.0.0/24", "udp", None), ("0.0.0.0/0", "tcp", "1-3")],
    }
    fwlimits.rules_elements = counting  # type: ignore[assignment]
    try:
        assert sizes.count(groups) == {"a": 11, "b": 7}
        assert len(calls) == 2
        groups["a"] = [*groups["a"], ("10.0.0.0/24", "tcp", "85-100")]
        assert sizes.count(groups) == {"a": 21, "b": 7}
        assert len(calls) == 3  # only "a" was recounted
    finally:
        fwlimits.rules_elements = real  # type: ignore[assignment]
    assert sizes.count(groups) == {n: real(r) for n, r in groups.items()}
