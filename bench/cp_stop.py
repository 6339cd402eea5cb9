"""Stopping a control-plane replica: time from SIGTERM to exit with open watch streams.

    .venv/bin/python bench/cp_stop.py [--streams 0,50,200] [--db sqlite|postgresql]
        [--pg-url URL] [--baseline-src DIR] [--rounds 3]

Runs `vpnfleet server` (the real command, its own process) on a fresh database, opens
`--streams` watch streams (raw HTTP/1.1 sockets, as followers), sends SIGTERM and measures:

- the time from SIGTERM to the process' exit;
- how each stream ended: *clean* (the chunked body's last chunk arrived: the server ended the
  stream) or *cut* (the connection closed or reset mid-body);
- the ERROR lines and tracebacks the server logged while stopping.

Baseline in the same run: `--baseline-src` is the `src/` of the code before this change
(`git archive <commit> src | tar -x -C /tmp/base`); the same runs then use it.
PostgreSQL (`--pg-url`: an account that may create databases) gets a fresh database per run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# `vpnfleet server` from the given src/ (first on the path), as the container runs it.
SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import vpnfleet
print("serving", vpnfleet.__file__, flush=True)
from vpnfleet.cli.main import app
app(sys.argv[2:], prog_name="vpnfleet")
"""


@dataclass
class Result:
    streams: int
    seconds: float
    clean: int
    cut: int
    errors: int
    tracebacks: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def follow(port: int, token: str, opened: asyncio.Event, counter: list[int]) -> str:
    """One watch stream: 'clean' if the server ended the body, 'cut' otherwise."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /api/v1/watch?since=0 HTTP/1.1\r\nHost: cp\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            return "refused"
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        counter[0] += 1
        if counter[0] == counter[1]:
            opened.set()
        while True:
            size_line = await reader.readline()
            if not size_line:
                return "cut"
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return "clean"
            await reader.readexactly(size + 2)
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return "cut"
    finally:
        writer.close()


def one_run(src: Path, url: str, streams: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="cpstop-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        log_path = data_dir / "server.log"
        env = dict(os.environ, VPNFLEET_SECRET="bench-seal-secret-Qx9LmPz4Rk8Vw2b7")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, str(src), "server", "--data-dir", str(data_dir),
                 "--database-url", url, "--listen", f"127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
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
                    raise RuntimeError(f"server did not start: {log_path.read_text()}")
                time.sleep(0.1)
            token = (data_dir / "admin-token").read_text().strip()

            async def run() -> Result:
                opened = asyncio.Event()
                counter = [0, streams]
                tasks = [
                    asyncio.create_task(follow(port, token, opened, counter))
                    for _ in range(streams)
                ]
                if streams:
                    await asyncio.wait_for(opened.wait(), 60)
                await asyncio.sleep(0.5)
                mark = len(log_path.read_text())
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                while proc.poll() is None:
                    if time.monotonic() - started > 30:
                        raise RuntimeError("the server did not exit within 30 s")
                    await asyncio.sleep(0.01)
                seconds = time.monotonic() - started
                ends = await asyncio.wait_for(asyncio.gather(*tasks), 10)
                tail = log_path.read_text()[mark:]
                return Result(
                    streams,
                    seconds,
                    ends.count("clean"),
                    ends.count("cut"),
                    sum(1 for line in tail.splitlines() if " ERROR " in line),
                    tail.count("Traceback"),
                )

            return asyncio.run(run())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fresh_pg(admin_url: str) -> tuple[str, str]:
    admin = make_url(admin_url)
    name = f"cpstop_{secrets.token_hex(4)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False), name


def drop_pg(admin_url: str, name: str) -> None:
    engine = create_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="0,50,200")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="postgresql")
    ap.add_argument("--pg-url", default=os.environ.get("VPNFLEET_TEST_PG_URL"))
    ap.add_argument("--baseline-src", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    codes = [("this code", SRC)]
    if args.baseline_src:
        codes.append(("baseline", args.baseline_src.resolve()))
    print(f"# {dt.date.today()} {platform.node()} {os.cpu_count()} CPUs, {args.db}")
    print("code       streams  SIGTERM->exit (median, max)  streams clean/cut  ERROR  tracebacks")
    for label, src in codes:
        for n in [int(x) for x in args.streams.split(",")]:
            results = []
            for _ in range(args.rounds):
                if args.db == "postgresql":
                    if not args.pg_url:
                        sys.exit("give --pg-url or VPNFLEET_TEST_PG_URL")
                    url, name = fresh_pg(args.pg_url)
                    try:
                        results.append(one_run(src, url, n))
                    finally:
                        drop_pg(args.pg_url, name)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        results.append(one_run(src, f"sqlite:///{tmp}/cp.db", n))
            secs = [r.seconds for r in results]
            print(
                f"{label:<10} {n:>7}  {statistics.median(secs):8.2f} s {max(secs):6.2f} s"
                f"            {sum(r.clean for r in results):>5}/{sum(r.cut for r in results):<5}"
                f"  {sum(r.errors for r in results):>5}  {sum(r.tracebacks for r in results):>5}"
                f"   ({args.rounds} rounds)",
                flush=True,
            )


if __name__ == "__main__":
    main()
