"""Web console pages with 10,000 users and 2,000 live sessions: server time per page.

    .venv/bin/python bench/console_pages.py [--users 10000] [--groups 200] [--live 2000]
        [--pods 10] [--requests 200] [--seconds 30] [--postgres] [--json FILE]

Real parts: a `vpnfleet server` process (the real command, uvicorn, loopback) on a fresh SQLite
file, or a fresh database on the PostgreSQL of VPNFLEET_TEST_PG_URL with `--postgres`
(scripts/pg-test-server.sh; default postgresql+psycopg://vpnfleet_test:...@127.0.0.1:5432).

Seeding, all through the HTTP API as an admin or a pod would:
- `--groups` groups, each with 3 grants, and `--users` users (each with a client certificate,
  in 2 or 3 groups, 2 % in gateway mode) through `POST /api/v1/policy/apply` (the API's bulk
  path), 1,000 users per apply;
- 300 `PATCH /api/v1/users/{name}` (4 concurrent clients): admin audit rows;
- `--pods` pods enrolled with an enrollment token, registered and heartbeating, each opening
  its share of `--live` sessions (distinct NAT users) and 100 more sessions opened and closed
  (history), through `POST /api/v1/agent/sessions/batch` (the agent's own protocol);
- an operator and an auditor console account (`POST /api/v1/console-accounts`), signed in over
  HTTP as a browser does (GET /console/login, the hidden csrf, POST, the cookie).

Measured per page: `--requests` requests (at most `--seconds` each run) one at a time, then the
same number spread over 4 concurrent clients (each its own signed-in session): the HTTP round
trip on loopback (p50/p99), the response bytes, and the server's own time from its
`vpnfleet_api_request_duration_seconds` histogram (the /metrics delta over the run: mean, and
the bucket holding the p99). The API's JSON lists of the same data (`GET /api/v1/users?limit=50`,
`GET /api/v1/sessions?active=true&limit=50`) are the baseline, in the same run.

First load: the overview's HTML + /console/static/console.css + console.js, as sent (and gzip
sizes for reference; whether the server compresses is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cp_failover import Replica
from cp_stop import SRC
from watch_catchup import pct

DEFAULT_PG = "postgresql+psycopg://vpnfleet_test:vpnfleet_test@127.0.0.1:5432/postgres"
PASSWORD = "console-bench-password-7Kq"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
NEXT = re.compile(r'<a href="([^"]+)" rel="next">')
NGINX_LINE = '10.0.3.2:40000 - - [04/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5'
CLIENTS = 4
USERS_PER_APPLY = 1000
AUDIT_EDITS = 300
HISTORY_PER_POD = 100
MAX_HOPS = 200  # following "Next page" links


def uname(i: int) -> str:
    return f"u{i:05d}"


def gname(i: int) -> str:
    return f"g{i:03d}"


# --- seeding --------------------------------------------------------------------------------


def policy_yaml(groups: int, users: range, total_users: int) -> str:
    """A policy file: every group (with its grants) and the given users."""
    lines = ["version: 1", "groups:"]
    for g in range(groups):
        lines.append(f"  {gname(g)}:")
        lines.append(f"    description: team {g}")
        lines.append("    grants:")
        lines.append(
            f'      - {{destination: 10.{g % 250}.{g // 250}.0/24, proto: tcp, ports: "22,443"}}'
        )
        lines.append(f"      - {{destination: 10.{g % 250}.{100 + g // 250}.5, proto: any}}")
        lines.append(f"      - {{destination: 172.16.{g % 250}.0/24, proto: udp, ports: 53}}")
    lines.append("users:")
    gateway_from = total_users - total_users // 50  # the last 2 %: gateway mode
    for i in users:
        mine = sorted(
            {gname(i % groups), gname((i * 7 + 3) % groups)}
            | ({gname((i * 13 + 5) % groups)} if i % 3 == 0 else set())
        )
        mode = "gateway" if i >= gateway_from else "nat"
        lines.append(
            f"  {uname(i)}: {{email: {uname(i)}@corp.test, mode: {mode}, "
            f"groups: [{', '.join(mine)}]}}"
        )
    return "\n".join(lines) + "\n"


def seed_users(admin: httpx.Client, users: int, groups: int) -> float:
    t0 = time.monotonic()
    for start in range(0, users, USERS_PER_APPLY):
        text = policy_yaml(groups, range(start, min(users, start + USERS_PER_APPLY)), users)
        r = admin.post("/api/v1/policy/apply", json={"yaml": text}, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"policy apply: {r.status_code} {r.text[:500]}")
    return time.monotonic() - t0


def seed_audit(admin_clients: list[httpx.Client], users: int) -> None:
    """Admin audit rows: e-mail changes, as an operator at work makes them."""

    def edit(k: int) -> None:
        c = admin_clients[k % len(admin_clients)]
        i = (k * 37) % users
        r = c.patch(f"/api/v1/users/{uname(i)}", json={"email": f"{uname(i)}@new.corp.test"})
        r.raise_for_status()

    with ThreadPoolExecutor(len(admin_clients)) as pool:
        list(pool.map(edit, range(AUDIT_EDITS)))


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def open_rec(pod: str, seq: int, user: str, p: int, host: int) -> dict[str, Any]:
    return {
        "kind": "open",
        "body": {
            "uid": f"{pod}-{seq:08d}",
            "user": user,
            "pod": pod,
            "mode": "nat",
            "tunnel_ip": f"10.{200 + p // 50}.{host // 250}.{host % 250 + 2}",
            "real_ip": f"198.51.{p}.{host % 250 + 1}",
            "real_port": 1024 + host,
            "client_id": seq,
            "started_at": now(),
        },
    }


def seed_sessions(server: Any, pods: int, live: int, users: int) -> float:
    """Each pod enrolls, registers, beats once, opens its share of the live sessions and
    HISTORY_PER_POD sessions it closes again, in batches through the agent API."""
    t0 = time.monotonic()
    per_pod = live // pods
    history_from = live  # users after the live ones: the sessions that ended

    def pod_work(p: int) -> None:
        pod = f"pod{p:02d}"
        with server.client(server.pod_token(pod)) as c:
            c.post("/api/v1/agent/register", json={"name": pod}).raise_for_status()
            hb = {"name": pod, "applied_revision": 0, "ready": True}
            c.post("/api/v1/agent/heartbeat", json=hb).raise_for_status()
            records: list[dict[str, Any]] = []
            seq = 0
            for h in range(HISTORY_PER_POD):
                seq += 1
                user = uname((history_from + p * HISTORY_PER_POD + h) % users)
                records.append(open_rec(pod, seq, user, p, 5000 + h))
                closing = {
                    "uid": f"{pod}-{seq:08d}",
                    "ended_at": now(),
                    "bytes_in": 1000 + h,
                    "bytes_out": 2000 + h,
                    "reason": "client exit",
                }
                records.append({"kind": "close", "body": closing})
            for h in range(per_pod):
                seq += 1
                records.append(open_rec(pod, seq, uname(p * per_pod + h), p, h))
            for start in range(0, len(records), 200):
                r = c.post(
                    "/api/v1/agent/sessions/batch",
                    json={"pod": pod, "records": records[start : start + 200]},
                    timeout=120,
                )
                r.raise_for_status()
                bad = [x for x in r.json()["results"] if x["status"] != 200]
                if bad:
                    raise RuntimeError(f"{pod}: refused records: {bad[:3]}")
            c.post("/api/v1/agent/heartbeat", json=hb).raise_for_status()

    with ThreadPoolExecutor(pods) as pool:
        list(pool.map(pod_work, range(pods)))
    return time.monotonic() - t0


def make_account(admin: httpx.Client, name: str, role: str) -> None:
    r = admin.post(
        "/api/v1/console-accounts", json={"name": name, "role": role, "password": PASSWORD}
    )
    if r.status_code != 201:
        raise RuntimeError(f"console account: {r.status_code} {r.text[:300]}")


def signed_in(base: str, name: str) -> httpx.Client:
    c = httpx.Client(base_url=base, timeout=60, follow_redirects=False)
    form = c.get("/console/login")
    token = CSRF.search(form.text)
    if not token:
        raise RuntimeError("no csrf on the login page")
    r = c.post(
        "/console/login",
        data={"csrf": token.group(1), "name": name, "password": PASSWORD, "next": "/console/"},
    )
    if r.status_code != 303:
        raise RuntimeError(f"sign-in of {name}: {r.status_code}")
    return c


def csrf_of(c: httpx.Client, path: str) -> str:
    found = CSRF.search(c.get(path).text)
    if not found:
        raise RuntimeError(f"no csrf on {path}")
    return found.group(1)


def follow_next(c: httpx.Client, path: str, hops: int) -> str:
    """The URL `hops` "Next page" links after `path`."""
    for _ in range(min(hops, MAX_HOPS)):
        r = c.get(path)
        found = NEXT.search(r.text)
        if not found:
            break
        path = found.group(1).replace("&amp;", "&")
    return path


# --- measuring ------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^vpnfleet_api_request_duration_seconds_(bucket|sum|count)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(base: str) -> dict[tuple[str, str, str], float]:
    """(route, method, le|sum|count) -> value, summed over status classes."""
    out: dict[tuple[str, str, str], float] = {}
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        what = labels.get("le", "") if m.group(1) == "bucket" else m.group(1)
        key = (labels.get("route", ""), labels.get("method", ""), what)
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def server_side(
    before: dict[tuple[str, str, str], float],
    after: dict[tuple[str, str, str], float],
    route: str,
    method: str,
) -> dict[str, Any]:
    """Mean and the bucket holding p99 of one route's requests between two scrapes."""

    def delta(what: str) -> float:
        return after.get((route, method, what), 0.0) - before.get((route, method, what), 0.0)

    count = delta("count")
    if count <= 0:
        return {"server_n": 0}
    les = sorted(
        (float(le), le)
        for (r, mth, le) in after
        if r == route and mth == method and le not in ("sum", "count", "+Inf")
    )
    p99_le = "+Inf"
    for value, le in les:
        if delta(le) >= 0.99 * count:
            p99_le = f"{value * 1000:g}"
            break
    return {
        "server_n": int(count),
        "server_mean_ms": round(delta("sum") / count * 1000, 1),
        "server_p99_at_most_ms": p99_le,
    }


