"""Auth policies (`cert`, `cert+sso`) on users and groups: the API, the audit log, and what
agents see in their snapshot and watch stream (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.test_cli import run
from tests.api.test_users_groups_rules import problem
from tests.api.test_watch import read_events
from tests.conftest import Server


def auth_of(admin: httpx.Client, name: str) -> tuple[str | None, str]:
    u = admin.get(f"/api/v1/users/{name}").json()
    return u["auth_policy"], u["auth"]


def snapshot_auth(server: Server, pod_token: str) -> dict[str, str]:
    with server.client(pod_token) as pod:
        snap = pod.get("/api/v1/agent/snapshot")
        assert snap.status_code == 200, snap.text
        return {u["name"]: u["auth"] for u in snap.json()["users"]}


def test_policies_resolve_and_reach_the_agents(server: Server, admin: httpx.Client) -> None:
    pod = server.pod_token("pod1")
    for name in ("alice", "bob", "svc"):
        assert admin.post("/api/v1/users", json={"name": name}).status_code == 201
    assert admin.post("/api/v1/groups", json={"name": "staff"}).status_code == 201
    for name in ("alice", "svc"):
        assert admin.post("/api/v1/groups/staff/members", json={"user": name}).status_code == 200
    assert auth_of(admin, "alice") == (None, "cert")
    assert snapshot_auth(server, pod) == {"alice": "cert", "bob": "cert", "svc": "cert"}

    # The service account is exempted by its own policy; then the group asks for SSO.
    r = admin.patch("/api/v1/users/svc", json={"auth_policy": "cert"})
    assert r.status_code == 200 and r.json()["auth"] == "cert"
    head = admin.get("/api/v1/revision").json()["revision"]
    r = admin.patch("/api/v1/groups/staff", json={"auth_policy": "cert+sso"})
    assert r.status_code == 200, r.text
    assert r.json()["auth_policy"] == "cert+sso"
    assert auth_of(admin, "alice") == (None, "cert+sso")
    assert auth_of(admin, "svc") == ("cert", "cert")
    assert auth_of(admin, "bob") == (None, "cert")
    # Agents hear each member's resolved policy from the watch stream ...
    events = read_events(server, head, 2)
    got = {e["object"]["name"]: e["object"]["auth"] for e in events if e["kind"] == "user"}
    assert got == {"alice": "cert+sso", "svc": "cert"}
    # ... and from a snapshot.
    assert snapshot_auth(server, pod) == {"alice": "cert+sso", "bob": "cert", "svc": "cert"}

    # Joining the group brings the policy; leaving it takes it away again.
    head = admin.get("/api/v1/revision").json()["revision"]
    assert admin.post("/api/v1/groups/staff/members", json={"user": "bob"}).status_code == 200
    users = [e for e in read_events(server, head, 2) if e["kind"] == "user"]
    assert users[-1]["object"]["name"] == "bob" and users[-1]["object"]["auth"] == "cert+sso"
    assert admin.delete("/api/v1/groups/staff/members/bob").status_code == 200
    assert auth_of(admin, "bob") == (None, "cert")
    # Back to inheriting: null.
    r = admin.patch("/api/v1/users/svc", json={"auth_policy": None})
    assert r.status_code == 200 and (r.json()["auth_policy"], r.json()["auth"]) == (
        None,
        "cert+sso",
    )
    assert admin.patch("/api/v1/groups/staff", json={"auth_policy": None}).status_code == 200
    assert snapshot_auth(server, pod) == {"alice": "cert", "bob": "cert", "svc": "cert"}

    audit = admin.get("/api/v1/audit/admin", params={"action": "group.auth_policy"}).json()
    pairs = {(a["before"]["auth_policy"], a["after"]["auth_policy"]) for a in audit}
    assert pairs == {(None, "cert+sso"), ("cert+sso", None)} and len(audit) == 2
    updates = admin.get("/api/v1/audit/admin", params={"action": "user.update"}).json()
    svc = {(a["before"]["auth_policy"], a["after"]["auth_policy"]) for a in updates}
    assert svc == {(None, "cert"), ("cert", None)}


def test_bad_policies_are_refused_and_change_nothing(admin: httpx.Client) -> None:
    assert admin.post("/api/v1/users", json={"name": "alice"}).status_code == 201
    assert admin.post("/api/v1/groups", json={"name": "staff"}).status_code == 201
    bad: dict[str, Any] = {"auth_policy": "sso"}
    assert "auth policy must be one of cert, cert+sso" in problem(
        admin.patch("/api/v1/users/alice", json=bad), 422
    )
    assert "auth policy must be one of" in problem(
        admin.patch("/api/v1/groups/staff", json=bad), 422
    )
    assert problem(admin.patch("/api/v1/groups/nobody", json={"auth_policy": "cert"}), 404)
    assert auth_of(admin, "alice") == (None, "cert")
    assert admin.get("/api/v1/groups/staff").json()["auth_policy"] is None


def test_an_auditor_cannot_change_policies(server: Server, admin: httpx.Client) -> None:
    assert admin.post("/api/v1/groups", json={"name": "staff"}).status_code == 201
    with server.client(server.make_token("auditor")) as aud:
        assert problem(aud.patch("/api/v1/groups/staff", json={"auth_policy": "cert"}), 403)


def test_cli_sets_policies(server: Server, admin: httpx.Client) -> None:
    run(server, "user", "add", "alice")
    run(server, "group", "add", "staff")
    run(server, "group", "add-member", "staff", "alice")
    run(server, "group", "set", "staff", "--auth-policy", "cert+sso")
    assert "cert+sso" in run(server, "user", "list").stdout
    run(server, "user", "set", "alice", "--auth-policy", "cert")
    assert auth_of(admin, "alice") == ("cert", "cert")
    run(server, "user", "set", "alice", "--auth-policy", "inherit")
    assert auth_of(admin, "alice") == (None, "cert+sso")
    run(server, "group", "set", "staff", "--auth-policy", "none")
    assert auth_of(admin, "alice") == (None, "cert")
    bad = run(server, "group", "set", "staff", "--auth-policy", "sso", ok=False)
    assert bad.returncode != 0 and "auth policy must be one of" in bad.stderr
