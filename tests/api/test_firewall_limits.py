"""Rules are checked against the pods' firewall element limit when they are written (REST and
policy files), on SQLite and PostgreSQL: the issue's 17-rule reproducer is a 422 naming the
group and the size, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import create_engine
from sqlalchemy import text as sql

from tests.api.test_cli import run
from tests.api.test_policy_cli import offline, write
from tests.conftest import Server

WIDE = [f"10.1{nn:02d}.0.0/16" for nn in range(17)]  # x "tcp 2-65535" = 65,534 elements each
SENTENCE = (
    "group 'devs' would need 1,114,078 firewall set elements (limit 1,048,576 on every pod): "
    "grant all ports (one element per network) or narrow the port ranges or destinations"
)


def _rule(admin: httpx.Client, group: str, dest: str, ports: str = "2-65535") -> httpx.Response:
    return admin.post(
        "/api/v1/rules", json={"group": group, "destination": dest, "proto": "tcp", "ports": ports}
    )


def _written(admin: httpx.Client) -> tuple[int, int, int]:
    """(revision, rules, admin audit rows): what a refused write must leave unchanged."""
    revision = admin.get("/api/v1/revision").json()["revision"]
    return (
        revision,
        len(admin.get("/api/v1/rules").json()),
        len(admin.get("/api/v1/audit/admin").json()),
    )


def _policy(groups: dict[str, list[str]]) -> str:
    lines = ["version: 1", "groups:"]
    for name, dests in groups.items():
        lines.append(f"  {name}:")
        lines.append("    grants:")
        lines += [f'      - {{destination: {d}, proto: tcp, ports: "2-65535"}}' for d in dests]
    return "\n".join(lines) + "\n"


def test_the_17th_wide_rule_is_refused_naming_group_and_size(admin: httpx.Client) -> None:
    assert admin.post("/api/v1/groups", json={"name": "devs"}).status_code == 201
    for dest in WIDE[:16]:
        r = _rule(admin, "devs", dest)
        assert r.status_code == 201, r.text
    before = _written(admin)
    r = _rule(admin, "devs", WIDE[16])
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["detail"] == f"{SENTENCE}; nothing was written"
    assert body["errors"] == [{"field": "ports", "message": SENTENCE}]
    assert (body["group"], body["elements"], body["limit"]) == ("devs", 1_114_078, 1_048_576)
    assert _written(admin) == before
    # All ports is one element per network: that fits.
    r = admin.post("/api/v1/rules", json={"group": "devs", "destination": WIDE[16], "proto": "tcp"})
    assert r.status_code == 201, r.text


def test_the_limit_counts_all_groups_and_names_the_one_written(admin: httpx.Client) -> None:
    for name in ("devs", "ops"):
        assert admin.post("/api/v1/groups", json={"name": name}).status_code == 201
    for dest in WIDE[:16]:
        assert _rule(admin, "devs", dest).status_code == 201
    before = _written(admin)
    r = _rule(admin, "ops", "192.0.2.0/24", "1000-1100")
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(
        "group 'ops' would need 101 firewall set elements, 1,048,645 with all other groups "
        "(limit 1,048,576 on every pod)"
    )
    assert _written(admin) == before
    # Elements the group already has cost nothing more: a narrower overlapping range fits.
    assert _rule(admin, "devs", WIDE[0], "80-90").status_code == 201


def test_policy_apply_and_check_refuse_the_reproducer(admin: httpx.Client) -> None:
    text = _policy({"devs": WIDE})
    before = _written(admin)
    for path, params in [
        ("/api/v1/policy/apply", {}),
        ("/api/v1/policy/apply", {"dry_run": "true"}),
        ("/api/v1/policy/check", {}),
    ]:
        r = admin.post(path, params=params, json={"yaml": text, "filename": "p.yaml"})
        assert r.status_code == 422, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["errors"] == [
            {"line": 3, "field": "groups.devs.grants", "message": SENTENCE}
        ]
        assert r.json()["detail"] == f"p.yaml:3: groups.devs.grants: {SENTENCE}"
    assert _written(admin) == before
    assert admin.get("/api/v1/groups").json() == []


def test_policy_apply_checks_the_result_with_the_groups_it_leaves_alone(
    admin: httpx.Client,
) -> None:
    # The file fits alone; with the stored group it does not (unless --prune deletes that).
    assert admin.post("/api/v1/groups", json={"name": "devs"}).status_code == 201
    for dest in WIDE[:16]:
        assert _rule(admin, "devs", dest).status_code == 201
    text = _policy({"ops": ["192.0.2.0/24"]})
    assert admin.post("/api/v1/policy/check", json={"yaml": text}).status_code == 200
    before = _written(admin)
    r = admin.post("/api/v1/policy/apply", json={"yaml": text, "filename": "ops.yaml"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        "ops.yaml:3: groups.ops.grants: group 'ops' would need 65,534 firewall set elements, "
        "1,114,078 with all other groups (limit 1,048,576 on every pod): grant all ports (one "
        "element per network) or narrow the port ranges or destinations; nothing was written"
    )
    assert _written(admin) == before
    r = admin.post("/api/v1/policy/apply", params={"prune": "true"}, json={"yaml": text})
    assert r.status_code == 200, r.text
    assert [g["name"] for g in admin.get("/api/v1/groups").json()] == ["ops"]


def test_an_apply_that_shrinks_an_over_limit_fleet_is_let_through(
    server: Server, admin: httpx.Client
) -> None:
    # Data stored before the check existed must stay fixable: an apply that lowers the total
    # goes through even while it is still over the limit.
    text = _policy({"devs": WIDE[:16]})
    assert admin.post("/api/v1/policy/apply", json={"yaml": text}).status_code == 200
    assert admin.post("/api/v1/groups", json={"name": "ops"}).status_code == 201
    # ops gets 2 wide rules by bypassing the check (as an older release would have stored).
    engine = create_engine(server.database_url)
    with engine.begin() as conn:
        gid = conn.execute(sql("SELECT id FROM groups WHERE name = 'ops'")).scalar_one()
        for dest in ("192.0.2.0/24", "198.51.100.0/24"):
            conn.execute(
                sql(
                    "INSERT INTO rules (group_id, destination, proto, ports, created_at) "
                    "VALUES (:g, :d, 'tcp', '2-65535', CURRENT_TIMESTAMP)"
                ),
                {"g": gid, "d": dest},
            )
    engine.dispose()
    # Still over (16 + 1 wide rules), but smaller than before: accepted.
    shrink = _policy({"ops": ["192.0.2.0/24"]})
    r = admin.post("/api/v1/policy/apply", json={"yaml": shrink})
    assert r.status_code == 200, r.text
    # Growing it again is refused.
    r = _rule(admin, "ops", "203.0.113.0/24")
    assert r.status_code == 422 and "group 'ops'" in r.json()["detail"], r.text


def test_the_cli_shows_the_sentence(server: Server, tmp_path: Path) -> None:
    run(server, "group", "add", "devs")
    for dest in WIDE[:16]:
        run(server, "rule", "add", "devs", dest, "--proto", "tcp", "--ports", "2-65535")
    proc = run(
        server, "rule", "add", "devs", WIDE[16], "--proto", "tcp", "--ports", "2-65535", ok=False
    )
    assert proc.returncode == 1
    assert "group 'devs' would need 1,114,078 firewall set elements" in " ".join(
        proc.stderr.split()
    )
    path = write(tmp_path, _policy({"devs": WIDE}))
    for proc in (
        offline("policy", "check", "-f", str(path), cwd=tmp_path),
        run(server, "policy", "apply", "-f", str(path), ok=False),
    ):
        assert proc.returncode == 1, proc.stderr
        assert f"{path}:3: error: groups.devs.grants: {SENTENCE}" in proc.stderr
