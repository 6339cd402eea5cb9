"""Policy as code and user access through the real API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.api.test_watch import read_events
from tests.conftest import Server

POLICY = """\
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


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a write made through another endpoint to become visible.

    The shared `DB` dependency commits after the response is sent, so on PostgreSQL a read
    right after such a write (token creation, heartbeat) may still see the old state.
    """
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the write never became visible"
        time.sleep(0.05)


def apply(
    client: httpx.Client,
    text: str,
    *,
    dry_run: bool = False,
    prune: bool = False,
    status: int = 200,
) -> dict[str, Any]:
    resp = client.post(
        "/api/v1/policy/apply",
        params={"dry_run": str(dry_run).lower(), "prune": str(prune).lower()},
        json={"yaml": text, "filename": "policy.yaml"},
    )
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    return body


def revision(admin: httpx.Client) -> int:
    return int(admin.get("/api/v1/revision").json()["revision"])


def state(admin: httpx.Client) -> dict[str, Any]:
    """Everything a policy controls, in a comparable form."""
    return {
        "users": admin.get("/api/v1/users").json(),
        "groups": admin.get("/api/v1/groups").json(),
        "rules": admin.get("/api/v1/rules").json(),
    }


def policy_audit_rows(admin: httpx.Client) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = admin.get(
        "/api/v1/audit/admin", params={"action": "policy."}
    ).json()
    return rows


def test_apply_creates_everything_and_a_second_apply_is_a_no_op(admin: httpx.Client) -> None:
    start = revision(admin)
    out = apply(admin, POLICY)
    assert out["changed"] is True and out["dry_run"] is False
    assert out["revision"] == revision(admin) > start
    assert [u["name"] for u in out["users"]["created"]] == ["alice", "gary"]
    assert [g["name"] for g in out["groups"]["created"]] == ["devs", "ops"]
    assert len(out["grants"]["added"]) == 3 and len(out["memberships"]["added"]) == 3

    users = {u["name"]: u for u in admin.get("/api/v1/users").json()}
    assert users["alice"]["groups"] == ["devs"] and users["alice"]["max_sessions"] == 2
    assert users["alice"]["email"] == "alice@example.com"
    assert users["gary"]["groups"] == ["devs", "ops"] and users["gary"]["gateway_address"]
    assert users["alice"]["certificate"]["common_name"] == "alice"
    assert users["gary"]["certificate"] is not None
    rules = {(r["group"], r["destination"], r["proto"], r["ports"]) for r in state(admin)["rules"]}
    assert rules == {
        ("devs", "10.10.0.0/16", "tcp", "22,443,8000-8100"),
        ("devs", "10.20.0.5/32", "any", None),
        ("ops", "10.0.0.0/8", "icmp", None),
    }
    groups = {g["name"]: g for g in admin.get("/api/v1/groups").json()}
    assert groups["devs"]["description"] == "Developers"

    # One audit row for the whole apply, none per object.
    rows = admin.get("/api/v1/audit/admin").json()
    actions = [r["action"] for r in rows]
    assert actions.count("policy.apply") == 1
    assert not {"user.create", "group.create", "rule.create"} & set(actions)
    row = rows[actions.index("policy.apply")]
    assert row["after"]["summary"] == out["summary"] and row["revision"] == out["revision"]
    assert row["target"] == "policy.yaml"

    before = state(admin)
    head = revision(admin)
    again = apply(admin, POLICY)
    assert again["changed"] is False and again["summary"] == "no changes"
    assert again["revision"] == head == revision(admin)
    assert state(admin) == before


def test_dry_run_writes_nothing(admin: httpx.Client) -> None:
    head = revision(admin)
    audit_before = len(admin.get("/api/v1/audit/admin").json())
    out = apply(admin, POLICY, dry_run=True)
    assert out["dry_run"] is True and out["changed"] is True
    assert [u["name"] for u in out["users"]["created"]] == ["alice", "gary"]
    assert out["revision"] == head == revision(admin)
    assert state(admin) == {"users": [], "groups": [], "rules": []}
    assert len(admin.get("/api/v1/audit/admin").json()) == audit_before


def test_updates_replace_grants_and_leave_unnamed_objects_alone(admin: httpx.Client) -> None:
    apply(admin, POLICY)
    # Objects the file does not name: bob, legacy, and bob's membership of devs.
    admin.post("/api/v1/users", json={"name": "bob"}).raise_for_status()
    admin.post("/api/v1/groups", json={"name": "legacy"}).raise_for_status()
    admin.post("/api/v1/groups/legacy/members", json={"user": "alice"}).raise_for_status()
    admin.post("/api/v1/groups/devs/members", json={"user": "bob"}).raise_for_status()
    gary_address = admin.get("/api/v1/users/gary").json()["gateway_address"]

    changed = (
        POLICY.replace("mode: nat, max_sessions: 2", "mode: gateway, max_sessions: 2")
        .replace("gary: {mode: gateway, groups: [devs, ops]}", "gary: {groups: [ops]}")
        .replace('ports: "22,443,8000-8100"', 'ports: "22,443"')
        .replace("description: Developers", "description: Developers and SREs")
    )
    out = apply(admin, changed)
    assert {u["name"]: {c["field"] for c in u["changes"]} for u in out["users"]["updated"]} == {
        "alice": {"mode"},
        "gary": {"mode"},
    }
    assert out["memberships"]["removed"] == [{"group": "devs", "user": "gary"}]
    assert [g["ports"] for g in out["grants"]["added"]] == ["22,443"]
    assert [g["ports"] for g in out["grants"]["removed"]] == ["22,443,8000-8100"]
    assert out["groups"]["updated"][0]["changes"] == [
        {"field": "description", "old": "Developers", "new": "Developers and SREs"}
    ]
    users = {u["name"]: u for u in admin.get("/api/v1/users").json()}
    assert users["alice"]["mode"] == "gateway" and users["alice"]["gateway_address"]
    assert users["alice"]["groups"] == ["devs", "legacy"]  # legacy is not managed
    assert users["gary"]["mode"] == "nat" and users["gary"]["gateway_address"] is None
    assert gary_address and users["gary"]["groups"] == ["ops"]
    assert users["bob"]["groups"] == ["devs"]
    assert "legacy" in {g["name"] for g in admin.get("/api/v1/groups").json()}


def test_prune_deletes_unnamed_users_and_groups(admin: httpx.Client) -> None:
    apply(admin, POLICY)
    bob = admin.post("/api/v1/users", json={"name": "bob", "groups": ["devs"]}).json()
    admin.post("/api/v1/groups", json={"name": "legacy"}).raise_for_status()
    admin.post(
        "/api/v1/rules", json={"group": "legacy", "destination": "192.168.0.0/24"}
    ).raise_for_status()
    admin.post("/api/v1/groups/legacy/members", json={"user": "alice"}).raise_for_status()

    without = apply(admin, POLICY, dry_run=True)
    assert without["users"]["deleted"] == [] and without["groups"]["deleted"] == []
    assert without["changed"] is False

    planned = apply(admin, POLICY, dry_run=True, prune=True)
    assert planned["users"]["deleted"] == ["bob"] and planned["groups"]["deleted"] == ["legacy"]
    assert "bob" in {u["name"] for u in admin.get("/api/v1/users").json()}

    out = apply(admin, POLICY, prune=True)
    assert out["users"]["deleted"] == ["bob"] and out["groups"]["deleted"] == ["legacy"]
    assert {u["name"] for u in admin.get("/api/v1/users").json()} == {"alice", "gary"}
    assert {g["name"] for g in admin.get("/api/v1/groups").json()} == {"devs", "ops"}
    assert admin.get("/api/v1/users/alice").json()["groups"] == ["devs"]
    assert "192.168.0.0/24" not in {r["destination"] for r in admin.get("/api/v1/rules").json()}
    # The pruned user's certificate is revoked like on DELETE /users/bob.
    from cryptography import x509

    crl = x509.load_pem_x509_crl(admin.get("/api/v1/pki/crl").text.encode())
    serial = int(bob["certificate"]["serial"])
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_a_failing_apply_leaves_the_database_untouched(admin: httpx.Client) -> None:
    apply(admin, POLICY)
    # A /29 gateway pool holds 5 clients; gary has one address already.
    admin.put("/api/v1/pools/gateway", json={"cidr": "10.201.0.0/29"}).raise_for_status()
    before, head = state(admin), revision(admin)
    audit_before = len(admin.get("/api/v1/audit/admin").json())
    users = "\n".join(f"  gw{i}: {{mode: gateway, groups: [ops]}}" for i in range(6))
    bigger = POLICY.replace("users:\n", "users:\n" + users + "\n").replace(
        "  ops: {grants:", "  new: {}\n  ops: {grants:"
    )
    resp = admin.post("/api/v1/policy/apply", json={"yaml": bigger})
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert "exhausted" in resp.json()["detail"]
    assert state(admin) == before and revision(admin) == head
    assert len(admin.get("/api/v1/audit/admin").json()) == audit_before


def test_invalid_policy_is_422_with_lines_and_writes_nothing(admin: httpx.Client) -> None:
    bad = textwrap.dedent(
        """\
        version: 1
        users:
          alice: {groups: [devs, nope]}
        groups:
          devs:
            grants:
              - {destination: 10.0.0.0/8, proto: tcp, ports: 70000}
        """
    )
    for path in ("/api/v1/policy/apply", "/api/v1/policy/check"):
        resp = admin.post(path, json={"yaml": bad, "filename": "team.yaml"})
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        body = resp.json()
        assert body["errors"] == [
            {
                "line": 3,
                "field": "users.alice.groups[1]",
                "message": "group 'nope' is not defined under 'groups'",
            },
            {
                "line": 7,
                "field": "groups.devs.grants[0].ports",
                "message": "port 70000 is out of range 1-65535",
            },
        ]
        assert body["detail"].startswith("team.yaml:3: users.alice.groups[1]: group 'nope'")
    assert state(admin) == {"users": [], "groups": [], "rules": []}
    dup = admin.post(
        "/api/v1/policy/apply", json={"yaml": "version: 1\nusers: {}\nusers: {a: {}}\n"}
    )
    assert dup.status_code == 422 and dup.json()["errors"][0]["line"] == 3
    assert admin.get("/api/v1/users").json() == []
    missing = admin.post("/api/v1/policy/apply", json={"filename": "x.yaml"})
    assert missing.status_code == 422


def test_check_reports_counts_and_overlap_warnings(admin: httpx.Client) -> None:
    text = POLICY.replace(
        "      - {destination: 10.20.0.5, proto: any}\n",
        "      - {destination: 10.20.0.5, proto: any}\n"
        "      - {destination: 10.10.1.0/24, proto: tcp, ports: 443}\n",
    )
    out = admin.post("/api/v1/policy/check", json={"yaml": text}).json()
    assert (out["valid"], out["users"], out["groups"], out["grants"]) == (True, 2, 2, 4)
    assert [(w["line"], w["field"]) for w in out["warnings"]] == [(11, "groups.devs.grants[2]")]
    dry = apply(admin, text, dry_run=True)
    assert dry["warnings"] == out["warnings"]


def test_export_then_apply_is_a_no_op(admin: httpx.Client) -> None:
    # State built by the individual endpoints, with every field a policy carries.
    for body in (
        {"name": "devs", "description": "Developers: 'quoted' and # hashed"},
        {"name": "no"},
        {"name": "empty", "description": ""},
    ):
        admin.post("/api/v1/groups", json=body).raise_for_status()
    for body in (
        {"group": "devs", "destination": "10.10.0.0/16", "proto": "tcp", "ports": "22,443"},
        {"group": "devs", "destination": "10.20.0.5", "description": "the build box"},
        {"group": "no", "destination": "10.0.0.0/8", "proto": "icmp"},
        {"group": "no", "destination": "10.30.0.0/16", "proto": "udp"},
    ):
        admin.post("/api/v1/rules", json=body).raise_for_status()
    for body in (
        {"name": "alice", "email": "alice@example.com", "groups": ["devs", "no"]},
        {"name": "gary", "mode": "gateway", "max_sessions": 3, "groups": ["devs"]},
        {"name": "007", "enabled": False},
    ):
        admin.post("/api/v1/users", json=body).raise_for_status()

    resp = admin.get("/api/v1/policy/export")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/yaml")
    exported = resp.text
    assert exported.startswith("# vpnfleet policy exported at revision")
    assert "10.20.0.5" in exported and "the build box" in exported
    before, head = state(admin), revision(admin)
    out = apply(admin, exported, prune=True)
    assert out["changed"] is False, out
    assert state(admin) == before and revision(admin) == head
    # An auditor may read the export (and check files) but not apply.
    auditor = token_client(admin, "auditor")
    assert auditor.get("/api/v1/policy/export").text == exported
    assert auditor.post("/api/v1/policy/check", json={"yaml": exported}).status_code == 200
    denied = auditor.post("/api/v1/policy/apply", json={"yaml": exported})
    assert denied.status_code == 403


def token_client(admin: httpx.Client, role: str, name: str = "") -> httpx.Client:
    """A client with a new token of `role` on the same server as `admin`."""
    r = admin.post("/api/v1/tokens", json={"name": name or f"{role}-policy", "role": role})
    r.raise_for_status()
    client = httpx.Client(
        base_url=str(admin.base_url),
        headers={"Authorization": f"Bearer {r.json()['token']}"},
        timeout=30,
    )
    eventually(lambda: client.get("/api/v1/whoami").status_code == 200)
    return client


def test_apply_emits_the_same_events_as_the_endpoints(server: Server, admin: httpx.Client) -> None:
    start = revision(admin)
    out = apply(admin, POLICY)
    events = read_events(server, start, 7)
    assert [(e["kind"], e["op"]) for e in events] == [
        ("group", "upsert"),
        ("group", "upsert"),
        ("rule", "upsert"),
        ("rule", "upsert"),
        ("rule", "upsert"),
        ("user", "upsert"),
        ("user", "upsert"),
    ]
    assert events[-1]["revision"] == out["revision"]
    gary = events[-1]["object"]
    assert gary["groups"] == ["devs", "ops"] and gary["gateway_address"] and gary["cert_serial"]
    devs = events[0]["object"]
    assert devs["name"] == "devs" and events[2]["object"]["group_id"] == devs["id"]
    assert events[2]["object"]["ports"] == "22,443,8000-8100"
    assert events[2]["object"]["proto"] == "tcp"

    # A user made by POST /users carries the same event fields as one made by a policy.
    mid = revision(admin)
    admin.post("/api/v1/users", json={"name": "manual", "groups": ["ops"]}).raise_for_status()
    manual = read_events(server, mid, 1)[0]
    assert manual["kind"] == "user" and set(manual["object"]) == set(gary)

    # Membership changes: the membership event, then the user's new state.
    mid = revision(admin)
    out = apply(admin, POLICY.replace("groups: [devs, ops]}", "groups: [ops]}"))
    events = read_events(server, mid, 2)
    assert [(e["kind"], e["op"]) for e in events] == [("membership", "delete"), ("user", "upsert")]
    assert events[0]["key"]["user"] == "gary" and events[0]["key"]["group"] == "devs"
    assert events[1]["object"]["groups"] == ["ops"] and events[1]["revision"] == out["revision"]

    # Prune: the same events as DELETE /users/manual and DELETE /groups/ops.
    mid = revision(admin)
    pruned = POLICY.replace("  ops: {grants: [{destination: 10.0.0.0/8, proto: icmp}]}\n", "")
    pruned = pruned.replace("groups: [devs, ops]}", "groups: [devs]}")
    apply(admin, pruned, prune=True)
    events = read_events(server, mid, 5)
    assert [(e["kind"], e["op"], (e.get("object") or e["key"]).get("name")) for e in events] == [
        ("membership", "upsert", None),
        ("user", "delete", "manual"),
        ("crl", "upsert", None),
        ("group", "delete", "ops"),
        ("user", "upsert", "gary"),
    ]
    assert events[-1]["object"]["groups"] == ["devs"]
    assert events[0]["object"]["user"] == "gary" and events[0]["object"]["group"] == "devs"


def register_pod(admin: httpx.Client, name: str) -> httpx.Client:
    """Register pod `name` the way its agent does; returns the agent's client."""
    enroller = token_client(admin, "agent", f"agent-{name}")
    r = enroller.post("/api/v1/agent/enroll", json={"name": name})
    enroller.close()
    r.raise_for_status()
    agent = httpx.Client(
        base_url=str(admin.base_url),
        headers={"Authorization": f"Bearer {r.json()['token']}"},
        timeout=30,
    )
    agent.post("/api/v1/agent/register", json={"name": name}).raise_for_status()
    return agent


