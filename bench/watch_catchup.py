"""Watch catch-up: many streams from revision 0 while `/healthz` and a user write are timed.

    .venv/bin/python bench/watch_catchup.py [--streams 1000] [--changes 4000]
        [--db sqlite,postgresql] [--pg-url URL] [--baseline-src DIR] [--timeout 180]

One control plane (`uvicorn`, its own process, as `vpnfleet server` runs it) on a database
whose change log already holds `--changes` realistic changes (users with groups and
certificates, groups, memberships, rules with ports, sessions opened and closed), written
before the server starts, as after a restart. Then `--streams` watch streams connect at once
from revision 0, and until every one has received the last change (checked: each stream gets
as many changes up to the head as the log holds), two probe processes time `GET /healthz` and
`POST /api/v1/users` (a real write: a user, its certificate, its change and audit rows), each
back to back ~50 ms apart (a request still waiting at the end counts with its wait so far).
Prints p50/p99/max of each, with the same probes on the idle server first.

Baseline in the same run: `--baseline-src` is the `src/` of the code before this change (for
instance `git archive <commit> src | tar -x -C /tmp/base`); the same runs then use it and the
ratios are printed. Each run is bounded by `--timeout` seconds; a run that does not finish in
time reports what it measured until then and how many streams were still behind.

The stream clients are raw HTTP/1.0 sockets that count lines (no JSON parsing, no chunked
framing) so that the client costs as little CPU as it can on a machine it shares with the
server. 1,000 streams need 1,000 sockets on each side: the script raises its soft file
descriptor limit (`ulimit -n`) to the hard limit; the server process inherits it.

PostgreSQL (`--pg-url`: an account that may create databases) gets a fresh database per run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from vpnfleet.controlplane import changelog  # noqa: E402
from vpnfleet.controlplane import db as dbmod  # noqa: E402
from vpnfleet.controlplane.models import Change  # noqa: E402
from vpnfleet.wire import (  # noqa: E402
    GroupState,
    LiveSession,
    MembershipState,
    RuleState,
    SessionKey,
    UserState,
)

# The server process: the given src/ first on the path, then the app as `vpnfleet server`
# builds it. It prints the vpnfleet it imported, so a baseline run cannot silently use ours.
SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import uvicorn, vpnfleet
from pathlib import Path
from vpnfleet.controlplane.app import create_app, prepare
from vpnfleet.controlplane.settings import ServerSettings
data_dir, url, port = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
settings = ServerSettings(data_dir=data_dir, database_url=url, listen=f"127.0.0.1:{port}",
                          secret="bench-seal-secret-Qx9LmPz4Rk8Vw2b7")
print("serving", vpnfleet.__file__, flush=True)
uvicorn.run(create_app(settings, prepare(settings)), host="127.0.0.1", port=port,
            log_config=None, access_log=False, log_level="warning", backlog=4096)
"""


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, changes: int) -> int:
    """Migrate the database and append `changes` changes in batches; returns the head."""
    engine = dbmod.make_engine(url)
    dbmod.upgrade(engine)
    factory = dbmod.session_factory(engine)
    pending: list[changelog.Pending] = []
    users: list[str] = []
    live: list[str] = []
    i = 0
    while len(pending) < changes:
        i += 1
        step = i % 10
        if step in (0, 1, 2):  # a user, its group, its membership, its final state
            gid, uid = 10_000 + i, 20_000 + i
            name = f"user{i:05d}@example.com"
            pending += [
                changelog.Upsert(GroupState(id=gid, name=f"team-{i}")),
                changelog.Upsert(MembershipState(group_id=gid, group=f"team-{i}", user_id=uid,
                                                 user=name)),
                changelog.Upsert(UserState(id=uid, name=name, enabled=True, mode="nat",
                                           max_sessions=2, groups=[f"team-{i}"],
                                           gateway_address=None,
                                           cert_serial=secrets.token_hex(16),
                                           auth="cert")),
            ]  # fmt: skip
            users.append(name)
        elif step in (3, 4):
            pending.append(
                changelog.Upsert(RuleState(id=30_000 + i, group_id=10_000 + i - step,
                                           destination=f"10.{i % 250}.0.0/16", proto="tcp",
                                           ports="22,443,8000-8100"))
            )  # fmt: skip
        elif step in (5, 6, 7) and users:
            uid_s = f"pod-{i % 7}-{i:016x}"
            pending.append(
                changelog.Upsert(LiveSession(uid=uid_s, user=users[i % len(users)],
                                             pod=f"pod-{i % 7}",
                                             tunnel_ip=f"10.200.{i // 250 % 250}.{i % 250 + 1}",
                                             mode="nat", real_ip=f"198.51.100.{i % 250 + 1}",
                                             kill=None))
            )  # fmt: skip
            live.append(uid_s)
        elif live:
            pending.append(changelog.Delete(SessionKey(uid=live.pop(0))))
    pending = pending[:changes]
    for start in range(0, len(pending), 500):
        with factory() as db, db.begin():
            changelog.append(db, pending[start : start + 500])
    with factory() as db:
        head = int(db.scalar(select(func.max(Change.id))) or 0)
    engine.dispose()
    return head


