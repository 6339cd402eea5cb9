"""The OpenAPI schema says what the API really answers: every operation documents its error
responses as problem+json (real errors validate against that schema), and the roles table of
docs/api.md is the one the routes enforce."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from tests.conftest import Server
from vpnfleet.controlplane.app import create_app
from vpnfleet.controlplane.openapi import operations, roles_of
from vpnfleet.controlplane.settings import ServerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROLES = ("admin", "operator", "auditor", "agent", "pod")
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


@pytest.fixture(scope="module")
def app_schema(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    data = tmp_path_factory.mktemp("openapi")
    settings = ServerSettings(
        data_dir=data,
        database_url=f"sqlite:///{data / 'db.sqlite'}",
        secret="test-seal-secret-Qx9LmPz4Rk8Vw2b7",
    )
    app = create_app(settings)
    return app, app.openapi()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_every_operation_documents_its_errors_as_problem_json(
    app_schema: tuple[Any, dict[str, Any]],
) -> None:
    _app, doc = app_schema
    ops = _operations(doc)
    assert len(ops) > 40
    for method, path, op in ops:
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        expected = {"400"}
        if op.get("security"):
            expected |= {"401", "403", "503"}
        if op.get("parameters") or "requestBody" in op:
            expected.add("422")
        if "requestBody" in op:
            expected.add("413")
        if "{" in path:
            expected.add("404")
        if method != "get" and op.get("security"):
            expected.add("409")
        assert expected <= set(responses), (where, sorted(expected - set(responses)))
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                assert response["content"] == {"application/problem+json": {"schema": PROBLEM_REF}}
    authenticated = {p for _m, p, op in ops if op.get("security")}
    assert authenticated == {p for p in doc["paths"] if p.startswith("/api/v1/")}
    assert "503" in doc["paths"]["/api/v1/watch"]["get"]["responses"]
    assert "404" in doc["paths"]["/api/v1/rules"]["post"]["responses"]
    # FastAPI's validation body is never sent, so it is nowhere in the schema.
    assert "HTTPValidationError" not in str(doc)
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    # The list endpoints document their next-page header.
    assert "Link" in doc["paths"]["/api/v1/users"]["get"]["responses"]["200"]["headers"]


def _validator(doc: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**PROBLEM_REF, "components": doc["components"]})


def test_real_error_responses_match_the_documented_schema(server: Server) -> None:
    with server.client() as admin:
        doc = admin.get("/openapi.json").json()
        validator = _validator(doc)
        auditor = server.make_token("auditor")
        enrollment = server.make_token("agent")
        admin.post("/api/v1/users", json={"name": "alice"}).raise_for_status()
        cases: list[tuple[str, str, httpx.Response]] = [
            ("get", "/api/v1/users", httpx.get(f"{server.url}/api/v1/users")),
            ("post", "/api/v1/users", admin.post("/api/v1/users", json={"name": "alice"})),
            ("post", "/api/v1/users", admin.post("/api/v1/users", json={"name": "Bad Name"})),
            ("post", "/api/v1/users", admin.post("/api/v1/users", content=b"{not json")),
            ("post", "/api/v1/users", admin.post("/api/v1/users", content=b"x" * 2_000_000)),
            ("get", "/api/v1/users/{name}", admin.get("/api/v1/users/nobody")),
            ("get", "/api/v1/users", admin.get("/api/v1/users", params={"cursor": "zz"})),
            ("get", "/api/v1/users", admin.get("/api/v1/users", params={"limit": 0})),
            ("get", "/api/v1/users/{name}", admin.get("/api/v1/users/a%00b")),
            ("delete", "/api/v1/rules/{rule_id}", admin.delete("/api/v1/rules/0")),
        ]
        with server.client(auditor) as a:
            cases.append(("get", "/api/v1/users", a.get("/api/v1/users")))
        with server.client(enrollment) as e:
            # The enrollment token may enroll a pod and nothing else, the watch included.
            cases.append(("get", "/api/v1/watch", e.get("/api/v1/watch")))
    seen = set()
    for method, path, resp in cases:
        code = str(resp.status_code)
        seen.add(code)
        assert resp.headers["content-type"] == "application/problem+json", (path, code)
        errors = sorted(validator.iter_errors(resp.json()), key=str)
        assert not errors, (path, code, resp.json(), errors)
        assert code in doc["paths"][path][method]["responses"], (method, path, code)
    assert seen == {"400", "401", "403", "404", "409", "413", "422"}
    # And the schema is not vacuous: a body missing `detail` or with a text status fails it.
    assert not validator.is_valid({"type": "about:blank", "title": "x", "status": 400})
    assert not validator.is_valid(
        {"type": "about:blank", "title": "x", "status": "400", "detail": ""}
    )


def _documented_roles() -> dict[tuple[str, str], frozenset[str]]:
    """The per-operation roles table of docs/api.md."""
    row = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^`]*)` \|(.*)\|\s*$")
    lines = DOCS.read_text().splitlines()
    start = lines.index("| operation | admin | operator | auditor | agent | pod |")
    end = lines.index("", start)
    table = {}
    for line in lines[start + 2 : end]:
        m = row.match(line)
        assert m, f"docs/api.md roles table: cannot read {line!r}"
        marks = [cell.strip() for cell in m.group(3).split("|")]
        assert len(marks) == len(ROLES) and set(marks) <= {"", "✓"}, line
        key = (m.group(1).lower(), "/api/v1" + m.group(2))
        assert key not in table, f"{line}: listed twice"
        table[key] = frozenset(r for r, mark in zip(ROLES, marks, strict=True) if mark)
    return table


def test_the_roles_table_in_the_docs_is_what_the_routes_enforce(
    app_schema: tuple[Any, dict[str, Any]],
) -> None:
    app, doc = app_schema
    enforced = {}
    for method, path, dependant in operations(app):
        roles = roles_of(dependant)
        if roles is None:
            # The browser's side of a VPN single sign-on login carries no token (docs/sso.md).
            token_free = (
                "/healthz",
                "/readyz",
                "/metrics",
                "/sso/login/{login_id}",
                "/sso/callback",
            )
            assert path in token_free, f"{method} {path} needs no token"
            continue
        enforced[(method, path)] = roles
        assert doc["paths"][path][method]["x-roles"] == sorted(roles)
    documented = _documented_roles()
    assert len(enforced) > 40
    missing = sorted(set(enforced) - set(documented))
    stale = sorted(set(documented) - set(enforced))
    wrong = sorted(k for k in enforced.keys() & documented.keys() if enforced[k] != documented[k])
    assert not missing, f"operations missing from docs/api.md's roles table: {missing}"
    assert not stale, f"docs/api.md lists operations that do not exist: {stale}"
    assert not wrong, [(k, sorted(documented[k]), "code:", sorted(enforced[k])) for k in wrong]
