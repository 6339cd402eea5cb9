"""Fleet simulator: simulated pod agents speaking the agent protocol to real control planes.

    .venv/bin/python bench/fleet_sim.py [--agents 200] [--users 20000] [--rate 500]
        [--churn-seconds 30] [--changes 20] [--extra-watchers 1000] [--replicas 1,2]
        [--per-record] [--pg-url URL] [--json FILE]

Real `vpnfleet server` processes (one, then two replicas; HTTPS with the control plane's own
CA, `--tls-self-signed 127.0.0.1`) on one fresh PostgreSQL database, seeded with `--users`
users in groups of 200 (each with a client certificate, through the directory sync's bulk path
`users.create_nat_users`). The load generator is one asyncio process of `--agents` simulated
pods. Each speaks the agent protocol through the agent's own client (`agent.cpclient.
ControlPlane`, the wire models of `vpnfleet.wire`): it enrolls its name with the enrollment
token and switches to its own credential, registers (`--join-concurrency` pods at a time),
fetches its snapshot (the first `--snapshots` agents; the others follow from the registration's
revision, as an agent restarting with its cached view does), holds a watch stream (every line
parsed by the agent's parser), heartbeats every 5 s (the agent's default), reports its live
sessions every 5 s unless session records wait (the agent's rule), sends its session records in
order as the agent's session shipper does (the records queued meanwhile, up to its BATCH, in
one `POST /agent/sessions/batch`; one request per record with `--per-record`) and ships flow
records every 2 s. With two replicas, agent i talks to replica i mod 2 first (the other is its
fallback, as `--server` with two URLs).
It stands in for the OpenVPN side only: no real client connects.

Each configuration runs, in order:

1. *idle*: agents on their streams, heartbeating, no change: the control planes' idle CPU rate;
2. *changes*: `--changes` operator changes 0.5 s apart (a rule added to a group, a user
   disabled, the rule deleted, the user enabled again), made by a separate process through the
   admin API; for each, the time from the API call returning (wall clock in that process) to
   each agent's stream delivering it (wall clock in the agents' process);
3. *churn*: sessions opened at `--rate` per second for `--churn-seconds` (each held 1-3 s then
   closed, 4 flow records shipped per closed session), with the same operator changes running
   at the same time;
4. *watchers*: the resident memory of the first replica with its agents' streams, then with
   `--extra-watchers` more watch streams (raw TLS sockets, operator token) on it.

CPU is utime + stime of each server process (/proc/PID/stat). "Per change" and "per session"
subtract the idle rate over the same seconds. The load generator shares the machine: its own
CPU and event-loop lag are printed beside the figures (a late loop delays arrivals and
latencies it records, so the figures are upper bounds for the control plane). A configuration
that fails (agents that cannot join in `--join-timeout`, an API call that times out) keeps the
figures measured before it, with the failure and the count of ERROR lines and database pool
timeouts in the servers' logs. The database and the server processes are removed whatever
happens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import platform
import random
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_failover import Replica
from cp_stop import SRC, drop_pg, fresh_pg
from watch_catchup import pct

sys.path.insert(0, str(SRC))
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.sessionship import BATCH as SHIP_BATCH
from vpnfleet.wire import (
    EnrollRequest,
    FlowReport,
    Heartbeat,
    RegisterRequest,
    RuleDelete,
    RuleUpsert,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionResult,
    UserUpsert,
    WatchResync,
)

SECRET = "bench-seal-secret-Qx9LmPz4Rk8Vw2b7"  # the one cp_failover's Replica starts with
HEARTBEAT_EVERY = 5.0  # the agent's default heartbeat interval (agent/settings.py)
REPORT_EVERY = 5.0  # the agent's default reconcile interval
FLOWS_EVERY = 2.0
FLOWS_PER_SESSION = 4
GROUP_SIZE = 200
PROBE_GROUP = "sim-probe"
PROBE_USERS = 10  # users only the operator changes (never used by the churn)
NAT_POOL = "10.64.0.0/15"
CLK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
T0 = time.monotonic()


def note(what: str) -> None:
    """Progress on stderr (the figures go to stdout)."""
    print(f"[{time.monotonic() - T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TlsReplica(Replica):
    """A `vpnfleet server` replica serving HTTPS with the control plane's own CA (the
    environment's VPNFLEET_TLS_SELF_SIGNED, which Replica.start passes on)."""

    def __init__(self, url: str, data_dir: Path) -> None:
        super().__init__(SRC, url, data_dir)
        self.base = f"https://127.0.0.1:{self.port}"
        self.ca = data_dir / "tls" / "ca.pem"

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.ca.exists():
                    r = httpx.get(
                        f"{self.base}/healthz",
                        timeout=2,
                        verify=ssl.create_default_context(cafile=str(self.ca)),
                    )
                    if r.status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            assert self.proc is not None
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server did not start (log in {self.data_dir})")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def seed(url: str, data_dir: Path, users: int) -> float:
    """Migrate, then create `users` users (groups of GROUP_SIZE, a certificate each) as the
    directory sync's import does; the seconds it took."""
    from vpnfleet.controlplane.app import prepare
    from vpnfleet.controlplane.directorysync import SYNC_ACTOR
    from vpnfleet.controlplane.models import Group
    from vpnfleet.controlplane.services import users as usersvc
    from vpnfleet.controlplane.services.journal import Journal
    from vpnfleet.controlplane.settings import ServerSettings

    t0 = time.perf_counter()
    state = prepare(ServerSettings(data_dir=data_dir, database_url=url, secret=SECRET))
    try:
        groups = [f"simg{g:03d}" for g in range((users + GROUP_SIZE - 1) // GROUP_SIZE)]
        with state.factory() as db, db.begin():
            journal = Journal(db, SYNC_ACTOR, itemized=False)
            db.add_all(Group(name=g) for g in [*groups, PROBE_GROUP])
            journal.commit()
        for start in range(0, users, 1000):
            with state.factory() as db, db.begin():
                journal = Journal(db, SYNC_ACTOR, itemized=False)
                usersvc.create_nat_users(db, journal, state.sealer, [
                    usersvc.NewNatUser(user_name(i), None, True, [groups[i // GROUP_SIZE]])
                    for i in range(start, min(users, start + 1000))
                ])  # fmt: skip
                journal.commit()
    finally:
        state.engine.dispose()
    return time.perf_counter() - t0


def user_name(i: int) -> str:
    return f"sim{i:05d}"


@dataclass
class Window:
    """One measured stretch of a run."""

    seconds: float = 0.0
    cpu: list[float] = field(default_factory=list)  # per replica
    sim_cpu: float = 0.0
    lag: list[float] = field(default_factory=list)  # event-loop lag samples, seconds


class Meter:
    """CPU of the replicas and of this process, and this event loop's lag, over a window."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.lag: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _watch_lag(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.05)
            self.lag.append(time.perf_counter() - t - 0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_lag())

    async def measure(self, coro: Any) -> tuple[Any, Window]:
        cpu0 = [cpu_seconds(p) for p in self.pids]
        self_cpu0 = time.process_time()
        mark = len(self.lag)
        t0 = time.perf_counter()
        out = await coro
        w = Window(time.perf_counter() - t0)
        w.cpu = [cpu_seconds(p) - c for p, c in zip(self.pids, cpu0, strict=True)]
        w.sim_cpu = time.process_time() - self_cpu0
        w.lag = self.lag[mark:]
        return out, w

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Users:
    """Which users are free to connect (max_sessions is 1: one session per user at a time)."""

    def __init__(self, total: int) -> None:
        self.free = deque(range(PROBE_USERS, total))
        random.shuffle(self.free)


@dataclass
class Counts:
    opened: int = 0
    refused: int = 0
    closed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    open_latency: list[float] = field(default_factory=list)  # the request
    open_wait: list[float] = field(default_factory=list)  # queued in the shipper + request
    close_latency: list[float] = field(default_factory=list)
    flows_sent: int = 0
    heartbeats: int = 0
    reports: int = 0
    reports_skipped: int = 0  # session records were waiting (as the agent does)
    resyncs: int = 0
    stream_restarts: int = 0
    join_retries: int = 0
    join_latency: dict[str, list[float]] = field(default_factory=dict)

    def error(self, what: str, exc: BaseException) -> None:
        key = f"{what}: {str(exc)[:80]}"
        self.errors[key] = self.errors.get(key, 0) + 1


class SimAgent:
    """One simulated pod: the agent's control-plane client and wire models, no OpenVPN."""

    def __init__(
        self, index: int, name: str, urls: list[str], token: str, ca: Path, counts: Counts,
        seen: dict[tuple[Any, ...], dict[int, float]], per_record: bool = False,
    ) -> None:  # fmt: skip
        self.index, self.name, self.counts, self.seen = index, name, counts, seen
        self.per_record = per_record
        self.cp = ControlPlane(urls, token, ca_file=ca)
        self.revision = 0
        self.pool: ipaddress.IPv4Network | None = None
        # Pods of each configuration get addresses of their own: a failed run's pods keep
        # theirs until their lease ends.
        self.pod_ip = str(ipaddress.IPv4Address("10.250.0.0") + 4096 * len(urls) + index + 1)
        self.live: set[str] = set()
        self.flows: list[str] = []
        self.serial = 0
        self.unanswered = 0  # records in the session request under way
        self.tasks: list[asyncio.Task[None]] = []
        self.streaming = asyncio.Event()
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def join(self, snapshot: bool) -> None:
        """Enroll, register and (`snapshot`) fetch the snapshot, as a new pod does; each step
        retried with backoff while the control plane cannot answer (as agent/registration.py)."""
        got = await self._retrying(self.cp.enroll, EnrollRequest(name=self.name))
        self.cp.use_token(got.token)
        req = RegisterRequest(name=self.name, pod_ip=self.pod_ip)
        boot = await self._retrying(self.cp.register, req)
        self.pool = ipaddress.IPv4Network(boot.nat_pool)
        if snapshot:
            self.revision = (await self._retrying(self.cp.snapshot)).revision
        else:  # as an agent restarting with its cached view: it follows from there
            self.revision = boot.revision

    async def _retrying(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        delay = 0.5
        deadline = time.monotonic() + 240
        while True:
            t0 = time.perf_counter()
            try:
                got = await call(*args)
                self.counts.join_latency.setdefault(call.__name__, []).append(
                    time.perf_counter() - t0
                )
                return got
            except ControlPlaneError as exc:
                # A name refused as "enrolled and alive": an earlier try was recorded but its
                # answer was lost; the agent waits for the lease to end, as here.
                if not exc.retryable and not (exc.status == 409 and "enroll" in str(exc)):
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} could not join in 240 s: {exc}") from None
                self.counts.join_retries += 1
                self.counts.error(f"join ({call.__name__})", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def start(self) -> None:
        loops = (self._watch(), self._heartbeat(), self._report(), self._ship_flows(),
                 self._ship_sessions())  # fmt: skip
        self.tasks = [asyncio.create_task(c) for c in loops]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.cp.close()

    async def _watch(self) -> None:
        while True:
            try:
                async for msg in self.cp.watch(self.revision):
                    now = time.time()
                    self.streaming.set()
                    if isinstance(msg, WatchResync):
                        self.counts.resyncs += 1
                        self.revision = (await self.cp.snapshot()).revision
                        break
                    self.revision = msg.revision
                    if isinstance(msg, RuleUpsert):
                        key: tuple[Any, ...] = ("rule+", msg.object.id)
                    elif isinstance(msg, RuleDelete):
                        key = ("rule-", msg.key.id)
                    elif isinstance(msg, UserUpsert) and msg.object.name < user_name(PROBE_USERS):
                        key = ("user", msg.object.name, msg.object.enabled)
                    else:
                        continue
                    self.seen.setdefault(key, {}).setdefault(self.index, now)
            except ControlPlaneError as exc:
                self.counts.error("watch", exc)
                await asyncio.sleep(0.2)
            self.counts.stream_restarts += 1

    async def _heartbeat(self) -> None:
        await asyncio.sleep(random.uniform(0, HEARTBEAT_EVERY))
        while True:
            try:
                await self.cp.heartbeat(Heartbeat(name=self.name, applied_revision=self.revision,
                                                  ready=True, status={"sim": True}))  # fmt: skip
                self.counts.heartbeats += 1
            except ControlPlaneError as exc:
                self.counts.error("heartbeat", exc)
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def _report(self) -> None:
        await asyncio.sleep(random.uniform(0, REPORT_EVERY))
        while True:
            if self.unanswered or not self.outbox.empty():
                # As the agent's shipper does (sessionship.report): no report while session
                # records wait, or it would close a session whose close is still queued.
                self.counts.reports_skipped += 1
                await asyncio.sleep(REPORT_EVERY)
                continue
            try:
                await self.cp.session_report(SessionReport(pod=self.name, live=sorted(self.live)))
                self.counts.reports += 1
            except ControlPlaneError as exc:
                self.counts.error("report", exc)
            await asyncio.sleep(REPORT_EVERY)

    async def _ship_flows(self) -> None:
        await asyncio.sleep(random.uniform(0, FLOWS_EVERY))
        while True:
            batch, self.flows = self.flows[:5000], self.flows[5000:]
            if batch:
                try:
                    await self.cp.flows(self.name, batch)
                    self.counts.flows_sent += len(batch)
                except ControlPlaneError as exc:
                    self.counts.error("flows", exc)
                    self.flows = batch + self.flows  # kept for the next try, as the spool does
            await asyncio.sleep(FLOWS_EVERY)

    async def _shipped(self, kind: str, body: BaseModel, timings: list[float]) -> Any:
        """A record sent by this pod's session shipper, in order, as the agent's does
        (agent/sessionship.py): the records queued meanwhile, up to its `BATCH`, in one
        `POST /agent/sessions/batch` (one per request with `--per-record`, as before that
        endpoint). `timings` gets the duration of the request that carried it; the answer is
        the record's verdict (open) or `closed` (close)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        record = {"kind": kind, "body": body.model_dump(mode="json")}
        self.outbox.put_nowait((record, timings, done))
        return await done

    async def _ship_sessions(self) -> None:
        while True:
            items = [await self.outbox.get()]
            if not self.per_record:
                while len(items) < SHIP_BATCH and not self.outbox.empty():
                    items.append(self.outbox.get_nowait())
            self.unanswered = len(items)
            try:
                await self._ship(items)
            finally:
                self.unanswered = 0

    async def _ship(self, items: list[tuple[dict[str, Any], list[float], Any]]) -> None:
        """One request for `items`; each waiting session gets its record's answer."""
        t0 = time.perf_counter()
        try:
            if self.per_record:
                ((record, _, _),) = items
                body = record["body"]
                if record["kind"] == "open":
                    verdict = await self.cp.session_open(SessionOpen.model_validate(body))
                    results = [SessionResult(kind="open", uid=verdict.uid, status=200,
                                             verdict=verdict)]  # fmt: skip
                else:
                    await self.cp.session_close(SessionClose.model_validate(body))
                    results = [SessionResult(kind="close", uid="", status=200, closed=True)]
            else:
                sent = [record for record, _, _ in items]
                results = (await self.cp.session_batch(self.name, sent)).results
        except Exception as exc:  # handed to the waiting sessions, whatever it is
            for _, _, done in items:
                if not done.done():
                    done.set_exception(exc)
            return
        took = time.perf_counter() - t0
        for (_, timings, done), res in zip(items, results, strict=True):
            timings.append(took)
            if done.done():
                continue
            if res.status >= 400:
                done.set_exception(ControlPlaneError(f"{res.status} {res.detail}", res.status))
            else:
                done.set_result(res.verdict if res.kind == "open" else res.closed)

    async def open_session(self, user: int) -> tuple[str, str, dt.datetime] | None:
        """A client connects: the session record (timed); its uid, address and start if it may
        stay."""
        assert self.pool is not None
        self.serial += 1
        uid = f"{self.name}-{self.serial:08x}"
        tunnel_ip = str(self.pool.network_address + 2 + user)
        start = dt.datetime.now(dt.UTC)
        self.live.add(uid)
        queued = time.perf_counter()
        try:
            verdict = await self._shipped("open", SessionOpen(
                uid=uid, user=user_name(user), pod=self.name, mode="nat", tunnel_ip=tunnel_ip,
                real_ip=f"198.51.{100 + user // 250 % 50}.{user % 250 + 1}",
                real_port=40000 + user % 20000, started_at=start,
            ), self.counts.open_latency)  # fmt: skip
        except ControlPlaneError as exc:
            self.live.discard(uid)
            self.counts.error("open", exc)
            return None
        self.counts.open_wait.append(time.perf_counter() - queued)
        if not verdict.allowed:
            self.live.discard(uid)
            self.counts.refused += 1
            return None
        self.counts.opened += 1
        return uid, tunnel_ip, start

    async def close_session(self, user: int, uid: str, tunnel_ip: str, start: dt.datetime) -> None:
        """The client leaves: the close record (timed), and its flows spooled for shipping."""
        end = dt.datetime.now(dt.UTC)
        try:
            await self._shipped("close", SessionClose(
                uid=uid, ended_at=end, bytes_in=123_456, bytes_out=654_321, reason="sim",
            ), self.counts.close_latency)  # fmt: skip
        except ControlPlaneError as exc:
            self.counts.error("close", exc)
            return
        finally:
            self.live.discard(uid)
        self.counts.closed += 1
        start_ms = int(start.timestamp() * 1000)
        for k in range(FLOWS_PER_SESSION):
            self.flows.append(FlowReport(
                kind="end", flow_id=f"{uid}-{k}", pod=self.name, user=user_name(user),
                session_uid=uid, proto="tcp", start_ms=start_ms,
                end_ms=int(end.timestamp() * 1000), tunnel_ip=tunnel_ip,
                tunnel_port=50000 + k, nat_ip=self.pod_ip, nat_port=20000 + k,
                dst_ip=f"10.99.{k}.10", dst_port=443, packets_out=10, bytes_out=1200,
                packets_in=12, bytes_in=9000,
            ).model_dump_json(exclude_none=True))  # fmt: skip


async def churn(agents: list[SimAgent], users: Users, rate: float, seconds: float,
                max_inflight: int) -> dict[str, float]:  # fmt: skip
    """Open sessions at `rate`/s for `seconds` (each held 1-3 s); wait for the last closes.
    A session due while `max_inflight` opens are unanswered waits: the achieved rate shows it."""
    inflight = asyncio.Semaphore(max_inflight)
    tasks: set[asyncio.Task[None]] = set()
    started = 0
    starved = 0  # due but no free user (all connected)
    t0 = time.perf_counter()

    async def one(agent: SimAgent, user: int) -> None:
        try:
            async with inflight:  # held until the open is answered, not during the session
                opened = await agent.open_session(user)
            if opened is not None:
                await asyncio.sleep(random.uniform(1.0, 3.0))
                await agent.close_session(user, *opened)
        finally:
            users.free.append(user)

    while (now := time.perf_counter() - t0) < seconds:
        due = int(now * rate)
        while started < due:
            if not users.free:
                starved += due - started
                started = due
                break
            user = users.free.popleft()
            agent = agents[started % len(agents)]
            started += 1
            task = asyncio.create_task(one(agent, user))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.002)
    opens_window = time.perf_counter() - t0
    if tasks:
        await asyncio.wait(set(tasks), timeout=60)
    unfinished = len(tasks)
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"scheduled": started, "starved": starved, "open_window_s": opens_window,
            "unfinished_after_60s": unfinished}  # fmt: skip


# The operator: a process of its own (its timestamps must not wait on the agents' event loop).
def operator_main(base: str, ca: str, token: str, changes: int, gap: float) -> int:
    """Make `changes` changes `gap` seconds apart; print each one's key and return time."""
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=ca), timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as c:  # fmt: skip
        rule_id = None
        for i in range(changes):
            try:
                key = operator_change(c, i, rule_id)
            except httpx.HTTPError as exc:  # reported, and the next change is made
                print(json.dumps({"key": None, "error": f"{type(exc).__name__} {exc}"[:200]}),
                      flush=True)  # fmt: skip
                time.sleep(gap)
                continue
            if key[0] == "rule+":
                rule_id = key[1]
            print(json.dumps({"key": key, "t": time.time()}), flush=True)
            time.sleep(gap)
    return 0


def operator_change(c: httpx.Client, i: int, rule_id: int | None) -> list[Any]:
    """Change `i` of the cycle: rule added, user disabled, rule deleted, user enabled."""
    user = user_name(i // 4 % PROBE_USERS)
    step = i % 4
    if step == 0:
        r = c.post("/api/v1/rules", json={"group": PROBE_GROUP, "proto": "tcp",
                                          "destination": f"10.99.{i % 250}.0/24",
                                          "ports": "443"})  # fmt: skip
        r.raise_for_status()
        key: list[Any] = ["rule+", r.json()["id"]]
    elif step == 1:
        c.post(f"/api/v1/users/{user}/disable").raise_for_status()
        key = ["user", user, False]
    elif step == 2 and rule_id is not None:
        c.delete(f"/api/v1/rules/{rule_id}").raise_for_status()
        key = ["rule-", rule_id]
    elif step == 3:
        c.post(f"/api/v1/users/{user}/enable").raise_for_status()
        key = ["user", user, True]
    else:
        raise httpx.HTTPError("no rule to delete (its creation failed)")
    return key


async def operator(base: str, ca: Path, token: str, changes: int, gap: float) -> list[Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--operator", base, str(ca), token, str(changes), str(gap),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    made: list[Any] = []
    deadline = time.monotonic() + 60 + changes * (gap + 5)
    try:
        while len(made) < changes:
            left = deadline - time.monotonic()
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, left))
            if not line:
                break
            made.append(json.loads(line))
    except TimeoutError:
        made.append({"key": None, "error": "the operator's changes did not finish in time"})
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return made


async def propagation(agents: list[SimAgent], seen: dict[tuple[Any, ...], dict[int, float]],
                      made: list[Any], timeout: float = 15.0) -> dict[str, Any]:  # fmt: skip
    """Per change, each agent's delay from the API call's return to its stream delivering it."""
    failed = [m["error"] for m in made if m["key"] is None]
    made = [m for m in made if m["key"] is not None]
    deadline = time.monotonic() + timeout
    keys = [tuple(m["key"]) for m in made]
    while time.monotonic() < deadline and any(len(seen.get(k, {})) < len(agents) for k in keys):
        await asyncio.sleep(0.05)
    delays, slowest, missing = [], [], 0
    for m, k in zip(made, keys, strict=True):
        got = seen.get(k, {})
        missing += len(agents) - len(got)
        per = [got[a.index] - m["t"] for a in agents if a.index in got]
        delays += per
        if per:
            slowest.append(max(per))
    return {"changes": len(made), "failed_changes": failed, "deliveries": len(delays),
            "missing": missing,
            "p50_ms": pct(delays, 50) * 1000, "p99_ms": pct(delays, 99) * 1000,
            "max_ms": max(delays, default=float("nan")) * 1000,
            "all_agents_p50_ms": pct(slowest, 50) * 1000}  # fmt: skip


async def hold_streams(
    base: str, ca: Path, token: str, count: int, since: int
) -> list[asyncio.Task[None]]:
    """`count` more watch streams from revision `since`, as agents follow (raw TLS sockets
    reading and discarding); returns the tasks once every stream got its 200."""
    ctx = ssl.create_default_context(cafile=str(ca))
    port = int(base.rsplit(":", 1)[1])
    ready = 0
    done = asyncio.Event()

    async def one() -> None:
        nonlocal ready
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            writer.write(f"GET /api/v1/watch?since={since} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())  # fmt: skip
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"extra watcher refused: {status!r}")
            ready += 1
            if ready == count:
                done.set()
            while await reader.read(1 << 16):
                pass
        finally:
            writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    deadline = time.monotonic() + 120
    while not done.is_set():
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        if failed or time.monotonic() > deadline:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            why = failed[0].exception() if failed else "timed out after 120 s"
            raise RuntimeError(f"only {ready}/{count} extra watch streams opened: {why}")
        await asyncio.sleep(0.05)
    return tasks


def api(base: str, ca: Path, token: str, method: str, path: str, body: Any = None) -> Any:
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=str(ca)), timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as c:  # fmt: skip
        r = c.request(method, path, json=body)
        r.raise_for_status()
        return r.json() if r.content else None


@dataclass
class Config:
    agents: int = 200
    users: int = 20_000
    rate: float = 500.0
    churn_seconds: float = 30.0
    changes: int = 20
    extra_watchers: int = 1000
    replicas: tuple[int, ...] = (1, 2)
    idle_seconds: float = 5.0
    change_gap: float = 0.5
    max_inflight: int = 400
    join_concurrency: int = 4  # pods starting at once (a rollout's surge)
    snapshots: int = 10  # agents that start with a snapshot (the others: a cached view)
    join_timeout: float = 300.0
    per_record: bool = False  # one session record per request, as agents did before batches


async def run_config(
    cfg: Config, replicas: list[TlsReplica], admin: str, tag: str, out: dict[str, Any]
) -> dict[str, Any]:
    """One configuration (the replicas already up): agents join, then the four windows. The
    figures go into `out` as they are measured (a run that fails keeps those before)."""
    base, ca = replicas[0].base, replicas[0].ca
    enroll = api(base, ca, admin, "POST", "/api/v1/tokens",
                 {"name": f"sim-enroll-{tag}", "role": "agent"})["token"]  # fmt: skip
    operator_token = api(base, ca, admin, "POST", "/api/v1/tokens",
                         {"name": f"sim-operator-{tag}", "role": "operator"})["token"]  # fmt: skip
    pids = [r.pid for r in replicas]
    out.update(replicas=len(replicas), agents=cfg.agents)
    out["rss_before_agents_mb"] = [rss_mb(p) for p in pids]
    counts = Counts()
    seen: dict[tuple[Any, ...], dict[int, float]] = {}
    agents = []
    for i in range(cfg.agents):
        urls = [r.base for r in replicas]
        k = i % len(urls)
        agents.append(SimAgent(i, f"{tag}-pod-{i:03d}", urls[k:] + urls[:k], enroll, ca,
                               counts, seen, cfg.per_record))  # fmt: skip
    meter = Meter(pids)
    meter.start()
    extra: list[asyncio.Task[None]] = []
    try:
        join_sem = asyncio.Semaphore(cfg.join_concurrency)

        joined = 0

        async def join(a: SimAgent) -> None:
            nonlocal joined
            async with join_sem:
                await a.join(snapshot=a.index < cfg.snapshots)
            a.start()
            joined += 1
            if joined % 50 == 0:
                note(f"{joined} agents joined")

        async def everyone_joins() -> None:
            await asyncio.wait_for(asyncio.gather(*(join(a) for a in agents)), cfg.join_timeout)
            await asyncio.wait_for(asyncio.gather(*(a.streaming.wait() for a in agents)), 60)

        try:
            _, w = await meter.measure(everyone_joins())
        except (TimeoutError, RuntimeError) as exc:
            out["join"] = {  # what the joins that finished took
                **{f"{k}_p50_ms": pct(v, 50) * 1000 for k, v in counts.join_latency.items()},
                **{f"{k}_p99_ms": pct(v, 99) * 1000 for k, v in counts.join_latency.items()},
                "retries": counts.join_retries, "errors": dict(counts.errors),
            }  # fmt: skip
            out["failed"] = (
                f"{type(exc).__name__} {exc}: "
                + f"{joined} of {cfg.agents} agents joined within the time limit; server log: "
                + "; ".join(log_errors(r) for r in replicas)
            )
            return out
        note("agents joined and streaming")
        out["join"] = {
            **window_out(w), "retries": counts.join_retries, "errors": dict(counts.errors),
            **{f"{k}_p50_ms": pct(v, 50) * 1000 for k, v in counts.join_latency.items()},
            **{f"{k}_p99_ms": pct(v, 99) * 1000 for k, v in counts.join_latency.items()},
        }  # fmt: skip
        counts.errors.clear()
        _, idle = await meter.measure(asyncio.sleep(cfg.idle_seconds))
        out["idle"] = window_out(idle)
        idle_rate = [c / idle.seconds for c in idle.cpu]

        async def changes() -> dict[str, Any]:
            made = await operator(base, ca, operator_token, cfg.changes, cfg.change_gap)
            return await propagation(agents, seen, made)

        quiet, wq = await meter.measure(changes())
        note("quiet changes done")
        out["changes_quiet"] = {**quiet, **window_out(wq)}
        out["cpu_per_change_ms"] = [
            (c - r * wq.seconds) / max(1, quiet["changes"]) * 1000
            for c, r in zip(wq.cpu, idle_rate, strict=True)
        ]
        seen.clear()
        users = Users(cfg.users)

        async def churn_and_changes() -> tuple[dict[str, float], dict[str, Any]]:
            c = asyncio.create_task(churn(agents, users, cfg.rate, cfg.churn_seconds,
                                          cfg.max_inflight))  # fmt: skip
            await asyncio.sleep(min(2.0, cfg.churn_seconds / 4))
            p = await changes()
            return await c, p

        (stats, loaded), wc = await meter.measure(churn_and_changes())
        note("churn done")
        out["churn"] = {
            **stats, **window_out(wc), "opened": counts.opened, "refused": counts.refused,
            "closed": counts.closed, "errors": dict(counts.errors),
            "achieved_open_rate": (counts.opened + counts.refused) / stats["open_window_s"],
            "open_p50_ms": pct(counts.open_latency, 50) * 1000,
            "open_p99_ms": pct(counts.open_latency, 99) * 1000,
            "open_max_ms": max(counts.open_latency, default=float("nan")) * 1000,
            "open_wait_p50_ms": pct(counts.open_wait, 50) * 1000,
            "open_wait_p99_ms": pct(counts.open_wait, 99) * 1000,
            "close_p50_ms": pct(counts.close_latency, 50) * 1000,
            "close_p99_ms": pct(counts.close_latency, 99) * 1000,
            "flows_sent": counts.flows_sent, "heartbeats": counts.heartbeats,
            "reports": counts.reports, "reports_skipped": counts.reports_skipped,
        }  # fmt: skip
        out["changes_churn"] = loaded
        sessions = max(1, counts.opened + counts.refused)
        out["cpu_per_session_ms"] = [
            (c - r * wc.seconds) / sessions * 1000 for c, r in zip(wc.cpu, idle_rate, strict=True)
        ]
        await asyncio.sleep(FLOWS_EVERY + 0.5)  # the last flows leave
        out["flows_sent"] = counts.flows_sent
        mine = cfg.agents // len(replicas) + (cfg.agents % len(replicas) > 0)
        out["watchers_on_first"] = mine
        out["rss_with_agents_mb"] = [rss_mb(p) for p in pids]
        if cfg.extra_watchers:
            head = api(base, ca, admin, "GET", "/api/v1/revision")["revision"]
            before = rss_mb(pids[0])
            extra = await hold_streams(base, ca, operator_token, cfg.extra_watchers, head)
            note(f"{cfg.extra_watchers} extra watchers on")
            await asyncio.sleep(2.0)
            after = rss_mb(pids[0])
            out["rss_with_extra_mb"] = after
            out["rss_per_1000_watchers_mb"] = (after - before) / cfg.extra_watchers * 1000
        out["server_log"] = [log_errors(r) for r in replicas]
        out["counts"] = {"resyncs": counts.resyncs, "stream_restarts": counts.stream_restarts,
                         "join_retries": counts.join_retries,
                         "errors": dict(counts.errors)}  # fmt: skip
        return out
    finally:
        for t in extra:
            t.cancel()
        await asyncio.gather(*extra, return_exceptions=True)
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        await meter.stop()
        note("agents stopped")


def log_errors(replica: TlsReplica) -> str:
    """How many ERROR lines a replica logged, and how many were database pool timeouts."""
    path = replica.data_dir / f"server-{replica.port}.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = sum(" ERROR " in line for line in lines)
    pool = sum("QueuePool limit" in line for line in lines)
    return f"{errors} ERROR lines, {pool} database pool timeouts"


def window_out(w: Window) -> dict[str, Any]:
    return {"seconds": w.seconds, "cp_cpu_s": w.cpu, "sim_cpu_s": w.sim_cpu,
            "loop_lag_p99_ms": pct(w.lag, 99) * 1000,
            "loop_lag_max_ms": max(w.lag, default=float("nan")) * 1000}  # fmt: skip


def run(cfg: Config, pg_admin: str) -> dict[str, Any]:
    """Every configuration of `cfg` on one fresh database (dropped at the end, whatever
    happens); the results keyed by replica count."""
    url, dbname = fresh_pg(pg_admin)
    tmp = tempfile.TemporaryDirectory(prefix="fleetsim-")
    results: dict[str, Any] = {"database": dbname}
    os.environ["VPNFLEET_TLS_SELF_SIGNED"] = "127.0.0.1"
    try:
        data_dir = Path(tmp.name) / "data"
        data_dir.mkdir(mode=0o700)
        results["seed_s"] = seed(url, data_dir, cfg.users)
        note(f"seeded {cfg.users} users")
        admin = (data_dir / "admin-token").read_text().strip()
        for n in cfg.replicas:
            servers = [TlsReplica(url, data_dir) for _ in range(n)]
            try:
                for s in servers:
                    s.start()
                note(f"{n} replica(s) up")
                if n == cfg.replicas[0]:
                    api(servers[0].base, servers[0].ca, admin, "PUT", "/api/v1/pools/default",
                        {"cidr": NAT_POOL, "kind": "nat"})  # fmt: skip
                tag = f"r{n}"
                results[tag] = {}
                try:
                    asyncio.run(run_config(cfg, servers, admin, tag, results[tag]))
                except Exception as exc:  # the figures so far are kept, with the failure
                    results[tag]["failed"] = (
                        f"{type(exc).__name__} {exc}"[:300]
                        + "; "
                        + "; ".join(log_errors(r) for r in servers)
                    )
                note("run done; revoking its pods")
                # Their sessions close and the next run starts clean (a failed run's pods are
                # left to their lease: the server may not be answering).
                for i in range(cfg.agents if "failed" not in results[tag] else 0):
                    api(servers[0].base, servers[0].ca, admin, "POST",
                        f"/api/v1/pods/{tag}-pod-{i:03d}/revoke")  # fmt: skip
            finally:
                for s in servers:
                    s.stop()
                note("replicas stopped")
    finally:
        os.environ.pop("VPNFLEET_TLS_SELF_SIGNED", None)
        drop_pg(pg_admin, dbname)
        tmp.cleanup()
    return results


def summary(res: dict[str, Any], cfg: Config) -> str:
    lines = []
    for n in cfg.replicas:
        r = res[f"r{n}"]
        if "failed" in r:
            lines.append(f"== {n} replica(s), {r['agents']} agents: FAILED: {r['failed']}")
            continue
        q, c, ch = r["changes_quiet"], r["changes_churn"], r["churn"]
        lines += [
            f"== {n} replica(s), {r['agents']} agents",
            f"  join: {r['join']['seconds']:.1f} s ({r['join']['retries']} retries; snapshot "
            f"p50 {r['join'].get('snapshot_p50_ms', 0):.0f} ms); idle CPU "
            + ", ".join(f"{x / r['idle']['seconds'] * 100:.0f} %" for x in r["idle"]["cp_cpu_s"]),
            f"  change -> agent (quiet): p50 {q['p50_ms']:.0f} ms p99 {q['p99_ms']:.0f} ms max "
            f"{q['max_ms']:.0f} ms, {q['deliveries']} deliveries, {q['missing']} missing; "
            f"loop lag p99 {q['loop_lag_p99_ms']:.0f} ms",
            f"  change -> agent (churn): p50 {c['p50_ms']:.0f} ms p99 {c['p99_ms']:.0f} ms max "
            f"{c['max_ms']:.0f} ms, {c['deliveries']} deliveries, {c['missing']} missing",
            f"  churn: {ch['achieved_open_rate']:.0f} opens/s (target {cfg.rate:.0f}), "
            f"{ch['opened']} opened, {ch['refused']} refused, {ch['closed']} closed, errors "
            f"{sum(ch['errors'].values())}; open p50 {ch['open_p50_ms']:.0f} ms p99 "
            f"{ch['open_p99_ms']:.0f} ms (queued in the shipper too: p50 "
            f"{ch['open_wait_p50_ms']:.0f} ms p99 {ch['open_wait_p99_ms']:.0f} ms); "
            f"loop lag p99 {ch['loop_lag_p99_ms']:.0f} ms; "
            f"sim CPU {ch['sim_cpu_s']:.0f} s / {ch['seconds']:.0f} s; session reports (whole "
            f"run) {ch['reports']} sent, {ch['reports_skipped']} skipped: records waited",
            "  CP CPU per change: " + ", ".join(f"{x:.0f} ms" for x in r["cpu_per_change_ms"])
            + "; per session: " + ", ".join(f"{x:.1f} ms" for x in r["cpu_per_session_ms"]),
            f"  server log: {'; '.join(r['server_log'])}",
            f"  RSS: before agents {r['rss_before_agents_mb']}, with agents "
            f"{r['rss_with_agents_mb']} MB; per 1,000 watchers "
            f"{r.get('rss_per_1000_watchers_mb', float('nan')):.1f} MB",
        ]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--operator":
        a = sys.argv[2:]
        return operator_main(a[0], a[1], a[2], int(a[3]), float(a[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--churn-seconds", type=float, default=30.0)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--extra-watchers", type=int, default=1000)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--join-concurrency", type=int, default=4)
    ap.add_argument("--join-timeout", type=float, default=300.0)
    ap.add_argument("--snapshots", type=int, default=10,
                    help="agents that fetch a snapshot at start (the rest start from the "
                    "registration's revision, as with a cached view)")  # fmt: skip
    ap.add_argument("--per-record", action="store_true",
                    help="send one session record per request (the agent's shipper before "
                    "POST /agent/sessions/batch; an older control plane)")  # fmt: skip
    ap.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.pg_url:
        raise SystemExit("give --pg-url or VPNFLEET_TEST_PG_URL")
    cfg = Config(agents=args.agents, users=args.users, rate=args.rate,
                 churn_seconds=args.churn_seconds, changes=args.changes,
                 extra_watchers=args.extra_watchers, join_concurrency=args.join_concurrency,
                 snapshots=min(args.snapshots, args.agents), join_timeout=args.join_timeout,
                 per_record=args.per_record,
                 replicas=tuple(int(x) for x in args.replicas.split(",")))  # fmt: skip
    if not (1 <= cfg.agents <= 1000 and PROBE_USERS + 10 <= cfg.users <= 100_000
            and 0 < cfg.rate <= 5000 and 1 <= cfg.churn_seconds <= 600
            and 1 <= cfg.changes <= 200 and 1 <= cfg.join_concurrency <= 50
            and 0 <= cfg.extra_watchers <= 1500 and 0 <= cfg.snapshots <= cfg.agents
            and set(cfg.replicas) <= {1, 2, 3}):  # fmt: skip
        raise SystemExit("an argument is out of range (see --help)")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"# fleet simulator {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs; {asdict(cfg)}", flush=True)  # fmt: skip
    res = run(cfg, args.pg_url)
    print(summary(res, cfg))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
