"""Fuzzing the running control plane against its own OpenAPI schema (schemathesis).

A real control plane (uvicorn on loopback, the whole stack: RequestIntake, the routers, the
error handlers, SQLAlchemy) on SQLite and on the real PostgreSQL, seeded with a realistic
fleet: users, groups with members, rules, a registered pod with live and closed sessions,
denied attempts and NAT flows, a spare token. Every operation in ``/openapi.json`` is then
sent schemathesis' explicit examples, its coverage cases (boundaries, wrong types, missing
and extra fields) and generated requests (valid and invalid), with the admin token on the
operator routes and an agent credential on the agent routes. Path and query parameters and
agent bodies are steered half of the time onto the seeded objects (schemathesis cannot guess
a user's name), so the code behind a 404 is reached too. The watch stream is read up to its
first line (:func:`_watch`); nothing else is left out.

What must hold for every response:

- never a 5xx (``not_a_server_error``);
- a success conforms to its documented schema and content type;
- no value reaches a database that refuses it (errors.py's 422 safety net, which cannot name
  the field): the schema must refuse it first.

Error responses are checked the same way (problem+json as documented), and an undocumented
status code is refused (:data:`ERRORS_IN_SCHEMA`).

Bounded: ``VPNFLEET_FUZZ_EXAMPLES`` generated requests per operation (default 12, plus the
examples and coverage cases), about two minutes per database on two cores. The seed
is fixed (``VPNFLEET_FUZZ_SEED``) so a CI failure replays; a run with another seed explores
other inputs (docs/testing.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, HookContext
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import DATABASES, Server, free_port, fresh_database, running_server
from vpnfleet import wire

# The schema documents the 4xx problem+json answers (controlplane/openapi.py): an error
# response must match its documented schema and content type, and an undocumented status
# code is a failure.
ERRORS_IN_SCHEMA = True

EXAMPLES = int(os.environ.get("VPNFLEET_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("VPNFLEET_FUZZ_SEED", "20261203"))
WATCH = "/api/v1/watch"
AGENT_PREFIX = "/api/v1/agent/"
POD = "pod-fuzz"
DIRECTORY = "/api/v1/directory"
# The directory the fuzzing may configure: loopback, on a port nothing listens on (a sync
# fails at once with 502), so no generated host name is ever looked up or contacted.
NO_DIRECTORY = f"ldap://127.0.0.1:{free_port()}"
IDP = "/api/v1/idp"
# Likewise the IdP: `idp test` fails at once with 502 (connection refused on loopback).
NO_IDP = f"http://127.0.0.1:{free_port()}/realms/fuzz"


def agent_headers(server: Server) -> dict[str, str]:
    """The one place the fuzz suite gets an agent's credential: pod ``POD``'s own, enrolled
    with a fresh enrollment token. It refuses a body naming another pod, which the fuzzing
    sends often: a 403 is a 4xx like any other."""
    return {"Authorization": f"Bearer {server.pod_token(POD)}"}


def _reenroll(server: Server, admin: dict[str, str], agent: dict[str, str]) -> None:
    """The fuzzing revokes or forgets ``POD`` (POST /pods/{name}/revoke, DELETE /pods/{name}):
    forget it and enroll it again, so the next operation starts with a pod that may speak."""
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as c:
        _ok(c.delete(f"/api/v1/pods/{POD}"))
    agent.update(agent_headers(server))


@dataclass
class Fleet:
    """The seeded objects, by the parameter names that refer to them."""

    users: list[str] = field(default_factory=lambda: ["alice", "bob", "carol"])
    groups: list[str] = field(default_factory=lambda: ["ops", "dev"])
    pools: list[str] = field(default_factory=lambda: ["default", "gateway"])
    tokens: list[str] = field(default_factory=lambda: ["fuzz-spare"])
    pods: list[str] = field(default_factory=lambda: [POD])
    rule_ids: list[int] = field(default_factory=list)

    def path_choices(self, path: str, param: str) -> list[Any]:
        if param == "user_name" or (param == "name" and path.startswith("/api/v1/users/")):
            return list(self.users)
        if param == "name" and path.startswith("/api/v1/groups/"):
            return list(self.groups)
        if param == "name" and path.startswith("/api/v1/pools/"):
            return list(self.pools)
        if param == "name" and path.startswith("/api/v1/tokens/"):
            return list(self.tokens)
        if param == "rule_id":
            return list(self.rule_ids)
        return []

    def value_choices(self, key: str) -> list[Any]:
        return {
            "user": self.users,
            "actor": self.users,
            "group": self.groups,
            "pod": self.pods,
            "name": self.pods,  # agent register and heartbeat name their pod
        }.get(key, [])


def _ok(r: httpx.Response) -> None:
    """Seeding tolerates 4xx (the object is already there, or the fuzzing changed it) but a
    5xx while seeding is a finding like any other."""
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:500])


def seed(server: Server, admin: dict[str, str], agent: dict[str, str], fleet: Fleet) -> None:
    """Create (or re-create: the fuzzing deletes and changes things) the seeded fleet."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as c:
        _ok(c.post("/api/v1/users", json={"name": "alice", "email": "alice@example.com"}))
        _ok(c.post("/api/v1/users", json={"name": "bob", "mode": "gateway", "max_sessions": 3}))
        _ok(c.post("/api/v1/users", json={"name": "carol", "enabled": False}))
        _ok(c.post("/api/v1/groups", json={"name": "ops", "description": "operations"}))
        _ok(c.post("/api/v1/groups", json={"name": "dev"}))
        for group, user in (("ops", "alice"), ("ops", "bob"), ("dev", "carol")):
            _ok(c.post(f"/api/v1/groups/{group}/members", json={"user": user}))
        for body in (
            {"group": "ops", "destination": "10.10.0.0/16", "proto": "tcp", "ports": "22,443"},
            {"group": "dev", "destination": "10.20.0.5", "proto": "any"},
        ):
            _ok(c.post("/api/v1/rules", json=body))
        rules = c.get("/api/v1/rules")
        _ok(rules)
        if rules.status_code == 200:
            fleet.rule_ids = [int(r["id"]) for r in rules.json()]
        _ok(c.post("/api/v1/tokens", json={"name": "fuzz-spare", "role": "auditor"}))
        directory = {
            "url": NO_DIRECTORY,
            "bind_dn": "cn=sync,dc=example,dc=test",
            "bind_password": "fuzz-bind-password",
            "user_bases": ["ou=people,dc=example,dc=test"],
            "group_bases": ["ou=groups,dc=example,dc=test"],
            "group_map": {"eng": "ops"},
            "enabled": False,
        }
        _ok(c.put(DIRECTORY, json=directory))
        idp = {
            "issuer": NO_IDP,
            "client_id": "vpnfleet",
            "client_secret": "fuzz-client-secret",
            "public_url": "https://vpn.example.test",
        }
        _ok(c.put(IDP, json=idp))
    at = now.isoformat()
    ms = int(now.timestamp() * 1000)
    first = f"{POD}-00000001"
    opened = [
        (first, "alice", "nat", "10.200.0.2"),
        (f"{POD}-00000002", "bob", "gateway", "10.201.0.2"),
        (f"{POD}-00000003", "alice", "nat", "10.200.0.3"),
    ]
    denied = {
        "user": "alice",
        "session_uid": first,
        "src": "10.200.0.2",
        "dst": "10.30.0.1",
        "proto": "tcp",
        "dport": 80,
        "first_at": at,
        "last_at": at,
        "count": 3,
    }
    flow = {
        "kind": "end",
        "flow_id": "f1",
        "user": "alice",
        "session_uid": first,
        "proto": "tcp",
        "start_ms": ms - 5000,
        "end_ms": ms,
        "tunnel_ip": "10.200.0.2",
        "tunnel_port": 40000,
        "nat_ip": "192.0.2.10",
        "nat_port": 40000,
        "dst_ip": "10.10.0.5",
        "dst_port": 443,
        "bytes_out": 100,
        "bytes_in": 2000,
    }
    register = {"name": POD, "pod_ip": "192.0.2.10"}
    with httpx.Client(base_url=server.url, headers=agent, timeout=30) as c:
        if c.post("/api/v1/agent/register", json=register).status_code in (401, 403):
            _reenroll(server, admin, agent)
        r = httpx.post(f"{server.url}/api/v1/agent/register", json=register, headers=agent)
        assert r.status_code == 200, r.text
    with httpx.Client(base_url=server.url, headers=agent, timeout=30) as c:
        beat = {"name": POD, "applied_revision": 1, "ready": True, "status": {"clients": 2}}
        _ok(c.post("/api/v1/agent/heartbeat", json=beat))
        for uid, user, mode, ip in opened:
            body = {"uid": uid, "user": user, "pod": POD, "mode": mode, "tunnel_ip": ip,
                    "real_ip": "198.51.100.7", "real_port": 5000, "started_at": at}  # fmt: skip
            _ok(c.post("/api/v1/agent/sessions/open", json=body))
        close = {"uid": opened[2][0], "ended_at": at, "bytes_in": 10, "bytes_out": 20}
        _ok(c.post("/api/v1/agent/sessions/close", json=close))
        _ok(c.post("/api/v1/agent/denied", json={"pod": POD, "events": [denied]}))
        _ok(c.post("/api/v1/agent/flows", json={"pod": POD, "records": [flow]}))


