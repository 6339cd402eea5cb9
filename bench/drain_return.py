"""Clients back after a pod goes away: a drain (SIGTERM) versus a crash (SIGKILL), real clients.

    .venv/bin/python bench/drain_return.py [--clients 30] [--pods 2] [--runs 1]   # as root

Per mode a fresh lab (``lab.runner.up``: control plane, ``--pods`` pods behind the lab's load
balancer and its endpoint follower, the backend echo service) with ``--clients`` NAT users, each
connected with the stock ``openvpn`` client and its own profile. Once every client's tunnel
reaches the backend through the pod its control-plane session names, the pod holding the most
clients goes away:

- **drain**: SIGTERM to its agent (a Kubernetes pod deletion or rollout). The agent turns
  readiness off, waits ``VPNFLEET_DRAIN_DELAY`` (1.5 s in the lab), then kicks every client with
  ``client-kill ... RESTART``; the endpoint follower has taken the pod out of the load balancer,
  so the clients' reconnects land on another pod. (It also clears the pod's UDP translations as
  soon as it sees it draining, before the kick: the pod's ``RESTART`` then reaches the clients
  from the pod's own address and they drop it; see docs/performance.md. The bench counts those
  drops per mode from the client logs.)
- **crash** (the baseline): SIGKILL to every process in the pod's namespace (agent, both
  openvpn servers): a node failure, or any deployment without a management-driven drain. The
  clients notice only through their ``ping-restart`` timeout (the pushed ``keepalive``).

For every client that was on that pod it measures, from the signal:

- **cp**: the control plane lists a live session of the user on another pod (polled every
  0.25 s through the admin API);
- **tunnel**: an HTTP request from the client's namespace through its tunnel to the backend
  succeeds and the backend sees the other pod's address (a NAT user's source), probes started
  every 0.25 s, 1 s timeout each.

Prints p50/p99/max per mode, the number of clients not back within ``--bound`` seconds, and the
ratio drain/crash of the p50s and p99s. ``--json`` also prints every client's times. Each lab is
torn down (``runner.down``) however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vpnfleet import tlspin
from vpnfleet.lab import runner
from vpnfleet.lab.runner import ECHO_PORT, LabInfo, LabUser
from vpnfleet.lab.topology import alive

CLONE_NEWNET = 0x40000000
POLL = 0.25
PROBE_TIMEOUT = 1.0
MAX_CLIENTS = 50  # the lab's limit (lab.topology.MAX_CLIENTS)
MODES = ("drain", "crash")


class NetnsSockets:
    """Sockets opened inside other network namespaces by this (asyncio) thread.

    ``setns`` changes only the calling thread's namespace and a socket stays in the namespace it
    was made in: enter, make the socket, come back, with no ``await`` in between. One process
    probes every client this way instead of one ``ip netns exec`` per probe.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._fds: dict[str, int] = {}

    def _setns(self, fd: int, what: str) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {what}: {os.strerror(err)}")

    def tcp(self, ns: str) -> socket.socket:
        if ns not in self._fds:
            self._fds[ns] = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        self._setns(self._fds[ns], f"into {ns}")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            # Coming back must not fail silently: everything after would run in the wrong place.
            self._setns(self._home, "back")
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._home)


async def backend_sees(nets: NetnsSockets, info: LabInfo, user: str) -> str | None:
    """GET / on the backend from ``user``'s namespace: the source address the backend saw, or
    None if the request did not complete within PROBE_TIMEOUT."""
    loop = asyncio.get_running_loop()
    sock = nets.tcp(info.plan.client_ns(user))
    data = b""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await loop.sock_connect(sock, (str(info.plan.svc_ip), ECHO_PORT))
            await loop.sock_sendall(
                sock, b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
            )
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
    except (OSError, TimeoutError):
        return None
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    try:
        return str(json.loads(body)["remote_addr"])
    except (ValueError, KeyError):
        return None


