"""The watch stream's one reader refuses what it does not understand, with a clear message.

A follower that skipped or defaulted an unreadable change would go on deciding from a state
that is silently wrong (a port-limited grant read as all ports); refusing lets it resync.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from vpnfleet.wire import (
    LiveSession,
    RuleState,
    RuleUpsert,
    SessionUpsert,
    UserDelete,
    UserKey,
    UserState,
    UserUpsert,
    WatchHeartbeat,
    WatchResync,
    parse_watch_message,
)

AT = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)
RULE = RuleUpsert(
    revision=4,
    at=AT,
    object=RuleState(id=5, group_id=3, destination="10.0.0.0/8", proto="tcp", ports="22,443"),
)
USER = UserUpsert(
    revision=5,
    at=AT,
    object=UserState(
        id=1,
        name="alice",
        enabled=True,
        mode="nat",
        max_sessions=1,
        groups=["devs"],
        gateway_address=None,
        cert_serial="123",
        auth="cert",
    ),
)


def wire(event: Any) -> dict[str, Any]:
    """The event as a watcher receives it: a JSON line, decoded."""
    out: dict[str, Any] = json.loads(event.model_dump_json())
    return out


def test_every_message_survives_the_wire_unchanged() -> None:
    kill = SessionUpsert(
        revision=6,
        at=AT,
        object=LiveSession(
            uid="pod1-aaaaaaaa",
            user="alice",
            pod="pod1",
            tunnel_ip="10.200.0.2",
            mode="nat",
            real_ip="198.51.100.7",
            kill="disconnected by an administrator",
        ),
    )
    gone = UserDelete(revision=7, at=AT, key=UserKey(id=1, name="alice"))
    for message in (RULE, USER, kill, gone, WatchResync(revision=9), WatchHeartbeat(revision=9)):
        assert parse_watch_message(wire(message)) == message
        assert parse_watch_message(message.model_dump_json()) == message
    line = wire(RULE)
    assert line["kind"] == "rule" and line["op"] == "upsert" and line["type"] == "change"
    assert line["object"]["ports"] == "22,443" and line["at"] == "2026-01-31T12:00:00Z"


def without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    out = json.loads(json.dumps(obj))
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return dict(out)


def replaced(obj: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    out = json.loads(json.dumps(obj))
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return dict(out)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        # Missing fields: nothing is assumed, least of all "all ports" or "enabled".
        (without(wire(RULE), "object", "ports"), "object.ports: Field required"),
        (without(wire(USER), "object", "enabled"), "object.enabled: Field required"),
        (without(wire(USER), "object", "groups"), "object.groups: Field required"),
        (without(wire(USER), "revision"), "revision: Field required"),
        (without(wire(USER), "at"), "at: Field required"),
        (without(wire(USER), "kind"), "'kind'"),
        (without(wire(USER), "object"), "object: Field required"),
        # Wrong types: strict, no coercion of "yes" or "1".
        (replaced(wire(USER), "yes", "object", "enabled"), "valid boolean"),
        (replaced(wire(USER), "1", "object", "max_sessions"), "valid integer"),
        (replaced(wire(USER), "bridge", "object", "mode"), "'nat' or 'gateway'"),
        (replaced(wire(RULE), "sctp", "object", "proto"), "object.proto"),
        (replaced(wire(RULE), 22, "object", "ports"), "object.ports"),
        (replaced(wire(USER), "10", "revision"), "revision"),
        (replaced(wire(USER), "2026-01-31T12:00:00", "at"), "timezone"),
        # Unknown kind, op, type; extra fields.
        (replaced(wire(USER), "kill", "kind"), "Input tag 'kill'"),
        (replaced(wire(USER), "update", "op"), "Input tag 'update'"),
        (replaced(wire(USER), "patch", "type"), "Input tag 'patch'"),
        (replaced(wire(USER), "x", "object", "nickname"), "Extra inputs"),
        (replaced(wire(USER), {"id": 1, "name": "alice"}, "key"), "Extra inputs"),
        # An upsert carries the object, a delete the key: not the other way round.
        (replaced(without(wire(USER), "object"), {"id": 1, "name": "a"}, "key"), "object"),
        # Pools are never deleted: there is no such event.
        (
            {"type": "change", "revision": 3, "at": "2026-01-31T12:00:00Z", "kind": "pool",
             "op": "delete", "key": {"id": 1}},
            "change.pool.op",
        ),
        ({"type": "resync"}, "resync.revision: Field required"),
        ({"type": "heartbeat", "revision": 3, "extra": True}, "Extra inputs"),
        ([], "valid dictionary"),
        ("{not json", "Invalid JSON"),
    ],
)  # fmt: skip
def test_malformed_or_unknown_messages_are_refused(bad: Any, says: str) -> None:
    with pytest.raises(ValueError, match=r"^malformed watch message") as exc:
        parse_watch_message(bad)
    assert says in str(exc.value)
    assert "\n" not in str(exc.value)  # one line, fit for a log
