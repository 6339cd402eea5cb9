"""Group memberships from the IdP's group claim at VPN single sign-on login, against a real
OpenID provider (django-oauth-toolkit, tests/oidcidp) whose ID tokens carry the user's Django
groups in `groups` (with the `groups` scope), on SQLite and PostgreSQL.

A login follows the short URL to the IdP's login form and back to the callback as a browser
would; the test changes the user's groups at the IdP between logins (the IdP reads them at
each login) and checks what an administrator and the agents see: memberships, the watch
stream, the admin audit log.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.api.test_users_groups_rules import problem
from tests.api.test_watch import read_events
from tests.conftest import RunningServer, Server, free_port
from tests.oidcidp import Idp, browser_login, running_idp

USERS: dict[str, tuple[str, str] | tuple[str, str, bool]] = {
    "alice": ("alice-pw-9Kd", "alice@example.test"),
    "bob": ("bob-pw-4Rw", "bob@example.test"),
}
OVERAGE = 10  # past this many groups the IdP sends Entra ID's overage indicator instead
GROUP_MAP = {
    "idp-eng": "eng",
    "idp-ops": "ops",
    "idp-contractors-eu": "contractors",
    "idp-contractors-us": "contractors",
}


@pytest.fixture(scope="module")
def cp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory, cp_port: int) -> Iterator[Idp]:
    callback = f"http://127.0.0.1:{cp_port}/sso/callback"
    with running_idp(
        tmp_path_factory.mktemp("idp"), callback, USERS, groups_overage=OVERAGE
    ) as running:
        yield running


@pytest.fixture
def server(database_url: str, tmp_path: Path, cp_port: int) -> Iterator[Server]:
    running = RunningServer(database_url, tmp_path / "data", port=cp_port)
    try:
        yield running.server
    finally:
        running.stop()


def idp_settings(idp: Idp, server: Server, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "public_url": server.url,
        "scopes": ["openid", "profile", "email", "groups"],
        "groups_claim": "groups",
        "group_map": GROUP_MAP,
    }
    body.update(over)
    return body


@pytest.fixture
def fleet(server: Server, admin: httpx.Client, idp: Idp) -> str:
    """Groups eng, ops, contractors (managed by the claim) and local (not), users alice (in
    ops and local by hand) and bob (in eng by hand), the IdP configured; pod1's credential."""
    for name in ("eng", "ops", "contractors", "local"):
        assert admin.post("/api/v1/groups", json={"name": name}).status_code == 201
    for name, (_, mail, *_verified) in USERS.items():
        assert admin.post("/api/v1/users", json={"name": name, "email": mail}).status_code == 201
    for group, user in (("ops", "alice"), ("local", "alice"), ("eng", "bob")):
        r = admin.post(f"/api/v1/groups/{group}/members", json={"user": user})
        assert r.status_code == 200, r.text
    r = admin.put("/api/v1/idp", json=idp_settings(idp, server))
    assert r.status_code == 200, r.text
    return server.pod_token("pod1")


def login(server: Server, pod_token: str, user: str, cid: int, as_user: str | None = None) -> Any:
    """A connection of `user` waits on pod1; the browser logs in at the IdP as `as_user`
    (default: `user`): the callback's page and the pod's decision."""
    with server.client(pod_token) as pod:
        r = pod.post(
            "/api/v1/agent/sso-logins",
            json={"server": "udp", "cid": cid, "kid": 1, "user": user, "real_ip": "192.0.2.7"},
        )
        assert r.status_code == 201, r.text
        who = as_user or user
        back = browser_login(
            r.json()["url"], who, USERS[who][0], stop_at=f"{server.url}/sso/callback"
        )
        page = httpx.get(back)
        decided = pod.get("/api/v1/agent/sso-decisions").json()["decisions"]
    assert [d["cid"] for d in decided] == [cid]
    return page, decided[0]


def groups_of(admin: httpx.Client, user: str) -> list[str]:
    return sorted(admin.get(f"/api/v1/users/{user}").json()["groups"])


def revision(admin: httpx.Client) -> int:
    return int(admin.get("/api/v1/revision").json()["revision"])


