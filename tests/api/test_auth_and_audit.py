"""Tokens, roles and the admin audit log."""

from __future__ import annotations

import logging
import stat

import httpx
import pytest

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server


def test_first_admin_token_file_is_owner_only(server: Server) -> None:
    path = server.data_dir / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip().startswith("vpf_")


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer"])
def test_missing_or_wrong_token(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=server.url, headers=headers) as c:
        r = c.get("/api/v1/users")
    assert problem(r, 401)


def test_roles(server: Server, admin: httpx.Client) -> None:
    operator = server.make_token("operator")
    auditor = server.make_token("auditor")
    agent = server.make_token("agent")
    with server.client(operator) as op:
        assert op.post("/api/v1/users", json={"name": "eve"}).status_code == 201
        assert "may not" in problem(
            op.post("/api/v1/tokens", json={"name": "x", "role": "admin"}), 403
        )
        assert op.get("/api/v1/sessions").status_code == 200
    with server.client(auditor) as au:
        assert "may not" in problem(au.post("/api/v1/users", json={"name": "mallory"}), 403)
        assert "may not" in problem(au.get("/api/v1/users"), 403)
        assert au.get("/api/v1/audit/admin").status_code == 200
        assert au.get("/api/v1/sessions").status_code == 200
    with server.client(agent) as ag:
        assert problem(ag.get("/api/v1/users"), 403)
        # The enrollment token reads nothing of the fleet and cannot act as a pod.
        assert problem(ag.get("/api/v1/revision"), 403)
        assert problem(ag.get("/api/v1/agent/snapshot"), 403)
        assert "pod credential" in problem(
            ag.post("/api/v1/agent/register", json={"name": "pod1"}), 403
        )
    assert admin.get("/api/v1/users/mallory").status_code == 404


def test_token_lifecycle_never_shows_the_secret_again(
    server: Server, admin: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"})
    assert r.status_code == 201
    secret = r.json()["token"]
    listing = admin.get("/api/v1/tokens").text
    assert secret not in listing and '"ci"' in listing
    with server.client(secret) as c:
        assert c.get("/api/v1/users").status_code == 200
    assert "already exists" in problem(
        admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}), 409
    )
    assert "unknown role" in problem(
        admin.post("/api/v1/tokens", json={"name": "x", "role": "root"}), 422
    )
    assert admin.delete("/api/v1/tokens/ci").status_code == 204
    with server.client(secret) as c:
        assert "revoked" in problem(c.get("/api/v1/users"), 401)
    assert "cannot revoke itself" in problem(admin.delete("/api/v1/tokens/bootstrap-admin"), 409)
    assert secret not in caplog.text and server.admin_token not in caplog.text
    audit = admin.get("/api/v1/audit/admin", params={"action": "token."}).text
    assert secret not in audit


def test_admin_audit_records_who_what_before_after(server: Server, admin: httpx.Client) -> None:
    operator = server.make_token("operator")
    with server.client(operator) as op:
        op.post("/api/v1/users", json={"name": "frank"})
        op.patch("/api/v1/users/frank", json={"mode": "gateway"})
    rows = admin.get("/api/v1/audit/admin", params={"action": "user."}).json()
    assert [r["action"] for r in rows] == ["user.update", "user.create"]
    update = rows[0]
    assert update["actor"].startswith("operator-") and update["role"] == "operator"
    assert update["before"]["mode"] == "nat" and update["after"]["mode"] == "gateway"
    assert update["after"]["gateway_address"]
    assert update["revision"] > rows[1]["revision"]
    # Failed calls leave no audit row.
    op_fail = admin.post("/api/v1/users", json={"name": "frank"})
    assert op_fail.status_code == 409
    assert len(admin.get("/api/v1/audit/admin", params={"action": "user."}).json()) == 2
    assert "time zone" in problem(
        admin.get("/api/v1/audit/admin", params={"since": "2026-01-01T00:00:00"}), 400
    )
