"""Users, groups, rules and pools through the real API, on SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server


def problem(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status
    return str(body["detail"])


def count(admin: httpx.Client, path: str) -> int:
    return len(admin.get(path).json())


def test_user_lifecycle(admin: httpx.Client) -> None:
    r = admin.post("/api/v1/users", json={"name": "alice", "email": "alice@example.com"})
    assert r.status_code == 201, r.text
    alice = r.json()
    assert alice["mode"] == "nat" and alice["enabled"] is True and alice["max_sessions"] == 1
    assert alice["certificate"]["common_name"] == "alice"
    assert alice["gateway_address"] is None

    r = admin.patch("/api/v1/users/alice", json={"max_sessions": 3})
    assert r.json()["max_sessions"] == 3
    assert admin.post("/api/v1/users/alice/disable").json()["enabled"] is False
    assert admin.get("/api/v1/users/alice").json()["enabled"] is False
    assert admin.post("/api/v1/users/alice/enable").json()["enabled"] is True

    assert admin.delete("/api/v1/users/alice").status_code == 204
    assert "does not exist" in problem(admin.get("/api/v1/users/alice"), 404)


def test_gateway_users_get_stable_unique_addresses(admin: httpx.Client) -> None:
    a = admin.post("/api/v1/users", json={"name": "gw-a", "mode": "gateway"}).json()
    b = admin.post("/api/v1/users", json={"name": "gw-b", "mode": "gateway"}).json()
    assert a["gateway_address"] and b["gateway_address"]
    assert a["gateway_address"] != b["gateway_address"]
    # Stable: changing something else keeps the address.
    again = admin.patch("/api/v1/users/gw-a", json={"max_sessions": 2}).json()
    assert again["gateway_address"] == a["gateway_address"]
    # Back to NAT releases it; the pool shows the lease count.
    assert admin.patch("/api/v1/users/gw-a", json={"mode": "nat"}).json()["gateway_address"] is None
    pools = {p["kind"]: p for p in admin.get("/api/v1/pools").json()}
    assert pools["gateway"]["leases"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Alice"}, "name"),
        ({"name": "-x"}, "name"),
        ({"name": "a" * 65}, "name"),
        ({"name": "ok", "mode": "bridge"}, "mode"),
        ({"name": "ok", "email": "not-an-email"}, "email"),
        ({"name": "ok", "max_sessions": 0}, "max_sessions"),
        ({"name": "ok", "unexpected": 1}, "unexpected"),
        ({}, "name"),
    ],
)
def test_bad_user_input_is_rejected_and_nothing_written(
    admin: httpx.Client, body: dict[str, object], field: str
) -> None:
    r = admin.post("/api/v1/users", json=body)
    detail = problem(r, 422)
    assert field in detail
    assert r.json()["errors"][0]["field"] == field
    assert count(admin, "/api/v1/users") == 0


def test_malformed_json_is_a_clear_error(admin: httpx.Client) -> None:
    r = admin.post(
        "/api/v1/users", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in problem(r, 422)


def test_unknown_group_on_create_writes_nothing(admin: httpx.Client) -> None:
    r = admin.post("/api/v1/users", json={"name": "bob", "groups": ["nope"]})
    assert "group 'nope' does not exist" in problem(r, 404)
    assert count(admin, "/api/v1/users") == 0
    # Not even a certificate or an audit row.
    assert admin.get("/api/v1/pki").json()["issued"] == 0
    assert admin.get("/api/v1/audit/admin").json() == []


def test_duplicates_conflict(admin: httpx.Client) -> None:
    assert admin.post("/api/v1/users", json={"name": "carol"}).status_code == 201
    assert "already exists" in problem(admin.post("/api/v1/users", json={"name": "carol"}), 409)
    assert admin.post("/api/v1/groups", json={"name": "devs"}).status_code == 201
    assert "already exists" in problem(admin.post("/api/v1/groups", json={"name": "devs"}), 409)
    assert admin.post("/api/v1/groups/devs/members", json={"user": "carol"}).status_code == 200
    r = admin.post("/api/v1/groups/devs/members", json={"user": "carol"})
    assert "already a member" in problem(r, 409)


def test_groups_members_and_rules(admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "dave"})
    admin.post("/api/v1/groups", json={"name": "ops", "description": "operations"})
    g = admin.post("/api/v1/groups/ops/members", json={"user": "dave"}).json()
    assert g["members"] == ["dave"]
    assert admin.get("/api/v1/users/dave").json()["groups"] == ["ops"]

    r = admin.post(
        "/api/v1/rules",
        json={
            "group": "ops",
            "destination": "10.10.0.0/16",
            "proto": "TCP",
            "ports": "443, 80,81-90,85",
        },
    )
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["proto"] == "tcp" and rule["ports"] == "80-90,443"
    host = admin.post("/api/v1/rules", json={"group": "ops", "destination": "10.0.0.5"}).json()
    assert host["destination"] == "10.0.0.5/32" and host["proto"] == "any"
    assert "already has this rule" in problem(
        admin.post("/api/v1/rules", json={"group": "ops", "destination": "10.0.0.5/32"}), 409
    )
    assert len(admin.get("/api/v1/rules", params={"group": "ops"}).json()) == 2
    assert admin.delete(f"/api/v1/rules/{rule['id']}").status_code == 204
    assert problem(admin.delete(f"/api/v1/rules/{rule['id']}"), 404)

    r = admin.delete("/api/v1/groups/ops/members/dave")
    assert r.json()["members"] == []
    assert admin.delete("/api/v1/groups/ops").status_code == 204
    assert admin.get("/api/v1/rules").json() == []


@pytest.mark.parametrize(
    ("rule", "field", "words"),
    [
        ({"destination": "10.0.0.5/24"}, "destination", "host bits"),
        ({"destination": "10.0.0.0/33"}, "destination", "not an IPv4"),
        ({"destination": "fe80::/64"}, "destination", "IPv6"),
        ({"destination": "banana"}, "destination", "not an IPv4"),
        ({"destination": "10.0.0.0/8", "proto": "sctp"}, "proto", "unknown protocol"),
        ({"destination": "10.0.0.0/8", "proto": "tcp", "ports": "0"}, "ports", "out of range"),
        ({"destination": "10.0.0.0/8", "proto": "tcp", "ports": "65536"}, "ports", "out of range"),
        ({"destination": "10.0.0.0/8", "proto": "tcp", "ports": "90-80"}, "ports", "reversed"),
        ({"destination": "10.0.0.0/8", "proto": "tcp", "ports": "80,,81"}, "ports", "empty"),
        ({"destination": "10.0.0.0/8", "proto": "icmp", "ports": "80"}, "body", "tcp or udp"),
    ],
)
def test_bad_rules_are_rejected(
    admin: httpx.Client, rule: dict[str, str], field: str, words: str
) -> None:
    admin.post("/api/v1/groups", json={"name": "g"})
    r = admin.post("/api/v1/rules", json={"group": "g", **rule})
    detail = problem(r, 422)
    assert words in detail
    assert r.json()["errors"][0]["field"] == field
    assert admin.get("/api/v1/rules").json() == []


def test_rule_for_unknown_group(admin: httpx.Client) -> None:
    r = admin.post("/api/v1/rules", json={"group": "ghost", "destination": "10.0.0.0/8"})
    assert "group 'ghost' does not exist" in problem(r, 404)


def test_pools(admin: httpx.Client) -> None:
    pools = {p["name"]: p for p in admin.get("/api/v1/pools").json()}
    assert pools["default"]["kind"] == "nat" and pools["gateway"]["kind"] == "gateway"
    r = admin.put("/api/v1/pools/default", json={"cidr": "10.50.0.0/20"})
    assert r.json()["cidr"] == "10.50.0.0/20" and r.json()["capacity"] == 4096 - 3
    assert "prefix length" in problem(
        admin.put("/api/v1/pools/default", json={"cidr": "10.0.0.0/30"}), 422
    )
    assert "required" in problem(
        admin.put("/api/v1/pools/other", json={"cidr": "10.60.0.0/24"}), 422
    )
    r = admin.put("/api/v1/pools/other", json={"cidr": "10.201.5.0/24", "kind": "nat"})
    assert "overlaps pool 'gateway'" in problem(r, 409)
    assert "kind cannot change" in problem(
        admin.put("/api/v1/pools/default", json={"cidr": "10.50.0.0/20", "kind": "gateway"}), 409
    )
    # Shrinking the gateway pool below an existing lease is refused.
    lease = admin.post("/api/v1/users", json={"name": "gw", "mode": "gateway"}).json()
    assert lease["gateway_address"].startswith("10.201.0.")
    r = admin.put("/api/v1/pools/gateway", json={"cidr": "10.202.0.0/24"})
    assert "fall outside" in problem(r, 409)


def test_gateway_pool_exhaustion_is_a_clear_conflict(admin: httpx.Client) -> None:
    admin.put("/api/v1/pools/gateway", json={"cidr": "10.210.0.0/29"})  # 5 client addresses
    for i in range(5):
        assert (
            admin.post("/api/v1/users", json={"name": f"g{i}", "mode": "gateway"}).status_code
            == 201
        )
    r = admin.post("/api/v1/users", json={"name": "g5", "mode": "gateway"})
    assert "exhausted" in problem(r, 409)
    assert admin.get("/api/v1/users/g5").status_code == 404


def test_openapi_schema_is_served(server: Server) -> None:
    with server.client(None) as anon:
        schema = anon.get("/openapi.json").json()
    assert "/api/v1/users" in schema["paths"] and "/api/v1/watch" in schema["paths"]
