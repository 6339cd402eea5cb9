"""The lab's processes: control plane, agents, backend services and VPN clients.

`up()` builds the network (lab.topology), then starts, in their namespaces: the control plane,
the backend echo service, the way gateway users are routed (``routing="bgp"``: a BIRD router
namespace the pods' own BIRDs announce to, lab/bgprouter.py; ``"static"``: a gateway-route
follower in the service network), one agent per pod, and one stock `openvpn` client per lab
user with the profile `vpnfleet user profile` produces. Everything it starts runs in a lab
namespace, so `down()` (topology.teardown) stops all of it, BIRDs included, also after a failed
`up()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vpnfleet import tlspin
from vpnfleet.core import netparse
from vpnfleet.lab import bgprouter, nginx, topology
from vpnfleet.lab.topology import LabPlan

log = logging.getLogger("vpnfleet.lab")

# Root-owned state of labs; override with VPNFLEET_LAB_DIR.
DEFAULT_STATE_ROOT = Path(os.environ.get("VPNFLEET_LAB_DIR", "/var/lib/vpnfleet-lab"))
ECHO_PORT = 8080
ECHO_UDP_PORT = 8081
ECHO_PORT_2 = 9090  # a second service, for permission tests
LAB_GROUP = "lab"
AGENT_HTTP_PORT = 9176
# The lab's agents serve per-user metrics on the pod network behind a bearer token (the file
# below), so a Prometheus in the lab can scrape them as a deployment would.
AGENT_USER_METRICS_PORT = 9177
METRICS_TOKEN_FILE = "metrics-token"  # noqa: S105 - a file name
CP_PORT = 8000
ROUTING = ("bgp", "static")
DEFAULT_BGP_HOLD_TIME = 9


class LabRunError(RuntimeError):
    """The lab could not be brought up or driven; the message says what to do."""


@dataclass(frozen=True)
class LabUser:
    name: str
    mode: str
    # Lab users join the "lab" group, which may reach the whole cluster network; tests that
    # exercise permissions create users outside it.
    lab_access: bool = True
    # False: only the user's client namespace; the user comes into the control plane some
    # other way (a directory sync) and the test writes clients/NAME.ovpn itself.
    create: bool = True

    @classmethod
    def parse(cls, text: str) -> LabUser:
        """`NAME[:MODE]`, mode nat (default) or gateway."""
        name, _, mode = text.partition(":")
        topology.validate_client_name(name)
        netparse.validate_name(name, "user name")
        return cls(name, netparse.parse_mode(mode or "nat"))


DEFAULT_USERS = (LabUser("alice", "nat"), LabUser("bob", "nat"), LabUser("gary", "gateway"))


@dataclass
class LabInfo:
    """What `lab up` made; saved as lab.json so later commands find it."""

    prefix: str
    pods: int
    users: list[LabUser]
    state_dir: str
    url: str
    agent_url: str
    service: str
    vpn_endpoint: str
    started_at: float = field(default_factory=time.time)
    # The real nginx backend (lab/nginx.py), None if nginx is not installed.
    web: str | None = None
    # How the backend reaches gateway users: "bgp" (through the router namespace) or
    # "static" (gateway-routes in the service namespace).
    routing: str = "bgp"
    bgp_hold_time: int = DEFAULT_BGP_HOLD_TIME

    @property
    def web_access_log(self) -> Path:
        """nginx's access log, in the vpnfleet log_format (for `audit annotate`)."""
        return self.dir / "nginx" / "access.log"

    @property
    def plan(self) -> LabPlan:
        return LabPlan(prefix=self.prefix, pods=self.pods, clients=[u.name for u in self.users])

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    @property
    def router_dir(self) -> Path:
        """The lab router's BIRD files (configuration, control socket, log)."""
        return self.dir / "router"

    @property
    def ca_file(self) -> Path:
        """The control plane's own CA (made at its first start): what agents and the CLI pin."""
        return self.dir / "cp" / "tls" / "ca.pem"

    @property
    def admin_token(self) -> str:
        return (self.dir / "cp" / "admin-token").read_text().strip()

    def save(self) -> None:
        data = asdict(self)
        (self.dir / "lab.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, prefix: str, root: Path = DEFAULT_STATE_ROOT) -> LabInfo:
        path = root / prefix / "lab.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LabRunError(
                f"no lab {prefix!r} here (no {path}); run 'vpnfleet lab up'"
            ) from None
        data["users"] = [LabUser(**u) for u in data["users"]]
        return cls(**data)

    def client(self, token: str | None = None) -> httpx.Client:
        """A client of the lab's control plane with `token` (default: the admin token)."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
            # A lab made before the lab ran TLS has an http URL and no CA.
            verify=tlspin.pinned_context(self.ca_file) if self.url.startswith("https:") else True,
        )

    def cli_env(self) -> dict[str, str]:
        """Environment for the CLI as an operator on the host: URL, pinned CA, admin token."""
        return {
            "VPNFLEET_URL": self.url,
            "VPNFLEET_CA_FILE": str(self.ca_file),
            "VPNFLEET_TOKEN": self.admin_token,
        }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vpnfleet.cli.main", *args]


async def _wait_http(
    url: str,
    seconds: float,
    what: str,
    proc: topology.LabProcess | None,
    ca_file: Path | None = None,
) -> None:
    """Wait for `url` to answer 200; over https, once the server has written `ca_file`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.returncode is not None:
            raise LabRunError(f"{what} exited; see {proc.log_path}")
        try:
            verify = tlspin.verify_for(ca_file)
        except tlspin.TrustError:  # not written yet
            verify = None
        if verify is not None:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=2, verify=verify) as http:
                    if (await http.get(url)).status_code == 200:
                        return
        await asyncio.sleep(0.2)
    raise LabRunError(f"{what} did not become ready within {seconds:.0f}s")


