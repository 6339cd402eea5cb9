"""Single sign-on at connect: many logins pending on one agent while certificate-only users
connect, and how soon a finished login admits its connection.

    .venv/bin/python bench/sso_pending.py [--pending 500] [--connects 2000] [--postgres]
        [--json FILE]

Real parts: a `vpnfleet server` process (SQLite, or PostgreSQL with `--postgres`), the real
OpenID provider the tests use (django-oauth-toolkit, tests/oidcidp, its own process), the
agent's event path as the pod wires it (session book decisions, ClientHandler, its SSO login
registry long-polling the control plane, the management client on a unix socket). The load
generator is a fake OpenVPN *management server* speaking the real protocol (as
bench/connect_storm.py): it sends `--pending` CONNECTs of `cert+sso` users announcing web auth,
collects the `client-pending-auth` URLs, then sends `--connects` CONNECTs of certificate-only
users (up to 64 outstanding) while "browsers" (4 worker processes, each following the IdP's
login form with plain HTTP) finish the pending logins.

Measured:
- certificate-only decisions (CONNECT written -> client-auth read) with the logins pending
  and the browsers at work, against the same connects with nothing pending (the baseline, the
  same run);
- callback -> admitted: from the browser's request to the control plane's callback to the
  client-auth of that connection at the fake OpenVPN; also from the callback's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cp_failover import Replica
from cp_stop import SRC, free_port
from watch_catchup import pct

from tests.oidcidp import browser_login, running_idp

SECRET = "bench-seal-secret-Qx9LmPz4Rk8Vw2b7"  # the one cp_failover's Replica starts with
WINDOW = 64
_URL = re.compile(r'WEB_AUTH::(\S+?)"')


def password(i: int) -> str:
    return f"sso-user-{i}-pw-7Kq"


def seed(url: str, data_dir: Path, pending: int, connects: int) -> None:
    """`pending` users in the group `sso` (policy cert+sso), `connects` certificate-only ones."""
    from vpnfleet.controlplane.app import prepare
    from vpnfleet.controlplane.directorysync import SYNC_ACTOR
    from vpnfleet.controlplane.models import Group
    from vpnfleet.controlplane.services import users as usersvc
    from vpnfleet.controlplane.services.journal import Journal
    from vpnfleet.controlplane.settings import ServerSettings

    state = prepare(ServerSettings(data_dir=data_dir, database_url=url, secret=SECRET))
    try:
        with state.factory() as db, db.begin():
            journal = Journal(db, SYNC_ACTOR, itemized=False)
            db.add(Group(name="sso", auth_policy="cert+sso"))
            journal.commit()
        names = [(f"sso{i}", ["sso"]) for i in range(pending)]
        names += [(f"crt{i}", []) for i in range(connects)]
        for start in range(0, len(names), 1000):
            with state.factory() as db, db.begin():
                journal = Journal(db, SYNC_ACTOR, itemized=False)
                usersvc.create_nat_users(db, journal, state.sealer, [
                    usersvc.NewNatUser(name, None, True, groups)
                    for name, groups in names[start : start + 1000]
                ])  # fmt: skip
                journal.commit()
    finally:
        state.engine.dispose()


class FakeOpenVPN:
    """The server side of the management session: CONNECTs out, answers in, timed."""

    def __init__(self, serials: dict[str, str]) -> None:
        self.serials = serials
        self.writer: asyncio.StreamWriter | None = None
        self.attached = asyncio.Event()
        self.sent: dict[int, float] = {}
        self.answered: dict[int, tuple[str, float]] = {}
        self.urls: dict[int, str] = {}
        self.denials: dict[int, str] = {}
        self.waiters: dict[int, asyncio.Event] = {}
        self.slots = asyncio.Semaphore(WINDOW)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        writer.write(b">INFO:OpenVPN Management Interface Version 5 -- type 'help'\r\n")
        await writer.drain()
        self.attached.set()
        while line := (await reader.readline()).decode().strip():
            word = line.split(" ", 1)[0]
            if word in ("client-auth", "client-deny", "client-pending-auth"):
                cid = int(line.split()[1])
                now = time.monotonic()
                if word == "client-auth":
                    while (await reader.readline()).decode().strip() != "END":
                        pass
                if word == "client-pending-auth":
                    found = _URL.search(line)
                    self.urls[cid] = found.group(1) if found else ""
                else:
                    self.answered[cid] = (word, now)
                    if word == "client-deny":
                        self.denials[cid] = line.split(" ", 3)[3]
                    if cid >= 100_000:
                        self.slots.release()
                writer.write(f"SUCCESS: {word} command succeeded\r\n".encode())
                event = self.waiters.get(cid)
                if event is not None:
                    event.set()
            elif word == "status":
                writer.write(
                    b"TITLE\tOpenVPN\r\nHEADER\tCLIENT_LIST\tCommon Name\tReal Address\t"
                    b"Virtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\t"
                    b"Connected Since\tConnected Since (time_t)\tUsername\tClient ID\t"
                    b"Peer ID\tData Channel Cipher\r\nEND\r\n"
                )
            else:
                writer.write(b"SUCCESS: ok\r\n")
            await writer.drain()

    async def connect(self, cid: int, user: str, webauth: bool) -> None:
        assert self.writer is not None
        env = [
            f"common_name={user}",
            f"tls_serial_0={self.serials[user]}",
            f"untrusted_ip=198.51.{cid // 250 % 250}.{cid % 250 + 1}",
            f"untrusted_port={1024 + cid % 60000}",
        ]
        if webauth:
            env.append("IV_SSO=webauth")
        lines = [f">CLIENT:CONNECT,{cid},1", *(f">CLIENT:ENV,{e}" for e in env), ">CLIENT:ENV,END"]
        self.sent[cid] = time.monotonic()
        self.writer.write(("\r\n".join(lines) + "\r\n").encode())
        await self.writer.drain()

    async def storm(self, first_cid: int, users: list[str], rate: float) -> list[float]:
        """Certificate-only CONNECTs arriving at `rate` per second (at most WINDOW
        outstanding); their decision times (ms)."""
        cids = []
        start = time.monotonic()
        for n, user in enumerate(users):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.slots.acquire()
            cid = first_cid + n
            cids.append(cid)
            await self.connect(cid, user, webauth=False)
        deadline = time.monotonic() + 60
        while any(c not in self.answered for c in cids) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [(self.answered[c][1] - self.sent[c]) * 1000 for c in cids if c in self.answered]


def browse(url: str, user: str, pw: str, callback_prefix: str) -> tuple[float, float, int]:
    """One user's browser (in a worker process): the login URL, the IdP's form, then the
    control plane's callback; (callback sent, callback answered, its status), monotonic."""
    back = browser_login(url, user, pw, callback_prefix)
    started = time.monotonic()
    status = httpx.get(back, timeout=60).status_code
    return started, time.monotonic(), status


