"""Connect storm through the management interface, versus a fork-per-client script.

    sudo .venv/bin/python bench/connect_storm.py [--cycles 20000] [--window 64]

The agent side is the real agent event path (session book decision, client-auth, client
journal and session spool, coalesced firewall updates with real ipset/iptables) inside a private
network namespace.
The load generator is a fake OpenVPN *management server* speaking the real protocol on a
unix socket: it sends CONNECT/ENV blocks (up to --window outstanding, as when many clients
connect at once), answers SUCCESS to client-auth, then sends ESTABLISHED and DISCONNECT.
Latency is measured from writing a CONNECT to reading its client-auth.

Baselines, run as OpenVPN runs a client-connect script (one fork+exec per client, the server
waiting for each), from the same state:

- python: bench/client_connect_hook.py, the same decision code as the agent;
- shell: bench/client_connect.sh, the seed's design: a POSIX sh hook that looks the user up in
  a users file and `ipset add`s the client's address to one set per group (real ipset, in the
  same private namespace). bench/connect_storm_e2e.py runs it under real OpenVPN.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USERS = 1000
GROUPS = 4
HOOK = ROOT / "bench" / "client_connect.sh"


def user_groups(i: int) -> list[str]:
    """Every user is in two of the GROUPS groups (each group may reach its own /24)."""
    return sorted({f"g{i % GROUPS}", f"g{(i + 1) % GROUPS}"})


def snapshot_json() -> str:
    from vpnfleet.wire import GroupState, RuleState, Snapshot, UserState

    users = [
        UserState(
            id=i,
            name=f"user{i}",
            enabled=True,
            mode="nat",
            max_sessions=4,
            groups=user_groups(i),
            gateway_address=None,
            cert_serial=str(1000 + i),
            auth="cert",
        )
        for i in range(USERS)
    ]
    groups = [GroupState(id=g + 1, name=f"g{g}") for g in range(GROUPS)]
    rules = [
        RuleState(id=g + 1, group_id=g + 1, destination=f"10.99.{g}.0/24", proto="tcp", ports="443")
        for g in range(GROUPS)
    ]
    return Snapshot(
        revision=1, users=users, groups=groups, rules=rules, pools=[], sessions=[], pods=[]
    ).model_dump_json()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class FakeOpenVPN:
    """The load generator: the server side of a management session."""

    def __init__(self, cycles: int, window: int) -> None:
        self.cycles = cycles
        self.window = window
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.denied = 0
        self.done = asyncio.Event()
        self.slots = asyncio.Semaphore(window)
        self.started = 0.0
        self.finished = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n"
        )
        await writer.drain()
        sender = asyncio.create_task(self.send_connects(writer))
        answered = 0
        while answered < self.cycles:
            line = (await reader.readline()).decode().strip()
            if not line:
                if reader.at_eof():
                    break
                continue
            if line.startswith("client-auth ") or line.startswith("client-deny "):
                parts = line.split()
                cid = int(parts[1])
                if line.startswith("client-auth "):
                    while (await reader.readline()).decode().strip() != "END":
                        pass
                    ok = True
                else:
                    ok = False
                now = time.perf_counter()
                self.latencies.append(now - self.sent.pop(cid))
                writer.write(f"SUCCESS: {parts[0]} command succeeded\r\n".encode())
                if ok:
                    writer.write(f">CLIENT:ESTABLISHED,{cid}\r\n{self.env(cid)}".encode())
                    writer.write(
                        f">CLIENT:DISCONNECT,{cid}\r\n>CLIENT:ENV,common_name=user{cid % USERS}\r\n"
                        ">CLIENT:ENV,bytes_received=1000\r\n>CLIENT:ENV,bytes_sent=2000\r\n"
                        ">CLIENT:ENV,END\r\n".encode()
                    )
                else:
                    self.denied += 1
                self.slots.release()
                answered += 1
            else:
                # status 3 / hold release / anything else the agent may ask
                writer.write(
                    b"SUCCESS: ok\r\n"
                    if not line.startswith("status")
                    else b"TITLE\tOpenVPN\r\nHEADER\tCLIENT_LIST\tCommon Name\tReal Address\t"
                    b"Virtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\t"
                    b"Connected Since\tConnected Since (time_t)\tUsername\tClient ID\t"
                    b"Peer ID\tData Channel Cipher\r\nEND\r\n"
                )
            await writer.drain()
        self.finished = time.perf_counter()
        sender.cancel()
        self.done.set()

    @staticmethod
    def env(cid: int) -> str:
        return (
            f">CLIENT:ENV,common_name=user{cid % USERS}\r\n"
            f">CLIENT:ENV,tls_serial_0={1000 + cid % USERS}\r\n"
            f">CLIENT:ENV,untrusted_ip=198.51.100.{cid % 200 + 1}\r\n"
            f">CLIENT:ENV,untrusted_port={1024 + cid % 60000}\r\n"
            ">CLIENT:ENV,END\r\n"
        )

    async def send_connects(self, writer: asyncio.StreamWriter) -> None:
        self.started = time.perf_counter()
        for cid in range(self.cycles):
            await self.slots.acquire()
            self.sent[cid] = time.perf_counter()
            writer.write(f">CLIENT:CONNECT,{cid},0\r\n{self.env(cid)}".encode())
            await writer.drain()


class AgentPath:
    """The agent's event path as PodAgent wires it for one server: the session book, the
    client handler (decisions, ``client-auth``, journal, session spool) and the firewall sync
    with real ipset/iptables in this namespace. Shared by this bench and connect_storm_e2e.py.
    """

    def __init__(self, view: Any, nat: ipaddress.IPv4Network, prefix: str, state: Path) -> None:
        from vpnfleet.agent.cpclient import ControlPlane
        from vpnfleet.agent.dataplane import Dataplane
        from vpnfleet.agent.firewall import FirewallSync
        from vpnfleet.agent.sessionship import SessionShipper
        from vpnfleet.agent.spool import Spool
        from vpnfleet.core.fwdesired import DesiredStateBuilder
        from vpnfleet.core.sessionbook import BookConfig, SessionBook

        self.view = view
        self.book = SessionBook(BookConfig(nat_pool=nat))
        self.state = state
        self.spool = Spool(state, "sessions")
        self.shipper = SessionShipper(self.spool, ControlPlane("http://127.0.0.1:9", "x"), "bench")
        self.dataplane = Dataplane(prefix)
        builder = DesiredStateBuilder(prefix, (nat,), nflog_group=7007)
        self.firewall = FirewallSync(
            self.dataplane, lambda: (view.revision, builder.build(view, self.book))
        )
        self.decisions = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, connect: Callable[[], Awaitable[Any]]) -> Any:
        """Set the sysctls, attach to the management socket (``connect()``), start the
        firewall and the event loop; returns the management client."""
        from vpnfleet.agent.clientjournal import ClientJournal
        from vpnfleet.agent.clients import ClientHandler
        from vpnfleet.core.mgmt_protocol import ClientEvent

        await self.dataplane.ensure_sysctls()
        self.mgmt = mgmt = await connect()
        self.handler = ClientHandler(
            self.book,
            ClientJournal(self.state / "clients.journal"),
            self.shipper,
            pod="bench",
            view=lambda: self.view,
            mgmt=lambda _server: mgmt,
            changed=self.firewall.poke,
        )
        self.firewall.start()

        async def events() -> None:
            async for event in mgmt.events():
                if isinstance(event, ClientEvent):
                    await self.handler.on_event(event)
                    self.decisions += 1

        self._tasks = [asyncio.create_task(self.firewall.run()), asyncio.create_task(events())]
        return mgmt

    async def stop(self) -> int:
        """Detach, remove the firewall; returns how many times it was applied."""
        await self.mgmt.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dataplane.remove_all()
        self.handler.close()
        self.spool.close()
        stats = self.dataplane.stats
        return stats.full_applies + stats.diff_applies


def summary(cycles: int, elapsed: float, lat_ms: list[float]) -> dict[str, float]:
    return {
        "cycles": cycles,
        "seconds": elapsed,
        "decisions_per_s": cycles / elapsed,
        "p50_ms": pct(lat_ms, 50),
        "p99_ms": pct(lat_ms, 99),
    }


async def run_agent_side(cycles: int, window: int, workdir: Path) -> dict[str, float]:
    """The agent's own event path: supervisor-style event loop -> ClientHandler (session book
    decision, client-auth, journal, session spool) -> FirewallSync (real ipset/iptables)."""
    from vpnfleet.agent.management import ManagementClient
    from vpnfleet.core.fleet import FleetView
    from vpnfleet.wire import Snapshot

    sock = workdir / "mgmt.sock"
    fake = FakeOpenVPN(cycles, window)
    server = await asyncio.start_unix_server(fake.handle, path=str(sock))
    state = workdir / "agent"
    state.mkdir()
    view = FleetView.from_snapshot(Snapshot.model_validate_json(snapshot_json()))
    agent = AgentPath(view, ipaddress.IPv4Network("10.200.0.0/16"), "vpnf", state)
    await agent.start(lambda: ManagementClient.connect(sock))
    await asyncio.wait_for(fake.done.wait(), timeout=600)
    elapsed = fake.finished - fake.started
    applies = await agent.stop()
    server.close()
    lat = [x * 1000 for x in fake.latencies]
    return {
        **summary(cycles, elapsed, lat),
        "window": window,
        "denied": fake.denied,
        "firewall_applies": applies,
    }


def run_baseline(cycles: int, workdir: Path) -> dict[str, float]:
    snap = workdir / "snapshot.json"
    snap.write_text(snapshot_json())
    hook = ROOT / "bench" / "client_connect_hook.py"
    lat: list[float] = []
    started = time.perf_counter()
    for cid in range(cycles):
        env = dict(
            os.environ,
            VPNFLEET_BENCH_SNAPSHOT=str(snap),
            common_name=f"user{cid % USERS}",
            tls_serial_0=str(1000 + cid % USERS),
            untrusted_ip="198.51.100.1",
            untrusted_port=str(1024 + cid),
        )
        t0 = time.perf_counter()
        rc = subprocess.run(
            [sys.executable, str(hook), str(workdir / "ccd")], env=env, check=False
        ).returncode
        lat.append((time.perf_counter() - t0) * 1000)
        if rc not in (0, 1):
            raise SystemExit(f"hook failed with exit code {rc}")
    return summary(cycles, time.perf_counter() - started, lat)


def run_shell_baseline(cycles: int, workdir: Path) -> dict[str, float]:
    """The shell hook per CONNECT, sequentially, with real ipset sets (hk-gN) in this namespace."""
    users = workdir / "users"
    users.write_text("".join(f"user{i} {' '.join(user_groups(i))}\n" for i in range(USERS)))
    for g in range(GROUPS):
        subprocess.run(["ipset", "create", f"hk-g{g}", "hash:ip"], check=True)
    conf = workdir / "ccd.tmp"
    lat: list[float] = []
    pool = list(ipaddress.IPv4Network("10.77.0.0/16").hosts())[1:]
    started = time.perf_counter()
    for cid in range(cycles):
        env = {
            "script_type": "client-connect",
            "common_name": f"user{cid % USERS}",
            "ifconfig_pool_remote_ip": str(pool[cid % len(pool)]),
        }
        t0 = time.perf_counter()
        rc = subprocess.run(
            [str(HOOK), str(users), "hk", str(conf)], env=env, check=False
        ).returncode
        lat.append((time.perf_counter() - t0) * 1000)
        if rc != 0:
            raise SystemExit(f"shell hook failed with exit code {rc}")
    elapsed = time.perf_counter() - started
    entries = 0
    for g in range(GROUPS):
        out = subprocess.run(
            ["ipset", "list", f"hk-g{g}"], capture_output=True, text=True, check=True
        ).stdout
        entries += len(out.partition("Members:\n")[2].split())
        subprocess.run(["ipset", "destroy", f"hk-g{g}"], check=True)
    if entries != 2 * min(cycles, len(pool)):
        raise SystemExit(f"shell hook: {entries} set entries, expected {2 * cycles}")
    return summary(cycles, elapsed, lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--baseline-cycles", type=int, default=200)
    ap.add_argument(
        "--baseline",
        choices=("python", "shell", "both"),
        default="both",
        help="which fork-per-client baseline(s) to run beside the agent",
    )
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inner:
        # A private network namespace: the firewall the agent programs vanishes with it.
        cmd = [
            "unshare",
            "--net",
            sys.executable,
            __file__,
            "--inner",
            "--cycles",
            str(args.cycles),
            "--window",
            str(args.window),
            "--baseline-cycles",
            str(args.baseline_cycles),
            "--baseline",
            args.baseline,
        ]
        raise SystemExit(subprocess.run(cmd, check=False).returncode)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        agent = asyncio.run(run_agent_side(args.cycles, args.window, work))
        bases: dict[str, dict[str, float]] = {}
        if args.baseline in ("python", "both"):
            bases["python_script"] = run_baseline(args.baseline_cycles, work)
        if args.baseline in ("shell", "both"):
            bases["shell_hook"] = run_shell_baseline(args.baseline_cycles, work)
    ratios = {k: agent["decisions_per_s"] / b["decisions_per_s"] for k, b in bases.items()}
    print(json.dumps({"agent": agent, **bases, "speedup": ratios}, indent=2))
    line = (
        f"agent: {agent['decisions_per_s']:.0f} decisions/s, p50 {agent['p50_ms']:.2f} ms, "
        f"p99 {agent['p99_ms']:.2f} ms"
    )
    for k, b in bases.items():
        line += (
            f" | {k}: {b['decisions_per_s']:.1f}/s, p50 {b['p50_ms']:.1f} ms, "
            f"p99 {b['p99_ms']:.1f} ms, agent {ratios[k]:.0f}x"
        )
    print(line)


if __name__ == "__main__":
    main()
