"""Listing 10,000 users through the API: page by page (this branch) versus main's single list.

    .venv/bin/python bench/list_users.py [--users 10000] [--rounds 5] [--baseline-ref main]
        [--db sqlite,postgresql] [--pg-url postgresql+psycopg://...]

For each database: a temporary database (a SQLite file; on PostgreSQL a database created and
dropped through the test role, VPNFLEET_TEST_PG_URL), schema from the real migrations and the
real bootstrap (CA, pools, an admin token), then 10,000 users loaded in bulk the way the API
stores them: each with a client certificate row (the CA's PEM as its text, so listing parses a
real certificate per user), in 2 of 20 groups, one in ten in gateway mode with a lease.

Two real control planes (`vpnfleet server`, uvicorn, loopback) then serve that same database:
the baseline runs `--baseline-ref` (main) exported with `git archive` into a temporary
directory, the other runs this tree. Requests alternate between them, round after round:

- baseline: `GET /api/v1/users` (main answers every user in one response, with 3 queries per
  user for groups, lease and certificate);
- one page of 10,000 (`limit=10000`: the same rows in one response, grouped queries);
- every page of 500 (the default) followed through `Link: rel="next"`: total time, the first
  page alone (what a person waits for) and the slowest page.

Prints the median of the rounds and each figure as a ratio of the baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane.bootstrap import bootstrap
from vpnfleet.controlplane.models import (
    Certificate,
    GatewayLease,
    Group,
    Membership,
    PKIState,
    Pool,
    User,
)
from vpnfleet.controlplane.pki import Sealer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql+psycopg://vpnfleet_test:vpnfleet_test@127.0.0.1:5432/postgres"
SECRET = secrets.token_urlsafe(32)
TOKEN = "vpf_" + secrets.token_urlsafe(32)
GROUPS = 20


def seed(url: str, users: int, data_dir: Path) -> None:
    """The schema, the bootstrap and `users` users with certificates, groups and leases."""
    engine = dbmod.make_engine(url)
    dbmod.upgrade(engine)
    factory = dbmod.session_factory(engine)
    with dbmod.transaction(factory) as db:
        bootstrap(db, Sealer(SECRET), data_dir, TOKEN)
    now = dt.datetime.now(dt.UTC)
    with dbmod.transaction(factory) as db:
        pem = db.scalars(select(PKIState.ca_cert_pem)).one()
        gateway = db.scalars(select(Pool.id).where(Pool.kind == "gateway")).one()
        db.execute(insert(Group), [{"name": f"team-{g:02d}"} for g in range(GROUPS)])
        group_ids = list(db.scalars(select(Group.id).order_by(Group.id)))
        db.execute(
            insert(User),
            [
                {
                    "name": f"user-{i:05d}",
                    "email": f"user-{i:05d}@example.com",
                    "mode": "gateway" if i % 10 == 0 else "nat",
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(users)
            ],
        )
        ids = list(db.scalars(select(User.id).order_by(User.id)))
        db.execute(
            insert(Membership),
            [
                {"user_id": u, "group_id": group_ids[(k + j * 7) % GROUPS]}
                for k, u in enumerate(ids)
                for j in range(2)
            ],
        )
        db.execute(
            insert(Certificate),
            [
                {
                    "kind": "client",
                    "common_name": f"user-{k:05d}",
                    "user_id": u,
                    "serial": f"{k + 1000:x}",
                    "cert_pem": pem,
                    "key_sealed": "-",
                    "not_after": now + dt.timedelta(days=365),
                    "created_at": now,
                }
                for k, u in enumerate(ids)
            ],
        )
        db.execute(
            insert(GatewayLease),
            [
                {"pool_id": gateway, "user_id": u, "address": f"10.201.{k // 250}.{k % 250 + 2}"}
                for k, u in enumerate(ids[::10])
            ],
        )
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(src: Path, url: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`vpnfleet server` from the sources in `src`, on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(
        PYTHONPATH=str(src),
        VPNFLEET_DATABASE_URL=url,
        VPNFLEET_DATA_DIR=str(data_dir),
        VPNFLEET_SECRET=SECRET,
        VPNFLEET_LISTEN=f"127.0.0.1:{port}",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vpnfleet.cli.main", "server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server from {src} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server from {src} did not start: {log.read_text()[-2000:]}")


def timed_get(client: httpx.Client, url: str) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    resp = client.get(url)
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    return elapsed, resp


def walk(client: httpx.Client, limit: int) -> dict[str, float]:
    """Every page of the users list; total, first-page and slowest-page seconds."""
    times = []
    rows = 0
    url: str | None = f"/api/v1/users?limit={limit}"
    while url:
        elapsed, resp = timed_get(client, url)
        times.append(elapsed)
        rows += len(resp.json())
        url = resp.links.get("next", {}).get("url")
    return {"total": sum(times), "first": times[0], "slowest": max(times), "pages": len(times),
            "rows": rows}  # fmt: skip


def bench_one(kind: str, url: str, work: Path, main_src: Path, args: argparse.Namespace) -> None:
    data_dir = work / f"data-{kind}"
    t0 = time.perf_counter()
    seed(url, args.users, data_dir)
    print(f"\n{kind}: {args.users:,} users loaded in {time.perf_counter() - t0:.1f} s")
    old, old_url = start(main_src, url, data_dir, work / f"baseline-{kind}.log")
    new, new_url = start(ROOT / "src", url, data_dir, work / f"new-{kind}.log")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    results: dict[str, list[float]] = {}
    try:
        with (
            httpx.Client(base_url=old_url, headers=headers, timeout=600) as before,
            httpx.Client(base_url=new_url, headers=headers, timeout=600) as after,
        ):
            for _ in range(args.rounds):
                elapsed, resp = timed_get(before, "/api/v1/users")
                assert len(resp.json()) == args.users, "the baseline lists every user"
                results.setdefault("baseline: one list (main)", []).append(elapsed)
                elapsed, resp = timed_get(after, "/api/v1/users?limit=10000")
                results.setdefault("one page of 10,000", []).append(elapsed)
                pages = walk(after, 500)
                assert pages["rows"] == args.users, pages
                results.setdefault(f"all {int(pages['pages'])} pages of 500", []).append(
                    pages["total"]
                )
                results.setdefault("  first page of 500", []).append(pages["first"])
                results.setdefault("  slowest page of 500", []).append(pages["slowest"])
    finally:
        for proc in (old, new):
            proc.terminate()
            proc.wait(timeout=30)
    base = statistics.median(results["baseline: one list (main)"])
    print(f"{'request':<28} {'median':>10} {'min':>10} {'vs baseline':>12}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<28} {med * 1000:>8.0f} ms {min(values) * 1000:>7.0f} ms "
              f"{med / base:>11.3f}x")  # fmt: skip


def export_baseline(ref: str, into: Path) -> Path:
    """`ref`'s src/ (git archive), for the baseline server."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True
    )
    print(f"baseline: {ref} ({commit.stdout.decode().strip()}), exported to {into}")
    return into / "src"


def drop_database(admin: Any, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL", DEFAULT_PG))
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"SQLite {sqlite3.sqlite_version}, {dt.date.today()}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="vpnfleet-bench-list-"))
    try:
        main_src = export_baseline(args.baseline_ref, work / "baseline")
        for kind in args.db.split(","):
            if kind == "sqlite":
                bench_one(kind, f"sqlite:///{work / 'users.db'}", work, main_src, args)
            elif kind == "postgresql":
                admin_url = make_url(args.pg_url)
                name = f"vpnfleet_bench_{secrets.token_hex(4)}"
                admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                try:
                    url = admin_url.set(database=name).render_as_string(hide_password=False)
                    bench_one(kind, url, work, main_src, args)
                finally:
                    drop_database(admin, name)
                    admin.dispose()
            else:
                raise SystemExit(f"unknown database {kind!r}: use sqlite and/or postgresql")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
