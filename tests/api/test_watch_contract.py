"""Contract: the watch stream and the snapshot describe the same fleet.

An agent builds its view from a snapshot and then follows the watch stream. For random
sequences of API operations (users, modes, groups, memberships, rules with and without ports,
pools, certificates, kills, policy applies, sessions opened and closed by pods), the view built
from the snapshot at r0 plus every watch event after r0 must equal the view built from the
snapshot at r1. A change event that loses or invents anything (say a rule's ports, so that a
port-limited grant becomes all ports) makes the two differ.

SQLite only: the contract is about shapes, not about the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import operator
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Server
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import Snapshot, WatchHeartbeat, WatchResync, parse_watch_message

USERS = ["u0", "u1", "u2", "u3"]
GROUPS = ["g0", "g1", "g2"]
PODS = ["pod0", "pod1"]
REAL_IPS = ["198.51.100.1", "198.51.100.2", "203.0.113.3"]
GRANTS = [
    ("10.10.0.0/16", "tcp", "22,443"),
    ("10.10.0.0/16", "tcp", None),
    ("10.20.0.0/24", "udp", "53"),
    ("10.30.0.5", "any", None),
    ("10.0.0.0/8", "icmp", None),
]
_uids = itertools.count()

user_name = st.sampled_from(USERS)
group_name = st.sampled_from(GROUPS)
operations = st.one_of(
    st.tuples(
        st.just("create_user"),
        user_name,
        st.sampled_from(["nat", "gateway"]),
        st.integers(1, 2),
        st.lists(group_name, max_size=2, unique=True),
    ),
    st.tuples(st.sampled_from(["disable", "enable", "delete_user", "reissue", "kill"]), user_name),
    st.tuples(st.just("mode"), user_name, st.sampled_from(["nat", "gateway"])),
    st.tuples(st.sampled_from(["create_group", "delete_group"]), group_name),
    st.tuples(st.sampled_from(["add_member", "remove_member"]), group_name, user_name),
    st.tuples(st.just("create_rule"), group_name, st.sampled_from(GRANTS)),
    st.tuples(st.just("delete_rule"), st.integers(0, 20)),
    st.tuples(st.just("pool"), st.sampled_from(["n0", "n1"]), st.integers(0, 3)),
    st.tuples(st.just("register"), st.sampled_from(PODS), st.sampled_from([None, "10.99.0.7"])),
    st.tuples(
        st.just("open"), user_name, st.sampled_from(PODS), st.sampled_from(REAL_IPS), st.booleans()
    ),
    st.tuples(st.just("close"), st.integers(0, 20)),
    st.tuples(st.just("report"), st.sampled_from(PODS), st.integers(0, 20)),
    st.tuples(
        st.just("policy"),
        st.sampled_from(GRANTS),
        st.sampled_from(["nat", "gateway"]),
        st.booleans(),
    ),
)


# Always run too: every kind of change at least once, whatever the random draw.
EVERY_KIND: list[tuple[Any, ...]] = [
    ("create_group", "g2"),
    ("create_rule", "g2", GRANTS[0]),
    ("create_user", "u3", "gateway", 1, ["g2"]),
    ("open", "u0", "pod0", REAL_IPS[0], False),
    ("open", "u0", "pod1", REAL_IPS[0], False),  # the same device: replaces (kills) the first
    ("open", "u3", "pod1", REAL_IPS[2], True),
    ("kill", "u0"),
    ("reissue", "u1"),
    ("add_member", "g1", "u1"),
    ("remove_member", "g0", "u1"),
    ("mode", "u2", "gateway"),
    ("disable", "u2"),
    ("pool", "n0", 1),
    ("register", "pod1", "10.99.0.7"),
    ("policy", GRANTS[2], "gateway", True),
    ("close", 0),
    ("report", "pod1", 0),
    ("delete_rule", 0),
    ("delete_group", "g2"),
    ("delete_user", "u3"),
    ("enable", "u2"),
]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def policy_text(grant: tuple[str, str, str | None], mode: str, member: bool) -> str:
    dest, proto, ports = grant
    ports_part = f", ports: {json.dumps(ports)}" if ports else ""
    groups = "[p0]" if member else "[]"
    return (
        "version: 1\n"
        f"users:\n  pu: {{mode: {mode}, groups: {groups}}}\n"
        "groups:\n  p0:\n    grants:\n"
        f"      - {{destination: {dest}, proto: {proto}{ports_part}}}\n"
    )


def run(
    admin: httpx.Client, agents: dict[str, httpx.Client], op: tuple[Any, ...], opened: list[str]
) -> None:
    """Apply one operation: admin writes through `admin`, each pod's through its own client."""
    """One API call; refusals (404, 409, 422) are part of the game and change nothing."""
    kind = op[0]
    if kind == "create_user":
        _, name, mode, max_sessions, groups = op
        body = {"name": name, "mode": mode, "max_sessions": max_sessions, "groups": groups}
        r = admin.post("/api/v1/users", json=body)
    elif kind in ("disable", "enable"):
        r = admin.post(f"/api/v1/users/{op[1]}/{kind}")
    elif kind == "delete_user":
        r = admin.delete(f"/api/v1/users/{op[1]}")
    elif kind == "reissue":
        r = admin.post(f"/api/v1/users/{op[1]}/reissue")
    elif kind == "kill":
        r = admin.post(f"/api/v1/users/{op[1]}/kill")
    elif kind == "mode":
        r = admin.patch(f"/api/v1/users/{op[1]}", json={"mode": op[2]})
    elif kind == "create_group":
        r = admin.post("/api/v1/groups", json={"name": op[1]})
    elif kind == "delete_group":
        r = admin.delete(f"/api/v1/groups/{op[1]}")
    elif kind == "add_member":
        r = admin.post(f"/api/v1/groups/{op[1]}/members", json={"user": op[2]})
    elif kind == "remove_member":
        r = admin.delete(f"/api/v1/groups/{op[1]}/members/{op[2]}")
    elif kind == "create_rule":
        dest, proto, ports = op[2]
        body = {"group": op[1], "destination": dest, "proto": proto, "ports": ports}
        r = admin.post("/api/v1/rules", json=body)
    elif kind == "delete_rule":
        rules = admin.get("/api/v1/rules").json()
        if not rules:
            return
        r = admin.delete(f"/api/v1/rules/{rules[op[1] % len(rules)]['id']}")
    elif kind == "pool":
        r = admin.put(
            f"/api/v1/pools/{op[1]}", json={"cidr": f"10.{210 + op[2]}.0.0/16", "kind": "nat"}
        )
    elif kind == "register":
        body = {"name": op[1]} | ({"pod_ip": op[2]} if op[2] else {})
        r = agents[op[1]].post("/api/v1/agent/register", json=body)
    elif kind == "open":
        _, name, pod, real_ip, gateway = op
        uid = f"{pod}-{next(_uids):08d}"
        address = f"10.200.0.{2 + len(opened) % 200}"
        if gateway:  # the user's lease if it has one (else refused: checked, not believed)
            user = admin.get(f"/api/v1/users/{name}")
            address = (user.json().get("gateway_address") if user.is_success else None) or address
        body = {
            "uid": uid,
            "user": name,
            "pod": pod,
            "mode": "gateway" if gateway else "nat",
            "tunnel_ip": address,
            "real_ip": real_ip,
            "real_port": 5000,
            "started_at": now(),
        }
        r = agents[pod].post("/api/v1/agent/sessions/open", json=body)
        if r.status_code == 200:
            opened.append(uid)
    elif kind == "close":
        if not opened:
            return
        uid = opened[op[1] % len(opened)]
        body = {"uid": uid, "ended_at": now(), "bytes_in": 1}
        r = agents[uid.rsplit("-", 1)[0]].post("/api/v1/agent/sessions/close", json=body)
    elif kind == "report":
        mine = [u for u in opened if u.startswith(op[1])]
        keep = mine[: op[2] % (len(mine) + 1)]
        r = agents[op[1]].post("/api/v1/agent/sessions/report", json={"pod": op[1], "live": keep})
    elif kind == "policy":
        text = policy_text(*op[1:])
        r = admin.post("/api/v1/policy/apply", json={"yaml": text, "filename": "p.yaml"})
    else:  # pragma: no cover - the strategy has no other operations
        raise AssertionError(kind)
    assert r.status_code < 500, f"{op}: {r.status_code} {r.text}"
    assert r.status_code in (200, 201, 204, 404, 409, 422), f"{op}: {r.status_code} {r.text}"


