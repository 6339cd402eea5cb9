"""The pod agent: OpenVPN under management-interface control, firewall, sessions, sync.

One asyncio loop runs these tasks:

- supervise: start (or adopt) openvpn, attach the management client, restart with backoff;
- events: answer CONNECT/REAUTH with client-auth/client-deny from the local fleet view,
  track ESTABLISHED/DISCONNECT;
- follow: keep the fleet view current from the control plane's watch stream;
- firewall: coalesce changes and move the dataplane to the desired state;
- deliver: send session records from the spool to the control plane, in order;
- flows: read conntrack NEW/DESTROY events, attribute each flow from a tunnel address to the
  session that owns the address, print it as a JSON line and spool it (NAT audit);
- flow-deliver: send spooled flow records to the control plane in batches, in order;
- reconcile: compare OpenVPN's `status 3` and the kernel with what we believe, and repair;
- heartbeat: tell the control plane we are alive and which revision we enforce.

Everything is level-triggered: a missed event is repaired by the next reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vpnfleet.agent.conntrack import ConntrackError, ConntrackListener
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError, WatchProtocolError
from vpnfleet.agent.dataplane import Dataplane, DataplaneError
from vpnfleet.agent.management import ManagementClient, ManagementError
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.nflog import NflogError, NflogListener, pump_denied
from vpnfleet.agent.openvpn import OpenVPNProcess
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.spool import Spool
from vpnfleet.core import authz, ipam, ovpn_config
from vpnfleet.core.denied import DeniedAggregator, DeniedEvent
from vpnfleet.core.fleet import Effects, FleetView
from vpnfleet.core.flowevents import FlowItem
from vpnfleet.core.flowtracker import FlowRecord, FlowTracker
from vpnfleet.core.fwstate import ClientCheck, DesiredState, GroupAccess
from vpnfleet.core.grants import Grant, grants_of
from vpnfleet.core.mgmt_protocol import ClientEvent, ClientEventKind, Hold, StatusClient
from vpnfleet.wire import (
    Bootstrap,
    DeniedBatch,
    DeniedRecord,
    Heartbeat,
    RegisterRequest,
    SessionClose,
    SessionOpen,
    SessionReport,
    Snapshot,
    WatchHeartbeat,
    WatchResync,
)

log = logging.getLogger("vpnfleet.agent")

TUN_DEV = "tun0"
CRL_REFRESH = 6 * 3600.0  # seconds between CRL downloads when OpenVPN checks the CRL
NFLOG_GROUP = 7007  # where the firewall sends denied packets for the agent to record
FLOW_BATCH = 5000  # records per POST /agent/flows (the API's limit)
FLOW_BATCH_BYTES = 4 << 20


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@dataclass
class LocalClient:
    """A client of this pod's OpenVPN, from CONNECT until DISCONNECT."""

    cid: int
    user: str
    mode: str
    tunnel_ip: str
    real_ip: str | None
    real_port: int | None
    uid: str
    connected_at: str
    established: bool = False
    groups: list[str] = field(default_factory=list)


