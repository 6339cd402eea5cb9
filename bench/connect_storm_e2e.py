"""Connect storm end to end: real OpenVPN 2.6, real clients, agent versus a shell hook.

    .venv/bin/python bench/connect_storm_e2e.py [--clients 100] [--rounds 2]   # as root

Two namespaces on a veth pair: a server namespace with one OpenVPN server (config from the
agent's own renderer, so ciphers, tls-crypt, keepalive and the like are identical in both
modes), and a client namespace where ``--clients`` stock ``openvpn`` clients (one certificate
per user) are started at once. Per client: from its start to its ``Initialization Sequence
Completed`` line; per storm: from the first start to the last client up. Every storm is run
over UDP and over TCP (``tcp4-server``/``tcp4-client``), in two modes:

- **agent**: the server runs with ``management-client-auth``; the agent's event path (the
  ``ManagementClient`` on the server's real management socket, ``ClientHandler``'s decision
  from the session book and the fleet view, ``client-auth`` with ``ifconfig-push``, the client
  journal and session spool, ``FirewallSync`` with real ipset/iptables) runs in its own process
  in the server namespace, as the agent runs beside OpenVPN in a pod. The control plane is not
  in the connect path (decisions come from the agent's local fleet view), so it is left out:
  sessions it would be told about are spooled.
- **hook** (the baseline, the seed's design): the same server with ``script-security 2`` and
  ``bench/client_connect.sh`` as ``client-connect``/``client-disconnect``, addresses from
  OpenVPN's ``ifconfig-pool``, a users file made from the same fleet state, one ipset per group
  and static iptables rules matching them.

After each storm it checks that every client's address is in its groups' sets (both modes),
then stops the clients and measures until the sets are empty again. Prints one line per storm
(with the number of clients that had to send PUSH_REQUEST more than once: their first one
reached the server before their authorization was decided) and JSON with every client's time;
``--show-slowest`` also prints the slowest client's log of each storm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.netns import Netns, NetnsPool, veth  # noqa: E402
from tests.e2e.ovpn_fixtures import LabPki, write_private  # noqa: E402
from vpnfleet.controlplane import pki  # noqa: E402
from vpnfleet.core.ovpn_config import render_client_profile, render_server_conf  # noqa: E402
from vpnfleet.wire import SERVER_CN_PREFIX, GroupState, RuleState, Snapshot, UserState  # noqa: E402

HOOK = ROOT / "bench" / "client_connect.sh"
NS_PREFIX = "vfb-cs-"
SERVER_IP = "198.18.31.1"
CLIENT_IP = "198.18.31.2"
PORT = 1194
NAT_POOL = ipaddress.IPv4Network("10.77.0.0/24")
GATEWAY = "10.77.0.1/24"
GROUPS = 4
HOOK_SET_PREFIX = "hk"
AGENT_PREFIX = "vpnf"
MAX_CLIENTS = 200  # the /24 pool (and the machine) bound the storm
DONE = "Initialization Sequence Completed"


# ------------------------------------------------------------------------------- fleet state


def fleet(users: int, serials: dict[str, str]) -> Snapshot:
    """``users`` users, every 10th one disabled unless it connects in the storm; each user is in
    two of the GROUPS groups; each group may reach its own /24 on tcp/443."""
    people = []
    for i in range(users):
        name = f"user{i}"
        people.append(
            UserState(
                id=i + 1,
                name=name,
                enabled=name in serials or i % 10 != 9,
                mode="nat",
                max_sessions=4,
                groups=sorted({f"g{i % GROUPS}", f"g{(i + 1) % GROUPS}"}),
                gateway_address=None,
                cert_serial=serials.get(name, str(10_000_000 + i)),
                auth="cert",
            )
        )
    groups = [GroupState(id=g + 1, name=f"g{g}") for g in range(GROUPS)]
    rules = [
        RuleState(id=g + 1, group_id=g + 1, destination=f"10.99.{g}.0/24", proto="tcp", ports="443")
        for g in range(GROUPS)
    ]
    return Snapshot(revision=1, users=people, groups=groups, rules=rules, pools=[], sessions=[],
                    pods=[])  # fmt: skip


def users_file(snap: Snapshot) -> str:
    """The hook's users file, from the same state: enabled users and their groups."""
    return "".join(f"{u.name} {' '.join(u.groups)}\n" for u in snap.users if u.enabled)


# ------------------------------------------------------------------------------- server side


