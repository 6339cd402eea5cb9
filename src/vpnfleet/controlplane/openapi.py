"""The OpenAPI schema as the API behaves: each operation lists the errors it can answer, as the
problem+json bodies errors.py and the request intake send, and the roles it admits.

FastAPI documents only a 422 with its own validation body (``HTTPValidationError``), which this
API never sends (errors.py turns validation errors into problem+json). Generated clients and
schema-driven fuzzers take the schema at its word, so it has to say what really comes back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from vpnfleet.controlplane.errors import PROBLEM

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "An error (RFC 9457). `detail` is one sentence for a person; `errors` names "
    "each field at fault when the request was invalid.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "always `about:blank`"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {"$ref": "#/components/schemas/ProblemField"}},
    },
}
PROBLEM_FIELD_SCHEMA: dict[str, Any] = {
    "title": "ProblemField",
    "type": "object",
    "required": ["field", "message"],
    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
}

WHY = {
    400: "Bad request: the URL holds `%00`, or a value is malformed (a `cursor` this list did "
    "not give out, a bad address or time); `detail` names it.",
    401: "No bearer token, or one that is unknown or revoked.",
    403: "The token's role may not do this (the roles allowed are in `x-roles`).",
    404: "An object the request names does not exist.",
    409: "The change conflicts with existing data: a duplicate name, an exhausted address "
    "pool, a race lost to a concurrent request. Nothing was written.",
    413: "The body is over the size limit (docs/api.md); it was not read.",
    422: "Invalid request: `errors` names each field and what is wrong with it.",
    502: "A server this operation depends on (the LDAP directory, the IdP) could not be reached or "
    "refused it; `detail` says which and why. Nothing was written.",
    503: "The database is unavailable (or, for the watch, the server refuses more streams).",
}

# Operations that answer 404 for an object named outside the path (a body or query field).
NAMES_OBJECTS = {
    ("post", "/api/v1/users"),  # its groups
    ("get", "/api/v1/rules"),  # ?group=
    ("post", "/api/v1/rules"),  # its group
    ("get", "/api/v1/audit/attribution"),  # a time past the retention horizon
    ("post", "/api/v1/agent/sessions/open"),  # its user
    ("post", "/api/v1/agent/heartbeat"),  # its pod
    ("get", "/api/v1/directory"),  # the directory settings, before they are set
    ("get", "/api/v1/idp"),  # the IdP settings, before they are set
    ("post", "/api/v1/idp/test"),  # likewise
    ("post", "/api/v1/agent/sso-logins"),  # its user
}
# Operations that answer 502 when a server they call fails.
CALLS_OUT = {("post", "/api/v1/directory/sync"), ("post", "/api/v1/idp/test")}
WRITES = {"post", "put", "patch", "delete"}
# Reads that can answer 409: a profile of a user whose certificate is revoked or expired.
CONFLICTING_READS = {("get", "/api/v1/users/{name}/profile")}
_PATH_PARAM = re.compile(r"\{[^}]+\}")


def operations(app: FastAPI) -> Iterator[tuple[str, str, Dependant]]:
    """(method, path, dependant) of each API operation, through included routers."""
    # FastAPI >= 0.16x keeps included routers nested (routing.iter_route_contexts flattens
    # them); older versions list every APIRoute in app.routes.
    flatten = getattr(routing, "iter_route_contexts", None)
    route: Any
    for route in flatten(app.routes) if flatten else app.routes:
        original = getattr(route, "original_route", route)
        if not isinstance(original, APIRoute) or not original.include_in_schema:
            continue  # the web console's pages (controlplane/console) are not API operations
        for method in route.methods or ():
            yield method.lower(), str(route.path_format), route.dependant


def roles_of(dependant: Dependant) -> frozenset[str] | None:
    """The roles an operation admits (`state.require`), or None when it needs no token."""

    def walk(dep: Dependant) -> Iterator[frozenset[str]]:
        roles = getattr(dep.call, "roles", None)
        if isinstance(roles, frozenset):
            yield roles
        for sub in dep.dependencies:
            yield from walk(sub)

    found = list(walk(dependant))
    return frozenset.intersection(*found) if found else None


def error_codes(method: str, path: str, operation: dict[str, Any]) -> list[int]:
    """The error statuses one operation can answer."""
    codes = {400}  # the intake refuses a URL holding %00 on every route
    if operation.get("security"):
        codes |= {401, 403, 503}
    if operation.get("parameters") or "requestBody" in operation:
        codes.add(422)
    if "requestBody" in operation:
        codes.add(413)
    if _PATH_PARAM.search(path) or (method, path) in NAMES_OBJECTS:
        codes.add(404)
    if (method in WRITES and operation.get("security")) or (method, path) in CONFLICTING_READS:
        codes.add(409)
    if path in ("/readyz", "/api/v1/watch"):
        codes.add(503)
    if (method, path) in CALLS_OUT:
        codes.add(502)
    return sorted(codes)


def document_errors(doc: dict[str, Any], roles: dict[tuple[str, str], frozenset[str]]) -> None:
    """Add the problem+json error responses and `x-roles` to every operation of `doc`."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["ProblemField"] = PROBLEM_FIELD_SCHEMA
    body = {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for code in error_codes(method, path, operation):
                responses[str(code)] = {"description": WHY[code], "content": body}
            if (method, path) in roles:
                operation["x-roles"] = sorted(roles[(method, path)])
    # FastAPI's own validation bodies are never sent: no operation refers to them any more.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def install(app: FastAPI) -> None:
    """Serve the schema with the error responses documented (built once, on first request)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            roles = {}
            for method, path, dependant in operations(app):
                if (admitted := roles_of(dependant)) is not None:
                    roles[(method, path)] = admitted
            document_errors(doc, roles)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