@dataclass
class Run:
    label: str
    health_idle: list[float] = field(default_factory=list)
    write_idle: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)
    caught_up: int = 0
    wrong: int = 0
    failed: int = 0
    connect_s: float = 0.0
    catchup_s: float = 0.0
    timed_out: bool = False
    server_rss_mb: float = 0.0
    unfinished: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def follow(port: int, token: str, head: int, run: Run, connected: list[float]) -> None:
    """One stream from 0 until the change at `head`; counts the lines up to it."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    except OSError as exc:
        run.failed += 1
        run.errors[type(exc).__name__] = run.errors.get(type(exc).__name__, 0) + 1
        return
    try:
        writer.write(
            f"GET /api/v1/watch?since=0 HTTP/1.0\r\nHost: cp\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        status = await reader.readuntil(b"\r\n\r\n")
        connected.append(time.perf_counter() - started)
        if not status.startswith(b"HTTP/1.1 200"):
            run.failed += 1
            key = status.split(b"\r\n", 1)[0].decode(errors="replace")
            run.errors[key] = run.errors.get(key, 0) + 1
            return
        lines = 0
        tail = b""
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                run.failed += 1
                run.errors["stream ended"] = run.errors.get("stream ended", 0) + 1
                return
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            complete, tail = data[:cut], data[cut:]
            found = re.search(rb'"revision":(\d+)[^\n]*\n$', complete) if complete else None
            if found and int(found.group(1)) >= head:
                # The last piece may hold later changes (the probe's writes): count exactly.
                for line in complete.splitlines():
                    rev = re.search(rb'"revision":(\d+)', line)
                    if rev and int(rev.group(1)) <= head:
                        lines += 1
                break
            lines += complete.count(b"\n")
        if lines == head:
            run.caught_up += 1
        else:
            run.wrong += 1
    except (OSError, asyncio.IncompleteReadError) as exc:
        run.failed += 1
        run.errors[type(exc).__name__] = run.errors.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


class _Stop(Exception):
    pass


def probe_main(method: str, path: str, base: str, token: str) -> int:
    """The probe process: time `method path` back to back, ~50 ms apart, printing each
    duration; on SIGTERM print the wait of a request still unanswered, and stop."""
    since: float | None = None

    def stop(_sig: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    n = 0
    try:
        with httpx.Client(base_url=base, timeout=600,
                          headers={"Authorization": f"Bearer {token}"}) as c:  # fmt: skip
            while True:
                n += 1
                body = {"name": f"probe-{secrets.token_hex(3)}-{n}"} if method == "POST" else None
                since = time.perf_counter()
                r = c.request(method, path, json=body)
                took, since = time.perf_counter() - since, None
                r.raise_for_status()
                print(f"ok {took:.6f}", flush=True)
                time.sleep(0.05)
    except _Stop:
        if since is not None:
            print(f"waiting {time.perf_counter() - since:.6f}", flush=True)
    return 0


class Probe:
    """One probe process (its own process: a thread here would share the GIL with the
    stream client and measure it). A request still unanswered when the run ends counts
    with the time it has waited so far (a lower bound)."""

    def __init__(self, base: str, token: str, method: str, path: str, out: list[float]) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", method, path, base, token],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the probe process did not start")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Stop; returns 1 if a request was still waiting (its wait so far is counted)."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        waiting = 0
        for line in stdout.splitlines():
            kind, _, value = line.partition(" ")
            self.out.append(float(value))
            waiting += kind == "waiting"
        return waiting


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_one(label: str, src: Path, url: str, data_dir: Path, streams: int, head: int,
              timeout: float) -> Run:  # fmt: skip
    run = Run(label)
    port = free_port()
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(src), str(data_dir), url, str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: {(data_dir / 'server.log').read_text()}")
            time.sleep(0.1)
        admin = (data_dir / "admin-token").read_text().strip()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as c:
            # An operator token may follow the watch in every version compared (agents need a
            # per-pod credential since issue 10; a follower's cost is the same).
            r = c.post("/api/v1/tokens", json={"name": "bench-follower", "role": "operator"})
            r.raise_for_status()
            agent = r.json()["token"]
            head = c.get("/api/v1/revision").json()["revision"]
        # Idle: the same probes for a few seconds with no stream.
        idle = [Probe(base, admin, "GET", "/healthz", run.health_idle),
                Probe(base, admin, "POST", "/api/v1/users", run.write_idle)]  # fmt: skip
        for p in idle:
            p.go()
        time.sleep(5)
        for p in idle:
            p.finish()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as c:
            head = c.get("/api/v1/revision").json()["revision"]
        connected: list[float] = []

        async def everyone() -> None:
            tasks = [asyncio.create_task(follow(port, agent, head, run, connected))
                     for _ in range(streams)]  # fmt: skip
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            run.timed_out = bool(pending)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        loaded = [Probe(base, admin, "GET", "/healthz", run.health),
                  Probe(base, admin, "POST", "/api/v1/users", run.write)]  # fmt: skip
        t0 = time.perf_counter()
        for p in loaded:
            p.go()
        asyncio.run(everyone())
        run.catchup_s = time.perf_counter() - t0
        run.connect_s = max(connected, default=float("nan"))
        run.unfinished = sum(p.finish() for p in loaded)
        run.server_rss_mb = rss_mb(proc.pid)
        print(f"  server: {log.name}: " + (data_dir / "server.log").read_text().splitlines()[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    return run


def report(run: Run, streams: int) -> None:
    ms = 1000.0
    print(f"  {run.label}: {run.caught_up}/{streams} streams caught up exactly, "
          f"{run.wrong} wrong, {run.failed} failed {run.errors or ''}"
          f"{' (TIMED OUT)' if run.timed_out else ''}; all done in {run.catchup_s:.1f} s, "
          f"slowest stream start {run.connect_s:.2f} s; server peak RSS "
          f"{run.server_rss_mb:.0f} MB; {run.unfinished} probe(s) still waiting at the end"
          )  # fmt: skip
    for name, idle, loaded in (("/healthz", run.health_idle, run.health),
                               ("POST user", run.write_idle, run.write)):  # fmt: skip
        lo = f"loaded (n={len(loaded)})"
        print(f"    {name:<10} idle p50 {pct(idle, 50) * ms:7.1f} p99 {pct(idle, 99) * ms:7.1f}"
              f" ms | {lo} p50 {pct(loaded, 50) * ms:8.1f} p99 {pct(loaded, 99) * ms:8.1f}"
              f" max {max(loaded, default=0) * ms:8.1f} ms")  # fmt: skip


def pg_database(admin_url: str) -> tuple[str, Any]:
    admin = make_url(admin_url)
    name = f"vfbench_{secrets.token_hex(4)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    return url, drop


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--probe":
        return probe_main(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=4000)
    ap.add_argument("--db", default="sqlite", help="sqlite, postgresql or both (comma list)")
    ap.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL"))
    ap.add_argument("--baseline-src", type=Path, help="src/ of the code to compare against")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args()
    if not 1 <= args.streams <= 5000 or not 1 <= args.changes <= 100_000:
        raise SystemExit("--streams must be 1..5000 and --changes 1..100000")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = args.streams + 200
    if min(hard, max(soft, hard)) < need:
        raise SystemExit(f"ulimit -n is {hard}; {args.streams} streams need about {need}")
    print(f"watch catch-up: {args.streams} streams from revision 0, {args.changes} changes in "
          f"the log; {platform.node()} {os.cpu_count()} CPU, Python "
          f"{platform.python_version()}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip
    codes = [("this code", SRC)]
    if args.baseline_src:
        codes.append(("baseline", args.baseline_src.resolve()))
    for kind in [k.strip() for k in args.db.split(",") if k.strip()]:
        print(f"== {kind}")
        runs: dict[str, Run] = {}
        for label, src in codes:
            work = Path(tempfile.mkdtemp(prefix="vpnfleet-watchbench-"))
            drop = None
            try:
                if kind == "sqlite":
                    url = f"sqlite:///{work / 'data' / 'vpnfleet.db'}"
                    (work / "data").mkdir(mode=0o700)
                elif kind == "postgresql":
                    (work / "data").mkdir(mode=0o700)
                    if not args.pg_url:
                        raise SystemExit("--pg-url (or VPNFLEET_TEST_PG_URL) is needed")
                    url, drop = pg_database(args.pg_url)
                else:
                    raise SystemExit(f"unknown database {kind!r}")
                head = fill(url, args.changes)
                runs[label] = bench_one(label, src, url, work / "data", args.streams, head,
                                        args.timeout)  # fmt: skip
                report(runs[label], args.streams)
            finally:
                if drop is not None:
                    drop()
                shutil.rmtree(work, ignore_errors=True)
        if "baseline" in runs:
            new, old = runs["this code"], runs["baseline"]
            for name, a, b in (("/healthz p99", new.health, old.health),
                               ("POST user p99", new.write, old.write)):  # fmt: skip
                print(f"  {name}: baseline / this code = {pct(b, 99) / pct(a, 99):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