Request = Callable[[httpx.Client], httpx.Response]


def run_once(c: httpx.Client, req: Request) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = req(c)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")
    return ms, len(r.content)


def measure(
    clients: list[httpx.Client], req: Request, n: int, seconds: float
) -> tuple[list[float], list[float], int]:
    """(sequential times, 4-client times, response bytes)."""
    for _ in range(5):  # warm-up, not counted
        run_once(clients[0], req)
    seq: list[float] = []
    size = 0
    deadline = time.monotonic() + seconds
    while len(seq) < n and time.monotonic() < deadline:
        ms, size = run_once(clients[0], req)
        seq.append(ms)
    conc: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(c: httpx.Client) -> None:
        for _ in range(n // len(clients)):
            if time.monotonic() > deadline:
                return
            ms, _size = run_once(c, req)
            with lock:
                conc.append(ms)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seq, conc, size


def figures(
    base: str,
    clients: list[httpx.Client],
    req: Request,
    route: str,
    method: str,
    n: int,
    seconds: float,
) -> dict[str, Any]:
    before = scrape(base)
    seq, conc, size = measure(clients, req, n, seconds)
    after = scrape(base)
    out: dict[str, Any] = {
        "bytes": size,
        "n_seq": len(seq),
        "seq_p50_ms": round(pct(seq, 50), 1),
        "seq_p99_ms": round(pct(seq, 99), 1),
        "n_4c": len(conc),
        "4c_p50_ms": round(pct(conc, 50), 1),
        "4c_p99_ms": round(pct(conc, 99), 1),
    }
    out.update(server_side(before, after, route, method))
    return out


def first_load(c: httpx.Client) -> dict[str, Any]:
    out: dict[str, Any] = {}
    total = total_gz = 0
    for path in ("/console/", "/console/static/console.css", "/console/static/console.js"):
        r = c.get(path, headers={"Accept-Encoding": "gzip"})
        # httpx decodes a compressed body: the wire size is the header's, when compressed.
        encoding = r.headers.get("content-encoding", "identity")
        wire = int(r.headers.get("content-length", len(r.content)))
        gz = len(gzip.compress(r.content, 6))
        out[path] = {"bytes_sent": wire, "content_encoding": encoding, "gzip_bytes": gz}
        total += wire
        total_gz += gz
    out["total_bytes_sent"] = total
    out["total_gzip_bytes"] = total_gz
    return out


def run(args: argparse.Namespace, work: Path, db_url: str) -> dict[str, Any]:
    from tests.conftest import Server

    data = work / "cp"
    data.mkdir()
    replica = Replica(SRC, db_url, data)
    replica.start()
    base = replica.base
    server = Server(base, (data / "admin-token").read_text().strip(), data, db_url)
    result: dict[str, Any] = {}
    try:
        with server.client() as admin:
            admin.timeout = httpx.Timeout(600)
            result["seed_users_s"] = round(seed_users(admin, args.users, args.groups), 1)
            admins = [server.client() for _ in range(CLIENTS)]
            seed_audit(admins, args.users)
            for a in admins:
                a.close()
            result["seed_sessions_s"] = round(
                seed_sessions(server, args.pods, args.live, args.users), 1
            )
            make_account(admin, "olga", "operator")
            make_account(admin, "audra", "auditor")
        ops = [signed_in(base, "olga") for _ in range(CLIENTS)]
        auds = [signed_in(base, "audra") for _ in range(CLIENTS)]
        api = [server.client() for _ in range(CLIENTS)]
        result["first_load"] = first_load(ops[0])
        overview = ops[0].get("/console/").text
        result["seeded"] = {
            what: int(m.group(1))
            if (m := re.search(rf'"num">(\d+)</span> {what}', overview))
            else None
            for what in ("live sessions", "users")
        }
        with server.client() as admin:
            audit = admin.get("/api/v1/audit/admin", params={"limit": 1000}).json()
            result["seeded"]["admin audit rows"] = len(audit)

        deep_users = follow_next(ops[0], "/console/users", args.users // 50 // 2)
        later_sessions = follow_next(ops[0], "/console/sessions", args.live // 50 // 2)
        result["deep_users_url"] = deep_users
        result["later_sessions_url"] = later_sessions
        someone = uname(42)  # has a live session
        group = gname(42 % args.groups)
        tokens = {id(c): csrf_of(c, "/console/audit/who") for c in auds}

        def get(path: str, **params: str) -> Request:
            return lambda c: c.get(path, params=params or None)

        def who(c: httpx.Client) -> httpx.Response:
            return c.post(
                "/console/audit/who",
                data={"csrf": tokens[id(c)], "line": NGINX_LINE, "format": "auto"},
            )

        pages: list[tuple[str, list[httpx.Client], Request, str, str]] = [
            ("overview", ops, get("/console/"), "/console/", "GET"),
            ("users", ops, get("/console/users"), "/console/users", "GET"),
            ("users (deep page)", ops, get(deep_users), "/console/users", "GET"),
            ("users?q=u05", ops, get("/console/users", q="u05"), "/console/users", "GET"),
            ("user", ops, get(f"/console/users/{someone}"), "/console/users/{name}", "GET"),
            ("groups", ops, get("/console/groups"), "/console/groups", "GET"),
            ("group", ops, get(f"/console/groups/{group}"), "/console/groups/{name}", "GET"),
            ("sessions (live)", ops, get("/console/sessions"), "/console/sessions", "GET"),
            ("sessions (later page)", ops, get(later_sessions), "/console/sessions", "GET"),
            (
                "sessions?user=",
                ops,
                get("/console/sessions", user=someone),
                "/console/sessions",
                "GET",
            ),
            ("audit log (auditor)", auds, get("/console/audit/log"), "/console/audit/log", "GET"),
            ("who POST (auditor)", auds, who, "/console/audit/who", "POST"),
            (
                "API users?limit=50 (baseline)",
                api,
                get("/api/v1/users", limit="50"),
                "/api/v1/users",
                "GET",
            ),
            (
                "API sessions?active&limit=50 (baseline)",
                api,
                get("/api/v1/sessions", active="true", limit="50"),
                "/api/v1/sessions",
                "GET",
            ),
        ]
        # Control: no database, no template; the machine's and the client's own share of a tail.
        pages.append(("healthz (control)", api, get("/healthz"), "/healthz", "GET"))
        table: dict[str, Any] = {}
        for label, clients, req, route, method in pages:
            try:
                table[label] = figures(
                    base, clients, req, route, method, args.requests, args.seconds
                )
            except RuntimeError as exc:  # a page that fails is reported, the others still run
                log = (data / f"server-{replica.port}.log").read_text().splitlines()
                table[label] = {"error": str(exc)[:300], "server_log_tail": log[-40:]}
            print(label, json.dumps(table[label]), file=sys.stderr, flush=True)
        base_users = table["API users?limit=50 (baseline)"].get("seq_p99_ms")
        base_sess = table["API sessions?active&limit=50 (baseline)"].get("seq_p99_ms")
        for label, row in table.items():
            if "error" in row:
                continue
            ref = base_sess if "session" in label else base_users
            row["seq_p99_vs_api"] = round(row["seq_p99_ms"] / ref, 2) if ref else None
            row["goal_p99_lt_100ms"] = row["seq_p99_ms"] < 100 and row["4c_p99_ms"] < 100
        result["pages"] = table
        for c in ops + auds + api:
            c.close()
    finally:
        replica.sigterm()
        replica.wait_exit()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--live", type=int, default=2_000)
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--requests", type=int, default=200, help="per page and run")
    ap.add_argument("--seconds", type=float, default=30.0, help="time bound per page and run")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="a fresh database on the PostgreSQL of VPNFLEET_TEST_PG_URL instead of SQLite",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.live > args.users - args.users // 50 - args.pods * HISTORY_PER_POD:
        ap.error("--live: not enough NAT users for the live and ended sessions")
    os.environ.setdefault("VPNFLEET_TEST_PG_URL", DEFAULT_PG)
    from tests.conftest import fresh_database

    kind = "postgresql" if args.postgres else "sqlite"
    started = time.monotonic()
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="console-bench-") as tmp,
        fresh_database(kind, Path(tmp)) as db_url,
    ):
        out = run(args, Path(tmp), db_url)
    out["database"] = kind
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    out["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out["wall_s"] = round(time.monotonic() - started, 1)
    out["load_average_before"] = [round(x, 2) for x in load_before]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