def ensure_cast(admin: httpx.Client, agents: dict[str, httpx.Client]) -> None:
    """Before r0: the same cast each time (u0-u2 in g0, g1 exists, u3 and g2 do not, both pods
    registered), so the operations under test find things to delete, kill, reissue and join,
    and things left to create, instead of mostly 404s and 409s."""
    for name in GROUPS[:2]:
        admin.post("/api/v1/groups", json={"name": name})
    admin.delete(f"/api/v1/groups/{GROUPS[2]}")
    existing = {u["name"] for u in admin.get("/api/v1/users").json()}
    for name in USERS[:3]:
        if name not in existing:
            body = {"name": name, "max_sessions": 2, "groups": [GROUPS[0]]}
            admin.post("/api/v1/users", json=body).raise_for_status()
        admin.post(f"/api/v1/users/{name}/enable").raise_for_status()
    admin.delete(f"/api/v1/users/{USERS[3]}")
    for pod in PODS:
        agents[pod].post("/api/v1/agent/register", json={"name": pod}).raise_for_status()


def events_after(server: Server, since: int, until: int) -> list[Any]:
    """Every change event in (since, until], read from the real watch stream."""
    events: list[Any] = []
    if until <= since:
        return events
    deadline = time.monotonic() + 15
    with (
        server.client() as c,
        c.stream("GET", "/api/v1/watch", params={"since": since}, timeout=15) as resp,
    ):
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line:
                continue
            message = parse_watch_message(line)
            assert not isinstance(message, WatchResync), "the stream asked for a resync"
            if not isinstance(message, WatchHeartbeat):
                events.append(message)
            if message.revision >= until or time.monotonic() > deadline:
                break
    assert events and events[-1].revision == until
    return events


