"""The directory sync's plan (core/directory.py): who is created, adopted, disabled, enabled,
which memberships change, and when a sync is refused as a mass disable."""

from __future__ import annotations

import pytest

from vpnfleet.core.directory import (
    DirectoryUser,
    DirectoryView,
    LocalUser,
    LocalView,
    MassDisableRefused,
    check_mass_disable,
    plan_sync,
)


def d_user(name: str, disabled: bool = False, email: str | None = None) -> DirectoryUser:
    return DirectoryUser(name, f"uid={name},ou=people,dc=x", email, disabled)


def l_user(
    name: str,
    enabled: bool = True,
    managed: bool = True,
    by_sync: bool = False,
    email: str | None = None,
) -> LocalUser:
    return LocalUser(name, enabled, email, managed, by_sync)


def view(users: list[DirectoryUser], members: dict[str, set[str]]) -> DirectoryView:
    return DirectoryView({u.name: u for u in users}, {g: frozenset(m) for g, m in members.items()})


def local(users: list[LocalUser], members: dict[str, set[str]]) -> LocalView:
    return LocalView(
        {u.name: u for u in users},
        {g: frozenset(m) for g, m in members.items()},
        frozenset(members),
    )


def test_new_directory_users_are_created_with_their_memberships() -> None:
    plan = plan_sync(
        view([d_user("ann", email="ann@x.test"), d_user("bo", disabled=True)],
             {"eng": {"ann", "bo"}}),
        local([], {}),
    )  # fmt: skip
    assert plan.create_groups == ["eng"]
    assert [(u.name, u.enabled, u.email) for u in plan.create_users] == [
        ("ann", True, "ann@x.test"),
        ("bo", False, None),
    ]
    assert plan.add_members == [("eng", "ann"), ("eng", "bo")]
    assert plan.disable_users == [] and plan.remove_members == []


def test_users_outside_mapped_groups_are_not_created() -> None:
    plan = plan_sync(view([d_user("ann"), d_user("cy")], {"eng": {"ann"}}), local([], {}))
    assert [u.name for u in plan.create_users] == ["ann"]


def test_a_local_user_of_the_same_name_is_adopted_not_recreated() -> None:
    plan = plan_sync(
        view([d_user("ann")], {"eng": {"ann"}}),
        local([l_user("ann", managed=False)], {"eng": set()}),
    )
    assert plan.create_users == [] and plan.adopt_users == [("ann", "uid=ann,ou=people,dc=x")]
    assert plan.add_members == [("eng", "ann")]


def test_disabled_or_gone_managed_users_are_disabled_unmanaged_never() -> None:
    plan = plan_sync(
        view([d_user("ann", disabled=True), d_user("bo")], {"eng": {"ann", "bo"}}),
        local(
            [l_user("ann"), l_user("bo"), l_user("cy"), l_user("local", managed=False)],
            {"eng": {"ann", "bo", "cy", "local"}},
        ),
    )
    assert plan.disable_users == [
        ("ann", "disabled in the directory"),
        ("cy", "no longer in a mapped directory group"),
    ]
    # The managed group's members become the directory's: the local user leaves it too.
    assert plan.remove_members == [("eng", "cy"), ("eng", "local")]


def test_only_users_the_sync_disabled_are_enabled_again() -> None:
    plan = plan_sync(
        view([d_user("ann"), d_user("bo")], {"eng": {"ann", "bo"}}),
        local(
            [l_user("ann", enabled=False, by_sync=True), l_user("bo", enabled=False)],
            {"eng": {"ann", "bo"}},
        ),
    )
    assert plan.enable_users == ["ann"]
    assert plan.disable_users == []


def test_an_already_disabled_user_is_not_disabled_again_and_emails_follow() -> None:
    plan = plan_sync(
        view([d_user("ann", disabled=True, email="new@x.test")], {"eng": {"ann"}}),
        local([l_user("ann", enabled=False, by_sync=True, email="old@x.test")], {"eng": {"ann"}}),
    )
    assert plan.disable_users == [] and plan.enable_users == []
    assert plan.update_emails == [("ann", "new@x.test")]
    assert plan.empty is False
    same = plan_sync(
        view([d_user("ann", email="a@x.test")], {"eng": {"ann"}}),
        local([l_user("ann", email="a@x.test")], {"eng": {"ann"}}),
    )
    assert same.empty


def test_mass_disable_is_refused_above_the_fraction() -> None:
    people = [l_user(f"u{i}") for i in range(8)]
    members = {"eng": {u.name for u in people}}

    def first(n: int) -> DirectoryView:
        return view([d_user(f"u{i}") for i in range(n)], {"eng": {f"u{i}" for i in range(n)}})

    two_gone = plan_sync(first(6), local(people, members))
    check_mass_disable(two_gone, local(people, members), 0.25)  # 2 of 8: allowed
    three_gone = plan_sync(first(5), local(people, members))
    with pytest.raises(MassDisableRefused, match="refusing to disable 3 of 8"):
        check_mass_disable(three_gone, local(people, members), 0.25)
    nobody = plan_sync(view([], {"eng": set()}), local(people, members))
    with pytest.raises(MassDisableRefused, match="8 of 8"):
        check_mass_disable(nobody, local(people, members), 0.9)


def test_a_directory_that_returns_nobody_is_refused_even_with_limit_one() -> None:
    people = [l_user("ann")]
    nobody = plan_sync(view([], {"eng": set()}), local(people, {"eng": {"ann"}}))
    with pytest.raises(MassDisableRefused):
        check_mass_disable(nobody, local(people, {"eng": {"ann"}}), 1.0)


def test_a_large_import_is_split_into_parts_that_add_up_to_the_plan() -> None:
    from vpnfleet.core.directory import split_plan

    names = [f"u{i}" for i in range(5)]
    plan = plan_sync(
        view([d_user(n) for n in names] + [d_user("old", disabled=True)],
             {"eng": set(names) | {"old"}, "ops": {"u1", "old"}}),
        local([l_user("old")], {"eng": set(), "ops": set()}),
    )  # fmt: skip
    assert split_plan(plan, 5) == [plan]
    parts = split_plan(plan, 2)
    assert [[u.name for u in p.create_users] for p in parts] == [
        ["u0", "u1"], ["u2", "u3"], ["u4"], []
    ]  # fmt: skip
    assert parts[0].create_groups == [] and plan.create_groups == []
    assert parts[0].add_members == [("eng", "u0"), ("eng", "u1"), ("ops", "u1")]
    # The last part holds everything about existing users.
    assert parts[-1].disable_users == [("old", "disabled in the directory")]
    assert parts[-1].add_members == [("eng", "old"), ("ops", "old")]
    for field in ("create_users", "add_members", "disable_users", "remove_members"):
        assert sorted(map(repr, (x for p in parts for x in getattr(p, field)))) == sorted(
            map(repr, getattr(plan, field))
        )