def audit(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    return list(admin.get("/api/v1/audit/admin", params={"action": action}).json())


def test_a_login_sets_the_managed_memberships_from_the_claim(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    # At the IdP alice is in engineering, the US contractors and HR (which maps to nothing).
    idp.set_groups("alice", ["idp-eng", "idp-contractors-us", "idp-hr"])
    assert groups_of(admin, "alice") == ["local", "ops"]
    start = revision(admin)

    page, decision = login(server, fleet, "alice", cid=1)
    assert page.status_code == 200 and "Signed in" in page.text
    assert decision["admitted"] is True
    # Joined eng and contractors, left ops (she is not in idp-ops); local is not managed.
    assert groups_of(admin, "alice") == ["contractors", "eng", "local"]
    assert groups_of(admin, "bob") == ["eng"]  # nobody else changes

    # The agents learn it from the watch stream like an administrator's change: the
    # memberships, then alice's whole state with her new groups.
    events = read_events(server, start, 4)
    got = [(e["kind"], e["op"], (e.get("object") or e["key"]).get("group")) for e in events]
    assert got == [
        ("membership", "delete", "ops"),
        ("membership", "upsert", "contractors"),
        ("membership", "upsert", "eng"),
        ("user", "upsert", None),
    ]
    assert sorted(events[-1]["object"]["groups"]) == ["contractors", "eng", "local"]
    # The decision and the memberships are one change: after them, nothing else.
    assert revision(admin) == events[-1]["revision"]

    # The audit log: each change by the sso-callback actor, naming group and user.
    changes = audit(admin, "group.add_member") + audit(admin, "group.remove_member")
    mine = {(a["action"], a["target"]) for a in changes if a["actor"] == "sso-callback"}
    assert mine == {
        ("group.add_member", "eng/alice"),
        ("group.add_member", "contractors/alice"),
        ("group.remove_member", "ops/alice"),
    }
    [entry] = audit(admin, "sso.login")
    assert entry["after"]["groups_added"] == ["contractors", "eng"]
    assert entry["after"]["groups_removed"] == ["ops"]

    # Out of every mapped group at the IdP: out of every managed group here; local stays.
    idp.set_groups("alice", ["idp-hr"])
    page, decision = login(server, fleet, "alice", cid=2)
    assert page.status_code == 200 and decision["admitted"] is True
    assert groups_of(admin, "alice") == ["local"]

    # Back in EU contractors only; then the same again: the second login changes nothing.
    idp.set_groups("alice", ["idp-contractors-eu"])
    login(server, fleet, "alice", cid=3)
    assert groups_of(admin, "alice") == ["contractors", "local"]
    before = revision(admin)
    page, decision = login(server, fleet, "alice", cid=4)
    assert decision["admitted"] is True
    assert revision(admin) == before
    assert audit(admin, "sso.login")[0]["after"]["groups_added"] == []


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        # The client did not ask for the groups scope: the IdP sends no groups claim. An
        # absent claim is never read as "in no group" (that would strip every membership).
        ({"scopes": ["openid", "profile", "email"]}, "token has no 'groups' claim"),
        # A claim that is there but not a list (the e-mail is a string).
        ({"groups_claim": "email"}, "'email' claim is not a list of groups"),
    ],
)
def test_an_unusable_claim_refuses_the_login_and_changes_nothing(
    server: Server,
    admin: httpx.Client,
    fleet: str,
    idp: Idp,
    over: dict[str, Any],
    reason: str,
) -> None:
    idp.set_groups("alice", ["idp-eng"])
    assert admin.put("/api/v1/idp", json=idp_settings(idp, server, **over)).status_code == 200
    start = revision(admin)
    page, decision = login(server, fleet, "alice", cid=5)
    assert page.status_code == 403 and reason in html.unescape(page.text)
    assert decision["admitted"] is False and reason in decision["reason"]
    assert groups_of(admin, "alice") == ["local", "ops"]
    assert revision(admin) == start
    assert all(a["actor"] != "sso-callback" for a in audit(admin, "group.add_member"))