def server_conf(work: Path, mode: str, proto: str) -> str:
    tcp = proto == "tcp"
    base = render_server_conf(
        pool_gateway=GATEWAY,
        management_socket=str(work / "mgmt.sock"),
        ca_path=str(work / "ca.crt"),
        cert_path=str(work / "server.crt"),
        key_path=str(work / "server.key"),
        tls_crypt_path=str(work / "tls-crypt.key"),
        local=SERVER_IP,
        port=PORT,
        proto="tcp4-server" if tcp else "udp4",
        verb=3,
    )
    if mode == "agent":
        return base
    # The hook server: the same config without the management interface, with OpenVPN's own
    # address pool and the script.
    drop = ("management", "management-client-auth", "auth-user-pass-optional", "management-hold",
            "script-security")  # fmt: skip
    lines = [ln for ln in base.splitlines() if ln.split(" ", 1)[0] not in drop]
    hosts = list(NAT_POOL.hosts())
    cmd = f"{HOOK} {work / 'users'} {HOOK_SET_PREFIX}"
    lines += [
        f"ifconfig-pool {hosts[1]} {hosts[-1]} {NAT_POOL.netmask}",
        "script-security 2",
        f'client-connect "{cmd}"',
        f'client-disconnect "{cmd}"',
    ]
    return "\n".join(lines) + "\n"