def heartbeat(admin: httpx.Client, agent: httpx.Client, name: str, applied: int) -> None:
    """Report `applied` as the pod's revision and wait until operators can see it."""
    r = agent.post(
        "/api/v1/agent/heartbeat", json={"name": name, "applied_revision": applied, "ready": True}
    )
    r.raise_for_status()
    eventually(
        lambda: any(
            p["name"] == name and p["applied_revision"] == applied
            for p in admin.get("/api/v1/pods").json()
        )
    )


def test_user_access_shows_grants_and_enforcement(server: Server, admin: httpx.Client) -> None:
    apply(admin, POLICY)
    agent_a = register_pod(admin, "pod-a")
    agent_b = register_pod(admin, "pod-b")

    access = admin.get("/api/v1/users/gary/access").json()
    assert access["user"] == "gary" and access["mode"] == "gateway" and access["enabled"]
    assert access["groups"] == ["devs", "ops"]
    assert [(g["group"], g["destination"], g["proto"], g["ports"]) for g in access["grants"]] == [
        ("devs", "10.10.0.0/16", "tcp", "22,443,8000-8100"),
        ("devs", "10.20.0.5/32", "any", None),
        ("ops", "10.0.0.0/8", "icmp", None),
    ]
    needed = access["revision"]
    assert 0 < needed <= access["current_revision"]
    assert [(p["pod"], p["applied_revision"], p["enforced"]) for p in access["pods"]] == [
        ("pod-a", 0, False),
        ("pod-b", 0, False),
    ]
    assert access["enforced_everywhere"] is False

    # pod-a catches up; pod-b is one revision short.
    heartbeat(admin, agent_a, "pod-a", needed)
    heartbeat(admin, agent_b, "pod-b", needed - 1)
    pods = {p["pod"]: p for p in admin.get("/api/v1/users/gary/access").json()["pods"]}
    assert pods["pod-a"]["enforced"] is True and pods["pod-a"]["last_heartbeat"]
    assert pods["pod-b"]["enforced"] is False
    heartbeat(admin, agent_b, "pod-b", needed)
    assert admin.get("/api/v1/users/gary/access").json()["enforced_everywhere"] is True

    # A change elsewhere does not affect gary; a new grant on one of his groups does.
    admin.post("/api/v1/users", json={"name": "other"}).raise_for_status()
    admin.post("/api/v1/groups", json={"name": "unrelated"}).raise_for_status()
    admin.post(
        "/api/v1/rules", json={"group": "unrelated", "destination": "172.16.0.0/12"}
    ).raise_for_status()
    assert admin.get("/api/v1/users/gary/access").json()["enforced_everywhere"] is True
    admin.post(
        "/api/v1/rules",
        json={"group": "ops", "destination": "10.50.0.0/16", "proto": "udp", "ports": "53"},
    ).raise_for_status()
    access = admin.get("/api/v1/users/gary/access").json()
    assert access["revision"] == access["current_revision"] > needed
    assert not any(p["enforced"] for p in access["pods"])
    assert ("ops", "10.50.0.0/16") in {(g["group"], g["destination"]) for g in access["grants"]}
    heartbeat(admin, agent_a, "pod-a", access["current_revision"])
    pods = {p["pod"]: p for p in admin.get("/api/v1/users/gary/access").json()["pods"]}
    assert pods["pod-a"]["enforced"] and not pods["pod-b"]["enforced"]

    # Leaving a group is a change to the user.
    apply(admin, POLICY.replace("groups: [devs, ops]}", "groups: [devs]}"))
    access = admin.get("/api/v1/users/gary/access").json()
    assert access["groups"] == ["devs"] and not any(p["enforced"] for p in access["pods"])

    # Auditors may look; agents may not; unknown users are 404.
    auditor = token_client(admin, "auditor")
    assert auditor.get("/api/v1/users/gary/access").status_code == 200
    assert agent_a.get("/api/v1/users/gary/access").status_code == 403
    assert admin.get("/api/v1/users/ghost/access").status_code == 404