async def agent_side(
    sock: Path, cp_url: str, pod_token: str, view: Any, state: Path
) -> tuple[Any, Any]:
    from vpnfleet.agent.clientjournal import ClientJournal
    from vpnfleet.agent.clients import ClientHandler
    from vpnfleet.agent.cpclient import ControlPlane
    from vpnfleet.agent.management import ManagementClient
    from vpnfleet.agent.sessionship import SessionShipper
    from vpnfleet.agent.spool import Spool
    from vpnfleet.agent.ssologin import SsoLogins
    from vpnfleet.core.mgmt_protocol import ClientEvent
    from vpnfleet.core.sessionbook import BookConfig, SessionBook

    mgmt = await ManagementClient.connect(sock)
    cp = ControlPlane(cp_url, pod_token)
    # When each decision reached the agent (by client id): splits callback -> admitted into
    # the control plane's part and the agent's.
    received: dict[int, float] = {}
    asked = cp.sso_decisions

    async def timed(wait: float = 0) -> list[dict[str, Any]]:
        got = await asked(wait)
        now = time.monotonic()
        for d in got:
            received[int(d["cid"])] = now
        return got

    cp.sso_decisions = timed  # type: ignore[method-assign]
    sso = SsoLogins(cp)
    handler = ClientHandler(
        SessionBook(BookConfig(nat_pool=ipaddress.IPv4Network("10.200.0.0/16"))),
        ClientJournal(state / "clients.journal"),
        # Session records are not what is measured: spooled, never sent.
        SessionShipper(Spool(state, "sessions"), ControlPlane("http://127.0.0.1:9", "x"), "p"),
        pod="pod1",
        view=lambda: view,
        mgmt=lambda _server: mgmt,
        changed=lambda: None,
        sso=sso,
    )

    async def events() -> None:
        async for event in mgmt.events():
            if isinstance(event, ClientEvent):
                await handler.on_event(event)

    task = asyncio.create_task(events())
    return handler, (mgmt, sso, cp, task, received)