class PodAgent:
    """The agent of one OpenVPN pod. `run()` until SIGTERM, then drain."""

    def __init__(self, settings: AgentSettings, cp: ControlPlane | None = None) -> None:
        self.s = settings
        self.state_dir = settings.state_dir
        self.cp = cp or ControlPlane(settings.server, settings.token)
        self.metrics = AgentMetrics(settings.name, self)
        self.view = FleetView()
        self.boot: Bootstrap | None = None
        self.mgmt: ManagementClient | None = None
        self.openvpn: OpenVPNProcess | None = None
        self.dataplane = Dataplane(settings.fw_prefix)
        self.clients: dict[int, LocalClient] = {}
        self.nat_alloc: ipam.AddressAllocator | None = None
        self.nat_pool: ipaddress.IPv4Network | None = None
        self.gateway_pool: ipaddress.IPv4Network | None = None
        self.spool: Spool | None = None
        # NAT audit (flow_loop): tunnel IP -> (user, session uid) of the session holding it,
        # kept current at ESTABLISHED/DISCONNECT/kick/adopt so the per-flow lookup is O(1).
        self.owners: dict[str, tuple[str, str]] = {}
        self.flow_spool: Spool | None = None
        self.flow_listener: ConntrackListener | None = None
        self.flow_tracker: FlowTracker | None = None
        self.flow_listener_up = False
        # Where flow records are printed as JSON lines (None: --flow-log off).
        self.flow_out: TextIO | None = sys.stdout if settings.flow_log == "stdout" else None
        self.flows_delivered = 0
        self.flows_refused = 0
        self._flow_wake = asyncio.Event()
        # Health facts the probes report.
        self.registered = False
        self.config_applied = False
        self.openvpn_ready = False
        self.cp_reachable = False
        self.draining = False
        self.last_tick = time.monotonic()
        self.last_mgmt_ok = 0.0
        self.applied_revision = 0
        # For /metrics (agent/exporter.py): the watch stream's state and OpenVPN's version.
        self.watch_connected = False
        self.watch_last_event = 0.0
        self.openvpn_version: str | None = None
        self._firewall_dirty = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._clients_dirty = False
        self._view_dirty = False
        self._unanswered: set[int] = set()
        self.last_status: list[StatusClient] = []
        self._crl_refreshed = time.monotonic()
        self._addr_cache: dict[str, ipaddress.IPv4Address] = {}
        self._group_cache: dict[str, GroupAccess] = {}
        # Clients already validated by the last desired state: a connect checks one address.
        self._client_check = ClientCheck()
        self.last_status_at = 0.0
        self._grants_cache: tuple[int, dict[str, tuple[int, tuple[Grant, ...]]]] | None = None

    # ------------------------------------------------------------------ files and cache

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "server.conf"

    @property
    def mgmt_socket(self) -> Path:
        return self.state_dir / "mgmt.sock"

    def _write_bootstrap(self, boot: Bootstrap) -> None:
        d = self.state_dir
        _write_private(d / "ca.crt", boot.ca_pem, 0o644)
        _write_private(d / "server.crt", boot.cert_pem, 0o644)
        _write_private(d / "server.key", boot.key_pem)
        _write_private(d / "tls-crypt.key", boot.tls_crypt_key)
        _write_private(d / "crl.pem", boot.crl_pem, 0o644)
        # Kept so the agent can restart while the control plane is away.
        _write_private(d / "bootstrap.json", boot.model_dump_json())

    def _load_cached_bootstrap(self) -> Bootstrap | None:
        try:
            return Bootstrap.model_validate_json((self.state_dir / "bootstrap.json").read_text())
        except (OSError, ValueError):
            return None

    def _save_view(self) -> None:
        _write_private(self.state_dir / "view.json", self.view.to_snapshot().model_dump_json())
        self._view_dirty = False

    def _load_cached_view(self) -> FleetView | None:
        try:
            snap = Snapshot.model_validate_json((self.state_dir / "view.json").read_text())
        except (OSError, ValueError):
            return None
        return FleetView.from_snapshot(snap)

    def _save_clients(self) -> None:
        data = [asdict(c) for c in self.clients.values()]
        _write_private(self.state_dir / "clients.json", json.dumps(data))
        self._clients_dirty = False

    def _load_cached_clients(self) -> dict[tuple[str, str], LocalClient]:
        """Clients from before a restart, keyed by (user, tunnel IP), to keep session ids."""
        try:
            rows = json.loads((self.state_dir / "clients.json").read_text())
            return {(r["user"], r["tunnel_ip"]): LocalClient(**r) for r in rows}
        except (OSError, ValueError, TypeError, KeyError):
            return {}

    # ------------------------------------------------------------------ start-up

    async def register(self) -> None:
        """Register with the control plane, or fall back to the cached bootstrap."""
        req = RegisterRequest(
            name=self.s.name,
            template=self.s.template,
            public_endpoint=self.s.public_endpoint,
            pod_ip=self.s.pod_ip,
        )
        delay = 0.5
        while not self._stop.is_set():
            try:
                boot = await self.cp.register(req)
                self.cp_reachable = True
                break
            except ControlPlaneError as exc:
                self.cp_reachable = False
                cached = self._load_cached_bootstrap()
                if not exc.retryable:
                    raise
                if cached is not None and cached.name == self.s.name:
                    log.warning("control plane unreachable (%s); starting from cached state", exc)
                    boot = cached
                    break
                log.warning("cannot register yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        else:
            return
        self.boot = boot
        self._write_bootstrap(boot)
        self.nat_pool = ipaddress.IPv4Network(boot.nat_pool)
        self.gateway_pool = ipaddress.IPv4Network(boot.gateway_pool) if boot.gateway_pool else None
        self.nat_alloc = ipam.AddressAllocator(self.nat_pool)
        self.registered = True
        log.info("registered as pod %s (NAT pool %s)", boot.name, boot.nat_pool)

    async def load_view(self) -> None:
        try:
            snap = await self.cp.snapshot()
            self.view = FleetView.from_snapshot(snap)
            self.cp_reachable = True
            self._save_view()
        except ControlPlaneError as exc:
            cached = self._load_cached_view()
            if cached is None:
                raise
            log.warning(
                "snapshot unavailable (%s); deciding from cached revision %d", exc, cached.revision
            )
            self.view = cached
        self.metrics.revision.set(self.view.revision)

    def render_config(self) -> None:
        assert self.boot is not None and self.nat_pool is not None
        gw = ipaddress.IPv4Interface(
            f"{ipam.server_address(self.nat_pool)}/{self.nat_pool.prefixlen}"
        )
        d = self.state_dir
        conf = ovpn_config.render_server_conf(
            pool_gateway=gw,
            management_socket=str(self.mgmt_socket),
            ca_path=str(d / "ca.crt"),
            cert_path=str(d / "server.crt"),
            key_path=str(d / "server.key"),
            tls_crypt_path=str(d / "tls-crypt.key"),
            crl_path=str(d / "crl.pem") if self.s.crl_verify else None,
            dev=TUN_DEV,
            port=self.s.port,
            proto="udp",
            management_hold=True,
        )
        _write_private(self.conf_path, conf, 0o644)

    # ------------------------------------------------------------------ decisions

    def _push_lines(self, user_mode: str, address: ipaddress.IPv4Address) -> list[str]:
        assert self.nat_pool is not None
        pool = self.nat_pool
        if user_mode == "gateway" and self.gateway_pool is not None:
            pool = self.gateway_pool
        lines = [f"ifconfig-push {address} {pool.netmask}"]
        if pool != self.nat_pool:
            # The gateway pool is another subnet: the client's next hop must be on it.
            lines.append(f'push "route-gateway {ipam.server_address(pool)}"')
        for route in self.s.push_routes:
            net = ipaddress.IPv4Network(route)
            lines.append(f'push "route {net.network_address} {net.netmask}"')
        return lines

    async def on_connect(self, ev: ClientEvent) -> None:
        """Answer CONNECT (new client) or REAUTH (TLS renegotiation) without blocking OpenVPN."""
        assert self.mgmt is not None
        started = time.perf_counter()
        env = ev.env
        cn = env.get("common_name", "")
        serial = env.get("tls_serial_0")
        real_ip = env.get("untrusted_ip")
        reauth = ev.kind is ClientEventKind.REAUTH
        # The same device reconnecting (same public address) replaces its old session, which
        # OpenVPN may keep for seconds or until a ping timeout: it must not count as another.
        stale = (
            []
            if reauth
            else [
                c
                for c in self.clients.values()
                if c.user == cn and c.cid != ev.cid and c.real_ip == real_ip and real_ip
            ]
        )
        local = sum(
            1 for c in self.clients.values() if c.user == cn and c.cid != ev.cid and c not in stale
        )
        superseded = {c.uid for c in stale} | {
            x.uid
            for x in self.view.sessions.values()
            if x.user == cn and real_ip and x.real_ip == real_ip
        }
        decision = authz.decide(self.view, cn, serial, local, frozenset(superseded))
        kid = ev.kid if ev.kid is not None else 0
        try:
            if not decision.allow:
                await self.mgmt.client_deny(ev.cid, kid, decision.reason, decision.client_reason)
                self._forget(ev.cid)
                log.info(
                    "denied %s from %s: %s",
                    cn or "?",
                    env.get("untrusted_ip", "?"),
                    decision.reason,
                    extra={"event": "auth", "user": cn, "result": "deny"},
                )
            elif reauth:
                await self.mgmt.client_auth(ev.cid, kid, ())
            else:
                assert decision.user is not None
                for old in stale:
                    await self._kick(old, "replaced by a new connection", halt=True)
                address = self._address_for(decision.user.mode, decision.user.gateway_address)
                lines = self._push_lines(decision.user.mode, address)
                self.clients[ev.cid] = LocalClient(
                    cid=ev.cid,
                    user=cn,
                    mode=decision.user.mode,
                    tunnel_ip=str(address),
                    real_ip=env.get("untrusted_ip"),
                    real_port=int(env["untrusted_port"])
                    if env.get("untrusted_port", "").isdigit()
                    else None,
                    uid=f"{self.s.name}-{secrets.token_hex(8)}",
                    connected_at=_now().isoformat(),
                    groups=list(decision.user.groups),
                )
                await self.mgmt.client_auth(ev.cid, kid, lines)
        except ipam.PoolExhausted as exc:
            log.error("cannot admit %s: %s", cn, exc)
            decision = authz.Decision(False, "address pool exhausted", "server full")
            with contextlib.suppress(ManagementError):
                await self.mgmt.client_deny(ev.cid, kid, decision.reason, decision.client_reason)
        except (ManagementError, ValueError) as exc:
            # The client vanished meanwhile, or openvpn restarted: reconcile tidies up.
            log.info("could not answer client %d: %s", ev.cid, exc)
            if not reauth:
                self._forget(ev.cid)
        self.metrics.decisions.labels(result=decision.label).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)

    def _address_for(self, mode: str, gateway_address: str | None) -> ipaddress.IPv4Address:
        if mode == "gateway" and gateway_address:
            return ipaddress.IPv4Address(gateway_address)
        assert self.nat_alloc is not None
        return self.nat_alloc.allocate()

    def _forget(self, cid: int) -> LocalClient | None:
        client = self.clients.pop(cid, None)
        if client is not None:
            if self.owners.get(client.tunnel_ip, ("", ""))[1] == client.uid:
                del self.owners[client.tunnel_ip]
            if client.mode == "nat" and self.nat_alloc is not None:
                self.nat_alloc.release(ipaddress.IPv4Address(client.tunnel_ip))
            if client.established:
                self._firewall_dirty.set()
            self._clients_dirty = True
        return client

    def on_established(self, ev: ClientEvent) -> None:
        client = self.clients.get(ev.cid)
        if client is None:
            log.warning("ESTABLISHED for unknown client %d; reconcile will decide", ev.cid)
            return
        client.established = True
        self.owners[client.tunnel_ip] = (client.user, client.uid)
        self._clients_dirty = True
        self._firewall_dirty.set()
        self._spool_open(client)
        self.metrics.connects.inc()
        log.info(
            "%s connected from %s:%s as %s (%s)",
            client.user,
            client.real_ip,
            client.real_port,
            client.tunnel_ip,
            client.mode,
            extra={
                "event": "connect",
                "user": client.user,
                "tunnel_ip": client.tunnel_ip,
                "session_uid": client.uid,
            },
        )

    def on_disconnect(self, ev: ClientEvent, reason: str = "disconnected") -> None:
        client = self._forget(ev.cid)
        if client is None or not client.established:
            return
        env = ev.env
        self._spool_close(
            client,
            bytes_in=int(env.get("bytes_received", "0") or 0),
            bytes_out=int(env.get("bytes_sent", "0") or 0),
            reason=reason,
        )
        self.metrics.disconnects.inc()
        log.info(
            "%s disconnected (%s)",
            client.user,
            client.tunnel_ip,
            extra={"event": "disconnect", "user": client.user, "session_uid": client.uid},
        )

    # ------------------------------------------------------------------ session delivery

    def _spool_open(self, client: LocalClient) -> None:
        assert self.spool is not None
        body = SessionOpen(
            uid=client.uid,
            user=client.user,
            pod=self.s.name,
            mode=client.mode,
            tunnel_ip=client.tunnel_ip,
            real_ip=client.real_ip,
            real_port=client.real_port,
            client_id=client.cid,
            started_at=dt.datetime.fromisoformat(client.connected_at),
        )
        self.spool.put({"kind": "open", "body": body.model_dump(mode="json")})
        self._deliver_wake.set()

    def _spool_close(self, client: LocalClient, bytes_in: int, bytes_out: int, reason: str) -> None:
        assert self.spool is not None
        body = SessionClose(
            uid=client.uid, ended_at=_now(), bytes_in=bytes_in, bytes_out=bytes_out, reason=reason
        )
        self.spool.put({"kind": "close", "body": body.model_dump(mode="json")})
        self._deliver_wake.set()

    async def deliver_loop(self) -> None:
        """Send spooled session records in order; keep them while the control plane is away."""
        assert self.spool is not None
        delay = 0.5
        while not self._stop.is_set():
            batch = self.spool.peek(50)
            if not batch:
                self._deliver_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deliver_wake.wait(), 1.0)
                self.spool.flush()
                continue
            done = 0
            try:
                for record in batch:
                    await self._deliver(record)
                    done += 1
                delay = 0.5
                self.cp_reachable = True
            except ControlPlaneError as exc:
                self.cp_reachable = False
                log.warning("session delivery paused (%s); %d queued", exc, len(self.spool))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            finally:
                self.spool.commit(done)
                self.metrics.spooled.set(len(self.spool))

    async def _deliver(self, record: dict[str, Any]) -> None:
        kind, body = record.get("kind"), record.get("body")
        try:
            if kind == "open":
                verdict = await self.cp.session_open(SessionOpen.model_validate(body))
                if not verdict.allowed:
                    await self._kick_uid(verdict.uid, verdict.reason or "refused")
            elif kind == "close":
                await self.cp.session_close(SessionClose.model_validate(body))
            elif kind == "denied":
                denied = DeniedRecord.model_validate(body)
                await self.cp.denied(DeniedBatch(pod=self.s.name, events=[denied]))
        except ControlPlaneError as exc:
            if exc.retryable:
                raise
            # A record the control plane will never accept (user deleted meanwhile...):
            # dropping it beats blocking every later record behind it.
            log.warning("dropped a %s record the control plane refused: %s", kind, exc)
        except ValueError as exc:
            log.error("dropped a malformed spool record: %s", exc)

    async def _kick_uid(self, uid: str, reason: str) -> None:
        for client in list(self.clients.values()):
            if client.uid == uid:
                await self._kick(client, reason, halt=True)

    async def _kick(self, client: LocalClient, reason: str, halt: bool) -> None:
        log.info(
            "disconnecting %s (%s): %s",
            client.user,
            client.tunnel_ip,
            reason,
            extra={"event": "kick", "user": client.user, "reason": reason},
        )
        if client.established:
            # OpenVPN keeps a killed instance for a few seconds (delayed exit): take the
            # address out of the firewall and end the session now, not at DISCONNECT.
            client.established = False
            self._clients_dirty = True
            self._firewall_dirty.set()
            self._spool_close(client, 0, 0, reason)
        if self.mgmt is None:
            return
        try:
            await self.mgmt.client_kill(client.cid, "HALT" if halt else "RESTART")
        except ManagementError as exc:
            log.info("client-kill %d: %s", client.cid, exc)

    # ------------------------------------------------------------------ fleet view

    async def handle_effects(self, effects: Effects) -> None:
        for user, reason in effects.kick.items():
            for client in [c for c in self.clients.values() if c.user == user]:
                await self._kick(client, reason, halt=reason != "connection mode changed")
        for uid, reason in effects.kick_sessions.items():
            for client in [c for c in self.clients.values() if c.uid == uid]:
                await self._kick(client, reason, halt=True)
        if effects.crl:
            await self.refresh_crl()
        if effects.dataplane:
            for client in self.clients.values():
                u = self.view.users.get(client.user)
                if u is not None:
                    client.groups = list(u.groups)
            self._firewall_dirty.set()

    async def refresh_crl(self) -> None:
        try:
            crl = await self.cp.crl()
        except ControlPlaneError as exc:
            log.warning("could not refresh the CRL: %s", exc)
            return
        _write_private(self.state_dir / "crl.pem", crl, 0o644)
        self._crl_refreshed = time.monotonic()
        log.info("CRL updated")

    async def follow_loop(self) -> None:
        """Follow the watch stream; on resync fetch a snapshot; survive outages."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                async for event in self.cp.watch(self.view.revision):
                    self.cp_reachable = True
                    self.watch_connected = True
                    self.watch_last_event = time.monotonic()
                    delay = 0.5
                    if isinstance(event, WatchResync):
                        await self.resync_view()
                    elif not isinstance(event, WatchHeartbeat):
                        effects = self.view.apply(event)
                        self._view_dirty = True
                        await self.handle_effects(effects)
                        if self.config_applied and not self._firewall_dirty.is_set():
                            # Nothing for the firewall to do: enforced as of this revision.
                            self.applied_revision = self.view.revision
                    self.metrics.revision.set(self.view.revision)
                    if self._stop.is_set():
                        return
            except WatchProtocolError as exc:
                # A line this agent cannot read: the snapshot holds what it described.
                log.warning("%s; resyncing from a snapshot", exc)
                try:
                    await self.resync_view()
                except ControlPlaneError as again:
                    self.cp_reachable = False
                    log.warning("resync failed (%s); retrying in %.1fs", again, delay)
            except ControlPlaneError as exc:
                self.cp_reachable = False
                log.warning("watch stream lost (%s); retrying in %.1fs", exc, delay)
            self.watch_connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

    async def resync_view(self) -> None:
        old = self.view
        snap = await self.cp.snapshot()
        self.view = FleetView.from_snapshot(snap)
        self._view_dirty = True
        effects = Effects(dataplane=True, crl=True)
        for client in self.clients.values():
            new = self.view.users.get(client.user)
            before = old.users.get(client.user)
            if new is None:
                effects.kick[client.user] = "account deleted"
            elif not new.enabled:
                effects.kick[client.user] = "account disabled"
            elif before is not None and before.cert_serial != new.cert_serial:
                effects.kick[client.user] = "certificate revoked or replaced"
        log.info("resynced the fleet view at revision %d", self.view.revision)
        await self.handle_effects(effects)

    # ------------------------------------------------------------------ firewall

    def _grants(self) -> dict[str, tuple[int, tuple[Grant, ...]]]:
        """Group name -> (group id, grants), recomputed only when the view changed."""
        if self._grants_cache is not None and self._grants_cache[0] == self.view.revision:
            return self._grants_cache[1]
        by_group: dict[int, list[Grant]] = {g: [] for g in self.view.groups}
        for rule in self.view.rules.values():
            if rule.group_id not in by_group:
                continue
            by_group[rule.group_id].extend(grants_of(rule.destination, rule.proto, rule.ports))
        out = {g.name: (g.id, tuple(by_group.get(g.id, ()))) for g in self.view.groups.values()}
        self._grants_cache = (self.view.revision, out)
        return out

    def _addr(self, text: str) -> ipaddress.IPv4Address:
        """One IPv4Address object per tunnel address, reused across states (cheap diffs)."""
        addr = self._addr_cache.get(text)
        if addr is None:
            addr = self._addr_cache[text] = ipaddress.IPv4Address(text)
        return addr

    def desired_state(self) -> DesiredState:
        """Firewall state from connected clients and their groups' grants (default deny).

        Unchanged groups keep their GroupAccess object: the dataplane skips identical objects
        when diffing, so a connect costs in proportion to the groups it touches.
        """
        assert self.nat_pool is not None
        nets = [self.nat_pool] + ([self.gateway_pool] if self.gateway_pool else [])
        established = [c for c in self.clients.values() if c.established]
        clients = frozenset(self._addr(c.tunnel_ip) for c in established)
        nat = frozenset(self._addr(c.tunnel_ip) for c in established if c.mode == "nat")
        grants = self._grants()
        members: dict[str, set[ipaddress.IPv4Address]] = {name: set() for name in grants}
        for client in established:
            for name in client.groups:
                if name in members:
                    members[name].add(self._addr(client.tunnel_ip))
        groups = []
        cache: dict[str, GroupAccess] = {}
        for name, (gid, g) in grants.items():
            old = self._group_cache.get(name)
            if (
                old is not None
                and old.group_id == gid
                and old.grants is g
                and old.members == members[name]
            ):
                state = old
            else:
                state = GroupAccess(group_id=gid, members=frozenset(members[name]), grants=g)
            cache[name] = state
            groups.append(state)
        self._group_cache = cache
        if len(self._addr_cache) > 4 * len(established) + 1024:
            self._addr_cache = {c.tunnel_ip: self._addr(c.tunnel_ip) for c in established}
        return DesiredState(
            prefix=self.s.fw_prefix,
            tunnel_networks=tuple(nets),
            uplink=self.s.uplink,
            nat_members=nat,
            all_clients=clients,
            groups=tuple(groups),
            allow_all=False,
            log_denied=True,
            nflog_group=NFLOG_GROUP,
            client_check=self._client_check,
        )

    async def firewall_loop(self) -> None:
        """Coalesce changes: one apply brings the kernel to the newest desired state."""
        while not self._stop.is_set():
            await self._firewall_dirty.wait()
            self._firewall_dirty.clear()
            await self.apply_firewall()

    async def apply_firewall(self, full: bool = False) -> None:
        started = time.perf_counter()
        try:
            state = self.desired_state()
            if full:
                await self.dataplane.apply_full(state)
            else:
                await self.dataplane.apply(state)
            self.config_applied = True
            self.applied_revision = self.view.revision
        except (DataplaneError, ValueError) as exc:
            self.metrics.dataplane_errors.inc()
            log.error("firewall update failed: %s", exc)
            await asyncio.sleep(0.5)
            self._firewall_dirty.set()
        finally:
            self.metrics.dataplane_seconds.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ denied attempts

    def _owner(self, ip: ipaddress.IPv4Address) -> tuple[str, str] | None:
        return self.owners.get(str(ip))

    def _record_denied(self, event: DeniedEvent) -> None:
        record = event.as_record()
        self.metrics.denied.inc(event.count)
        log.info(
            "denied %s -> %s %s/%s (%d packet(s))",
            event.user or event.src,
            event.dst,
            event.proto,
            event.dport,
            event.count,
            extra=record,
        )
        if self.spool is not None:
            body = {k: record[k] for k in DeniedRecord.model_fields if k in record}
            self.spool.put({"kind": "denied", "body": body})
            self._deliver_wake.set()

    async def denied_loop(self) -> None:
        """Read the firewall's NFLOG of denied packets and record them as audit events."""
        while not self._stop.is_set():
            listener = NflogListener(NFLOG_GROUP, prefix=f"{self.s.fw_prefix}-deny")
            try:
                listener.open()
                agg = DeniedAggregator(self._owner)
                await pump_denied(listener, agg, self._record_denied)
            except NflogError as exc:
                log.error("denied-attempt log unavailable: %s; retrying in 5s", exc)
            finally:
                listener.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 5)

    # ------------------------------------------------------------------ NAT audit: flows

    def _seed_owners(self) -> None:
        """After a restart the listener's first table dump may come before the clients are
        re-adopted: take their addresses' owners from the cached client list (same session
        uids as adoption will keep), until the first reconcile confirms or drops them."""
        for cached in self._load_cached_clients().values():
            if cached.established:
                self.owners.setdefault(cached.tunnel_ip, (cached.user, cached.uid))

    def _prune_owners(self) -> None:
        held = {c.tunnel_ip for c in self.clients.values()}
        for ip in [ip for ip in self.owners if ip not in held]:
            del self.owners[ip]  # a cached owner whose client was not there to adopt

    def _tunnel_networks(self) -> list[ipaddress.IPv4Network]:
        return [n for n in (self.nat_pool, self.gateway_pool) if n is not None]

    def _on_flow_item(self, item: FlowItem) -> None:
        """Per conntrack event (the listener's fast path): attribute, print, spool."""
        assert self.flow_tracker is not None and self.flow_spool is not None
        records = self.flow_tracker.feed(item)
        if records:
            self._emit_flows(records)

    def _emit_flows(self, records: list[FlowRecord]) -> None:
        """Spool and print records (the per-event path, and the flows ended at shutdown)."""
        assert self.flow_spool is not None
        out = self.flow_out
        put = self.flow_spool.put_line
        for record in records:
            # One JSON object per line, marked "event": "flow" for log pipelines (Loki,
            # ELK); the same text is spooled (first: the audit trail) and printed.
            line = record.to_log_line()
            put(line)
            if out is not None:
                try:
                    out.write(line)
                except (OSError, ValueError):
                    self.flow_out = out = None  # stdout is gone; the spool still has it all
                    log.error("flow records can no longer be printed on stdout")
        self._flow_wake.set()

    async def flow_loop(self) -> None:
        """Run the conntrack listener; restart it with backoff if it fails."""
        assert self.flow_tracker is not None
        delay = 1.0
        while not self._stop.is_set():
            listener = ConntrackListener()
            self.flow_listener = listener
            try:
                listener.open()
                self.flow_listener_up = True
                log.info(
                    "flow audit on: conntrack events of %s",
                    ", ".join(str(n) for n in self._tunnel_networks()),
                )
                await listener.run(self._on_flow_item)
                delay = 1.0
            except ConntrackError as exc:
                log.error("flow audit unavailable: %s; retrying in %.0fs", exc, delay)
            except Exception as exc:  # audit trouble must not stop the VPN
                log.error(
                    "flow listener failed: %r; restarting in %.0fs", exc, delay, exc_info=True
                )
            finally:
                self.flow_listener_up = False
                listener.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 30)

    async def _send_flows(self, limit: int) -> int:
        """Send one batch of spooled flow records; returns how many left the spool.
        Raises ControlPlaneError when the control plane is unreachable (retry later)."""
        assert self.flow_spool is not None
        lines = self.flow_spool.peek_lines(limit, max_bytes=FLOW_BATCH_BYTES)
        if not lines:
            return 0
        try:
            await self.cp.flows(self.s.name, lines)
        except ControlPlaneError as exc:
            if exc.status == 413 and len(lines) > 1:
                return await self._send_flows(max(1, len(lines) // 2))  # too big: smaller
            if exc.status not in (400, 422):
                raise  # unreachable, 5xx, or not allowed (a token problem): keep, retry
            if len(lines) > 1:
                # Something in the batch is refused: halve until the bad record is alone.
                return await self._send_flows(max(1, len(lines) // 2))
            self.flows_refused += 1
            log.error("dropped a flow record the control plane refused: %s", exc)
            self.flow_spool.commit(1)
            return 1
        self.flow_spool.commit(len(lines))
        self.flows_delivered += len(lines)
        return len(lines)

    async def flow_deliver_loop(self) -> None:
        """Send flow records in batches of up to 5,000, oldest first; keep them on disk while
        the control plane is away. The spool and stdout are flushed at least once a second."""
        assert self.flow_spool is not None
        delay = 0.5
        last_flush = time.monotonic()
        # Runs through the drain too (until cancelled once the clients are gone): records
        # keep flowing while clients move away.
        while True:
            sent = 0
            try:
                sent = await self._send_flows(FLOW_BATCH)
                delay = 0.5
            except ControlPlaneError as exc:
                log.warning(
                    "flow delivery paused (%s); %d record(s) spooled", exc, len(self.flow_spool)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            except OSError as exc:  # the spool's disk (full, read-only): keep trying
                log.error("flow spool: %s; retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
            if time.monotonic() - last_flush >= 1.0:
                try:
                    self._flush_flow_outputs()
                except OSError as exc:
                    log.error("flow spool cannot be flushed: %s", exc)
                last_flush = time.monotonic()
            if sent >= FLOW_BATCH:
                continue  # a backlog: next batch at once
            # Quiet or trickling: gather records for a moment (fewer, larger requests).
            self._flow_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flow_wake.wait(), 1.0)
            if sent or len(self.flow_spool):
                await asyncio.sleep(0.2)

    def _flush_flow_outputs(self) -> None:
        if self.flow_spool is not None:
            self.flow_spool.flush()
        if self.flow_out is not None:
            with contextlib.suppress(OSError, ValueError):
                self.flow_out.flush()

    async def _finish_flows(self, budget: float) -> None:
        """At shutdown: end the flows still open (no client is left to use them), then give
        the records ``budget`` seconds to reach the control plane; the spool keeps the rest."""
        if self.flow_tracker is None or self.flow_spool is None:
            return
        if self.flow_listener is not None:
            self.flow_listener.close()
        ended = self.flow_tracker.end_all(_now())
        if ended:
            self._emit_flows(ended)
            log.info("ended %d open flow(s) at shutdown", len(ended))
        deadline = time.monotonic() + budget
        while len(self.flow_spool) and (left := deadline - time.monotonic()) > 0:
            try:
                # A hanging request must not eat the rest of the termination grace period.
                await asyncio.wait_for(self._send_flows(FLOW_BATCH), left)
            except TimeoutError:
                break
            except (ControlPlaneError, OSError):
                await asyncio.sleep(0.2)
        with contextlib.suppress(OSError):
            self._flush_flow_outputs()
        if len(self.flow_spool):
            log.info("%d flow record(s) stay spooled for the next start", len(self.flow_spool))

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self) -> None:
        """Compare OpenVPN's client list and the kernel with our state; repair differences."""
        if self.mgmt is None or self.mgmt.closed:
            return
        try:
            listed = await self.mgmt.status()
            self.last_mgmt_ok = time.monotonic()
            # Kept for /metrics (per-client byte counters, connected-since).
            self.last_status = listed
            self.last_status_at = time.time()
        except ManagementError as exc:
            log.info("reconcile skipped: %s", exc)
            return
        await self._reconcile_clients(listed)
        self._prune_owners()
        if self.config_applied:
            try:
                drift = await self.dataplane.check_drift(self.desired_state())
            except DataplaneError as exc:
                drift = [f"cannot read kernel state: {exc}"]
            for line in drift:
                log.warning("firewall drift repaired: %s", line, extra={"event": "drift"})
            if drift:
                self.metrics.drift_repairs.inc(len(drift))
                await self.apply_firewall(full=True)
        if self.cp_reachable:
            try:
                live = [c.uid for c in self.clients.values() if c.established]
                closed = await self.cp.session_report(SessionReport(pod=self.s.name, live=live))
                if closed:
                    log.info("control plane closed %d stale session(s) of this pod", closed)
            except ControlPlaneError as exc:
                log.info("session report failed: %s", exc)

    async def _reconcile_clients(self, listed: list[StatusClient]) -> None:
        present = {c.client_id: c for c in listed if c.client_id is not None}
        # Ghosts: established here, gone from OpenVPN (a DISCONNECT we never saw).
        for cid, client in list(self.clients.items()):
            if client.established and cid not in present:
                log.warning("client %d (%s) vanished without DISCONNECT", cid, client.user)
                self.on_disconnect(
                    ClientEvent(kind=ClientEventKind.DISCONNECT, cid=cid, kid=None),
                    reason="missing from openvpn status (reconciled)",
                )
        # Orphans: connected in OpenVPN, unknown here (the agent restarted).
        cached = (
            self._load_cached_clients() if any(cid not in self.clients for cid in present) else {}
        )
        unanswered: set[int] = set()
        for cid, row in present.items():
            if cid in self.clients:
                continue
            if not row.virtual_address:
                # A CONNECT sent while no agent was attached is never replayed: the client
                # would wait for its hand-window. Seen twice in a row, it gets a restart.
                unanswered.add(cid)
                if cid in self._unanswered and self.mgmt is not None:
                    log.info(
                        "client %d (%s) never got an answer; asking it to reconnect",
                        cid,
                        row.common_name,
                    )
                    with contextlib.suppress(ManagementError, ValueError):
                        await self.mgmt.client_kill(cid, "RESTART")
                continue
            await self._adopt(cid, row, cached)
        self._unanswered = unanswered

    async def _adopt(
        self, cid: int, row: StatusClient, cached: dict[tuple[str, str], LocalClient]
    ) -> None:
        user = self.view.users.get(row.common_name)
        vaddr = str(row.virtual_address)
        if user is None or not user.enabled:
            log.warning("found %s connected but not allowed; disconnecting", row.common_name)
            if self.mgmt is not None:
                with contextlib.suppress(ManagementError):
                    await self.mgmt.client_kill(cid, "HALT")
            return
        old = cached.get((row.common_name, vaddr))
        host, _, port = row.real_address.rpartition(":")
        client = LocalClient(
            cid=cid,
            user=row.common_name,
            mode=user.mode,
            tunnel_ip=vaddr,
            real_ip=host or row.real_address,
            real_port=int(port) if port.isdigit() else None,
            uid=old.uid if old else f"{self.s.name}-{secrets.token_hex(8)}",
            connected_at=old.connected_at
            if old
            else (row.connected_since.isoformat() if row.connected_since else _now().isoformat()),
            established=True,
            groups=list(user.groups),
        )
        if user.mode == "nat" and self.nat_alloc is not None:
            self.nat_alloc.reserve(ipaddress.IPv4Address(vaddr))
        self.clients[cid] = client
        self.owners[vaddr] = (client.user, client.uid)
        self._clients_dirty = True
        self._firewall_dirty.set()
        if old is None:
            self._spool_open(client)
        log.info(
            "adopted %s (%s) after restart",
            client.user,
            vaddr,
            extra={"event": "adopt", "user": client.user, "session_uid": client.uid},
        )

    async def reconcile_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.s.reconcile_interval)
            if self._stop.is_set():
                return
            await self.reconcile()

    # ------------------------------------------------------------------ openvpn supervision

    async def _attach(self) -> ManagementClient:
        deadline = time.monotonic() + 15
        while True:
            try:
                return await ManagementClient.connect(self.mgmt_socket, timeout=3)
            except ManagementError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def supervise_loop(self) -> None:
        """Keep openvpn running and attached; restart it with backoff when it dies."""
        delay = 1.0
        while not self._stop.is_set():
            proc = OpenVPNProcess(self.s.openvpn, self.conf_path, self.state_dir)
            pid = proc.recorded_pid()
            adopted = False
            if pid is not None and self.mgmt_socket.exists():
                proc.adopt(pid)
                adopted = True
            else:
                with contextlib.suppress(OSError):
                    self.mgmt_socket.unlink()
                await proc.start()
            self.openvpn = proc
            started = time.monotonic()
            try:
                self.mgmt = await self._attach()
                if not adopted:
                    self.clients.clear()
                    self.owners.clear()
                    if self.nat_alloc is not None and self.nat_pool is not None:
                        self.nat_alloc = ipam.AddressAllocator(self.nat_pool)
                self._firewall_dirty.set()
                events = asyncio.create_task(self.events_loop(self.mgmt), name="mgmt-events")
                await self.mgmt.command("hold release")
                with contextlib.suppress(ManagementError):
                    self.openvpn_version = (await self.mgmt.version()).openvpn
                await self._routes_up()
                self.openvpn_ready = True
                self.last_mgmt_ok = time.monotonic()
                await self.reconcile()
                await events
            except ManagementError as exc:
                log.error("openvpn management failed: %s", exc)
            finally:
                self.openvpn_ready = False
            if self._stop.is_set():
                return
            code = await asyncio.wait_for(proc.wait(), 10) if proc.running else -1
            log.error("openvpn stopped (exit %s); restarting in %.0fs", code, delay)
            self.metrics.openvpn_restarts.inc()
            await proc.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30)

    async def _routes_up(self) -> None:
        """Route the gateway pool into the tunnel (its clients are on another subnet)."""
        if self.gateway_pool is None:
            return
        for _ in range(50):
            proc = await asyncio.create_subprocess_exec(
                "ip",
                "route",
                "replace",
                str(self.gateway_pool),
                "dev",
                TUN_DEV,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
            if proc.returncode == 0:
                return
            await asyncio.sleep(0.1)  # tun0 appears a moment after hold release
        log.error("could not route %s into %s: %s", self.gateway_pool, TUN_DEV, err.decode())

    async def events_loop(self, mgmt: ManagementClient) -> None:
        async for event in mgmt.events():
            self.last_tick = time.monotonic()
            if isinstance(event, ClientEvent):
                if event.kind in (ClientEventKind.CONNECT, ClientEventKind.REAUTH):
                    # A task per decision would reorder answers; decisions are fast and local.
                    await self.on_connect(event)
                elif event.kind is ClientEventKind.ESTABLISHED:
                    self.on_established(event)
                elif event.kind is ClientEventKind.DISCONNECT:
                    self.on_disconnect(event)
            elif isinstance(event, Hold) and self.openvpn_ready:
                # openvpn restarted itself (SIGUSR1) and waits again.
                with contextlib.suppress(ManagementError):
                    await mgmt.command("hold release")

    # ------------------------------------------------------------------ housekeeping

    async def heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            self.last_tick = time.monotonic()
            if self._clients_dirty:
                self._save_clients()
            if self._view_dirty:
                self._save_view()
            if self.s.crl_verify and time.monotonic() - self._crl_refreshed > CRL_REFRESH:
                # CRLs expire (30 days); OpenVPN would refuse everyone with an expired one.
                await self.refresh_crl()
            if self.config_applied and not self._firewall_dirty.is_set():
                # Nothing pending: every change up to the view's revision is enforced.
                self.applied_revision = self.view.revision
            try:
                await self.cp.heartbeat(
                    Heartbeat(
                        name=self.s.name,
                        applied_revision=self.applied_revision,
                        ready=self.ready()[0],
                        status={
                            "clients": sum(1 for c in self.clients.values() if c.established),
                            "openvpn": self.openvpn_ready,
                            "view_revision": self.view.revision,
                            # Sessions, denied attempts and flow records waiting.
                            "spooled": sum(
                                len(sp) for sp in (self.spool, self.flow_spool) if sp is not None
                            ),
                        },
                    )
                )
                self.cp_reachable = True
            except ControlPlaneError as exc:
                self.cp_reachable = False
                log.debug("heartbeat failed: %s", exc)
            self.metrics.cp_up.set(1 if self.cp_reachable else 0)
            self.metrics.clients.set(sum(1 for c in self.clients.values() if c.established))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.s.heartbeat_interval)

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the loop turns and OpenVPN answers on its management socket."""
        now = time.monotonic()
        loop_ok = now - self.last_tick < 30
        mgmt_ok = self.mgmt is not None and not self.mgmt.closed
        detail = {"loop": loop_ok, "management": mgmt_ok}
        return loop_ok and (mgmt_ok or self.draining), detail

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: registered, firewall applied, OpenVPN listening, not draining."""
        detail = {
            "registered": self.registered,
            "config_applied": self.config_applied,
            "openvpn": self.openvpn_ready,
            "draining": self.draining,
            "control_plane": self.cp_reachable,
            "revision": self.view.revision,
            # Informational: a pod without flow audit still serves users (alert on it).
            "flow_audit": self.flow_listener_up if self.s.flow_audit else "off",
        }
        ok = self.registered and self.config_applied and self.openvpn_ready and not self.draining
        return ok, detail

    async def probe_management(self) -> bool:
        if self.mgmt is None or self.mgmt.closed:
            return False
        try:
            await self.mgmt.pid(timeout=2)
        except ManagementError:
            return False
        self.last_mgmt_ok = time.monotonic()
        return True

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: draining")
            self.draining = True
            self._stop.set()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and exit."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool = Spool(self.state_dir, "sessions")
        if self.s.flow_audit:
            self.flow_spool = Spool(
                self.state_dir, "flows", max_bytes=self.s.flow_spool_mb * 1024 * 1024
            )
        from vpnfleet.agent.health import serve_http

        http = asyncio.create_task(serve_http(self), name="http")
        try:
            await self.register()
            if self._stop.is_set():
                return
            await self.load_view()
            self.render_config()
            await self.dataplane.ensure_sysctls()
            loops = [
                ("supervise", self.supervise_loop()),
                ("follow", self.follow_loop()),
                ("firewall", self.firewall_loop()),
                ("deliver", self.deliver_loop()),
                ("reconcile", self.reconcile_loop()),
                ("heartbeat", self.heartbeat_loop()),
                ("denied", self.denied_loop()),
            ]
            if self.flow_spool is not None:
                self._seed_owners()
                self.flow_tracker = FlowTracker(
                    self.s.name,
                    self._tunnel_networks(),
                    self.owners.get,
                    record_destination=self.s.flow_destinations,
                )
                loops += [("flows", self.flow_loop()), ("flow-deliver", self.flow_deliver_loop())]
            tasks = [asyncio.create_task(coro, name=name) for name, coro in loops]
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    log.error("task %s failed: %r", task.get_name(), task.exception())
                    self.request_stop()
            await self.drain(tasks)
        finally:
            http.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await http
            if self.spool is not None:
                self.spool.close()
            if self.flow_spool is not None:
                self.flow_spool.close()
            await self.cp.close()

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Tell clients to reconnect elsewhere, close their sessions, tidy up, stop openvpn."""
        self.draining = True
        established = [c for c in self.clients.values() if c.established]
        log.info(
            "draining %d client(s) in %.0fs (readiness is off now)",
            len(established),
            self.s.drain_delay,
        )
        await asyncio.sleep(self.s.drain_delay)
        established = [c for c in self.clients.values() if c.established]
        for client in established:
            await self._kick(client, "pod draining", halt=False)
        deadline = time.monotonic() + self.s.drain_timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for client in list(self.clients.values()):
            self._forget(client.cid)
            if client.established:
                self._spool_close(client, 0, 0, "pod drained")
        deliver = next((t for t in tasks if t.get_name() == "deliver"), None)
        others = [t for t in tasks if t is not deliver]
        if self.flow_listener is not None:
            await asyncio.sleep(0.3)  # the DESTROY events of the clients' last flows
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._finish_flows(budget=3)
        if deliver is not None:
            # It stops after its current batch now that stop is set; then we own the spool.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(deliver, 5)
        # Give the records a moment to reach the control plane; the spool keeps the rest.
        deadline = time.monotonic() + 3
        while self.spool is not None and len(self.spool) and time.monotonic() < deadline:
            await self._flush_spool_once()
        if self.mgmt is not None:
            await self.mgmt.close()
        if self.openvpn is not None:
            await self.openvpn.stop()
        try:
            await self.dataplane.remove_all()
        except DataplaneError as exc:
            log.error("firewall cleanup failed: %s", exc)
        self._save_clients()
        with contextlib.suppress(ControlPlaneError):
            await self.cp.heartbeat(
                Heartbeat(
                    name=self.s.name,
                    applied_revision=self.applied_revision,
                    ready=False,
                    status={"clients": 0, "openvpn": False, "drained": True},
                )
            )
        log.info("drained; bye")

    async def _flush_spool_once(self) -> None:
        assert self.spool is not None
        batch = self.spool.peek(50)
        done = 0
        try:
            for record in batch:
                await self._deliver(record)
                done += 1
        except ControlPlaneError:
            await asyncio.sleep(0.2)
        finally:
            self.spool.commit(done)
