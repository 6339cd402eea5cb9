"""Reverse lookup latency ("who was POD_IP:PORT at T?") over 10 million flow records.

    .venv/bin/python bench/attribution_lookup.py [--rows 10000000] [--lookups 2000]
        [--http 300] [--db sqlite,postgresql] [--pg-url postgresql+psycopg://...] [--prune]

For each database: a temporary database (a SQLite file in a temporary directory; on
PostgreSQL a database created and dropped through the test role, VPNFLEET_TEST_PG_URL),
schema from the real migrations, then a bulk load of synthetic flows (SQLite: executemany in
200,000-row transactions; PostgreSQL: COPY through psycopg), with the two random-order
indexes built after the load. Then random lookups through `controlplane.reverse_lookup.lookup`,
the function the API calls, each in its own session and transaction as a request has:

- covering: a time inside a stored flow (every address:port is reused ~20 times over the
  30 days, so these all face port reuse);
- miss: a random address, port and time (nothing covers it: 4 queries with candidates);
- hot port: one address:port reused 20,000 times (a NAT port that everybody lands on),
  covering and missing times.

Baseline in the same run: the covering-flow fetch without the lifetime classes (one query on
address, port, protocol and start time, as a plain (nat_ip, nat_port, proto, start_at) index
serves it), which reads every earlier flow of the address and port.
Last, a smaller sample through HTTP (uvicorn on loopback, GET /api/v1/audit/attribution) and
one POST of 10,000 lookups (what `vpnfleet audit annotate` sends per chunk). With --prune,
the retention code then deletes the first half of the month, and each transaction is timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import io
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, or_, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane.models import Flow, VpnSession
from vpnfleet.controlplane.reverse_lookup import FLOW_COLUMNS, lookup
from vpnfleet.core.attribution import Query, duration_class_ms

DEFAULT_PG = "postgresql+psycopg://vpnfleet_test:vpnfleet_test@127.0.0.1:5432/postgres"
BASE = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
DAYS = 30
PODS = 8
SESSIONS = 50_000
SESSION_HOURS = 10
USERS = 5_000
HOT_IP, HOT_PORT, HOT_FLOWS = "10.99.0.1", 33333, 20_000
SAMPLE_EVERY = 2_000  # remember one generated flow in this many, to ask about it later
LATE_INDEXES = ("ix_flows_nat", "ix_flows_user_time")
COLUMNS = (
    "flow_id", "pod_name", "user_name", "session_uid", "proto", "tunnel_ip", "tunnel_port",
    "nat_ip", "nat_port", "dst_ip", "dst_num", "dst_port", "start_at", "end_at",
    "duration_class", "end_inferred", "packets_out", "bytes_out", "packets_in", "bytes_in",
)  # fmt: skip


@dataclass(frozen=True)
class Sampled:
    nat_ip: str
    nat_port: int
    start_ms: int
    end_ms: int | None


@functools.lru_cache(maxsize=1 << 16)
def _second(sec: int) -> str:
    return dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def ts(ms: int) -> str:
    """Epoch ms as the naive-UTC text both databases take (SQLAlchemy's SQLite format)."""
    return f"{_second(ms // 1000)}.{ms % 1000:03d}000"


def pod_ip(p: int) -> str:
    return f"10.99.0.{p + 1}"


def session_start_ms(k: int) -> int:
    step = DAYS * 86_400_000 // SESSIONS
    return int(BASE.timestamp() * 1000) + k * step


def generate(rows: int, seed: int, sample: list[Sampled]) -> Iterator[tuple[Any, ...]]:
    """Flows in start order: each belongs to a session alive at its start."""
    rng = random.Random(seed)
    base_ms = int(BASE.timestamp() * 1000)
    span_ms = DAYS * 86_400_000
    session_ms = SESSION_HOURS * 3_600_000
    step = span_ms // SESSIONS
    buckets = 43_200  # one per minute
    per_bucket = rows / buckets
    seq = 0
    carry = 0.0
    for b in range(buckets):
        carry += per_bucket
        n = int(carry)
        carry -= n
        b0 = base_ms + b * 60_000
        for offset in sorted(rng.randrange(60_000) for _ in range(n)):
            start = b0 + offset
            newest = (start - base_ms) // step
            # A session alive at `start` (it started at most SESSION_HOURS before).
            k = rng.randint(max(0, newest - session_ms // step + 1), newest)
            pod = k % PODS
            roll = rng.random()
            if roll < 0.80:
                life = rng.randint(200, 60_000)
            elif roll < 0.98:
                life = rng.randint(60_000, 1_800_000)
            else:
                life = rng.randint(1_800_000, 8 * 3_600_000)
            end: int | None = max(start, min(start + life, session_start_ms(k) + session_ms))
            if rng.random() < 0.01:
                end = None  # still open, or its end record is late
            nat_port = rng.randint(1024, 65535)
            dst = rng.randrange(500)
            seq += 1
            if seq % SAMPLE_EVERY == 0:
                sample.append(Sampled(pod_ip(pod), nat_port, start, end))
            yield (
                f"pod{pod}:{seq:09d}:{start // 1000}", f"pod{pod}", f"user{k % USERS}",
                f"s{k:08d}", "tcp", f"10.200.{(k >> 8) & 255}.{k & 255}",
                rng.randint(32768, 60999), pod_ip(pod), nat_port, f"10.20.{dst >> 8}.{dst & 255}",
                (10 << 24) | (20 << 16) | dst, 443, ts(start), None if end is None else ts(end),
                duration_class_ms(start, end), False, 10, 2_000, 12, 40_000,
            )  # fmt: skip
    # The hot port: reused back to back all month.
    gap = span_ms // HOT_FLOWS
    for i in range(HOT_FLOWS):
        start = base_ms + i * gap
        end = start + rng.randint(100, gap - 1)
        seq += 1
        if i % 200 == 0:
            sample.append(Sampled(HOT_IP, HOT_PORT, start, end))
        yield (
            f"pod0:{seq:09d}:{start // 1000}", "pod0", f"user{i % USERS}", f"s{i:08d}", "tcp",
            "10.200.0.9", 40000, HOT_IP, HOT_PORT, "10.20.0.1", (10 << 24) | (20 << 16) | 1,
            443, ts(start), ts(end), duration_class_ms(start, end), False, 1, 100, 1, 100,
        )  # fmt: skip


def sessions_rows() -> list[dict[str, Any]]:
    out = []
    for k in range(SESSIONS):
        start = BASE + dt.timedelta(milliseconds=session_start_ms(k) - int(BASE.timestamp() * 1000))
        out.append({
            "uid": f"s{k:08d}", "user_name": f"user{k % USERS}", "pod_name": f"pod{k % PODS}",
            "mode": "nat", "tunnel_ip": f"10.200.{(k >> 8) & 255}.{k & 255}",
            "real_ip": f"198.51.{(k >> 8) & 255}.{k & 255}", "real_port": 50000,
            "started_at": start, "ended_at": start + dt.timedelta(hours=SESSION_HOURS),
            "bytes_in": 0, "bytes_out": 0,
        })  # fmt: skip
    return out


def drop_late_indexes(engine: Engine) -> None:
    with engine.begin() as conn:
        for name in LATE_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))


def create_late_indexes(engine: Engine) -> None:
    with engine.begin() as conn:
        for index in Flow.__table__.indexes:
            if index.name in LATE_INDEXES:
                index.create(conn)


def load_sqlite(path: Path, rows: int, seed: int, sample: list[Sampled]) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-2000000")
    marks = ",".join("?" * len(COLUMNS))
    stmt = f"INSERT INTO flows ({','.join(COLUMNS)}) VALUES ({marks})"
    batch: list[tuple[Any, ...]] = []
    for row in generate(rows, seed, sample):
        batch.append(row)
        if len(batch) >= 200_000:
            con.execute("BEGIN")
            con.executemany(stmt, batch)
            con.execute("COMMIT")
            batch.clear()
    if batch:
        con.execute("BEGIN")
        con.executemany(stmt, batch)
        con.execute("COMMIT")
    con.close()


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if value is False:
        return "f"
    return str(value)


def load_postgres(engine: Engine, rows: int, seed: int, sample: list[Sampled]) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("ALTER TABLE flows DROP CONSTRAINT uq_flows_flow_id")
        cur.execute("DROP INDEX ix_flows_time")
        with cur.copy(f"COPY flows ({','.join(COLUMNS)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            buf = io.StringIO()
            for i, row in enumerate(generate(rows, seed, sample), 1):
                buf.write("\t".join(map(_copy_text, row)))
                buf.write("\n")
                if i % 100_000 == 0:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        raw.commit()
        cur.execute("SET maintenance_work_mem = '1GB'")
        cur.execute("ALTER TABLE flows ADD CONSTRAINT uq_flows_flow_id UNIQUE (flow_id)")
        cur.execute("CREATE INDEX ix_flows_time ON flows (start_at)")
        raw.commit()
    finally:
        raw.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return (
        f"  {name:<22} n={len(ms):>5}  p50 {pct(ms, 50):6.2f} ms  p90 {pct(ms, 90):6.2f} ms  "
        f"p99 {pct(ms, 99):6.2f} ms  max {max(ms):7.2f} ms  mean {statistics.fmean(ms):6.2f} ms"
    )


def make_queries(sample: list[Sampled], n: int, rng: random.Random) -> list[tuple[str, Query]]:
    normal = [s for s in sample if s.nat_port != HOT_PORT]
    hot = [s for s in sample if s.nat_port == HOT_PORT]
    base_ms = int(BASE.timestamp() * 1000)
    out: list[tuple[str, Query]] = []

    def at(ms: int) -> dt.datetime:
        return BASE + dt.timedelta(milliseconds=ms - base_ms)

    for i in range(n):
        kind = ("covering", "covering", "miss", "hot covering", "hot miss")[i % 5]
        if kind.endswith("covering"):
            s = rng.choice(hot if kind.startswith("hot") else normal)
            end = s.end_ms if s.end_ms is not None else s.start_ms + 1000
            when = rng.randint(s.start_ms, end)
            out.append((kind, Query(s.nat_ip, s.nat_port, "tcp", at(when))))
        elif kind == "miss":
            when = base_ms + rng.randrange(DAYS * 86_400_000)
            q = Query(pod_ip(rng.randrange(PODS)), rng.randint(1024, 65535), "tcp", at(when))
            out.append((kind, q))
        else:
            # Between two consecutive hot-port flows: each ends before the next starts.
            s = rng.choice(hot)
            gap_end = s.start_ms + DAYS * 86_400_000 // HOT_FLOWS
            assert s.end_ms is not None
            when = rng.randint(s.end_ms + 1, gap_end - 1)
            out.append((kind, Query(HOT_IP, HOT_PORT, "tcp", at(when))))
    rng.shuffle(out)
    return out


def scan_variant(db: Any, q: Query) -> list[Any]:
    """Baseline: the covering fetch without lifetime classes, as an index on (address, port,
    protocol, start) alone allows: every earlier flow of the address and port is read."""
    stmt = (
        select(*FLOW_COLUMNS)
        .where(Flow.nat_ip == q.ip, Flow.nat_port == q.port, Flow.proto == q.proto,
               Flow.start_at <= q.latest, or_(Flow.end_at >= q.at, Flow.end_at.is_(None)))
        .order_by(Flow.start_at.desc())
        .limit(10)
    )  # fmt: skip
    return list(db.connection().execute(stmt).all())


def timed(factory: Any, fn: Callable[[Any], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with factory() as db, db.begin():
        result = fn(db)
    return (time.perf_counter() - t0) * 1000, result


def run_lookups(engine: Engine, queries: list[tuple[str, Query]]) -> dict[str, list[float]]:
    factory = dbmod.session_factory(engine)
    for _kind, q in queries[:100]:  # warm-up: connection pool, statement caches
        timed(factory, lambda db, q=q: lookup(db, q))
    by_kind: dict[str, list[float]] = {}
    statuses: dict[str, dict[str, int]] = {}
    for kind, q in queries:
        ms, out = timed(factory, lambda db, q=q: lookup(db, q))
        by_kind.setdefault(kind, []).append(ms)
        by_kind.setdefault("all", []).append(ms)
        counts = statuses.setdefault(kind, {})
        counts[out.status] = counts.get(out.status, 0) + 1
    for kind, q in queries:
        ms, _ = timed(factory, lambda db, q=q: scan_variant(db, q))
        by_kind.setdefault("baseline " + kind, []).append(ms)
    for kind, counts in sorted(statuses.items()):
        print(f"  answers for {kind}: {counts}")
    return by_kind


def explain(engine: Engine, q: Query) -> None:
    """Print the plan of the statement lookup() runs first, with its real parameters."""
    seen: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cur: Any, statement: str, params: Any, *_rest: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        with dbmod.session_factory(engine)() as db:
            lookup(db, q)
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    statement, params = next((st, pa) for st, pa in seen if "UNION ALL" in st)
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(prefix + statement, params).all()
    lines = [str(r[-1]) if engine.dialect.name == "sqlite" else str(r[0]) for r in plan]
    print("  plan of the covering query:")
    for line in lines:
        print("    " + line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_http(url: str, data_dir: Path, queries: list[tuple[str, Query]], n: int) -> None:
    import httpx
    import uvicorn

    from vpnfleet.controlplane.app import create_app
    from vpnfleet.controlplane.settings import ServerSettings

    port = free_port()
    settings = ServerSettings(
        data_dir=data_dir,
        database_url=url,
        listen=f"127.0.0.1:{port}",
        secret=secrets.token_urlsafe(32),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None,
                       access_log=False, log_level="warning")
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    token = (data_dir / "admin-token").read_text().strip()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        ) as c:
            ms: list[float] = []
            for i, (_kind, q) in enumerate(queries[: n + 20]):
                params = {"ip": q.ip, "port": q.port, "proto": q.proto, "at": q.at.isoformat()}
                t0 = time.perf_counter()
                r = c.get("/api/v1/audit/attribution", params=params)
                if i >= 20:  # the first ones warm the connection up
                    ms.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
            print(summary("HTTP GET (all kinds)", ms))
            body = {
                "queries": [
                    {"ip": q.ip, "port": q.port, "proto": q.proto, "at": q.at.isoformat(),
                     "window": 1}
                    for _k, q in (queries * (10_000 // len(queries) + 1))[:10_000]
                ],
                "candidates": False,
            }  # fmt: skip
            t0 = time.perf_counter()
            r = c.post("/api/v1/audit/attribution", json=body)
            r.raise_for_status()
            took = time.perf_counter() - t0
            print(f"  HTTP POST 10,000 lookups: {took:.2f} s ({10_000 / took:,.0f} lookups/s)")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def bench_one(kind: str, url: str, work: Path, args: argparse.Namespace) -> None:
    print(f"== {kind}: {args.rows:,} flows (+{HOT_FLOWS:,} on one hot port)")
    engine = dbmod.make_engine(url)
    try:
        dbmod.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(insert(VpnSession), sessions_rows())
        drop_late_indexes(engine)
        sample: list[Sampled] = []
        t0 = time.perf_counter()
        if kind == "sqlite":
            engine.dispose()
            load_sqlite(Path(make_url(url).database or ""), args.rows, args.seed, sample)
        else:
            load_postgres(engine, args.rows, args.seed, sample)
        loaded = time.perf_counter() - t0
        create_late_indexes(engine)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        if kind == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM flows"))
        indexed = time.perf_counter() - t0 - loaded
        total = args.rows + HOT_FLOWS
        print(f"  load {loaded:.0f} s ({total / loaded:,.0f} rows/s), indexes + analyze "
              f"{indexed:.0f} s")  # fmt: skip
        if kind == "sqlite":
            size = Path(make_url(url).database or "").stat().st_size
        else:
            with engine.connect() as conn:
                size = int(conn.execute(text("SELECT pg_database_size(current_database())"))
                           .scalar_one())  # fmt: skip
        print(f"  database size {size / 2**30:.1f} GiB")
        rng = random.Random(args.seed + 1)
        queries = make_queries(sample, args.lookups, rng)
        explain(engine, queries[0][1])
        results = run_lookups(engine, queries)
        order = ["all", "covering", "miss", "hot covering", "hot miss"]
        for name in order + [f"baseline {k}" for k in order[1:]]:
            print(summary(name, results[name]))
        engine.dispose()
        run_http(url, work / f"{kind}-data", queries, args.http)
        if args.prune:
            run_prune(engine)
    finally:
        engine.dispose()


def run_prune(engine: Engine) -> None:
    """Retention on the loaded data: delete the first half of the month, timing each batch."""
    from vpnfleet.controlplane import retention

    spent: list[float] = []
    batch = retention._delete_batch

    def timed_batch(factory: Any, stmt: Any) -> int:
        t0 = time.perf_counter()
        try:
            return batch(factory, stmt)
        finally:
            spent.append(time.perf_counter() - t0)

    retention._delete_batch = timed_batch  # type: ignore[assignment]  # measure, same code
    try:
        t0 = time.perf_counter()
        done = retention.prune(dbmod.session_factory(engine), BASE + dt.timedelta(days=DAYS / 2))
        wall = time.perf_counter() - t0
    finally:
        retention._delete_batch = batch  # type: ignore[assignment]
    ms = [t * 1000 for t in spent]
    print(f"  retention: deleted {done.flows:,} flows in {wall:.1f} s ({done.flows / wall:,.0f} "
          f"rows/s), {len(ms)} transactions of <= {retention.BATCH:,} rows: median "
          f"{pct(ms, 50):.0f} ms, longest {max(ms):.0f} ms")  # fmt: skip


def drop_database(admin: Engine, name: str) -> None:
    """Drop the temporary database, waiting out an autovacuum worker (after the prune, one
    may be busy in it, and the test role may not terminate a superuser's process)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def main() -> None:
    # Cleanup (temporary database and files) lives in finally blocks: let SIGTERM reach them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--http", type=int, default=300)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL", DEFAULT_PG))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--prune", action="store_true", help="Also time retention deleting half of the flows."
    )
    parser.add_argument("--tmpdir", default=None, help="Where the SQLite file goes.")
    args = parser.parse_args()
    import platform

    print(f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"SQLite {sqlite3.sqlite_version}, {dt.date.today()}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="vpnfleet-bench-", dir=args.tmpdir))
    try:
        for kind in args.db.split(","):
            if kind == "sqlite":
                bench_one(kind, f"sqlite:///{work / 'flows.db'}", work, args)
                (work / "flows.db").unlink()
            elif kind == "postgresql":
                admin_url = make_url(args.pg_url)
                name = f"vpnfleet_bench_{secrets.token_hex(4)}"
                admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                try:
                    url = admin_url.set(database=name).render_as_string(hide_password=False)
                    bench_one(kind, url, work, args)
                finally:
                    drop_database(admin, name)
                    admin.dispose()
            else:
                raise SystemExit(f"unknown database {kind!r}: use sqlite and/or postgresql")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
