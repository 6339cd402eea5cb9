"""NAT audit on SQLite and PostgreSQL: flow ingest, reverse lookup, listing, retention."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server, free_port
from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane import retention

T0 = dt.datetime(2026, 11, 26, 15, 0, 0, tzinfo=dt.UTC)
POD_IP = "10.99.0.11"


def ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def rec(
    kind: str,
    flow_id: str,
    start: dt.datetime,
    end: dt.datetime | None = None,
    *,
    user: str | None = "alice",
    session: str | None = "pod1-alice-0001",
    nat_port: int = 40000,
    tunnel_ip: str = "10.200.0.2",
    tunnel_port: int = 51000,
    dst: tuple[str, int] | None = ("10.20.0.5", 443),
    proto: str = "tcp",
    **extra: Any,
) -> dict[str, Any]:
    """A flow record exactly as an agent sends it (core.flowtracker.FlowRecord.as_dict())."""
    body: dict[str, Any] = {
        "kind": kind,
        "flow_id": flow_id,
        "pod": "pod1",
        "user": user,
        "session_uid": session,
        "proto": proto,
        "start_ms": ms(start),
        "end_ms": ms(end) if end else None,
        "tunnel_ip": tunnel_ip,
        "tunnel_port": tunnel_port,
        "nat_ip": POD_IP,
        "nat_port": nat_port,
        "dst_ip": dst[0] if dst else None,
        "dst_port": dst[1] if dst else None,
        "packets_out": None,
        "bytes_out": None,
        "packets_in": None,
        "bytes_in": None,
        "end_inferred": False,
    }
    body.update(extra)
    return body


def send(agent: httpx.Client, records: list[dict[str, Any]], pod: str = "pod1") -> dict[str, Any]:
    r = agent.post("/api/v1/agent/flows", json={"pod": pod, "records": records})
    assert r.status_code == 200, r.text
    return dict(r.json())


def open_session(
    agent: httpx.Client,
    uid: str,
    user: str,
    started: dt.datetime,
    real_ip: str,
    tunnel_ip: str = "10.200.0.2",
) -> None:
    body = {
        "uid": uid,
        "user": user,
        "pod": "pod1",
        "mode": "nat",
        "tunnel_ip": tunnel_ip,
        "real_ip": real_ip,
        "real_port": 5000,
        "started_at": iso(started),
    }
    r = agent.post("/api/v1/agent/sessions/open", json=body)
    assert r.status_code == 200 and r.json()["allowed"], r.text


def who(client: httpx.Client, at: dt.datetime, port: int = 40000, **params: Any) -> httpx.Response:
    return client.get(
        "/api/v1/audit/attribution",
        params={"ip": POD_IP, "port": port, "proto": "tcp", "at": iso(at), **params},
    )


@pytest.fixture
def agent(server: Server, admin: httpx.Client) -> Iterator[httpx.Client]:
    for name in ("alice", "bob"):
        assert admin.post("/api/v1/users", json={"name": name}).status_code == 201
    with server.client(server.pod_token("pod1")) as c:
        yield c


@pytest.fixture
def auditor(server: Server) -> Iterator[httpx.Client]:
    with server.client(server.make_token("auditor")) as c:
        yield c


def flows(auditor: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = auditor.get("/api/v1/audit/flows", params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


def test_redelivered_batch_stores_each_flow_once(
    agent: httpx.Client, auditor: httpx.Client
) -> None:
    batch = [
        rec("start", "pod1:1:1", T0),
        rec("start", "pod1:2:1", T0 + dt.timedelta(seconds=1), nat_port=40001),
        rec("end", "pod1:1:1", T0, T0 + dt.timedelta(seconds=30), bytes_out=10, bytes_in=20,
            packets_out=1, packets_in=2),
    ]  # fmt: skip
    send(agent, batch)
    first = flows(auditor)
    send(agent, batch)  # the spool resends after an outage
    again = flows(auditor)
    assert again == first and len(again) == 2
    done = next(f for f in again if f["flow_id"] == "pod1:1:1")
    assert done["end_at"] == "2026-11-26T15:00:30Z" and done["bytes_in"] == 20
    still_open = next(f for f in again if f["flow_id"] == "pod1:2:1")
    assert still_open["end_at"] is None and still_open["bytes_out"] is None
    # A start arriving after its end changes nothing.
    send(agent, [rec("start", "pod1:1:1", T0)])
    assert flows(auditor) == first


def test_end_without_start_is_a_complete_flow(agent: httpx.Client, auditor: httpx.Client) -> None:
    end = T0 + dt.timedelta(minutes=2)
    send(agent, [rec("end", "pod1:9:1", T0, end, user="bob", bytes_out=5, bytes_in=7)])
    [row] = flows(auditor)
    assert row["user"] == "bob" and row["end_at"] == iso(end) and row["bytes_out"] == 5
    # An inferred end (the DESTROY was lost) never overwrites the real one.
    inferred = rec("end", "pod1:9:1", T0, end + dt.timedelta(minutes=5), end_inferred=True)
    send(agent, [inferred])
    assert flows(auditor)[0]["end_at"] == iso(end)


def test_port_reuse_picks_the_covering_flow(agent: httpx.Client, auditor: httpx.Client) -> None:
    open_session(agent, "pod1-alice-0001", "alice", T0 - dt.timedelta(hours=1), "198.51.100.7")
    open_session(
        agent, "pod1-bob-00002", "bob", T0 - dt.timedelta(hours=1), "203.0.113.9", "10.200.0.3"
    )
    m = dt.timedelta(minutes=1)
    send(
        agent,
        [
            rec("end", "pod1:1:1", T0, T0 + m, tunnel_port=51000),
            rec("end", "pod1:2:1", T0 + 10 * m, T0 + 12 * m, user="bob",
                session="pod1-bob-00002", tunnel_ip="10.200.0.3", tunnel_port=52000),
        ],
    )  # fmt: skip
    first = who(auditor, T0 + dt.timedelta(seconds=30)).json()
    assert first["status"] == "match" and first["user"] == "alice"
    assert first["session"]["real_ip"] == "198.51.100.7"
    assert first["session"]["tunnel_ip"] == "10.200.0.2" and first["session"]["ended_at"] is None
    assert first["flow"]["tunnel_port"] == 51000 and first["flow"]["dst_ip"] == "10.20.0.5"
    assert "was alice" in first["message"]
    second = who(auditor, T0 + 11 * m).json()
    assert second["status"] == "match" and second["user"] == "bob"
    assert second["session"]["real_ip"] == "203.0.113.9"
    assert second["flow"]["tunnel_ip"] == "10.200.0.3" and second["flow"]["tunnel_port"] == 52000
    # The log said 15:01:00 with whole seconds: [15:01:00, 15:01:01] touches alice's end.
    edge = who(auditor, T0 + m, window=1).json()
    assert edge["user"] == "alice"


def test_nothing_covers_lists_nearest_candidates(
    agent: httpx.Client, auditor: httpx.Client
) -> None:
    m = dt.timedelta(minutes=1)
    send(
        agent,
        [
            rec("end", "pod1:1:1", T0, T0 + m),
            rec("end", "pod1:2:1", T0 + 10 * m, T0 + 11 * m, user="bob", session=None),
            rec("end", "pod1:3:1", T0, T0 + 60 * m, nat_port=40001),  # another port
        ],
    )
    out = who(auditor, T0 + 4 * m).json()
    assert out["status"] == "no_match" and out["user"] is None and out["flow"] is None
    assert out["message"].startswith("no flow covers 10.99.0.11:40000/tcp at 2026-11-26T15:04:00Z")
    cands = out["candidates"]
    assert [c["user"] for c in cands] == ["alice", "bob"]
    assert [c["distance_seconds"] for c in cands] == [180.0, 360.0]
    assert [c["relation"] for c in cands] == ["before", "after"]
    never = who(auditor, T0, port=49999).json()
    assert never["status"] == "no_match" and never["candidates"] == []


def test_two_covering_flows_are_ambiguous(agent: httpx.Client, auditor: httpx.Client) -> None:
    # Linux keeps only the 5-tuple unique: two clients may share the NAT port towards
    # different destinations at the same time.
    m = dt.timedelta(minutes=1)
    send(
        agent,
        [
            rec("end", "pod1:1:1", T0, T0 + 5 * m, dst=("10.20.0.5", 443)),
            rec("end", "pod1:2:1", T0 + m, T0 + 6 * m, user="bob", session=None,
                dst=("10.20.0.6", 443)),
        ],
    )  # fmt: skip
    out = who(auditor, T0 + 2 * m).json()
    assert out["status"] == "ambiguous" and out["user"] is None
    assert {x["user"] for x in out["matches"]} == {"alice", "bob"}
    assert "2 flows cover" in out["message"] and "dst" in out["message"]
    narrowed = who(auditor, T0 + 2 * m, dst="10.20.0.6:443").json()
    assert narrowed["status"] == "match" and narrowed["user"] == "bob"


def test_open_flow_is_bounded_by_its_session(
    server: Server, agent: httpx.Client, auditor: httpx.Client
) -> None:
    open_session(agent, "pod1-alice-0001", "alice", T0 - dt.timedelta(minutes=5), "198.51.100.7")
    send(agent, [rec("start", "pod1:1:1", T0)])
    h = dt.timedelta(hours=1)
    assert who(auditor, T0 + h).json()["user"] == "alice"  # session open: flow may be too
    closed = agent.post(
        "/api/v1/agent/sessions/close",
        json={"uid": "pod1-alice-0001", "ended_at": iso(T0 + 2 * h)},
    )
    assert closed.json() == {"closed": True}
    assert who(auditor, T0 + h).json()["user"] == "alice"
    after = who(auditor, T0 + 3 * h).json()
    assert after["status"] == "no_match" and after["candidates"][0]["distance_seconds"] == 3600


def test_reuse_of_the_same_tuple_ends_an_open_flow(
    agent: httpx.Client, auditor: httpx.Client
) -> None:
    m = dt.timedelta(minutes=1)
    # alice's end record never came; bob later got the very same NAT tuple, so hers had ended.
    send(
        agent,
        [
            rec("start", "pod1:1:1", T0, session=None),
            rec("end", "pod1:2:1", T0 + 10 * m, T0 + 11 * m, user="bob", session=None),
        ],
    )
    assert who(auditor, T0 + 5 * m).json()["user"] == "alice"
    assert who(auditor, T0 + 10 * m + dt.timedelta(seconds=30)).json()["user"] == "bob"


def test_batch_lookup_answers_in_order(agent: httpx.Client, auditor: httpx.Client) -> None:
    m = dt.timedelta(minutes=1)
    send(agent, [rec("end", "pod1:1:1", T0, T0 + m), rec("end", "pod1:2:1", T0 + 5 * m,
         T0 + 6 * m, user="bob", session=None)])  # fmt: skip
    queries = [
        {"ip": POD_IP, "port": 40000, "at": iso(T0 + 5 * m + dt.timedelta(seconds=1))},
        {"ip": POD_IP, "port": 40000, "at": iso(T0 + 3 * m)},
        {"ip": POD_IP, "port": 40000, "proto": "tcp", "at": iso(T0), "window": 1},
    ]
    r = auditor.post("/api/v1/audit/attribution", json={"queries": queries})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["match", "no_match", "match"]
    assert [x["user"] for x in results] == ["bob", None, "alice"]
    assert len(results[1]["candidates"]) == 2
    quiet = auditor.post(
        "/api/v1/audit/attribution", json={"queries": queries, "candidates": False}
    ).json()["results"]
    assert quiet[1]["candidates"] == []
    queries[1]["port"] = 0
    bad = auditor.post("/api/v1/audit/attribution", json={"queries": queries})
    assert problem(bad, 400) == "queries[1]: port 0 is out of range 1-65535"
    too_many = [queries[0]] * 10_001
    assert problem(auditor.post("/api/v1/audit/attribution", json={"queries": too_many}), 422)


def test_bad_lookups_get_one_sentence(auditor: httpx.Client) -> None:
    base = {"ip": POD_IP, "port": 40000, "proto": "tcp", "at": "2026-11-26T15:00:00Z"}

    def ask(**change: Any) -> httpx.Response:
        return auditor.get("/api/v1/audit/attribution", params={**base, **change})

    assert problem(ask(at="2026-11-26T15:00:00"), 400) == (
        "at: time '2026-11-26T15:00:00' has no time zone; add Z or +HH:MM"
    )
    assert "is not ISO 8601" in problem(ask(at="yesterday"), 400)
    assert problem(ask(port=0), 400) == "port 0 is out of range 1-65535"
    assert problem(ask(port=65536), 400) == "port 65536 is out of range 1-65535"
    assert problem(ask(proto="sctp"), 400) == "proto 'sctp' is not one of tcp, udp, icmp"
    assert "not an IP address" in problem(ask(ip="pod-1"), 400)
    assert "IPv6" in problem(ask(ip="2001:db8::1"), 400)
    assert "dst" in problem(ask(dst="10.0.0.1:99999"), 400)
    # An unencoded "+" in the URL arrives as a space; the zone is still understood.
    ok = auditor.get("/api/v1/audit/attribution?ip=10.99.0.11&port=1&at=2026-11-26T15:00:00+00:00")
    assert ok.status_code == 200 and ok.json()["status"] == "no_match"
    assert "since" in problem(auditor.get("/api/v1/audit/flows?since=2026-11-26"), 400)
    assert "host bits" in problem(auditor.get("/api/v1/audit/flows?dst=10.0.0.1/8"), 400)


def test_bad_flow_records_are_refused_whole(
    agent: httpx.Client, auditor: httpx.Client, server: Server
) -> None:
    good = rec("start", "pod1:1:1", T0)

    def post(*records: dict[str, Any], pod: str = "pod1") -> httpx.Response:
        return agent.post("/api/v1/agent/flows", json={"pod": pod, "records": list(records)})

    assert "not an IPv4 address" in problem(post(good, {**good, "nat_ip": "pod"}), 422)
    assert "end_ms" in problem(post({**good, "kind": "end"}), 422)
    assert "batch from 'pod2'" in problem(post(good, pod="pod2"), 422)
    assert problem(post({**good, "nat_port": 70000}), 422)
    assert problem(post({**good, "start_ms": ms(T0) * 1000}), 422)  # microseconds, not ms
    assert problem(post(*[good] * 5001), 422)
    assert flows(auditor) == []
    assert problem(auditor.post("/api/v1/agent/flows", json={"pod": "p", "records": []}), 403)
    with server.client(server.make_token("operator")) as op:
        assert op.get("/api/v1/audit/flows").status_code == 200
    assert problem(agent.get("/api/v1/audit/attribution", params={"ip": POD_IP}), 403)


def test_flow_listing_filters(agent: httpx.Client, auditor: httpx.Client) -> None:
    m = dt.timedelta(minutes=1)
    send(
        agent,
        [
            rec("end", "pod1:1:1", T0, T0 + m, dst=("10.20.0.5", 443)),
            rec("end", "pod1:2:1", T0 + 5 * m, T0 + 6 * m, dst=("10.30.1.9", 22)),
            rec("start", "pod1:3:1", T0 + 9 * m, user="bob", dst=None),  # privacy: no dst
        ],
    )
    assert [f["flow_id"] for f in flows(auditor)] == ["pod1:3:1", "pod1:2:1", "pod1:1:1"]
    assert [f["flow_id"] for f in flows(auditor, user="bob")] == ["pod1:3:1"]
    assert [f["flow_id"] for f in flows(auditor, dst="10.20.0.0/16")] == ["pod1:1:1"]
    assert [f["flow_id"] for f in flows(auditor, dst="10.30.1.9")] == ["pod1:2:1"]
    window = flows(auditor, since=iso(T0 + m), until=iso(T0 + 9 * m))
    assert [f["flow_id"] for f in window] == ["pod1:3:1", "pod1:2:1"]
    assert len(flows(auditor, limit=1)) == 1
    privacy = flows(auditor, user="bob")[0]
    assert privacy["dst_ip"] is None and privacy["dst_port"] is None


@pytest.fixture
def kept_30_days(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """A control plane started with --audit-retention 30."""
    import uvicorn

    from vpnfleet.controlplane.app import create_app
    from vpnfleet.controlplane.settings import ServerSettings

    port = free_port()
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        listen=f"127.0.0.1:{port}",
        secret="test-seal-secret-Qx9LmPz4Rk8Vw2b7",
        audit_retention_days=30,
    )
    srv = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "control plane did not start"
        time.sleep(0.05)
    token = (settings.data_dir / "admin-token").read_text().strip()
    try:
        yield Server(f"http://127.0.0.1:{port}", token, settings.data_dir, database_url)
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


def test_retention_deletes_old_rows_in_batches_and_says_so(kept_30_days: Server) -> None:
    server = kept_30_days
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old, recent = now - dt.timedelta(days=40), now - dt.timedelta(days=1)
    day = dt.timedelta(days=1)
    records = [rec("end", f"pod1:{i}:1", old, old + dt.timedelta(minutes=i)) for i in range(5)]
    records += [
        rec("end", "pod1:100:1", recent, recent + dt.timedelta(minutes=1)),
        rec("start", "pod1:101:1", old, nat_port=40001),  # never ended, started long ago
        rec("end", "pod1:102:1", old, now - day, nat_port=40002),  # long, ended recently
    ]
    denied = [
        {"src": "10.200.0.2", "dst": "10.1.1.1", "proto": "tcp", "dport": 22, "count": 1,
         "first_at": iso(t), "last_at": iso(t)}
        for t in (old, old, old, recent)
    ]  # fmt: skip
    with server.client(server.pod_token("pod1")) as agent, server.client() as admin:
        send(agent, records)
        r = agent.post("/api/v1/agent/denied", json={"pod": "pod1", "events": denied})
        assert r.status_code == 200, r.text
        engine = dbmod.make_engine(server.database_url)
        try:
            factory = dbmod.session_factory(engine)
            done = retention.prune(factory, retention.horizon(30), batch=2, pause=0)
            assert (done.flows, done.denied) == (6, 3)
            assert retention.prune(factory, retention.horizon(30), batch=2, pause=0).flows == 0
        finally:
            engine.dispose()
        kept = {f["flow_id"] for f in admin.get("/api/v1/audit/flows").json()}
        assert kept == {"pod1:100:1", "pod1:102:1"}
        assert len(admin.get("/api/v1/audit/denied").json()) == 1

        params = {"ip": POD_IP, "port": 40000, "at": iso(old + dt.timedelta(seconds=30))}
        gone = admin.get("/api/v1/audit/attribution", params=params)
        assert "older than the 30-day retention" in problem(gone, 404)
        # A flow that outlived the horizon still answers for its later part.
        later = {**params, "port": 40002, "at": iso(now - 2 * day)}
        assert admin.get("/api/v1/audit/attribution", params=later).json()["user"] == "alice"
        batch = admin.post("/api/v1/audit/attribution", json={"queries": [params, later]}).json()[
            "results"
        ]
        assert [x["status"] for x in batch] == ["expired", "match"]


async def test_retention_task_prunes_and_logs(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    engine = dbmod.make_engine(database_url)
    try:
        dbmod.upgrade(engine)
        factory = dbmod.session_factory(engine)
        from vpnfleet.controlplane.models import Flow

        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        with dbmod.transaction(factory) as db:
            db.add_all(
                Flow(flow_id=f"p:{i}:1", pod_name="p", proto="tcp", tunnel_ip="10.200.0.2",
                     tunnel_port=1, nat_ip=POD_IP, nat_port=2, start_at=old, end_at=old,
                     duration_class=0)
                for i in range(3)
            )  # fmt: skip
        caplog.set_level("INFO", logger="vpnfleet.retention")
        task = asyncio.create_task(retention.run_retention(factory, 7, first_delay=0))
        deadline = time.monotonic() + 20
        while "deleted 3 flows" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        engine.dispose()


def test_long_flow_is_found_among_many_reuses(agent: httpx.Client, auditor: httpx.Client) -> None:
    h = dt.timedelta(hours=1)
    # alice's SSH flow lives 2 days; meanwhile bob's short flows reuse the NAT port towards
    # other destinations every 10 minutes.
    records = [rec("end", "pod1:1:1", T0, T0 + 48 * h, dst=("10.30.0.22", 22))]
    records += [
        rec("end", f"pod1:{i}:1", T0 + i * 10 * dt.timedelta(minutes=1),
            T0 + i * 10 * dt.timedelta(minutes=1) + dt.timedelta(seconds=20), user="bob",
            session=None, dst=("10.20.0.5", 443))
        for i in range(2, 40)
    ]  # fmt: skip
    send(agent, records)
    at = T0 + 5 * h + dt.timedelta(minutes=5)  # between two of bob's flows
    assert who(auditor, at).json()["user"] == "alice"
    # Exactly at the end of a flow that lived exactly its class bound (1 hour): still covered.
    send(agent, [rec("end", "pod1:900:1", T0, T0 + h, nat_port=40900)])
    assert who(auditor, T0 + h, port=40900).json()["user"] == "alice"
    # Where bob's flow covers the time too, both are named.
    both = who(auditor, T0 + 50 * dt.timedelta(minutes=1) + dt.timedelta(seconds=10)).json()
    assert both["status"] == "ambiguous" and {m["user"] for m in both["matches"]} == {
        "alice",
        "bob",
    }


def test_an_end_record_turns_an_open_flow_into_a_bounded_one(
    agent: httpx.Client, auditor: httpx.Client
) -> None:
    h = dt.timedelta(hours=1)
    open_session(agent, "pod1-alice-0001", "alice", T0 - h, "198.51.100.7")
    send(agent, [rec("start", "pod1:1:1", T0)])
    assert who(auditor, T0 + 3 * h).json()["user"] == "alice"  # open, session open
    send(agent, [rec("end", "pod1:1:1", T0, T0 + 2 * h, bytes_in=9)])
    assert who(auditor, T0 + 90 * dt.timedelta(minutes=1)).json()["user"] == "alice"
    assert who(auditor, T0 + 3 * h).json()["status"] == "no_match"
