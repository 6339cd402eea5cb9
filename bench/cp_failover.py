"""Agents behind a stopped control-plane replica: how long until they are current again.

    .venv/bin/python bench/cp_failover.py [--followers 50] [--pg-url URL]
        [--baseline-src DIR] [--rounds 3]

`vpnfleet server` replicas (the real command, each its own process) on one fresh PostgreSQL
database, and `--followers` agent view followers (the agent's own ViewFollower and
ControlPlane client, in a process of their own, from the same src/ as the servers). Two
scenarios; in each, the time from the SIGTERM to the moment every follower holds a change made
right after it:

- *restart*: one replica, stopped and started again at once (the followers know its URL only);
  the change is made as soon as it answers again. Also: from "it answers again" to "every
  follower has the change".
- *failover*: two replicas, followers given both URLs (each its own first); the first replica
  is stopped, the change is made through the second at once. (The baseline has no list of
  URLs: it cannot run this one.)

Baseline in the same run: `--baseline-src` is the `src/` of the code before this change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_stop import SERVER, SRC, drop_pg, free_port, fresh_pg

# The followers: the agent's ViewFollower from the given src/, one ControlPlane client each.
# Reads a target revision per line on stdin; answers with the time every follower reached it.
FOLLOWERS = r"""
import asyncio, logging, sys, time, tempfile
from pathlib import Path
logging.disable(logging.WARNING)  # a line per retry of every follower is not the point
sys.path.insert(0, sys.argv[1])
from vpnfleet.agent.cpclient import ControlPlane
from vpnfleet.agent.follower import ViewFollower
urls, token, count = sys.argv[2].split("|"), sys.argv[3], int(sys.argv[4])

async def main():
    tmp = Path(tempfile.mkdtemp())
    async def nothing(_effects):
        pass
    followers = []
    for i in range(count):
        order = urls[i % len(urls):] + urls[:i % len(urls)]
        cp = ControlPlane(order if len(order) > 1 else order[0], token)
        f = ViewFollower(cp, tmp / f"view{i}.json", nothing)
        await f.load()
        followers.append(f)
    tasks = [asyncio.create_task(f.run()) for f in followers]
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        target = int(line)
        while min(f.view.revision for f in followers) < target:
            await asyncio.sleep(0.005)
        print(f"{time.monotonic():.6f}", flush=True)
    for t in tasks:
        t.cancel()

asyncio.run(main())
"""


class Replica:
    def __init__(self, src: Path, url: str, data_dir: Path, port: int | None = None) -> None:
        self.src, self.url, self.data_dir = src, url, data_dir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, VPNFLEET_SECRET="bench-seal-secret-Qx9LmPz4Rk8Vw2b7")
        log = open(self.data_dir / f"server-{self.port}.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.src), "server", "--data-dir",
             str(self.data_dir), "--database-url", self.url, "--listen",
             f"127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.wait_up()

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc is not None
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self) -> None:
        assert self.proc is not None
        self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def change(base: str, token: str, n: int) -> int:
    """A user change through `base`; the head revision after it."""
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        c.post("/api/v1/users", json={"name": f"bench{n}"}).raise_for_status()
        return int(c.get("/api/v1/revision").json()["revision"])


def scenario(src: Path, pg_admin: str, followers: int, replicas: int) -> tuple[float, float]:
    url, name = fresh_pg(pg_admin)
    tmp = tempfile.TemporaryDirectory(prefix="cpfail-")
    data_dir = Path(tmp.name)
    servers = [Replica(src, url, data_dir) for _ in range(replicas)]
    proc = None
    try:
        for s in servers:
            s.start()
        admin = (data_dir / "admin-token").read_text().strip()
        with httpx.Client(
            base_url=servers[0].base, headers={"Authorization": f"Bearer {admin}"}, timeout=30
        ) as c:
            r = c.post("/api/v1/tokens", json={"name": "bench-followers", "role": "operator"})
            r.raise_for_status()
            token = r.json()["token"]
        proc = subprocess.Popen(
            [sys.executable, "-c", FOLLOWERS, str(src), "|".join(s.base for s in servers),
             token, str(followers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        head = change(servers[0].base, admin, 0)
        proc.stdin.write(f"{head}\n")
        proc.stdin.flush()
        proc.stdout.readline()  # every follower is on the stream, at the head
        time.sleep(1.0)
        stopped = time.monotonic()
        servers[0].sigterm()
        if replicas == 1:
            servers[0].wait_exit()
            servers[0].start()
            back = time.monotonic()
            head = change(servers[0].base, admin, 1)
        else:
            back = stopped
            head = change(servers[1].base, admin, 1)
        proc.stdin.write(f"{head}\n")
        proc.stdin.flush()
        current = float(proc.stdout.readline())
        return current - stopped, current - back
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for s in servers:
            s.kill()
        drop_pg(pg_admin, name)
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--followers", type=int, default=50)
    ap.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL"))
    ap.add_argument("--baseline-src", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.pg_url:
        sys.exit("give --pg-url or VPNFLEET_TEST_PG_URL")
    codes = [("this code", SRC)]
    if args.baseline_src:
        codes.append(("baseline", args.baseline_src.resolve()))
    print(f"# {dt.date.today()} {platform.node()} {os.cpu_count()} CPUs, PostgreSQL, "
          f"{args.followers} followers, {args.rounds} rounds (median, max)")  # fmt: skip
    for label, src in codes:
        for what, replicas in (("restart", 1), ("failover", 2)):
            if label == "baseline" and replicas > 1:
                continue
            runs = [
                scenario(src, args.pg_url, args.followers, replicas) for _ in range(args.rounds)
            ]
            total = [r[0] for r in runs]
            line = (f"{label:<10} {what:<9} SIGTERM -> all current: "
                    f"{statistics.median(total):6.2f} s ({max(total):.2f})")  # fmt: skip
            if replicas == 1:
                after = [r[1] for r in runs]
                line += (f";  back up -> all current: {statistics.median(after):5.2f} s "
                         f"({max(after):.2f})")  # fmt: skip
            print(line, flush=True)


if __name__ == "__main__":
    main()