def _api(info: LabInfo, method: str, path: str, body: Any = None) -> Any:
    with info.client() as c:
        resp = c.request(method, path, json=body)
    if resp.status_code >= 400:
        raise LabRunError(f"{method} {path}: {resp.text[:300]}")
    return (
        resp.json()
        if resp.content and "json" in resp.headers.get("content-type", "")
        else resp.text
    )


async def up(
    prefix: str = "vfl",
    pods: int = 2,
    users: tuple[LabUser, ...] | list[LabUser] = DEFAULT_USERS,
    state_root: Path = DEFAULT_STATE_ROOT,
    connect: bool = True,
    routing: str = "bgp",
    bgp_hold_time: int = DEFAULT_BGP_HOLD_TIME,
) -> LabInfo:
    """Build the lab and start everything; on any failure, tear it all down again."""
    if routing not in ROUTING:
        raise LabRunError(f"routing must be one of {', '.join(ROUTING)}, not {routing!r}")
    if routing == "bgp" and not (shutil.which("bird") and shutil.which("birdc")):
        raise LabRunError("BGP routing needs BIRD 2 (apt-get install bird2), or use routing static")
    plan = LabPlan(prefix=prefix, pods=pods, clients=[u.name for u in users])
    state = state_root / prefix
    # build() refuses, with a clear message, if a lab with this prefix still exists.
    await topology.build(plan)
    try:
        if state.exists():
            shutil.rmtree(state)
        state.mkdir(parents=True, mode=0o700)
        host, port = plan.vpn_endpoint
        info = LabInfo(
            prefix=prefix,
            pods=pods,
            users=list(users),
            state_dir=str(state),
            url=plan.control_plane_url,
            agent_url=f"https://{plan.cp_ip}:{CP_PORT}",
            service=f"http://{plan.svc_ip}:{ECHO_PORT}",
            vpn_endpoint=f"{host}:{port}",
            web=f"http://{plan.svc_ip}:{nginx.NGINX_PORT}" if nginx.available() else None,
            routing=routing,
            bgp_hold_time=bgp_hold_time,
        )
        info.save()
        await _start_control_plane(info)
        await _start_services(info)
        await asyncio.gather(*(start_agent(info, i) for i in range(1, pods + 1)))
        await _wait_pods_ready(info)
        topology.spawn_in(
            plan.ns("lb"),
            sys.executable,
            "-m",
            "vpnfleet.lab.endpoints",
            "--prefix",
            prefix,
            "--pods",
            str(pods),
            log_path=state / "endpoints.log",
        )
        if connect:
            await asyncio.gather(*(start_client(info, u.name) for u in users))
        return info
    except BaseException:
        log.error("lab up failed; removing what was built")
        await topology.teardown(prefix)
        raise