def test_concurrent_applies_of_one_file_create_everything_once(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> dict[str, Any]:
        with server.client() as c:
            return apply(c, POLICY)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert sorted(r["changed"] for r in results) == [False, False, False, True]
    with server.client() as c:
        assert [u["name"] for u in c.get("/api/v1/users").json()] == ["alice", "gary"]
        assert len(c.get("/api/v1/rules").json()) == 3


def test_auth_policies_from_a_file(admin: httpx.Client) -> None:
    """Groups and users carry their single sign-on policy in the file (docs/sso.md); a file
    that does not mention it leaves it as it is."""
    text = textwrap.dedent(
        """\
        version: 1
        users:
          ann: {groups: [staff]}
          bot: {auth_policy: cert, groups: [staff]}
        groups:
          staff: {auth_policy: cert+sso}
        """
    )
    assert apply(admin, text)["changed"] is True

    def auth() -> dict[str, tuple[str | None, str]]:
        out = {}
        for name in ("ann", "bot"):
            u = admin.get(f"/api/v1/users/{name}").json()
            out[name] = (u["auth_policy"], u["auth"])
        return out

    assert auth() == {"ann": (None, "cert+sso"), "bot": ("cert", "cert")}
    group = admin.get("/api/v1/groups/staff").json()
    assert group["auth_policy"] == "cert+sso"
    exported = admin.get("/api/v1/policy/export").text
    assert "auth_policy: cert+sso" in exported and "auth_policy: inherit" in exported
    assert apply(admin, exported)["changed"] is False
    # The same file before auth policies existed: nothing changes.
    older = text.replace("auth_policy: cert, ", "").replace("{auth_policy: cert+sso}", "{}")
    assert apply(admin, older)["changed"] is False
    assert auth() == {"ann": (None, "cert+sso"), "bot": ("cert", "cert")}
    # Lifting the requirement is explicit.
    lifted = text.replace("auth_policy: cert, ", "auth_policy: inherit, ").replace(
        "auth_policy: cert+sso", "auth_policy: none"
    )
    out = apply(admin, lifted)
    assert out["changed"] is True
    assert auth() == {"ann": (None, "cert"), "bot": (None, "cert")}
    assert admin.get("/api/v1/groups/staff").json()["auth_policy"] is None
    bad = apply(admin, text.replace("cert+sso", "sso"), status=422)
    assert "groups.staff.auth_policy" in json.dumps(bad)
