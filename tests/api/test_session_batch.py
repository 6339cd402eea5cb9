"""`POST /agent/sessions/batch`: a pod's open/close records applied in order, in one request,
each answered as its own endpoint would answer it; bad batches refused whole."""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from vpnfleet.agent.cpclient import ControlPlane
from vpnfleet.agent.sessionship import SessionShipper
from vpnfleet.agent.spool import Spool
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.services import sessions as session_service
from vpnfleet.core.sessionbook import Client
from vpnfleet.wire import MAX_SESSION_BATCH

BATCH = "/api/v1/agent/sessions/batch"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def open_rec(uid: str, user: str, real_ip: str, pod: str = "pod1", host: int = 2) -> dict[str, Any]:
    return {
        "kind": "open",
        "body": {
            "uid": uid,
            "user": user,
            "pod": pod,
            "mode": "nat",
            "tunnel_ip": f"10.200.0.{host}",
            "real_ip": real_ip,
            "real_port": 5000,
            "started_at": now(),
        },
    }


def close_rec(uid: str, bytes_in: int = 7) -> dict[str, Any]:
    body = {"uid": uid, "ended_at": now(), "bytes_in": bytes_in, "bytes_out": 9, "reason": "bye"}
    return {"kind": "close", "body": body}


def sessions(admin: httpx.Client) -> list[dict[str, Any]]:
    out = admin.get("/api/v1/sessions", params={"limit": 1000}).json()
    return sorted(out, key=lambda s: s["id"])


def revision(agent: httpx.Client) -> int:
    """The change log's head, as a heartbeat answers it."""
    hb = {"name": "pod1", "applied_revision": 0, "ready": True}
    return int(agent.post("/api/v1/agent/heartbeat", json=hb).json()["revision"])


def setup(server: Server, admin: httpx.Client, *pods: str) -> list[httpx.Client]:
    for name, limit in (("alice", 1), ("bob", 1), ("carol", 2)):
        r = admin.post("/api/v1/users", json={"name": name, "max_sessions": limit})
        assert r.status_code == 201, r.text
    clients = []
    for pod in pods:
        c = server.client(server.pod_token(pod))
        c.post("/api/v1/agent/register", json={"name": pod}).raise_for_status()
        clients.append(c)
    return clients


def test_records_apply_in_order_with_a_result_each(server: Server, admin: httpx.Client) -> None:
    (agent,) = setup(server, admin, "pod1")
    with closing(agent):
        records = [
            open_rec("pod1-00000001", "alice", "198.51.100.1"),
            # Refused in the middle of the batch: alice is at her limit of 1 (another device).
            open_rec("pod1-00000002", "alice", "198.51.100.2", host=3),
            close_rec("pod1-00000001"),
            # Only because the close before it was applied first: the limit counts it gone.
            open_rec("pod1-00000003", "alice", "198.51.100.3", host=4),
            open_rec("pod1-00000004", "bob", "198.51.100.4", host=5),
        ]
        r = agent.post(BATCH, json={"pod": "pod1", "records": records})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert [(x["kind"], x["uid"], x["status"]) for x in res] == [
            ("open", "pod1-00000001", 200),
            ("open", "pod1-00000002", 200),
            ("close", "pod1-00000001", 200),
            ("open", "pod1-00000003", 200),
            ("open", "pod1-00000004", 200),
        ]
        allowed = [x["verdict"]["allowed"] if x["kind"] == "open" else x["closed"] for x in res]
        assert allowed == [True, False, True, True, True]
        assert "session limit reached (1)" in res[1]["verdict"]["reason"]

        rows = sessions(admin)
        assert [(s["user"], s["ended_at"] is None) for s in rows] == [
            ("alice", False),  # opened, then closed by its record
            ("alice", False),  # refused: kept for the audit trail, closed at once
            ("alice", True),
            ("bob", True),
        ]
        assert (rows[0]["bytes_in"], rows[0]["end_reason"]) == (7, "bye")
        assert rows[1]["end_reason"].startswith("refused: session limit")
        # Agents learn the live sessions (the change log was appended).
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert sorted(s["uid"] for s in snap["sessions"]) == ["pod1-00000003", "pod1-00000004"]