async def start_control_plane(info: LabInfo) -> topology.LabProcess:
    """Start (or restart) the control plane process and wait until it is ready."""
    cp = topology.spawn_in(
        info.plan.ns("cp"),
        *_cli(
            "server",
            "--listen",
            f"0.0.0.0:{CP_PORT}",
            "--data-dir",
            str(info.dir / "cp"),
            "--public-endpoint",
            info.vpn_endpoint,
            "--public-tcp-endpoint",
            "{}:{}".format(*info.plan.vpn_tcp_endpoint),
            # HTTPS as in a deployment: a certificate for the addresses agents (cluster
            # network) and the host (admin link) use, from the control plane's own CA.
            "--tls-self-signed",
            f"{info.plan.cp_ip},{info.plan.admin.ns_address.ip}",
            # The host reaches the server at this URL: the admin token file may go there.
            "--advertise-url",
            info.url,
            "--log-format",
            "json",
        ),
        log_path=info.dir / "cp.log",
    )
    await _wait_http(f"{info.url}/readyz", 60, "the control plane", cp, info.ca_file)
    return cp


async def _start_control_plane(info: LabInfo) -> None:
    await start_control_plane(info)
    token = _api(info, "POST", "/api/v1/tokens", {"name": "lab-agents", "role": "agent"})["token"]
    path = info.dir / "agent-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    # gateway-routes only reads the fleet view: a read-only (auditor) token.
    routes = _api(info, "POST", "/api/v1/tokens", {"name": "lab-routes", "role": "auditor"})
    path = info.dir / "routes-token"
    path.write_text(routes["token"] + "\n")
    path.chmod(0o600)
    clients = info.dir / "clients"
    clients.mkdir(mode=0o700)
    _api(info, "POST", "/api/v1/groups", {"name": LAB_GROUP, "description": "lab users"})
    _api(
        info,
        "POST",
        "/api/v1/rules",
        {"group": LAB_GROUP, "destination": str(topology.CLUSTER_NET), "proto": "any"},
    )
    for user in (u for u in info.users if u.create):
        groups = [LAB_GROUP] if user.lab_access else []
        _api(
            info, "POST", "/api/v1/users", {"name": user.name, "mode": user.mode, "groups": groups}
        )
        profile = _api(info, "GET", f"/api/v1/users/{user.name}/profile")
        dest = clients / f"{user.name}.ovpn"
        dest.write_text(profile)
        dest.chmod(0o600)


async def _start_services(info: LabInfo) -> None:
    plan = info.plan
    svc = plan.ns("svc")
    echo = topology.spawn_in(
        svc,
        sys.executable,
        "-m",
        "vpnfleet.lab.echo",
        "--listen",
        f"0.0.0.0:{ECHO_PORT}",
        "--udp-listen",
        f"0.0.0.0:{ECHO_UDP_PORT}",
        log_path=info.dir / "echo.log",
    )
    topology.spawn_in(
        svc,
        sys.executable,
        "-m",
        "vpnfleet.lab.echo",
        "--listen",
        f"0.0.0.0:{ECHO_PORT_2}",
        log_path=info.dir / "echo2.log",
    )
    if info.routing == "bgp":
        try:
            await bgprouter.start(plan, info.router_dir, info.bgp_hold_time)
        except bgprouter.RouterError as exc:
            raise LabRunError(str(exc)) from None
    else:
        topology.spawn_in(
            svc,
            *_cli("gateway-routes", "--server", info.agent_url, "--log-format", "json"),
            log_path=info.dir / "gateway-routes.log",
            env={
                **os.environ,
                "VPNFLEET_ROUTES_TOKEN": (info.dir / "routes-token").read_text().strip(),
                "VPNFLEET_CA_FILE": str(info.ca_file),
            },
        )
    web = nginx.start(svc, info.dir / "nginx") if info.web else None
    if web is None:
        log.warning("nginx is not installed: the lab runs without its web backend")
    await asyncio.sleep(0.3)
    if echo.returncode is not None:
        raise LabRunError(f"the echo service exited; see {echo.log_path}")
    if web is not None and web.returncode is not None:
        raise LabRunError(f"nginx exited; see {web.log_path} and {web.log_path.parent}/error.log")