def normalized(view: FleetView) -> dict[str, Any]:
    snap = view.to_snapshot().model_dump()
    for key, sort_by in (
        ("users", "name"),
        ("groups", "id"),
        ("rules", "id"),
        ("pools", "id"),
        ("sessions", "uid"),
        ("pods", "name"),
    ):
        snap[key] = sorted(snap[key], key=operator.itemgetter(sort_by))
    return snap


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_snapshot_plus_watch_events_equals_the_next_snapshot(server: Server) -> None:
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(server.client())
        agents = {pod: stack.enter_context(server.client(server.pod_token(pod))) for pod in PODS}
        agent = agents[PODS[0]]

        def snapshot() -> Snapshot:
            return Snapshot.model_validate(agent.get("/api/v1/agent/snapshot").json())

        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        )
        @given(st.lists(operations, min_size=1, max_size=20))
        @example(EVERY_KIND)
        def contract(ops: list[tuple[Any, ...]]) -> None:
            ensure_cast(admin, agents)
            before = snapshot()
            view = FleetView.from_snapshot(before)
            opened: list[str] = []
            for op in ops:
                run(admin, agents, op, opened)
            after = snapshot()
            for event in events_after(server, before.revision, after.revision):
                view.apply(event)
            assert normalized(view) == normalized(FleetView.from_snapshot(after))

        contract()