def test_a_record_its_endpoint_refuses_is_skipped_and_the_rest_apply(
    server: Server, admin: httpx.Client
) -> None:
    agent, agent2 = setup(server, admin, "pod1", "pod2")
    with closing(agent), closing(agent2):
        theirs = agent2.post(BATCH, json={"pod": "pod2", "records": [
            open_rec("pod2-00000001", "carol", "203.0.113.1", pod="pod2", host=2)]})  # fmt: skip
        assert theirs.status_code == 200, theirs.text
        records = [
            open_rec("pod1-00000001", "alice", "198.51.100.1"),
            open_rec("pod1-00000002", "ghost", "198.51.100.2", host=3),  # no such user
            close_rec("pod2-00000001"),  # another pod's session
            open_rec("pod2-00000001", "carol", "198.51.100.5", host=6),  # its uid, pod2's
            open_rec("pod1-00000003", "bob", "198.51.100.3", host=4),
        ]
        res = agent.post(BATCH, json={"pod": "pod1", "records": records}).json()["results"]
        assert [x["status"] for x in res] == [200, 404, 403, 409, 200]
        assert "user 'ghost' does not exist" in res[1]["detail"]
        assert "cannot close it" in res[2]["detail"]
        assert "belongs to another pod" in res[3]["detail"]
        assert res[4]["verdict"]["allowed"] is True
        rows = sessions(admin)
        assert [(s["user"], s["pod"], s["ended_at"] is None) for s in rows] == [
            ("carol", "pod2", True),  # pod1 could not close it
            ("alice", "pod1", True),
            ("bob", "pod1", True),
        ]


def test_a_batch_sent_again_after_its_answer_was_lost_changes_nothing(
    server: Server, admin: httpx.Client
) -> None:
    (agent,) = setup(server, admin, "pod1")
    with closing(agent):
        batch = {"pod": "pod1", "records": [
            open_rec("pod1-00000001", "alice", "198.51.100.1"),
            open_rec("pod1-00000002", "bob", "198.51.100.2", host=3),
            close_rec("pod1-00000001", bytes_in=70),
            open_rec("pod1-00000003", "carol", "198.51.100.3", host=4),
        ]}  # fmt: skip
        first = agent.post(BATCH, json=batch).json()["results"]
        before = sessions(admin)
        head = revision(agent)
        again = agent.post(BATCH, json=batch).json()["results"]
        assert sessions(admin) == before  # no new row, the close's bytes and time kept
        assert [(s["user"], s["bytes_in"]) for s in before] == [
            ("alice", 70),
            ("bob", 0),
            ("carol", 0),
        ]
        ids = [x["verdict"]["session_id"] for x in first if x["kind"] == "open"]
        assert [x["verdict"]["session_id"] for x in again if x["kind"] == "open"] == ids
        # As the open endpoint answers a record delivered again: the same verdict, except for
        # a session ended meanwhile (here by the batch's own close; the agent knows that).
        assert [x["verdict"]["allowed"] for x in again if x["kind"] == "open"] == [
            False,
            True,
            True,
        ]
        assert again[2]["closed"] is False  # closing twice is not an error
        # Nothing changed for the agents either: no new change-log revision.
        assert revision(agent) == head


def test_a_bad_batch_is_refused_whole_and_writes_nothing(
    server: Server, admin: httpx.Client
) -> None:
    agent, _agent2 = setup(server, admin, "pod1", "pod2")
    with closing(agent), closing(_agent2):
        good = [open_rec("pod1-00000001", "alice", "198.51.100.1")]
        too_many = [
            open_rec(f"pod1-{i:08x}", "carol", "198.51.100.9", host=2 + i % 200)
            for i in range(MAX_SESSION_BATCH + 1)
        ]

        def refused(records: list[dict[str, Any]]) -> str:
            return problem(agent.post(BATCH, json={"pod": "pod1", "records": records}), 422)

        assert f"at most {MAX_SESSION_BATCH} items" in refused(too_many)
        assert "at least 1 item" in refused([])
        assert "records.1" in refused([*good, {"kind": "denied", "body": {}}])
        assert "ended_at" in refused([*good, {"kind": "close", "body": {"uid": "pod1-00000001"}}])
        assert "NUL" in refused([*good, open_rec("pod1-00000002", "a\x00b", "198.51.100.2")])
        assert "the batch is pod 'pod1'" in refused(
            [*good, open_rec("pod1-00000002", "bob", "198.51.100.2", pod="pod2")]
        )
        not_json = agent.post(
            BATCH,
            content=b'{"pod": "pod1", "records": [',
            headers={"Content-Type": "application/json"},
        )
        assert not_json.status_code == 422, not_json.text
        # Another pod's batch, with this pod's credential.
        theirs = [open_rec("pod2-00000001", "bob", "198.51.100.2", pod="pod2")]
        assert "cannot act as pod 'pod2'" in problem(
            agent.post(BATCH, json={"pod": "pod2", "records": theirs}), 403
        )
        huge = {"pod": "pod1", "records": good, "pad": "x" * (2 << 20)}
        problem(agent.post(BATCH, json=huge), 413)
        assert sessions(admin) == []
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert snap["sessions"] == []