def _agent_token(info: LabInfo) -> str:
    return (info.dir / "agent-token").read_text().strip()


def metrics_token_path(info: LabInfo) -> Path:
    """The bearer token for the agents' per-user metrics (made once per lab, 0600)."""
    path = info.dir / METRICS_TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    return path


async def start_agent(info: LabInfo, index: int) -> topology.LabProcess:
    """Start (or restart) the agent of pod `index`."""
    plan = info.plan
    node = plan.pod(index)
    uplink = node.attachments[0].ifname
    env = {
        **os.environ,
        "VPNFLEET_AGENT_TOKEN": _agent_token(info),
        "VPNFLEET_CA_FILE": str(info.ca_file),
        "VPNFLEET_HEARTBEAT_INTERVAL": "1",
        "VPNFLEET_RECONCILE_INTERVAL": "2",
        "VPNFLEET_DRAIN_DELAY": "1.5",
        "VPNFLEET_USER_METRICS_TOKEN_FILE": str(metrics_token_path(info)),
    }
    bgp: list[str] = []
    if info.routing == "bgp":
        # Router id: the pod's address (--pod-ip). BIRD's control socket: in the state dir.
        bgp = [
            "--bgp",
            "--bgp-asn",
            str(bgprouter.POD_ASN),
            "--bgp-neighbor",
            f"{plan.router_ip}:{bgprouter.ROUTER_ASN}",
            "--bgp-hold-time",
            str(info.bgp_hold_time),
        ]
    return topology.spawn_in(
        plan.pod_ns(index),
        *_cli(
            "agent",
            *bgp,
            "--server",
            info.agent_url,
            "--name",
            f"pod{index}",
            "--state-dir",
            str(info.dir / f"pod{index}"),
            "--pod-ip",
            str(plan.pod_ip(index)),
            "--uplink",
            uplink,
            "--push-route",
            str(topology.CLUSTER_NET),
            "--http",
            f"0.0.0.0:{AGENT_HTTP_PORT}",
            "--user-metrics-listen",
            f"0.0.0.0:{AGENT_USER_METRICS_PORT}",
            "--log-format",
            "json",
        ),
        log_path=info.dir / f"pod{index}.log",
        env=env,
    )