@dataclass
class Target:
    """The control plane under fuzzing and what the test needs to talk to it."""

    server: Server
    admin: dict[str, str]
    agent: dict[str, str]
    fleet: Fleet
    refusals: list[str] = field(default_factory=list)  # the server's "database refused" warnings
    operation: str = ""  # the operation being fuzzed
    changed: bool = False  # whether it may have changed the seeded fleet

    def headers_for(self, case: Case) -> dict[str, str]:
        return self.agent if case.operation.path.startswith(AGENT_PREFIX) else self.admin


class _RefusalCatcher(logging.Handler):
    """Collects the server's "database refused a value" warnings (errors.py's safety net)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "database refused" in message:
            self.into.append(message)


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            "generation": {
                "max-examples": EXAMPLES,
                "database": "none",  # replays come from the seed, not a local file
                "mode": "all",  # valid and invalid requests
            },
            # The stateful phase needs links between operations the schema does not declare.
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 30,
        }
    )


def _steer(choices: list[Any], value: Any) -> st.SearchStrategy[Any]:
    """Half of the time the generated value, half of the time a seeded one."""
    if not choices:
        return st.just(value)
    return st.one_of(st.just(value), st.sampled_from(choices))


def _steer_each(values: Any, choices: Callable[[str], list[Any]]) -> st.SearchStrategy[Any]:
    """`_steer` each entry of a generated mapping (anything else as generated)."""
    if not isinstance(values, dict):
        return st.just(values)
    return st.fixed_dictionaries({k: _steer(choices(str(k)), v) for k, v in values.items()})


@pytest.fixture(scope="module", params=DATABASES)
def fuzz_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with fresh_database(request.param, tmp) as url, running_server(url, tmp / "data") as server:
        # The fuzzing runs with its own admin token: the bootstrap token's name is one the
        # generated DELETE /tokens/{name} could hit.
        admin = {"Authorization": f"Bearer {server.make_token('admin')}"}
        agent = agent_headers(server)
        fleet = Fleet()
        seed(server, admin, agent, fleet)
        with httpx.Client(base_url=server.url, headers=admin) as c:
            # A guard against a run that only ever meets 404s: the seeded objects are there.
            assert c.get("/api/v1/users/alice").status_code == 200
            assert len(fleet.rule_ids) == 2
            assert len(c.get("/api/v1/sessions", params={"pod": POD}).json()) == 3
        target = Target(server, admin, agent, fleet)
        catcher = _RefusalCatcher(target.refusals)
        logging.getLogger("vpnfleet.api").addHandler(catcher)
        try:
            yield target
        finally:
            logging.getLogger("vpnfleet.api").removeHandler(catcher)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_target: Target) -> schemathesis.BaseSchema:
    fleet = fuzz_target.fleet
    schema = schemathesis.openapi.from_url(
        f"{fuzz_target.server.url}/openapi.json", config=_config()
    )

    @schema.hook
    def flatmap_path_parameters(
        context: HookContext, path_parameters: dict[str, Any]
    ) -> st.SearchStrategy[dict[str, Any]]:
        path = context.operation.path if context.operation else ""
        return _steer_each(path_parameters, lambda k: fleet.path_choices(path, k))

    @schema.hook
    def flatmap_query(
        context: HookContext, query: dict[str, Any]
    ) -> st.SearchStrategy[dict[str, Any]]:
        return _steer_each(query, fleet.value_choices)

    @schema.hook
    def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
        path = context.operation.path if context.operation else ""
        if path == DIRECTORY and isinstance(body, dict) and isinstance(body.get("url"), str):
            # Any URL the schema would accept points at loopback (and the periodic sync off).
            return st.just({**body, "url": NO_DIRECTORY, "enabled": False})
        if path == IDP and isinstance(body, dict) and isinstance(body.get("issuer"), str):
            # Any issuer the schema would accept points at loopback, where nothing listens.
            return st.just({**body, "issuer": NO_IDP})
        if not path.startswith(AGENT_PREFIX):
            return st.just(body)
        return _steer_each(body, fleet.value_choices)

    return schema


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32 labels each operation's subtest by rewriting ``Node._nodeid``, which
    pytest 9.2 no longer has (node ids moved to ``_id``): give it the attribute it reads.
    A no-op where pytest still has it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _checks(status: int) -> list[Any]:
    if status < 400 or ERRORS_IN_SCHEMA:
        checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
        return [*checks, status_code_conformance] if ERRORS_IN_SCHEMA else checks
    return [not_a_server_error]


def _watch(case: Case, target: Target) -> None:
    """The watch answers a stream that never ends, so schemathesis would wait forever for
    the end of its body: read the status and the first line instead, then hang up. The first
    line is a catch-up change, a resync, or (since at the head) a heartbeat within the test
    server's heartbeat interval of one second; it must be a message agents understand."""
    headers = {**(case.headers or {}), **target.headers_for(case)}
    with (
        httpx.Client(base_url=target.server.url, timeout=10) as c,
        c.stream(case.method, case.formatted_path, params=case.query, headers=headers) as r,
    ):
        assert r.status_code < 500, (case.query, r.status_code, r.read()[:500])
        if r.status_code != 200:
            assert r.headers["content-type"] == "application/problem+json", r.headers
            return
        assert r.headers["content-type"].startswith("application/x-ndjson"), r.headers
        first = next(r.iter_lines())
        wire.parse_watch_message(json.loads(first))