def hook_firewall(ns: Netns) -> None:
    """What a user of the hook sets up once: one hash:ip set per group, rules matching them."""
    rules = ["*filter", ":FORWARD DROP [0:0]"]
    for g in range(GROUPS):
        ns.run("ipset", "create", f"{HOOK_SET_PREFIX}-g{g}", "hash:ip")
        rules.append(
            f"-A FORWARD -i tun+ -m set --match-set {HOOK_SET_PREFIX}-g{g} src "
            f"-d 10.99.{g}.0/24 -p tcp --dport 443 -j ACCEPT"
        )
    rules.append("-A FORWARD -o tun+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    rules.append("COMMIT")
    ns.run("iptables-restore", input="\n".join(rules) + "\n")
    ns.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", str(NAT_POOL), "-j", "MASQUERADE")


def set_members(ns: Netns, mode: str) -> int:
    """Client addresses in group sets (hook: hk-gN; agent: its groups' member sets)."""
    names = ns.run("ipset", "list", "-n").stdout.split()
    if mode == "hook":
        wanted = [n for n in names if re.fullmatch(rf"{HOOK_SET_PREFIX}-g\d+", n)]
    else:
        wanted = [n for n in names if re.fullmatch(rf"{AGENT_PREFIX}-g\d+-m", n)]
    total = 0
    for name in wanted:
        out = ns.run("ipset", "list", name).stdout
        total += len(out.partition("Members:\n")[2].split())
    return total


# ------------------------------------------------------------------------------- agent process


async def agent_inner(sock: Path, snapshot: str, state: Path) -> None:
    """The agent's event path on a real OpenVPN's management socket (runs in the server ns).

    Prints ``ready`` once the server is released; runs until stdin closes; then removes its
    firewall and prints its numbers as JSON."""
    from connect_storm import AgentPath

    from vpnfleet.agent.management import ManagementClient, ManagementError
    from vpnfleet.core.fleet import FleetView

    async def connect() -> ManagementClient:
        deadline = time.monotonic() + 20
        while True:
            try:
                return await ManagementClient.connect(sock)
            except ManagementError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    view = FleetView.from_snapshot(Snapshot.model_validate_json(snapshot))
    agent = AgentPath(view, NAT_POOL, AGENT_PREFIX, state)
    mgmt = await agent.start(connect)
    await mgmt.hold_release()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    applies = await agent.stop()
    print(json.dumps({"events": agent.decisions, "firewall_applies": applies}), flush=True)


# ------------------------------------------------------------------------------- the storm


@dataclass
class Storm:
    mode: str
    proto: str
    clients: int
    per_client_ms: list[float] = field(default_factory=list)
    total_s: float = 0.0
    members: int = 0
    expected_members: int = 0
    emptied_s: float | None = None
    server_cpu_s: float = 0.0
    helper_cpu_s: float = 0.0
    slowest_log: str = ""
    push_retries: int = 0  # clients that had to send PUSH_REQUEST more than once


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid`` and its waited-for children (the hook's forks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def start_client(ns: Netns, profile: Path, timeout: float) -> tuple[float, float, str]:
    """Start one stock client; (start, up, its log up to then, each line with the ms since its
    start) with up = inf if it never came up."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *ns.argv("openvpn", "--config", str(profile)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    up = float("inf")
    try:
        async with asyncio.timeout(timeout):
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                lines.append(f"{(time.perf_counter() - started) * 1000:7.0f} {text}")
                if DONE in text:
                    up = time.perf_counter()
                    break
    except TimeoutError:
        pass
    # Keep reading (and discarding) so the client never blocks on a full pipe.
    asyncio.get_running_loop().create_task(_drain(proc))
    return started, up, "\n".join(lines)


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(Exception):
        while await proc.stdout.read(65536):
            pass


def client_pids(ns: Netns) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True,
                         timeout=10).stdout  # fmt: skip
    pids = []
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "openvpn":
                pids.append(pid)
    return pids


async def stop_clients(ns: Netns) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in client_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client_pids(ns):
            await asyncio.sleep(0.1)
        if not client_pids(ns):
            return


async def run_storm(
    server_ns: Netns, client_ns: Netns, work: Path, tag: str, profiles: list[Path], mode: str,
    proto: str, snapshot: Path, expected_members: int,
) -> Storm:  # fmt: skip
    run_dir = work / f"{tag}-{mode}-{proto}"
    run_dir.mkdir()
    storm = Storm(mode, proto, len(profiles), expected_members=expected_members)
    conf = write_private(run_dir / "server.conf", server_conf(work, mode, proto))
    log = run_dir / "server.log"
    # Started once per storm, outside the measured part: a blocking Popen is fine here.
    server = subprocess.Popen(  # noqa: ASYNC220
        server_ns.argv("openvpn", "--config", str(conf), "--log", str(log)),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    helper: subprocess.Popen[str] | None = None
    try:
        if mode == "agent":
            (run_dir / "agent").mkdir()
            helper = subprocess.Popen(  # noqa: ASYNC220
                server_ns.argv(sys.executable, __file__, "--agent-inner", str(work / "mgmt.sock"),
                               str(snapshot), str(run_dir / "agent")),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert helper.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(helper.stdout.readline), 30)
            if line.strip() != "ready":
                raise SystemExit(f"agent side did not start: {line!r}")
        deadline = time.monotonic() + 30
        while DONE not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start; see {log}:\n" + log.read_text()[-2000:])
            await asyncio.sleep(0.05)
        server_cpu0 = cpu_seconds(server.pid)
        helper_cpu0 = cpu_seconds(helper.pid) if helper else 0.0
        results = await asyncio.gather(*(start_client(client_ns, p, 120) for p in profiles))
        failed = ["\n".join(log.splitlines()[-6:]) for _, up, log in results if up == float("inf")]
        if failed:
            raise SystemExit(
                f"{len(failed)} of {len(results)} clients did not come up ({mode}, {proto});"
                f" one client's last lines:\n{failed[0]}\nserver log: {log}"
            )
        storm.per_client_ms = [(up - start) * 1000 for start, up, _ in results]
        storm.slowest_log = max(results, key=lambda r: r[1] - r[0])[2]
        storm.push_retries = sum(log.count("'PUSH_REQUEST'") > 1 for _, _, log in results)
        storm.total_s = max(up for _, up, _ in results) - min(s for s, _, _ in results)
        storm.server_cpu_s = cpu_seconds(server.pid) - server_cpu0
        if helper is not None:
            # The agent process is `ip netns exec`'s exec'd python: same pid.
            storm.helper_cpu_s = cpu_seconds(helper.pid) - helper_cpu0
        # Wait (bounded) for the agent's coalesced firewall sync to catch up.
        deadline = time.monotonic() + 10
        while True:
            storm.members = set_members(server_ns, mode)
            if storm.members >= expected_members or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if storm.members != expected_members:
            raise SystemExit(
                f"{mode}/{proto}: {storm.members} addresses in group sets, expected "
                f"{expected_members}"
            )
        stopped = time.perf_counter()
        await stop_clients(client_ns)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if set_members(server_ns, mode) == 0:
                storm.emptied_s = time.perf_counter() - stopped
                break
            await asyncio.sleep(0.05)
    finally:
        await stop_clients(client_ns)
        if helper is not None:
            with contextlib.suppress(Exception):
                out, _ = helper.communicate("", timeout=20)
                print(f"  agent side: {out.strip()}", file=sys.stderr)
            if helper.poll() is None:
                helper.kill()
                helper.wait(timeout=5)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    return storm


def make_profiles(
    work: Path, certs: LabPki, keys: dict[str, pki.KeyPair], proto: str
) -> list[Path]:
    """One client profile per user (its own certificate), as the control plane renders them."""
    out: list[Path] = []
    for name, kp in keys.items():
        text = render_client_profile(
            remotes=[(SERVER_IP, PORT)],
            ca_pem=certs.ca.cert_pem,
            cert_pem=kp.cert_pem,
            key_pem=kp.key_pem,
            tls_crypt_key=certs.tls_crypt,
            proto="udp4",
            server_name_prefix=SERVER_CN_PREFIX,
            name=name,
        )
        if proto == "tcp":
            # The same profile over TCP: explicit-exit-notify is UDP only.
            text = text.replace("proto udp4\n", "proto tcp4-client\n").replace(
                "explicit-exit-notify 1\n", ""
            )
        # All clients share one namespace, so each gets its own tun device. Their addresses
        # share the pool's subnet; nothing is sent through the tunnels, so that does not matter.
        text = text.replace("dev tun\n", f"dev tun{len(out)}\n")
        out.append(write_private(work / f"{name}-{proto}.ovpn", text))
    return out


async def main(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, ipset, iptables)")
    for tool in ("ip", "openvpn", "ipset", "iptables", "awk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing tool: {tool}")
    n = args.clients
    names = [f"user{i}" for i in range(n)]
    certs = LabPki.create()
    keys = {name: certs.client(name) for name in names}
    serials = {nm: str(pki.cert_info(kp.cert_pem).serial) for nm, kp in keys.items()}
    snap = fleet(max(args.users, n), serials)
    # Each connecting user is in two groups: 2 set entries per client in both modes.
    expected = sum(len(u.groups) for u in snap.users if u.name in serials)
    storms: list[Storm] = []
    uptimes: list[str] = []
    with NetnsPool(NS_PREFIX) as pool:
        work = Path(tempfile.mkdtemp(prefix=NS_PREFIX))
        try:
            sns, cns = pool.create("s"), pool.create("c")
            veth(sns, "s0", cns, "c0")
            sns.add_addr("s0", f"{SERVER_IP}/30")
            cns.add_addr("c0", f"{CLIENT_IP}/30")
            write_private(work / "ca.crt", certs.ca.cert_pem)
            write_private(work / "server.crt", certs.server.cert_pem)
            write_private(work / "server.key", certs.server.key_pem)
            write_private(work / "tls-crypt.key", certs.tls_crypt)
            (work / "users").write_text(users_file(snap))
            snapshot = work / "snapshot.json"
            snapshot.write_text(snap.model_dump_json())
            hook_firewall(sns)
            profiles = {p: make_profiles(work, certs, keys, p) for p in args.protos}
            for rnd in range(args.rounds):
                for proto in args.protos:
                    # Alternate which mode goes first, so drift in the machine's load is shared.
                    modes = ("hook", "agent") if rnd % 2 == 0 else ("agent", "hook")
                    for mode in modes:
                        uptimes.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
                        storm = await run_storm(sns, cns, work, f"r{rnd}", profiles[proto],
                                                mode, proto, snapshot, expected)  # fmt: skip
                        storms.append(storm)
                        print(summary(storm), flush=True)
                        if args.show_slowest:
                            print(storm.slowest_log, file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report(storms, uptimes)


def summary(s: Storm) -> str:
    emptied = f"{s.emptied_s * 1000:.0f} ms" if s.emptied_s is not None else "not within 30 s"
    return (
        f"{s.mode:5s} {s.proto}: {s.clients} clients, total {s.total_s:.2f} s, "
        f"p50 {pct(s.per_client_ms, 50):.0f} ms, p99 {pct(s.per_client_ms, 99):.0f} ms, "
        f"server CPU {s.server_cpu_s:.2f} s, agent CPU {s.helper_cpu_s:.2f} s, "
        f"set entries {s.members}/{s.expected_members}, sets empty {emptied} after stop, "
        f"{s.push_retries} clients sent PUSH_REQUEST again"
    )


def report(storms: list[Storm], uptimes: list[str]) -> None:
    print(json.dumps({
        "storms": [
            {"mode": s.mode, "proto": s.proto, "clients": s.clients, "total_s": round(s.total_s, 3),
             "p50_ms": round(pct(s.per_client_ms, 50), 1),
             "p99_ms": round(pct(s.per_client_ms, 99), 1),
             "server_cpu_s": round(s.server_cpu_s, 2), "agent_cpu_s": round(s.helper_cpu_s, 2),
             "push_retries": s.push_retries,
             "per_client_ms": [round(x) for x in sorted(s.per_client_ms)],
             "emptied_s": None if s.emptied_s is None else round(s.emptied_s, 3)}
            for s in storms
        ],
        "loadavg_before_each": uptimes,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--agent-inner":
        snap_text = Path(sys.argv[3]).read_text()
        asyncio.run(agent_inner(Path(sys.argv[2]), snap_text, Path(sys.argv[4])))
        raise SystemExit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--users", type=int, default=1000, help="users in the fleet state")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--protos", default="udp,tcp")
    ap.add_argument(
        "--show-slowest", action="store_true", help="print the slowest client's log per storm"
    )
    a = ap.parse_args()
    if not 1 <= a.clients <= MAX_CLIENTS:
        raise SystemExit(f"--clients must be 1..{MAX_CLIENTS}")
    a.protos = [p for p in a.protos.split(",") if p]
    if not a.protos or any(p not in ("udp", "tcp") for p in a.protos):
        raise SystemExit("--protos: udp, tcp or both")
    asyncio.run(main(a))
