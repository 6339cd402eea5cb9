"""Real OpenVPN servers and clients in test namespaces, wired the way the agent runs them.

Usage::

    async with OvpnLab.create() as lab:             # namespaces vft-mg-<random>-{s,c}
        server = lab.start_server()                  # config from render_server_conf()
        mgmt = await lab.connect_mgmt()              # ManagementClient, after its greeting
        await mgmt.hold_release()
        client = lab.start_client("alice")           # profile from render_client_profile()
        event = await next_client_event(mgmt, ClientEventKind.CONNECT)
        ...
    # management sessions closed, openvpn killed, namespaces and temp files removed

Only addresses inside the two namespaces are used: the underlay 198.18.30.0/30 on a veth
pair and the tunnel pool 10.77.0.0/24.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.e2e.netns import Netns, NetnsPool, veth
from vpnfleet.agent.management import ManagementClient, ManagementError
from vpnfleet.controlplane import pki
from vpnfleet.core.mgmt_protocol import ClientEvent, ClientEventKind, Event
from vpnfleet.core.ovpn_config import render_client_profile, render_server_conf
from vpnfleet.wire import SERVER_CN_PREFIX

NS_PREFIX = "vft-mg-"
SERVER_IP = "198.18.30.1"
CLIENT_IP = "198.18.30.2"
UNDERLAY_PREFIX = 30
PORT = 1194
POOL_GATEWAY = "10.77.0.1/24"
SERVER_TUNNEL_IP = "10.77.0.1"


@dataclass
class LabPki:
    """A CA, one pod certificate and a tls-crypt key, made with our own PKI module."""

    ca: pki.KeyPair
    server: pki.KeyPair
    tls_crypt: str

    @classmethod
    def create(cls) -> LabPki:
        ca = pki.create_ca("vpnfleet test CA")
        return cls(
            ca, pki.issue_server_cert(ca, f"{SERVER_CN_PREFIX}a"), pki.generate_tls_crypt_key()
        )

    def client(self, common_name: str) -> pki.KeyPair:
        return pki.issue_client_cert(self.ca, common_name)

    def crl(self, revoked: Iterable[pki.KeyPair] = ()) -> str:
        now = dt.datetime.now(dt.UTC)
        return pki.build_crl(self.ca, [(pki.cert_info(k.cert_pem).serial, now) for k in revoked])


def write_private(path: Path, text: str) -> Path:
    """Write a file only root can read (openvpn warns about group/other-readable keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class OpenVPNProcess:
    """One openvpn process in a namespace, logging to its own file (`--log`)."""

    def __init__(self, ns: Netns, workdir: Path, name: str, config: str) -> None:
        self.ns = ns
        self.name = name
        self.config_path = write_private(workdir / f"{name}.conf", config)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OpenVPNProcess:
        self.log_path.unlink(missing_ok=True)
        # `ip netns exec` execs openvpn, so the Popen pid is openvpn's own.
        self.proc = subprocess.Popen(
            self.ns.argv("openvpn", "--config", str(self.config_path), "--log", str(self.log_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """SIGTERM (or SIGKILL when not `graceful`), SIGKILL after `timeout`; waits for exit.

        Waiting matters: an exiting openvpn unlinks its management socket path, which would
        delete the socket of a successor started at the same path too early.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    async def wait_exit(self, time_limit: float) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, time_limit, f"{self.name} to exit")
        rc = proc.poll()
        assert rc is not None
        return rc

    async def wait_log(self, pattern: str, time_limit: float) -> re.Match[str]:
        """Wait until the log matches `pattern` (a regex); fails with the log's tail."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + time_limit
        while True:
            if (m := regex.search(self.log())) is not None:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} log has no {pattern!r} after {time_limit}s; tail:\n"
                    + "\n".join(self.log().splitlines()[-25:])
                )
            await asyncio.sleep(0.1)


async def wait_until(pred: Callable[[], bool], time_limit: float, what: str) -> None:
    """Poll `pred` every 0.1 s; AssertionError naming `what` after `time_limit` s."""
    deadline = time.monotonic() + time_limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {time_limit}s waiting for {what}")
        await asyncio.sleep(0.1)


async def next_client_event(
    mgmt: ManagementClient,
    kind: ClientEventKind,
    time_limit: float = 20.0,
    cid: int | None = None,
    seen: list[Event] | None = None,
) -> ClientEvent:
    """The next ClientEvent of `kind` (and `cid`), skipping others (kept in `seen`)."""
    deadline = time.monotonic() + time_limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no >CLIENT:{kind} (cid={cid}) within {time_limit}s")
        try:
            event = await mgmt.next_event(timeout=left)
        except TimeoutError:
            continue
        if seen is not None:
            seen.append(event)
        if (
            isinstance(event, ClientEvent)
            and event.kind is kind
            and (cid is None or event.cid == cid)
        ):
            return event


async def drain_events(mgmt: ManagementClient, duration: float) -> list[Event]:
    """Everything that arrives within `duration` seconds."""
    events: list[Event] = []
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        try:
            events.append(await mgmt.next_event(timeout=left))
        except TimeoutError:
            break
    return events


# A one-connection TCP listener: prints "ready", answers "pong <peer ip>", exits.
LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
conn, peer = s.accept()
conn.sendall(f"pong {peer[0]}\n".encode())
conn.close()
"""

PROBE = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.makefile().readline().strip())
except OSError as exc:
    print("fail", type(exc).__name__)
"""


@dataclass
class OvpnLab:
    """Two namespaces (server `s`, client `c`) on a veth pair, a PKI and a temp dir."""

    pool: NetnsPool
    server_ns: Netns
    client_ns: Netns
    workdir: Path
    certs: LabPki
    processes: list[OpenVPNProcess] = field(default_factory=list)
    sessions: list[ManagementClient] = field(default_factory=list)

    @classmethod
    def create(cls) -> OvpnLab:
        pool = NetnsPool(NS_PREFIX)
        # A short /tmp path: unix socket paths are limited to 107 bytes.
        workdir = Path(tempfile.mkdtemp(prefix=NS_PREFIX))
        try:
            server_ns, client_ns = pool.create("s"), pool.create("c")
            veth(server_ns, "s0", client_ns, "c0")
            server_ns.add_addr("s0", f"{SERVER_IP}/{UNDERLAY_PREFIX}")
            client_ns.add_addr("c0", f"{CLIENT_IP}/{UNDERLAY_PREFIX}")
            return cls(pool, server_ns, client_ns, workdir, LabPki.create())
        except BaseException:
            pool.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    async def __aenter__(self) -> OvpnLab:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close sessions, stop openvpn, remove namespaces and files; never raises."""
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 5)
        for proc in self.processes:
            with contextlib.suppress(Exception):
                proc.stop(timeout=5, graceful=False)  # a graceful server exit takes ~2 s
        self.pool.close()  # also SIGKILLs anything left in the namespaces
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def mgmt_socket(self) -> Path:
        return self.workdir / "mgmt.sock"

    def server_config(self, revoked: Iterable[pki.KeyPair] = (), **overrides: object) -> str:
        """Write the server's key material and render its config with our renderer."""
        d = self.workdir
        write_private(d / "ca.crt", self.certs.ca.cert_pem)
        write_private(d / "server.crt", self.certs.server.cert_pem)
        write_private(d / "server.key", self.certs.server.key_pem)
        write_private(d / "tls-crypt.key", self.certs.tls_crypt)
        self.write_crl(revoked)
        kwargs: dict[str, object] = {
            "pool_gateway": POOL_GATEWAY,
            "management_socket": str(self.mgmt_socket),
            "ca_path": str(d / "ca.crt"),
            "cert_path": str(d / "server.crt"),
            "key_path": str(d / "server.key"),
            "tls_crypt_path": str(d / "tls-crypt.key"),
            "crl_path": str(d / "crl.pem"),
            "local": SERVER_IP,
            "port": PORT,
            "proto": "udp4",
        }
        kwargs.update(overrides)
        return render_server_conf(**kwargs)  # type: ignore[arg-type]

    def write_crl(self, revoked: Iterable[pki.KeyPair] = ()) -> None:
        """(Re)write the CRL file the server verifies against, atomically."""
        tmp = write_private(self.workdir / "crl.pem.new", self.certs.crl(revoked))
        tmp.replace(self.workdir / "crl.pem")

    def start_server(self, revoked: Iterable[pki.KeyPair] = ()) -> OpenVPNProcess:
        proc = OpenVPNProcess(self.server_ns, self.workdir, "server", self.server_config(revoked))
        self.processes.append(proc)
        return proc.start()

    def start_client(
        self, common_name: str, keypair: pki.KeyPair | None = None, extra: str = ""
    ) -> OpenVPNProcess:
        """A stock client with our profile (`extra`: more config lines appended to it)."""
        kp = keypair or self.certs.client(common_name)
        profile = render_client_profile(
            remotes=[(SERVER_IP, PORT)],
            ca_pem=self.certs.ca.cert_pem,
            cert_pem=kp.cert_pem,
            key_pem=kp.key_pem,
            tls_crypt_key=self.certs.tls_crypt,
            proto="udp4",
            server_name_prefix=SERVER_CN_PREFIX,
            name=common_name,
        )
        proc = OpenVPNProcess(
            self.client_ns, self.workdir, f"client-{common_name}", profile + extra
        )
        self.processes.append(proc)
        return proc.start()

    async def connect_mgmt(self, time_limit: float = 15.0) -> ManagementClient:
        """Connect to the server's management socket, retrying until openvpn has made it."""
        deadline = time.monotonic() + time_limit
        while True:
            try:
                session = await ManagementClient.connect(self.mgmt_socket, timeout=5)
            except ManagementError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            self.sessions.append(session)
            return session

    async def client_tunnel_ipv4(self, dev: str = "tun0") -> str | None:
        """The client's tunnel address as `a.b.c.d/len`, or None while it has none."""
        res = await self.client_ns.arun("ip", "-4", "-o", "addr", "show", "dev", dev, check=False)
        m = re.search(r"inet (\S+)", res.stdout)
        return m.group(1) if m else None

    async def probe_through_tunnel(self, port: int = 5555, wait: float = 5.0) -> str:
        """TCP from the client namespace to the server's tunnel address; returns the reply."""
        listener = self.server_ns.popen(
            sys.executable, "-c", LISTENER, SERVER_TUNNEL_IP, str(port), str(wait + 5)
        )
        try:
            assert listener.stdout is not None
            ready = await asyncio.wait_for(asyncio.to_thread(listener.stdout.readline), 10)
            assert ready.strip() == "ready", f"listener did not start: {ready!r}"
            res = await self.client_ns.arun(
                sys.executable, "-c", PROBE, SERVER_TUNNEL_IP, str(port), str(wait),
                time_limit=wait + 5,
            )  # fmt: skip
            return res.stdout.strip()
        finally:
            if listener.poll() is None:
                listener.kill()
            listener.wait(timeout=5)