class _Counting(httpx.AsyncBaseTransport):
    """The agent client's real transport, counting requests per path. With ``old=True`` it
    answers the batch path 404 itself, as a control plane older than batches does; with
    ``faulty=True`` 500, as a control plane with a bug on one of the batch's records would
    (fakes: neither control plane runs here); every other request reaches the real server."""

    def __init__(self, old: bool, faulty: bool = False) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.old = old
        self.faulty = faulty
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.old and request.url.path == BATCH:
            return httpx.Response(404, json={"detail": "Not Found"})
        if self.faulty and request.url.path == BATCH:
            return httpx.Response(500, text="Internal Server Error")
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


async def _ship(
    server: Server, token: str, state: Path, old: bool, faulty: bool = False
) -> tuple[list[str], Any]:
    """Five records through the agent's own shipper: (request paths, refusals it acted on)."""
    cp = ControlPlane(server.url, token)
    transport = _Counting(old, faulty)
    cp._http = httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, transport=transport
    )
    shipper = SessionShipper(Spool(state, "sessions"), cp, "pod1")
    kicked: list[tuple[str, str]] = []

    async def kick(uid: str, reason: str) -> None:
        kicked.append((uid, reason))

    shipper.on_refused(kick)
    tag = "c" if faulty else "b" if old else "a"

    def client(n: int, user: str) -> Client:
        return Client(cid=n, user=user, mode="nat", tunnel_ip=f"10.200.0.{n + 1}",
                      real_ip=f"198.51.100.{n}", real_port=5000, uid=f"pod1-{tag}000000{n}",
                      connected_at=now())  # fmt: skip

    one, two, three = client(1, "alice"), client(2, "alice"), client(3, "bob")
    shipper.opened(one)
    shipper.opened(two)  # alice's second device: over her limit of 1
    shipper.closed(one, 10, 20, "gone")
    shipper.opened(three)
    shipper.closed(three, 1, 2, "gone")
    task = asyncio.create_task(shipper.run())
    try:
        for _ in range(100):
            if not len(shipper.spool):
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cp.close()
    assert not len(shipper.spool)
    return transport.paths, kicked