def test_too_many_groups_at_the_idp_refuses_the_login(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    """Past its limit the IdP leaves the claim out and points elsewhere (`_claim_names`, as
    Entra ID does past 200 groups): refused with that reason, nothing changed."""
    idp.set_groups("alice", ["idp-eng", *(f"idp-team-{i}" for i in range(OVERAGE))])
    start = revision(admin)
    page, decision = login(server, fleet, "alice", cid=6)
    assert page.status_code == 403 and "left the 'groups' claim out" in html.unescape(page.text)
    assert decision["admitted"] is False
    assert groups_of(admin, "alice") == ["local", "ops"]
    assert revision(admin) == start


def test_a_refused_identity_changes_no_membership(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    """Bob signs in at the IdP for alice's connection: refused before any group is looked at,
    so neither alice's nor bob's memberships follow bob's claim."""
    idp.set_groups("bob", ["idp-ops", "idp-contractors-eu"])
    start = revision(admin)
    page, decision = login(server, fleet, "alice", cid=7, as_user="bob")
    assert page.status_code == 403 and decision["admitted"] is False
    assert groups_of(admin, "alice") == ["local", "ops"]
    assert groups_of(admin, "bob") == ["eng"]
    assert revision(admin) == start


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_membership_changed_meanwhile_ends_as_the_claim_says(
    server: Server, admin: httpx.Client, fleet: str, idp: Idp
) -> None:
    """Another transaction removes alice from ops while her login does the same (PostgreSQL,
    where the login's delete waits for that uncommitted one: a race only a real concurrent
    writer produces). The login goes on once it commits, is admitted, and alice's
    memberships are what the claim says, with her state sent to the agents."""
    idp.set_groups("alice", ["idp-eng"])
    start = revision(admin)
    engine = create_engine(server.database_url)
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    try:
        with engine.connect() as other, ThreadPoolExecutor(1) as pool:
            tx = other.begin()
            other.execute(
                text(
                    "DELETE FROM memberships WHERE group_id = (SELECT id FROM groups WHERE "
                    "name = 'ops') AND user_id = (SELECT id FROM users WHERE name = 'alice')"
                )
            )
            pending = pool.submit(login, server, fleet, "alice", 8)
            deadline = time.monotonic() + 30
            with engine.connect() as watcher:
                while not watcher.execute(waiting).scalar():
                    assert time.monotonic() < deadline, "the login never waited for the row"
                    assert not pending.done(), pending.result()
                    time.sleep(0.05)
            tx.commit()
            page, decision = pending.result(timeout=60)
    finally:
        engine.dispose()
    assert page.status_code == 200 and decision["admitted"] is True
    assert groups_of(admin, "alice") == ["eng", "local"]
    events = read_events(server, start, 3)
    assert [(e["kind"], e["op"]) for e in events] == [
        ("membership", "delete"),
        ("membership", "upsert"),
        ("user", "upsert"),
    ]
    assert sorted(events[-1]["object"]["groups"]) == ["eng", "local"]


# --- settings -----------------------------------------------------------------------------


def directory_body(group_map: dict[str, str]) -> dict[str, Any]:
    return {
        "url": "ldap://127.0.0.1:389",
        "bind_dn": "cn=sync,dc=example,dc=test",
        "bind_password": "bind-pw-8Qe",
        "user_bases": ["ou=people,dc=example,dc=test"],
        "group_bases": ["ou=groups,dc=example,dc=test"],
        "group_map": group_map,
        "enabled": False,
    }


def test_managed_groups_must_exist_and_have_one_source(
    server: Server, admin: httpx.Client, idp: Idp
) -> None:
    for name in ("eng", "ops", "contractors"):
        assert admin.post("/api/v1/groups", json={"name": name}).status_code == 201
    # A mapped group that does not exist is refused (not created), and nothing is stored.
    body = idp_settings(idp, server, group_map={**GROUP_MAP, "idp-sales": "sales"})
    assert "do not exist: 'sales'" in problem(admin.put("/api/v1/idp", json=body), 409)
    assert problem(admin.get("/api/v1/idp"), 404)

    # The directory manages ops: the IdP may not; the refusal changes nothing.
    r = admin.put("/api/v1/directory", json=directory_body({"cn=ops,ou=groups": "ops"}))
    assert r.status_code == 200, r.text
    detail = problem(admin.put("/api/v1/idp", json=idp_settings(idp, server)), 409)
    assert "directory sync already manages 'ops'" in detail
    assert problem(admin.get("/api/v1/idp"), 404)
    # Without ops the IdP's mapping is accepted ...
    no_ops = {k: v for k, v in GROUP_MAP.items() if v != "ops"}
    r = admin.put("/api/v1/idp", json=idp_settings(idp, server, group_map=no_ops))
    assert r.status_code == 200, r.text
    assert admin.get("/api/v1/idp").json()["group_map"] == no_ops
    # ... and now the directory may not take eng, which the IdP manages.
    taking = directory_body({"cn=ops,ou=groups": "ops", "cn=eng,ou=groups": "eng"})
    detail = problem(admin.put("/api/v1/directory", json=taking), 409)
    assert "IdP's group claim already manages 'eng'" in detail
    assert admin.get("/api/v1/directory").json()["group_map"] == {"cn=ops,ou=groups": "ops"}
    # Memberships no longer follow the IdP: the directory may take eng.
    plain = idp_settings(idp, server, groups_claim=None, group_map={})
    assert admin.put("/api/v1/idp", json=plain).status_code == 200
    assert admin.put("/api/v1/directory", json=taking).status_code == 200
    # The change of settings is in the audit log.
    [latest, *_] = audit(admin, "idp.set")
    assert latest["before"]["group_map"] == no_ops and latest["after"]["group_map"] == {}