def _other_cpus() -> set[int]:
    """Every CPU but the first: the agent's own process runs alone on CPU 0 (it runs in its
    own pod in a real fleet); the control plane, the IdP and the browsers share the rest."""
    cpus = os.sched_getaffinity(0)
    return cpus - {min(cpus)} or cpus


def _pin_browser() -> None:
    os.sched_setaffinity(0, _other_cpus())


async def run(pending: int, connects: int, rate: float, work: Path, db_url: str) -> dict[str, Any]:
    from tests.conftest import Server
    from vpnfleet.core.fleet import FleetView
    from vpnfleet.wire import Snapshot

    data = work / "cp"
    data.mkdir()
    t0 = time.monotonic()
    seed(db_url, data, pending, connects)
    seeded = time.monotonic() - t0
    port = free_port()
    replica = Replica(SRC, db_url, data, port=port)
    replica.start()
    assert replica.proc is not None
    others = _other_cpus()
    os.sched_setaffinity(replica.proc.pid, others)
    os.sched_setaffinity(0, os.sched_getaffinity(0) - others or others)
    base = f"http://127.0.0.1:{port}"
    idp_users = {f"sso{i}": (password(i), f"sso{i}@corp.test") for i in range(pending)}
    try:
        with running_idp(work / "idp", f"{base}/sso/callback", idp_users) as idp:
            for pid in _children():
                os.sched_setaffinity(pid, others)
            server = Server(base, (data / "admin-token").read_text().strip(), data, db_url)
            with server.client() as admin:
                r = admin.put("/api/v1/idp", json={
                    "issuer": idp.issuer, "client_id": idp.client_id,
                    "client_secret": idp.client_secret, "public_url": base,
                    "login_timeout_seconds": 600,
                })  # fmt: skip
                r.raise_for_status()
            token = server.pod_token("pod1")
            with server.client(token) as pod:
                pod.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
                snap = Snapshot.model_validate_json(pod.get("/api/v1/agent/snapshot").content)
            view = FleetView.from_snapshot(snap)
            serials = {u.name: str(u.cert_serial) for u in snap.users}
            crt = [f"crt{i}" for i in range(connects)]

            fake = FakeOpenVPN(serials)
            sock = work / "mgmt.sock"
            srv = await asyncio.start_unix_server(fake.handle, path=str(sock))
            state = work / "agent"
            state.mkdir()
            handler, parts = await agent_side(sock, base, token, view, state)
            await asyncio.wait_for(fake.attached.wait(), 10)

            # Baseline: the certificate-only connects with nothing pending.
            base_ms = await fake.storm(100_000, crt, rate)
            for cid in range(100_000, 100_000 + connects):
                fake.answered.pop(cid, None)

            # Logins pending: `pending` SSO CONNECTs, each waiting with its URL.
            t_reg = time.monotonic()
            for i in range(pending):
                await fake.connect(i, f"sso{i}", webauth=True)
            while len(fake.urls) < pending and time.monotonic() - t_reg < 120:
                await asyncio.sleep(0.01)
            registered = time.monotonic() - t_reg
            for i in range(pending):
                fake.waiters[i] = asyncio.Event()

            # The browsers finish the logins while the certificate-only storm runs.
            loop = asyncio.get_running_loop()
            with ProcessPoolExecutor(
                4, mp_context=multiprocessing.get_context("spawn"), initializer=_pin_browser
            ) as pool:
                futures = [
                    loop.run_in_executor(
                        pool, browse, fake.urls[i], f"sso{i}", password(i), f"{base}/sso/callback"
                    )
                    for i in range(pending)
                ]
                storm = asyncio.create_task(fake.storm(200_000, crt, rate))
                browsed = await asyncio.gather(*futures)
                loaded_ms = await storm
            deadline = time.monotonic() + 30
            while any(i not in fake.answered for i in range(pending)):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            from_request, from_answer = [], []
            to_agent, in_agent = [], []
            received = parts[4]
            refused: dict[str, int] = {}
            for i, (sent, answered, status) in enumerate(browsed):
                got = fake.answered.get(i)
                if status != 200 or got is None or got[0] != "client-auth":
                    why = f"callback {status}, answer {got[0] if got else 'none'}"
                    if i in fake.denials:
                        why += f": {fake.denials[i]}"
                    refused[why] = refused.get(why, 0) + 1
                    continue
                from_request.append((got[1] - sent) * 1000)
                from_answer.append(max(0.0, got[1] - answered) * 1000)
                if i in received:
                    to_agent.append(max(0.0, received[i] - answered) * 1000)
                    in_agent.append((got[1] - received[i]) * 1000)
            mgmt, sso, cp, task, _ = parts
            polls = sso.polls
            task.cancel()
            await sso.close()
            await cp.close()
            await mgmt.close()
            handler.close()
            srv.close()
    finally:
        replica.sigterm()
        replica.wait_exit()
    return {
        "pending": pending,
        "connects": connects,
        "connect_rate_per_s": rate,
        "seed_s": round(seeded, 1),
        "register_pending_s": round(registered, 2),
        "baseline_decision_p50_ms": round(pct(base_ms, 50), 2),
        "baseline_decision_p99_ms": round(pct(base_ms, 99), 2),
        "loaded_decision_p50_ms": round(pct(loaded_ms, 50), 2),
        "loaded_decision_p99_ms": round(pct(loaded_ms, 99), 2),
        "loaded_decisions": len(loaded_ms),
        "p99_ratio_loaded_vs_baseline": round(pct(loaded_ms, 99) / pct(base_ms, 99), 2),
        "callback_to_admitted_p50_ms": round(pct(from_request, 50), 1),
        "callback_to_admitted_p99_ms": round(pct(from_request, 99), 1),
        "callback_answer_to_admitted_p50_ms": round(pct(from_answer, 50), 1),
        "callback_answer_to_admitted_p99_ms": round(pct(from_answer, 99), 1),
        # The two parts of callback answer -> admitted: the decision's way to the agent (the
        # long poll), then the agent's admission (a new decision on its view, client-auth).
        "callback_answer_to_agent_p50_ms": round(pct(to_agent, 50), 1),
        "callback_answer_to_agent_p99_ms": round(pct(to_agent, 99), 1),
        "agent_to_admitted_p50_ms": round(pct(in_agent, 50), 1),
        "agent_to_admitted_p99_ms": round(pct(in_agent, 99), 1),
        "logins_admitted": len(from_request),
        "logins_not_admitted": refused,  # by (callback status, answer to OpenVPN)
        "decision_polls": polls,
    }


def _children() -> list[int]:
    """This process's child processes (the IdP's uvicorn)."""
    me = str(os.getpid())
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out.append(int(stat.parent.name))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=500)
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0, help="certificate-only connects/s")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="a fresh database on the PostgreSQL of VPNFLEET_TEST_PG_URL instead of SQLite",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.conftest import fresh_database

    with (
        tempfile.TemporaryDirectory(prefix="sso-bench-") as tmp,
        fresh_database("postgresql" if args.postgres else "sqlite", Path(tmp)) as db_url,
    ):
        out = asyncio.run(run(args.pending, args.connects, args.rate, Path(tmp), db_url))
    out["database"] = "postgresql" if args.postgres else "sqlite"
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
