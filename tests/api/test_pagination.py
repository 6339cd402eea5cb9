"""Every list endpoint pages (limit, cursor, Link rel="next") on SQLite and PostgreSQL: walking
the pages yields each row once, in the list's order, even while rows are being inserted."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from tests.api.test_cli import run
from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane.models import (
    AdminAudit,
    DeniedAttempt,
    Flow,
    Group,
    Membership,
    Pod,
    Rule,
    User,
    VpnSession,
)

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def database(server: Server) -> Iterator[Session]:
    """A session on the server's own database: another writer, as a concurrent request is."""
    engine = dbmod.make_engine(server.database_url)
    factory = dbmod.session_factory(engine)
    try:
        with factory() as db:
            yield db
    finally:
        engine.dispose()


def walk(client: httpx.Client, path: str, limit: int, **params: Any) -> tuple[list[Any], int]:
    """All rows of a list, following Link rel="next"; and how many pages it took."""
    resp = client.get(path, params={**params, "limit": limit})
    rows: list[Any] = []
    pages = 0
    while True:
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page) <= limit
        rows += page
        pages += 1
        nxt = resp.links.get("next")
        if nxt is None:
            return rows, pages
        assert len(page) == limit  # only a full page has a next one
        assert nxt["url"].startswith(path + "?")  # a path on the same server
        resp = client.get(nxt["url"])