# The whole run of one database is one pytest test: the project's 300 s per-test timeout is
# a hang guard sized for ordinary tests, this one scales with the number of examples.
@pytest.mark.timeout(600 + 60 * EXAMPLES)
@schema.parametrize()
def test_no_server_errors_and_responses_match_the_schema(case: Case, fuzz_target: Target) -> None:
    if fuzz_target.operation != case.operation.label:
        # Each operation starts from the seeded fleet: the writes before it may have deleted,
        # disabled, pruned or re-pooled what they were steered onto.
        if fuzz_target.changed:
            seed(fuzz_target.server, fuzz_target.admin, fuzz_target.agent, fuzz_target.fleet)
        fuzz_target.operation = case.operation.label
        fuzz_target.changed = False
    fuzz_target.changed |= case.method.upper() != "GET"
    fuzz_target.refusals.clear()
    if case.operation.path == WATCH:
        _watch(case, fuzz_target)
    else:
        response = case.call(headers=fuzz_target.headers_for(case))
        checks = _checks(response.status_code)
        unreachable = (f"{DIRECTORY}/sync", f"{IDP}/test")
        if case.operation.path in unreachable and response.status_code == 502:
            # The fuzzed directory and IdP are deliberately unreachable: their documented 502
            # is the right answer, not a server error (the body is still checked as
            # problem+json).
            checks = [c for c in checks if c is not not_a_server_error]
        case.validate_response(response, checks=checks)
    # The safety net in errors.py answers 422 when the database refuses a value the schema
    # let through; the answer cannot name the field, so the schema must be tightened.
    assert not fuzz_target.refusals, (
        f"the database, not the schema, refused {case.operation.label} "
        f"path={case.path_parameters} query={case.query} body={case.body!r:.300}: "
        f"{fuzz_target.refusals}"
    )
