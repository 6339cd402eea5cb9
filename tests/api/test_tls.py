"""HTTPS between the control plane and its clients, with a real uvicorn on loopback.

The CLI and the agent pin the control plane's own CA; a certificate from the fleet CA (which
signs every pod's certificate) does not pass for the control plane; the local admin token file
is never sent to another URL.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.controlplane import pki
from vpnfleet.tokenbinding import ADMIN_TOKEN_FILE
from vpnfleet.wire import Heartbeat

VPNFLEET = [sys.executable, "-m", "vpnfleet.cli.main"]
SVC = "vpnfleet-controlplane.vpnfleet.svc"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """TLS and the token binding do not depend on the database: SQLite only here."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@dataclass
class TLSServer:
    url: str
    port: int
    data_dir: Path
    ca_file: Path
    admin_token: str
    stop: Callable[[], float]  # as on SIGTERM; the seconds until the server had stopped


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSServer]:
    """`vpnfleet server --tls-self-signed SVC` as the server command runs it (SQLite)."""
    from vpnfleet.controlplane.app import create_app, prepare
    from vpnfleet.controlplane.serving import ControlPlaneServer, server_config
    from vpnfleet.controlplane.settings import ServerSettings

    port = free_port()
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        listen=f"127.0.0.1:{port}",
        secret="test-seal-secret-Qx9LmPz4Rk8Vw2b7",
        tls_self_signed=[SVC],
    )
    settings.validate()
    state = prepare(settings)
    assert state.tls is not None and state.tls.ca_file is not None
    srv = ControlPlaneServer(server_config(create_app(settings, state), settings, state),
                             state.hub, state.bell)  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("control plane did not start")
        time.sleep(0.05)
    token = (settings.data_dir / ADMIN_TOKEN_FILE).read_text().strip()

    def stop() -> float:
        started = time.monotonic()
        srv.should_exit = True
        thread.join(timeout=15)
        return time.monotonic() - started

    try:
        yield TLSServer(
            f"https://127.0.0.1:{port}", port, settings.data_dir, state.tls.ca_file, token, stop
        )
    finally:
        stop()


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    base.update(COLUMNS="200", VPNFLEET_CONFIG="/nonexistent/config.toml", **env)
    return subprocess.run([*VPNFLEET, *args], capture_output=True, text=True, env=base, timeout=60)


def test_cli_with_the_pinned_ca(tls_server: TLSServer) -> None:
    proc = cli(
        "--url",
        tls_server.url,
        "--ca-file",
        str(tls_server.ca_file),
        "user",
        "add",
        "alice",
        VPNFLEET_TOKEN=tls_server.admin_token,
    )
    assert proc.returncode == 0, proc.stderr
    proc = cli(
        "user",
        "list",
        VPNFLEET_URL=tls_server.url,
        VPNFLEET_CA_FILE=str(tls_server.ca_file),
        VPNFLEET_TOKEN=tls_server.admin_token,
    )
    assert proc.returncode == 0 and "alice" in proc.stdout, proc.stderr