def test_the_agent_ships_its_records_in_batches_and_falls_back_one_by_one(
    server: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    (agent,) = setup(server, admin, "pod1")
    with closing(agent):
        token = str(agent.headers["Authorization"]).split()[1]
        paths, kicked = asyncio.run(_ship(server, token, tmp_path / "a", old=False))
        assert paths == [BATCH]  # five records, one request
        assert kicked == [("pod1-a0000002", "session limit reached (1)")]
        # An older control plane: the same records, one request each, the same refusal.
        paths, kicked = asyncio.run(_ship(server, token, tmp_path / "b", old=True))
        assert paths == [BATCH] + [
            f"/api/v1/agent/sessions/{k}" for k in ("open", "open", "close", "open", "close")
        ]
        assert kicked == [("pod1-b0000002", "session limit reached (1)")]
        # A control plane that answers every batch 500: after three tries (0.5 s, then 1 s
        # apart) the same records go one per request, and nothing is lost or held up.
        paths, kicked = asyncio.run(_ship(server, token, tmp_path / "c", old=False, faulty=True))
        assert paths == 3 * [BATCH] + [
            f"/api/v1/agent/sessions/{k}" for k in ("open", "open", "close", "open", "close")
        ]
        assert kicked == [("pod1-c0000002", "session limit reached (1)")]
        rows = sessions(admin)
        assert [(s["user"], s["end_reason"]) for s in rows] == 3 * [
            ("alice", "gone"),
            ("alice", "refused: session limit reached (1)"),
            ("bob", "gone"),
        ]


def test_a_batch_looks_up_once_what_all_its_records_share(
    server: Server, admin: httpx.Client
) -> None:
    """The database statements a batch costs grow by a few per record, not by every lookup
    per record: its pod, NAT pool, users and sessions are read once for the whole batch (the
    fleet simulator's 100 opens/s on 50 pods: docs/performance.md, "Fewer statements per
    session record"). Counted on the server's engines while only the batch runs."""
    names = [f"u{i:02d}" for i in range(40)]
    for name in names:
        assert admin.post("/api/v1/users", json={"name": name}).status_code == 201
    agent = server.client(server.pod_token("pod1"))
    with closing(agent):
        agent.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
        opens = [
            open_rec(f"pod1-{i:08x}", name, f"198.51.100.{i + 1}", host=i + 2)
            for i, name in enumerate(names)
        ]
        closes = [close_rec(rec["body"]["uid"]) for rec in opens]
        counts = []
        for records in (opens, closes):
            statements: list[str] = []

            def count(*args: Any) -> None:
                statements.append(str(args[2]))

            event.listen(Engine, "before_cursor_execute", count)
            try:
                r = agent.post(BATCH, json={"pod": "pod1", "records": records})
            finally:
                event.remove(Engine, "before_cursor_execute", count)
            assert r.status_code == 200, r.text
            assert all(res["status"] == 200 for res in r.json()["results"]), r.text
            counts.append(len(statements))
    per_open, per_close = ((n - 20) / 40 for n in counts)
    # Measured with the request's own statements spread over the records: 0.7 (PostgreSQL)
    # and 1.7 (SQLite) per open and per close: the insert or update, nothing else. With a
    # savepoint per record and the user's live sessions read per open: 3.7 and 4.75 per
    # open, 2.8 and 3.75 per close; when each record also looked up its pod, pool, user,
    # session and its user's pods itself: 11.7 and 10.7 per open.
    assert per_open <= 2.5 and per_close <= 2.5, counts
    assert [s["user"] for s in sessions(admin)] == names
    assert all(s["ended_at"] for s in sessions(admin))


def test_closing_the_session_of_a_user_deleted_meanwhile_is_no_error(
    server: Server, admin: httpx.Client
) -> None:
    """A deleted user's live session keeps its row (user_id cleared); its pod closes it when
    the CRL drops the client, often in the same batch as other closes. That batch used to
    fail whole with a 500, and the agent sent it again and again: the pod's session records
    stopped for good."""
    (agent,) = setup(server, admin, "pod1")
    with closing(agent):
        first = [
            open_rec("pod1-000000a1", "alice", "198.51.100.1"),
            open_rec("pod1-000000b1", "bob", "198.51.100.2", host=3),
        ]
        r = agent.post(BATCH, json={"pod": "pod1", "records": first})
        assert r.status_code == 200 and all(x["verdict"]["allowed"] for x in r.json()["results"])
        assert admin.delete("/api/v1/users/alice").status_code == 204
        closes = [close_rec("pod1-000000a1"), close_rec("pod1-000000b1")]
        r = agent.post(BATCH, json={"pod": "pod1", "records": closes})
        assert r.status_code == 200, r.text
        assert [(x["status"], x["closed"]) for x in r.json()["results"]] == [(200, True)] * 2
    assert [s["ended_at"] is not None for s in sessions(admin)] == [True, True]


def test_a_record_refused_after_it_wrote_fails_the_batch_whole(
    server: Server, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records have no savepoint of their own: a refusal must come before a record writes.
    Should code ever refuse after writing (forced here: the server runs in this process), the
    batch is answered 500 and nothing of it is kept, rather than half a record."""
    (agent,) = setup(server, admin, "pod1")
    with closing(agent):
        first = [open_rec("pod1-00000001", "alice", "198.51.100.1")]
        assert agent.post(BATCH, json={"pod": "pod1", "records": first}).status_code == 200
        before = sessions(admin)
        real = session_service.close_session

        def refuses_late(*args: Any, **kwargs: Any) -> bool:
            real(*args, **kwargs)  # writes the close
            raise Problem(403, "Forbidden", "refused after writing")

        monkeypatch.setattr(session_service, "close_session", refuses_late)
        records = [
            open_rec("pod1-00000002", "bob", "198.51.100.2", host=3),
            close_rec("pod1-00000001"),
        ]
        r = agent.post(BATCH, json={"pod": "pod1", "records": records})
        assert r.status_code == 500, r.text
    assert sessions(admin) == before  # neither bob's open nor alice's close was kept