def seed(db: Session) -> None:
    """Rows for every list, with ties on the time-ordered ones (the id must break them)."""
    groups = [Group(name=f"g{i:02d}") for i in range(7)]
    users = [User(name=f"u{i:02d}", email=f"u{i}@example.com") for i in range(23)]
    db.add_all(groups + users)
    db.flush()
    db.add_all(Membership(group_id=groups[i % 3].id, user_id=u.id) for i, u in enumerate(users))
    db.add_all(
        Rule(group_id=g.id, destination=f"10.{i}.{j}.0/24", proto="tcp", ports="443")
        for i, g in enumerate(groups)
        for j in range(3)
    )
    for i in range(17):
        same = T0 - dt.timedelta(minutes=i // 4)  # four rows share each time
        db.add(
            VpnSession(
                uid=f"s{i}",
                user_name="u00",
                pod_name="pod-a",
                mode="nat",
                tunnel_ip=f"10.8.0.{i + 2}",
                started_at=same,
            )
        )
        db.add(
            DeniedAttempt(
                pod_name="pod-a",
                user_name="u00",
                src="10.8.0.2",
                dst="10.9.0.1",
                proto="tcp",
                dport=22,
                first_at=same,
                last_at=same,
            )
        )
        db.add(
            Flow(
                flow_id=f"f{i}",
                pod_name="pod-a",
                user_name="u00",
                proto="tcp",
                tunnel_ip="10.8.0.2",
                tunnel_port=40000 + i,
                nat_ip="10.99.0.11",
                nat_port=50000 + i,
                start_at=same,
                duration_class=0,
            )
        )
    db.commit()


LISTS = [
    ("/api/v1/users", "name"),
    ("/api/v1/groups", "name"),
    ("/api/v1/rules", "id"),
    ("/api/v1/pools", "name"),
    ("/api/v1/tokens", "name"),
    ("/api/v1/sessions", "id"),
    ("/api/v1/audit/admin", "id"),
    ("/api/v1/audit/denied", None),
    ("/api/v1/audit/flows", "flow_id"),
    ("/api/v1/pods", "name"),
]


def test_every_list_walks_in_pages_to_the_same_rows(
    server: Server, admin: httpx.Client, database: Session
) -> None:
    seed(database)
    for i in range(5):
        admin.put(f"/api/v1/pools/nat{i}", json={"cidr": f"10.{200 + i}.0.0/16", "kind": "nat"})
        server.make_token("auditor")
    database.add_all(Pod(name=name) for name in ("pod-b", "pod-a", "pod-c"))
    database.commit()
    for path, field in LISTS:
        whole = admin.get(path, params={"limit": 10_000})
        assert "link" not in whole.headers
        expected = whole.json()
        assert len(expected) >= 3, path
        for limit in (1, 2, 3):
            rows, pages = walk(admin, path, limit)
            assert rows == expected, (path, limit)
            assert pages == -(-len(expected) // limit), (path, limit)
        if field:
            assert len({r[field] for r in expected}) == len(expected), path
    # Ties on time: the id decides, newest first, so no row is lost between pages.
    sessions = admin.get("/api/v1/sessions").json()
    keys = [(s["started_at"], s["id"]) for s in sessions]
    assert keys == sorted(keys, reverse=True) and len(keys) == 17
    # Filters still apply on every page.
    rows, pages = walk(admin, "/api/v1/rules", 2, group="g03")
    assert [r["group"] for r in rows] == ["g03"] * 3 and pages == 2


def test_pages_neither_repeat_nor_skip_rows_while_rows_are_inserted(
    server: Server, admin: httpx.Client, database: Session
) -> None:
    seed(database)
    before = [u["name"] for u in admin.get("/api/v1/users").json()]
    log_before = [r["id"] for r in admin.get("/api/v1/audit/admin").json()]
    seen: list[str] = []
    log_seen: list[int] = []
    resp = admin.get("/api/v1/users", params={"limit": 4})
    log = admin.get("/api/v1/audit/admin", params={"limit": 1})
    step = 0
    while resp.links.get("next") or log.links.get("next"):
        seen += [u["name"] for u in resp.json()]
        log_seen += [r["id"] for r in log.json()]
        # Another writer: names before and after the cursor, and newer audit rows.
        database.add_all([User(name=f"a{step:02d}"), User(name=f"z{step:02d}")])
        database.add(AdminAudit(actor="someone", role="admin", action="user.create"))
        database.commit()
        step += 1
        if resp.links.get("next"):
            resp = admin.get(resp.links["next"]["url"])
        else:
            resp = httpx.Response(200, json=[])
        if log.links.get("next"):
            log = admin.get(log.links["next"]["url"])
        else:
            log = httpx.Response(200, json=[])
    seen += [u["name"] for u in resp.json()]
    log_seen += [r["id"] for r in log.json()]
    assert step > 3
    assert len(seen) == len(set(seen)) and set(before) <= set(seen)
    assert seen == sorted(seen)
    assert log_seen == log_before  # newer rows are ahead of the walk, never inside it


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


def test_bad_cursors_and_limits_are_4xx_naming_the_field(
    admin: httpx.Client, database: Session
) -> None:
    seed(database)
    first = admin.get("/api/v1/users", params={"limit": 2})
    users_cursor = httpx.URL(first.links["next"]["url"]).params["cursor"]
    bad = [
        ("/api/v1/users", "not base64 !"),
        ("/api/v1/users", base64.urlsafe_b64encode(b"\xff\xfe").decode()),
        ("/api/v1/users", _cursor("users")),
        ("/api/v1/users", _cursor("users", 7)),
        ("/api/v1/users", _cursor("users", "a\u0000b")),
        ("/api/v1/users", _cursor("users", "\ud800")),
        ("/api/v1/groups", users_cursor),  # another list's cursor
        ("/api/v1/rules", _cursor("rules", "g01", 2**63)),
        ("/api/v1/rules", _cursor("rules", "g01", True)),
        ("/api/v1/sessions", _cursor("sessions", "2026-11-30T12:00:00", 5)),
        ("/api/v1/sessions", _cursor("sessions", "yesterday", 5)),
        ("/api/v1/audit/flows", _cursor("audit-flows", "0001-01-01T00:00:00+14:00", 1)),
    ]
    for path, cursor in bad:
        r = admin.get(path, params={"cursor": cursor})
        detail = problem(r, 400)
        assert detail.startswith("cursor: "), (path, cursor, detail)
        assert r.json()["errors"][0]["field"] == "cursor"
    r = admin.get("/api/v1/users", params={"cursor": "x" * 1001})
    assert "cursor" in problem(r, 422)
    for path, _field in LISTS:
        for limit in ("0", "10001", "-1", "many"):
            r = admin.get(path, params={"limit": limit})
            assert r.json()["errors"][0]["field"] == "limit", (path, limit)
            problem(r, 422)
        assert admin.get(path, params={"limit": 10_000}).status_code == 200
    # The default page is 500 rows.
    database.add_all(User(name=f"bulk{i:04d}") for i in range(600))
    database.commit()
    r = admin.get("/api/v1/users")
    assert len(r.json()) == 500 and "next" in r.links
    assert len(walk(admin, "/api/v1/users", 500)[0]) == 623


def test_cli_lists_print_every_page(server: Server, database: Session) -> None:
    seed(database)
    env = {"VPNFLEET_PAGE_SIZE": "4"}
    out = json.loads(run(server, "user", "list", "--json", env=env).stdout)
    assert [u["name"] for u in out] == [f"u{i:02d}" for i in range(23)]
    table = run(server, "user", "list", env=env).stdout
    assert all(f"u{i:02d}" in table for i in range(23))
    sessions = json.loads(run(server, "session", "list", "--json", env=env).stdout)
    assert len(sessions) == 17 and len({s["id"] for s in sessions}) == 17
    # --limit is how many rows to print, whatever the page size.
    flows = json.loads(run(server, "audit", "flows", "--limit", "9", "--json", env=env).stdout)
    assert len(flows) == 9
    rules = run(server, "rule", "list", "--json", env={"VPNFLEET_PAGE_SIZE": "2"}).stdout
    assert len(json.loads(rules)) == 21
    bad = run(server, "user", "list", env={"VPNFLEET_PAGE_SIZE": "0"}, ok=False)
    assert bad.returncode == 1 and "VPNFLEET_PAGE_SIZE" in bad.stderr