def test_local_token_file_brings_its_url_and_ca(tls_server: TLSServer) -> None:
    """On the server's host the CLI needs nothing but the URL: the binding record names the CA."""
    proc = cli(
        "user",
        "list",
        "--json",
        VPNFLEET_URL=tls_server.url,
        VPNFLEET_DATA_DIR=str(tls_server.data_dir),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("[")


def test_cli_without_or_with_the_wrong_ca_is_refused(tls_server: TLSServer, tmp_path: Path) -> None:
    token = {"VPNFLEET_TOKEN": tls_server.admin_token}
    proc = cli("--url", tls_server.url, "user", "list", **token)
    assert proc.returncode == 1
    assert (
        f"the TLS certificate of {tls_server.url} failed the check against the default"
        in proc.stderr
    )
    assert "unable to get local issuer certificate" in proc.stderr
    assert "Traceback" not in proc.stderr
    other = tmp_path / "other-ca.pem"
    other.write_text(pki.create_ca("vpnfleet control plane CA").cert_pem)  # same name, other key
    proc = cli("--url", tls_server.url, "--ca-file", str(other), "user", "list", **token)
    assert proc.returncode == 1
    assert f"failed the check against the CA in {other}" in proc.stderr
    proc = cli(
        "--url", tls_server.url, "--ca-file", str(tmp_path / "nope.pem"), "user", "list", **token
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_plain_http_to_the_https_port_is_explained(tls_server: TLSServer) -> None:
    url = f"http://127.0.0.1:{tls_server.port}"
    proc = cli("--url", url, "user", "list", VPNFLEET_TOKEN=tls_server.admin_token)
    assert proc.returncode == 1
    assert "use an https:// URL" in proc.stderr, proc.stderr


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_server_refuses_tls_below_1_2(tls_server: TLSServer) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(tls_server.ca_file)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=ctx) as http:
        http.get(f"{tls_server.url}/healthz")
    with httpx.Client(verify=servertls_ctx(tls_server.ca_file)) as http:
        assert http.get(f"{tls_server.url}/healthz").status_code == 200


def servertls_ctx(ca_file: Path) -> ssl.SSLContext:
    from vpnfleet.tlspin import pinned_context

    return pinned_context(ca_file)


def pod_credential(tls_server: TLSServer, name: str) -> str:
    """Pod `name`'s own credential, enrolled with a new enrollment token."""
    with httpx.Client(
        base_url=tls_server.url,
        verify=servertls_ctx(tls_server.ca_file),
        headers={"Authorization": f"Bearer {tls_server.admin_token}"},
    ) as admin:
        resp = admin.post("/api/v1/tokens", json={"name": f"enroll-{name}", "role": "agent"})
        enrollment = resp.json()["token"]
        resp = admin.post(
            "/api/v1/agent/enroll",
            json={"name": name},
            headers={"Authorization": f"Bearer {enrollment}"},
        )
        resp.raise_for_status()
        return str(resp.json()["token"])


def established_ports(port: int) -> set[str]:
    """The local ports of this machine's established TCP connections to `port` (ss)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split()[2].rsplit(":", 1)[1] for line in out.splitlines() if line.strip()}


def test_an_agent_keeps_one_connection_from_heartbeat_to_heartbeat(tls_server: TLSServer) -> None:
    """Agents heartbeat every 5 s, and uvicorn and httpx both drop an idle connection after
    5 s by default: every heartbeat of every pod paid a new TLS handshake, or was sent on a
    connection the server was closing (a failed request, retried a tick later)."""
    token = pod_credential(tls_server, "pod-ka")
    beat = Heartbeat(name="pod-ka", applied_revision=0, ready=False)

    async def two_heartbeats() -> tuple[set[str], set[str]]:
        cp = ControlPlane(tls_server.url, token, ca_file=tls_server.ca_file)
        try:
            await cp.heartbeat(beat)
            first = established_ports(tls_server.port)
            await asyncio.sleep(6.5)  # the agent's 5 s interval, and more
            await cp.heartbeat(beat)
            return first, established_ports(tls_server.port)
        finally:
            await cp.close()

    first, second = asyncio.run(two_heartbeats())
    assert len(first) == 1 and second == first, (first, second)


def test_agent_client_pins_the_ca(tls_server: TLSServer, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_text(pki.create_ca().cert_pem)

    agent_token = pod_credential(tls_server, "pod-tls")  # the pod's own credential reads the CRL

    async def crl(ca_file: Path) -> str:
        cp = ControlPlane(tls_server.url, agent_token, ca_file=ca_file)
        try:
            return await cp.crl()
        finally:
            await cp.close()

    assert asyncio.run(crl(tls_server.ca_file)).startswith("-----BEGIN X509 CRL-----")
    with pytest.raises(ControlPlaneError, match="unable to get local issuer certificate") as err:
        asyncio.run(crl(other))
    assert err.value.retryable and str(other) in str(err.value)


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[str, list[str | None]]]:
    """A plain HTTP server on loopback that records the Authorization header it receives."""
    handler = type("Recorder", (_Recorder,), {"seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("how", ["data-dir", "token-file"])
def test_file_token_is_not_sent_to_another_url(
    server: Server, recorder: tuple[str, list[str | None]], how: str
) -> None:
    url, seen = recorder
    token_file = server.data_dir / ADMIN_TOKEN_FILE
    env = (
        {"VPNFLEET_DATA_DIR": str(server.data_dir)}
        if how == "data-dir"
        else {"VPNFLEET_TOKEN_FILE": str(token_file)}
    )
    # The token works at the URL it was created for...
    proc = cli("user", "list", "--json", VPNFLEET_URL=server.url, **env)
    assert proc.returncode == 0, proc.stderr
    # ...and is not sent anywhere else: no request reaches the other server at all.
    proc = cli("user", "list", VPNFLEET_URL=url, **env)
    assert proc.returncode == 1
    assert f"was created for {server.url}" in proc.stderr and f"not {url}" in proc.stderr
    assert "pass --token or set VPNFLEET_TOKEN" in proc.stderr
    assert seen == []
    # Given explicitly, a token goes where the user says (the recorder can see it).
    proc = cli("user", "list", VPNFLEET_URL=url, VPNFLEET_TOKEN="vpf_explicit")
    assert proc.returncode == 0, proc.stderr
    assert seen == ["Bearer vpf_explicit"]


@pytest.fixture
def https_with(tmp_path: Path) -> Iterator[object]:
    """Start a loopback HTTPS server presenting a given certificate; yields a starter."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(pair: pki.KeyPair) -> int:
        (tmp_path / "pod.pem").write_text(pair.cert_pem)
        (tmp_path / "pod.key").write_text(pair.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "pod.pem", tmp_path / "pod.key")
        handler = type("Recorder", (_Recorder,), {"seen": []})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return int(httpd.server_address[1])

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_pod_certificate_does_not_pass_for_the_control_plane(
    tls_server: TLSServer, https_with: object, tmp_path: Path
) -> None:
    """The fleet CA signs every pod's server certificate (its DNS name is the pod name). Such a
    certificate is refused by the hostname check where the fleet CA is trusted, and by the CA
    check where clients pin the control-plane CA, even for a pod named like the control plane."""
    from vpnfleet.controlplane import certs, db
    from vpnfleet.controlplane.pki import Sealer

    engine = db.make_engine(f"sqlite:///{tls_server.data_dir / 'vpnfleet.db'}")
    with db.session_factory(engine)() as session:
        fleet_ca = certs.load_ca(session, Sealer("test-seal-secret-Qx9LmPz4Rk8Vw2b7"))
    engine.dispose()
    fleet_ca_file = tmp_path / "fleet-ca.pem"
    fleet_ca_file.write_text(fleet_ca.cert_pem)
    start = https_with  # type: ignore[assignment]
    token = {"VPNFLEET_TOKEN": "vpf_should_not_matter"}

    pod_port = start(pki.issue_server_cert(fleet_ca, "pod1"))  # type: ignore[operator]
    proc = cli(
        "--url",
        f"https://localhost:{pod_port}",
        "--ca-file",
        str(fleet_ca_file),
        "user",
        "list",
        **token,
    )
    assert proc.returncode == 1
    assert "Hostname mismatch, certificate is not valid for 'localhost'" in proc.stderr
    assert "use a host name the certificate carries" in proc.stderr

    # A pod registered under a name the control plane answers to ("localhost" here) gets a
    # fleet-signed certificate for it; the control-plane CA never signed it.
    impostor = start(pki.issue_server_cert(fleet_ca, "localhost"))  # type: ignore[operator]
    url = f"https://localhost:{impostor}"
    proc = cli("--url", url, "--ca-file", str(tls_server.ca_file), "user", "list", **token)
    assert proc.returncode == 1
    assert f"the TLS certificate of {url} failed the check against the CA in" in proc.stderr
    assert "unable to get local issuer certificate" in proc.stderr


def test_a_connection_still_in_its_handshake_when_a_stop_begins_does_not_hold_it(
    tls_server: TLSServer,
) -> None:
    """A connection accepted just before a SIGTERM whose TLS handshake ends after it (a
    rolling restart while agents reconnect) used to be missed by the stop's one round of
    "close once answered": it was answered, stayed open for keep-alive, and the stop waited
    the full grace (a 5.3 s stop in a CI run). Now it is told too once its request has begun:
    its request is answered, its connection then closed, and the stop lasts only as long as
    the request really in flight."""
    ctx = ssl.create_default_context(cafile=str(tls_server.ca_file))
    body = json.dumps({"name": "slowpoke"}).encode()
    # In flight when the stop begins: its body arrives in two parts, 1.5 s apart.
    slow = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", tls_server.port), timeout=10),
        server_hostname="127.0.0.1",
    )
    late = socket.create_connection(("127.0.0.1", tls_server.port), timeout=10)
    took: list[float] = []
    stopping = threading.Thread(target=lambda: took.append(tls_server.stop()))
    try:
        slow.sendall(
            b"POST /api/v1/users HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {tls_server.admin_token}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        time.sleep(0.3)  # both accepted; the late one's handshake waits for us
        stopping.start()
        time.sleep(0.5)  # the stop has begun (uvicorn looks for it every 0.1 s)
        late_answer = b""
        with ctx.wrap_socket(late, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            while chunk := tls.recv(4096):
                late_answer += chunk  # until the server closes it
        time.sleep(1.0)
        slow.sendall(body[5:])
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
        slow.close()  # as a client does on "connection: close"
        stopping.join(timeout=15)
    finally:
        slow.close()
        late.close()
    # The request in flight was answered in full (and its connection closed), and the stop
    # waited for it only: about 1.5 s, not the 5 s grace.
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    # The late request was answered, and the server closed that connection (the read above
    # ended).
    assert late_answer.startswith(b"HTTP/1.1 200"), late_answer[:200]
    assert took and took[0] < 3.0, took