async def _wait_pods_ready(info: LabInfo, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    pods: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        pods = _api(info, "GET", "/api/v1/pods")
        ready = {p["name"] for p in pods if p["ready"]}
        if all(f"pod{i}" in ready for i in range(1, info.pods + 1)):
            if info.routing == "bgp":
                await _wait_bgp(info, deadline - time.monotonic())
            return
        await asyncio.sleep(0.3)
    raise LabRunError(
        f"pods not ready within {seconds:.0f}s: "
        + ", ".join(f"{p['name']}={p['status']}" for p in pods)
        + f"; see the pod logs in {info.dir}"
    )


async def _wait_bgp(info: LabInfo, seconds: float) -> None:
    """Every pod's BGP session with the router is up (gateway users are routable)."""
    pods = {str(ip) for ip in info.plan.pod_ips}
    try:
        await bgprouter.wait_established(info.router_dir, pods, max(seconds, 5))
    except bgprouter.RouterError as exc:
        raise LabRunError(f"{exc} and the pod logs in {info.dir}") from None


async def start_client(
    info: LabInfo, name: str, wait: bool = True, extra: Sequence[str] = ()
) -> topology.LabProcess:
    """Connect lab user `name` with the stock openvpn client and its profile; `extra` options
    go after it on the command line (e.g. ``--setenv IV_SSO webauth``)."""
    ns = info.plan.client_ns(name)
    log_path = info.dir / "clients" / f"{name}.log"
    proc = topology.spawn_in(
        ns,
        "openvpn",
        "--config",
        str(info.dir / "clients" / f"{name}.ovpn"),
        "--dev",
        "tun0",
        "--connect-retry",
        "1",
        "1",
        "--verb",
        "3",
        *extra,
        log_path=log_path,
    )
    if wait and not await wait_client_address(info, name, 30):
        raise LabRunError(f"{name} did not get a tunnel address; see {log_path}")
    return proc


async def pin_client(info: LabInfo, name: str, pod: int) -> None:
    """Send lab user ``name``'s next connections to pod ``pod`` (tests and benchmarks).

    A DNAT rule for the user's address ahead of the Service's random spread, replacing an
    earlier pin; the user's old translation is forgotten so the next packets take it. The
    endpoint follower's rewrite of the load balancer's rules (a pod's readiness changing)
    removes every pin."""
    plan = info.plan
    lb, src = plan.lb.ns, str(plan.client_ip(name))
    match = ["PREROUTING", "-s", src, "-p", "udp", "--dport", str(topology.VPN_PORT), "-j", "DNAT"]
    for other in range(1, info.pods + 1):
        old = [*match, "--to-destination", str(plan.pod_ip(other))]
        await topology.run_in(lb, "iptables", "-w", "5", "-t", "nat", "-D", *old, check=False)
    rule = [*match, "--to-destination", str(plan.pod_ip(pod))]
    await topology.run_in(lb, "iptables", "-w", "5", "-t", "nat", "-I", *rule)
    await topology.run_in(lb, "conntrack", "-D", "-s", src, "-p", "udp", check=False)


async def client_address(info: LabInfo, name: str) -> str | None:
    """The client's tunnel address, or None while it has none."""
    res = await topology.run_in(
        info.plan.client_ns(name), "ip", "-j", "-4", "addr", "show", "dev", "tun0", check=False
    )
    if res.returncode != 0:
        return None
    for iface in json.loads(res.stdout or "[]"):
        for addr in iface.get("addr_info", []):
            return str(addr["local"])
    return None


async def wait_client_address(info: LabInfo, name: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        addr = await client_address(info, name)
        if addr:
            return addr
        await asyncio.sleep(0.2)
    return None


async def client_pids(info: LabInfo, name: str) -> list[int]:
    """The openvpn processes in the user's namespace (network namespaces share the pid space,
    so `pgrep` would also see the pods' servers: ask `ip netns pids` instead)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", info.plan.client_ns(name), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    pids = []
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "openvpn":  # noqa: ASYNC240
                pids.append(pid)
    return pids


async def stop_client(info: LabInfo, name: str) -> None:
    """Stop the user's openvpn client (as the user closing the VPN app)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in await client_pids(info, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not await client_pids(info, name):
                return
            await asyncio.sleep(0.1)
    raise LabRunError(f"cannot stop {name}'s client")


async def down(
    prefix: str = "vfl", state_root: Path = DEFAULT_STATE_ROOT
) -> topology.TeardownReport:
    """Stop everything of lab `prefix` and remove its namespaces, links and state."""
    report = await topology.teardown(prefix)
    state = state_root / prefix
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)
    return report


async def node_namespace(info: LabInfo, node: str) -> str:
    """`cp`, `lb`, `svc`, `pod1`, `c-alice` or just `alice` -> the namespace name."""
    if node in {u.name for u in info.users}:
        return info.plan.client_ns(node)
    ns = info.plan.ns(node)
    if ns not in info.plan.namespaces:
        known = [
            "cp",
            "lb",
            "svc",
            "rtr",
            *(f"pod{i}" for i in range(1, info.pods + 1)),
            *(u.name for u in info.users),
        ]
        raise LabRunError(f"unknown lab node {node!r}; known: {', '.join(known)}")
    return ns


async def status(info: LabInfo) -> dict[str, Any]:
    """Namespaces, processes and the control plane's view of pods and sessions."""
    topo = await topology.status(info.prefix)
    out: dict[str, Any] = {
        "prefix": info.prefix,
        "url": info.url,
        "token_file": str(info.dir / "cp" / "admin-token"),
        "ca_file": str(info.ca_file),
        "service": info.service,
        "web": info.web,
        "web_access_log": str(info.web_access_log) if info.web else None,
        "vpn_endpoint": info.vpn_endpoint,
        "namespaces": {n.name: {"pids": list(n.pids)} for n in topo.namespaces},
    }
    try:
        out["pods"] = _api(info, "GET", "/api/v1/pods")
        out["sessions"] = _api(info, "GET", "/api/v1/sessions?active=true")
    except (LabRunError, httpx.HTTPError, OSError) as exc:
        out["control_plane_error"] = str(exc)
    out["clients"] = {u.name: await client_address(info, u.name) for u in info.users}
    return out