def api_client(info: LabInfo) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=info.url,
        headers={"Authorization": f"Bearer {info.admin_token}"},
        timeout=10,
        verify=tlspin.pinned_context(info.ca_file),
    )


async def live_sessions(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/sessions", params={"active": "true"})
    resp.raise_for_status()
    return list(resp.json())


async def ns_pids(ns: str) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", ns, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def agent_pid(info: LabInfo, pod: int) -> int:
    for pid in await ns_pids(info.plan.pod_ns(pod)):
        cmd = cmdline(pid)
        if b"agent" in cmd and any(b"vpnfleet" in part for part in cmd):
            return pid
    raise RuntimeError(f"no agent running in pod{pod}")


@dataclass
class Outcome:
    mode: str
    pod: str
    clients: int
    moved: list[str]
    cp: dict[str, float] = field(default_factory=dict)  # user -> seconds after the signal
    tunnel: dict[str, float] = field(default_factory=dict)
    connect_s: float = 0.0
    proto: dict[str, str] = field(default_factory=dict)  # how each moved client came back
    restarts: dict[str, int] = field(default_factory=dict)  # client log: restart causes
    # Moved clients whose openvpn dropped a packet from the pod's own address (no reverse NAT).
    rejected: int = 0
    agent_exit_s: float | None = None  # drain: SIGTERM to the agent's exit


async def connect_all(
    info: LabInfo, nets: NetnsSockets, api: httpx.AsyncClient, bound: float
) -> dict[str, str]:
    """Start every client, then wait until each one's tunnel reaches the backend through the pod
    its live session names. Returns user -> pod name."""
    users = [u.name for u in info.users]
    for name in users:
        await runner.start_client(info, name, wait=False)
    pod_ips = {f"pod{i}": str(info.plan.pod_ip(i)) for i in range(1, info.pods + 1)}
    deadline = time.monotonic() + bound
    pending = set(users)
    where: dict[str, str] = {}
    while time.monotonic() < deadline:
        sessions = await live_sessions(api)
        by_user: dict[str, list[str]] = {}
        for s in sessions:
            by_user.setdefault(s["user"], []).append(s["pod"])
        seen = await asyncio.gather(*(backend_sees(nets, info, u) for u in sorted(pending)))
        for user, addr in zip(sorted(pending), seen, strict=True):
            pods = by_user.get(user, [])
            if len(pods) == 1 and addr == pod_ips[pods[0]]:
                where[user] = pods[0]
                pending.discard(user)
        if not pending:
            return where
        await asyncio.sleep(0.5)
    raise RuntimeError(
        f"{len(pending)} client(s) not connected within {bound:.0f}s: {sorted(pending)[:5]}"
    )


async def kill_pod(info: LabInfo, pod: int, mode: str) -> float:
    """SIGTERM the agent (drain) or SIGKILL everything in the pod (crash); the time it was sent."""
    if mode == "drain":
        pid = await agent_pid(info, pod)
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        return sent
    pids = await ns_pids(info.plan.pod_ns(pod))
    names = sorted({comm(p) for p in pids} - {""})
    sent = time.monotonic()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    print(
        f"    crash: SIGKILL to {len(pids)} process(es) in pod{pod}: {', '.join(names)}", flush=True
    )
    return sent


async def follow_return(
    info: LabInfo,
    nets: NetnsSockets,
    api: httpx.AsyncClient,
    victim: str,
    moved: list[str],
    sent: float,
    bound: float,
    out: Outcome,
) -> None:
    """Record, per moved user, when the control plane and the tunnel show it on another pod."""
    others = {str(info.plan.pod_ip(i)) for i in range(1, info.pods + 1) if f"pod{i}" != victim}
    deadline = sent + bound

    async def watch_cp() -> None:
        while len(out.cp) < len(moved) and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                now = time.monotonic()
                for s in await live_sessions(api):
                    if s["user"] in moved and s["pod"] != victim and s["user"] not in out.cp:
                        out.cp[s["user"]] = now - sent
            await asyncio.sleep(POLL)

    async def watch_tunnel(user: str) -> None:
        probes: set[asyncio.Task[str | None]] = set()
        try:
            while user not in out.tunnel and time.monotonic() < deadline:
                probe = asyncio.create_task(backend_sees(nets, info, user))
                probes.add(probe)

                def done(task: asyncio.Task[str | None]) -> None:
                    probes.discard(task)
                    if not task.cancelled() and task.result() in others:
                        out.tunnel.setdefault(user, time.monotonic() - sent)

                probe.add_done_callback(done)
                await asyncio.sleep(POLL)
        finally:
            for probe in list(probes):
                probe.cancel()
            await asyncio.gather(*probes, return_exceptions=True)

    await asyncio.gather(watch_cp(), *(watch_tunnel(u) for u in moved))


RESTART_RE = re.compile(r"SIGUSR1\[[a-z]+,([a-z-]+)\]")
LINK_RE = re.compile(r"(UDPv4|TCPv4_CLIENT) link remote")


def client_log_summary(info: LabInfo, user: str, pod_ip: str) -> tuple[str, list[str], bool]:
    """How the client's last connection went (UDP or TCP), the restart causes it logged, and
    whether it rejected a packet coming from ``pod_ip`` itself instead of the load balancer."""
    text = (info.dir / "clients" / f"{user}.log").read_text(errors="replace")
    links = LINK_RE.findall(text)
    proto = "tcp" if links and links[-1].startswith("TCP") else "udp" if links else "?"
    rejected = f"Incoming packet rejected from [AF_INET]{pod_ip}:" in text
    return proto, RESTART_RE.findall(text), rejected


async def wait_exit(pid: int, sent: float, bound: float, out: Outcome) -> None:
    while time.monotonic() < sent + bound:
        if not alive(pid):
            out.agent_exit_s = time.monotonic() - sent
            return
        await asyncio.sleep(0.1)


async def run_mode(root: Path, mode: str, args: argparse.Namespace, logs: Path | None) -> Outcome:
    prefix = "vd" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    users = tuple(LabUser(f"u{i:02d}", "nat") for i in range(args.clients))
    nets = NetnsSockets()
    try:
        info = await runner.up(
            prefix, pods=args.pods, users=users, state_root=root, connect=False, routing="static"
        )
        async with api_client(info) as api:
            t0 = time.monotonic()
            where = await connect_all(info, nets, api, args.bound)
            connect_s = time.monotonic() - t0
            counts = {f"pod{i}": 0 for i in range(1, args.pods + 1)}
            for pod in where.values():
                counts[pod] += 1
            victim = max(counts, key=lambda p: counts[p])
            moved = sorted(u for u, p in where.items() if p == victim)
            print(
                f"  {mode}: {len(where)} clients up in {connect_s:.1f}s "
                f"({', '.join(f'{p}={n}' for p, n in counts.items())}); {victim} goes away",
                flush=True,
            )
            out = Outcome(mode, victim, len(where), moved, connect_s=connect_s)
            index = int(victim.removeprefix("pod"))
            pid = await agent_pid(info, index)
            sent = await kill_pod(info, index, mode)
            await asyncio.gather(
                follow_return(info, nets, api, victim, moved, sent, args.bound, out),
                wait_exit(pid, sent, args.bound, out),
            )
        victim_ip = str(info.plan.pod_ip(index))
        for user in moved:
            proto, causes, rejected = client_log_summary(info, user, victim_ip)
            out.proto[user] = proto
            out.rejected += rejected
            for cause in causes:
                out.restarts[cause] = out.restarts.get(cause, 0) + 1
        return out
    finally:
        nets.close()
        state = root / prefix
        if logs is not None and state.exists():
            for path in state.rglob("*.log"):
                dest = logs / f"{mode}-{prefix}" / path.relative_to(state)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
        report = await runner.down(prefix, state_root=root)
        if report.errors:
            print(f"  teardown of {prefix} reported: {report.errors}", file=sys.stderr)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(values: dict[str, float], moved: list[str]) -> dict[str, float | int | None]:
    back = [values[u] for u in moved if u in values]
    if not back:
        return {"p50": None, "p99": None, "max": None, "back": 0, "missing": len(moved)}
    return {
        "p50": pct(back, 0.5),
        "p99": pct(back, 0.99),
        "max": max(back),
        "back": len(back),
        "missing": len(moved) - len(back),
    }


def fmt(v: float | int | None) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=30, help=f"NAT users (1-{MAX_CLIENTS})")
    ap.add_argument("--pods", type=int, default=2, help="pods behind the load balancer (2-3)")
    ap.add_argument("--runs", type=int, default=1, help="drain+crash pairs (1-5)")
    ap.add_argument("--bound", type=float, default=120.0, help="seconds to wait for a client")
    ap.add_argument("--modes", default=",".join(MODES), help="drain,crash (default both)")
    ap.add_argument("--logs", type=Path, help="copy every lab's logs here before teardown")
    ap.add_argument("--json", action="store_true", help="also print every client's times")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not 1 <= args.clients <= MAX_CLIENTS:
        ap.error(f"--clients must be 1-{MAX_CLIENTS}")
    if args.pods not in (2, 3):
        ap.error("--pods must be 2 or 3")
    if not 1 <= args.runs <= 5:
        ap.error("--runs must be 1-5")
    if not 10 <= args.bound <= 600:
        ap.error("--bound must be 10-600 seconds")
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated subset of {','.join(MODES)}")
    # SIGTERM (timeout(1), a CI runner) and SIGINT cancel the run: the labs' finally blocks
    # still tear everything down.
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    print(f"load before: {load()}", flush=True)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="vpnfleet-drain-") as tmp:
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}", flush=True)
            for mode in modes:
                outcomes.append(await run_mode(Path(tmp), mode, args, args.logs))
                print(f"  load: {load()}", flush=True)
    print(
        f"\nclients back after a pod goes away: {args.clients} NAT users, {args.pods} pods, "
        f"seconds from the signal, not back within {args.bound:.0f}s counted as missing"
    )
    print(
        "  mode   run moved |     cp: p50    p99    max miss |"
        " tunnel: p50    p99    max miss | client logs"
    )
    agg: dict[str, dict[str, list[float]]] = {m: {"cp": [], "tunnel": []} for m in modes}
    for i, o in enumerate(outcomes):
        cp, tun = stats(o.cp, o.moved), stats(o.tunnel, o.moved)
        protos = {p: list(o.proto.values()).count(p) for p in sorted(set(o.proto.values()))}
        print(
            f"  {o.mode:6s} {i // len(modes) + 1:3d} {len(o.moved):5d} | "
            f"{fmt(cp['p50'])} {fmt(cp['p99'])} {fmt(cp['max'])} {cp['missing']:4d} | "
            f"{fmt(tun['p50'])} {fmt(tun['p99'])} {fmt(tun['max'])} {tun['missing']:4d} | "
            f"{protos} restarts {o.restarts} rejected-from-pod {o.rejected} agent-exit "
            f"{fmt(o.agent_exit_s).strip()}s"
        )
        agg[o.mode]["cp"] += list(o.cp.values())
        agg[o.mode]["tunnel"] += list(o.tunnel.values())
    if set(modes) == set(MODES):
        for what in ("cp", "tunnel"):
            d, c = agg["drain"][what], agg["crash"][what]
            if d and c:
                print(
                    f"  {what:6s} drain/crash, all runs pooled: p50 {pct(d, 0.5) / pct(c, 0.5):.3f}"
                    f"  p99 {pct(d, 0.99) / pct(c, 0.99):.3f}"
                )
    print(f"load after: {load()}")
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes], indent=1))


if __name__ == "__main__":
    if sys.platform != "linux":
        raise SystemExit("Linux only (network namespaces)")
    if os.geteuid() != 0:
        raise SystemExit("run as root (it builds network namespaces)")
    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        raise SystemExit("interrupted; the labs were torn down") from None
