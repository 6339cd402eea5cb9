"""The pod agent: wires its parts together, runs them, and drains on SIGTERM.

Each part owns its state and runs its own task; this module only builds them, passes messages
between them and answers the probes. Data flows one way — control plane → view → decisions →
kernel — and reports flow back (sessions, flows, denied attempts, heartbeats):

- :class:`~vpnfleet.agent.registration.Registration`: identity, keys, config, CRL.
- :class:`~vpnfleet.agent.follower.ViewFollower`: the fleet view, from snapshot + watch stream.
- :class:`~vpnfleet.agent.supervisor.OpenVPNSupervisor`, one per OpenVPN server (UDP, and the
  TCP fallback unless turned off): the openvpn process and its management session; client
  notifications in, tagged with the server they came from.
- :class:`~vpnfleet.agent.clients.ClientHandler`: the one session book of both servers (who is
  connected where, with which address), CONNECT decisions, kicks, adoption after a restart,
  the client journal.
- :class:`~vpnfleet.agent.hostroutes.HostRoutes`: the /32 routes of gateway users on the TCP
  server.
- :class:`~vpnfleet.agent.firewall.FirewallSync`: the kernel's sets, rules and open flows.
- :class:`~vpnfleet.agent.sessionship.SessionShipper`,
  :class:`~vpnfleet.agent.flowaudit.FlowAudit`, :class:`~vpnfleet.agent.deniedaudit.DeniedAudit`:
  audit records, spooled and delivered.
- :class:`~vpnfleet.agent.heartbeat.HeartbeatSender` and ``health.py``: reports and probes.

Messages: a view change pokes the firewall and makes the client handler converge (disconnect
what the view no longer allows); a client change pokes the firewall; a session the control
plane refuses is kicked; every few seconds a reconcile compares OpenVPN's client list with the
session book, asks the firewall to check for drift, and reports live sessions. Everything is
level-triggered: a missed event is repaired by the next reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vpnfleet.agent.bgp import BgpSync
from vpnfleet.agent.bird import BirdSpeaker
from vpnfleet.agent.clientjournal import ClientJournal
from vpnfleet.agent.clients import ClientHandler
from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.dataplane import Dataplane
from vpnfleet.agent.deniedaudit import NFLOG_GROUP, DeniedAudit
from vpnfleet.agent.exporter import Readings
from vpnfleet.agent.firewall import FirewallSync
from vpnfleet.agent.flowaudit import FlowAudit
from vpnfleet.agent.follower import ViewFollower
from vpnfleet.agent.heartbeat import HeartbeatSender
from vpnfleet.agent.hostroutes import HostRoutes
from vpnfleet.agent.management import ManagementError
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.netcommands import DataplaneError
from vpnfleet.agent.registration import TUN_DEVS, Registration
from vpnfleet.agent.runners import (
    BgpSpeaker,
    FirewallRunner,
    ManagementSession,
    ProcessRunner,
)
from vpnfleet.agent.sessionship import SessionShipper
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.spool import Spool
from vpnfleet.agent.ssologin import SsoLogins
from vpnfleet.agent.statedir import StateDir
from vpnfleet.agent.supervisor import OpenVPNSupervisor
from vpnfleet.core import bgpplan, fwlimits, fwstate
from vpnfleet.core.fleet import Effects, FleetView
from vpnfleet.core.fwdesired import DesiredStateBuilder
from vpnfleet.core.mgmt_protocol import ClientEvent
from vpnfleet.core.sessionbook import BookConfig, SessionBook
from vpnfleet.tokenbinding import is_loopback_url
from vpnfleet.wire import Heartbeat

log = logging.getLogger("vpnfleet.agent")

ADOPT_ATTEMPTS = 10  # status listings tried before a running openvpn is given up on
# How long the first server ready waits for the other's clients before the first firewall
# apply (longer than a supervisor's attach timeout: a server that cannot come up at all must
# not keep the other one's users out).
PREPARE_WAIT = 20.0
MAX_REPORTED_GROUPS = 10  # over-limit group names in the heartbeat status


class PodAgent:
    """The agent of one OpenVPN pod. ``run()`` until SIGTERM, then drain.

    ``firewall``, ``process``, ``connect`` and ``bgp_speaker`` replace the real runners (tests
    use the fakes in :mod:`vpnfleet.agent.fakes`); ``process`` and ``connect`` are given the
    server's name ("udp", "tcp").
    """

    def __init__(
        self,
        settings: AgentSettings,
        cp: ControlPlane | None = None,
        *,
        firewall: FirewallRunner | None = None,
        process: Callable[[str], ProcessRunner] | None = None,
        connect: Callable[[str], Awaitable[ManagementSession]] | None = None,
        bgp_speaker: BgpSpeaker | None = None,
    ) -> None:
        self.s = settings
        self.paths = StateDir(settings.state_dir)
        self.cp = cp or ControlPlane(
            settings.control_planes, settings.token, ca_file=settings.ca_file
        )
        self.metrics = AgentMetrics(settings.name, self)
        collector = self.metrics.collector
        if settings.user_metrics_listen == "off" and collector is not None:
            # No listener serves per-user series: do not build them for every scrape.
            collector.config = dataclasses.replace(collector.config, per_client=False)
        self.registration = Registration(settings, self.cp, self.paths)
        self.follower = ViewFollower(self.cp, self.paths.view, self._view_changed)
        self.sso = SsoLogins(self.cp)
        self.dataplane: FirewallRunner = firewall or Dataplane(settings.fw_prefix)
        self._process = process
        self._connect = connect
        self._bgp_speaker = bgp_speaker
        self.draining = False
        # /readyz stays on through a drain until every client has been told to reconnect:
        # Kubernetes already takes a terminating pod out of new connections, and kube-proxy
        # deletes a Service's UDP translations to a pod as soon as it stops serving (ready
        # off), after which the pod's RESTART reaches its clients from the pod's own address
        # and they drop it (they wait for their ping-restart instead: about 60 s).
        self.serving_ended = False
        # Groups the firewall denies for being over its element limit: name -> elements.
        self.over_limit: dict[str, int] = {}
        self._stop = asyncio.Event()
        # Built once registration tells the pools (see _assemble).
        self.clients: ClientHandler | None = None
        self.firewall: FirewallSync | None = None
        self.supervisors: dict[str, OpenVPNSupervisor] = {}
        self.host_routes: HostRoutes | None = None
        self._prepared: set[str] = set()
        self._all_prepared = asyncio.Event()
        # The book holds every server's clients (or PREPARE_WAIT ran out): only then may the
        # pod report its live sessions, since the control plane closes those it does not list.
        self._book_complete = False
        self.shipper: SessionShipper | None = None
        self.flow_audit: FlowAudit | None = None
        self.denied_audit: DeniedAudit | None = None
        self.bgp: BgpSync | None = None
        self.heartbeat = HeartbeatSender(self.cp, settings.heartbeat_interval, self._beat)

    # ------------------------------------------------------------------ assembly

    def _assemble(self) -> None:
        s, reg = self.s, self.registration
        nat, gateway = reg.nat_pool, reg.gateway_pool
        book = SessionBook(
            BookConfig(
                nat_pool=nat,
                gateway_pool=gateway,
                push_routes=tuple(ipaddress.IPv4Network(r) for r in s.push_routes),
                servers=s.servers,
                auth_tokens=self.registration.auth_tokens,
                sso_lifetime=self.registration.sso_lifetime,
            )
        )
        networks = book.config.tunnel_networks
        self.shipper = SessionShipper(
            Spool(s.state_dir, "sessions"), self.cp, s.name, metrics=self.metrics
        )
        self.clients = ClientHandler(
            book,
            ClientJournal(self.paths.journal),
            self.shipper,
            pod=s.name,
            view=lambda: self.follower.view,
            mgmt=self._session_of,
            changed=self._clients_changed,
            metrics=self.metrics,
            wait_current=self.follower.wait_current,
            sso=self.sso,
        )
        self.clients.load_journal()
        self.shipper.on_refused(self.clients.kick_uid)
        if s.flow_audit:
            self.flow_audit = FlowAudit(
                self.cp,
                s.name,
                Spool(s.state_dir, "flows", max_bytes=s.flow_spool_mb * 1024 * 1024),
                list(networks),
                self.clients.owner,
                out=sys.stdout if s.flow_log == "stdout" else None,
                record_destination=s.flow_destinations,
            )
        builder = DesiredStateBuilder(
            s.fw_prefix,
            networks,
            uplink=s.uplink,
            nflog_group=NFLOG_GROUP,
            log_denied=s.denied_audit,
        )
        clients = self.clients

        def desired() -> tuple[int, fwstate.DesiredState]:
            view = self.follower.view
            state = builder.build(view, clients.all())
            self._note_over_limit(builder.over_limit, builder.total_elements)
            return view.revision, state

        self.firewall = FirewallSync(
            self.dataplane,
            desired,
            open_flows=self.flow_audit.open_flows if self.flow_audit else None,
            metrics=self.metrics,
        )
        if s.denied_audit:
            self.denied_audit = DeniedAudit(
                s.fw_prefix, self.clients.owner, self.shipper, metrics=self.metrics
            )
        if s.bgp_config is not None:
            speaker = self._bgp_speaker or BirdSpeaker(s.bgp_config, self.paths, s.bird)

            def routes() -> bgpplan.Announced:
                killed = self.follower.view.killed().keys()
                return bgpplan.announcements(clients.all(), gateway, killed)

            self.bgp = BgpSync(speaker, routes, on_status=self._bgp_status)
        for server in s.servers:
            process, connect = self._process, self._connect
            self.supervisors[server] = OpenVPNSupervisor(
                self.paths,
                server=server,
                binary=s.openvpn,
                # The gateway pool is routed into the UDP server's device; a gateway user on
                # TCP gets a host route into tun1 (HostRoutes).
                gateway_pool=gateway if server == "udp" else None,
                process=functools.partial(process, server) if process else None,
                connect=functools.partial(connect, server) if connect else None,
                route=self.dataplane.route_into,
                metrics=self.metrics,
            )
        if gateway is not None and len(s.servers) > 1:
            self.host_routes = HostRoutes(
                self.dataplane, self.clients.book.gateway_routes, TUN_DEVS
            )

    def _session_of(self, server: str) -> ManagementSession | None:
        sup = self.supervisors.get(server)
        return sup.session if sup is not None else None

    @property
    def supervisor(self) -> OpenVPNSupervisor | None:
        """The UDP server's supervisor (every pod runs one)."""
        return self.supervisors.get("udp")

    @property
    def openvpn_ready(self) -> bool:
        """Every OpenVPN server of the pod runs and is attached."""
        return bool(self.supervisors) and all(s.ready for s in self.supervisors.values())

    # ------------------------------------------------------------------ messages

    def _note_over_limit(self, groups: dict[str, int], total: int) -> None:
        """Report groups the firewall denies for being over its limit, once per change."""
        if groups == self.over_limit:
            return
        for name in sorted(groups.keys() - self.over_limit.keys()):
            overflow = fwlimits.Overflow(name, groups[name], total)
            log.error(
                "%s; it grants nothing on this pod until its rules are narrowed",
                overflow.message().replace(" would need ", " needs "),
                extra={"event": "group_over_limit", "group": name},
            )
        for name in sorted(self.over_limit.keys() - groups.keys()):
            log.info(
                "group %r fits the firewall again and is enforced",
                name,
                extra={"event": "group_over_limit_cleared", "group": name},
            )
        self.over_limit = dict(groups)
        self.metrics.groups_over_limit.set(len(groups))

    def _bgp_status(self, routes: int, sessions: int) -> None:
        self.metrics.bgp_routes.set(routes)
        self.metrics.bgp_sessions.set(sessions)

    def _clients_changed(self) -> None:
        if self.firewall is not None:
            self.firewall.poke()
        if self.host_routes is not None:
            self.host_routes.poke()
        if self.bgp is not None:
            self.bgp.poke()

    async def _view_changed(self, effects: Effects | None) -> None:
        """A change event (``effects``) or a resync (None) reached the fleet view."""
        view = self.follower.view
        fw, clients = self.firewall, self.clients
        if fw is None or clients is None:
            return
        if effects is None or effects.dataplane:
            fw.poke()
        if self.bgp is not None and (effects is None or effects.sessions):
            self.bgp.poke()  # a session of ours replaced elsewhere: stop announcing it
        fw.note_revision(view.revision)
        self.metrics.revision.set(view.revision)
        if effects is None:
            await clients.converge()
            await self.registration.refresh_crl()
            return
        users = set(effects.users)
        for uid in effects.sessions:
            users |= clients.users_of(uid)
        if users:
            await clients.converge(users)
        if effects.crl:
            await self.registration.refresh_crl()

    async def prepare(self, adopted: bool, server: str) -> None:
        """Before ``server``'s openvpn lets clients in (its supervisor): its clients are in the
        book and the firewall is ready."""
        assert self.clients is not None and self.firewall is not None
        if adopted:
            # The running clients must be in the book before the first apply: otherwise the
            # firewall would lock them out and cut their connections.
            for _ in range(ADOPT_ATTEMPTS):
                if await self.clients.reconcile(server):
                    break
                await asyncio.sleep(0.5)
            else:
                raise ManagementError(f"could not list the running {server} openvpn's clients")
        else:
            self.clients.reset(f"openvpn ({server}) restarted", server)
        self._prepared.add(server)
        if self._prepared >= self.supervisors.keys():
            self._all_prepared.set()
        # The first apply (and the cut of disallowed flows that follows it) must see the
        # clients of every server: one applied before the other server's running clients
        # were adopted would lock them out and cut their connections.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_prepared.wait(), PREPARE_WAIT)
        self._book_complete = True
        self.firewall.start()
        if self.bgp is not None:
            self.bgp.allow()  # the book is complete: announce from it (adopting a running BIRD)
        await self.firewall.wait_ready()

    async def on_event(self, ev: ClientEvent, server: str) -> None:
        assert self.clients is not None
        await self.clients.on_event(ev, server)

    async def _reconcile_loop(self) -> None:
        assert self.clients is not None and self.firewall is not None
        assert self.shipper is not None and self.supervisors
        while True:
            await asyncio.sleep(self.s.reconcile_interval)
            for server, sup in self.supervisors.items():
                if sup.ready:
                    await self.clients.reconcile(server)
            await self.clients.end_lapsed_logins()
            if self.host_routes is not None:
                self.host_routes.check_soon()
            if self.firewall.ready:
                self.firewall.check_drift_soon()
            # Not before every server's running clients are adopted: a report made while a
            # slow server's clients are not yet in the book would close their sessions (and
            # the control plane would then have them disconnected).
            if self.cp.reachable and self._book_complete:
                await self.shipper.report(self.clients.live_uids())

    # ------------------------------------------------------------------ reports and probes

    def _beat(self, ready: bool | None = None, drained: bool = False) -> Heartbeat:
        clients = len(self.clients.established()) if self.clients else 0
        self.metrics.clients.set(clients)
        self.metrics.cp_up.set(1 if self.cp.reachable else 0)
        status: dict[str, object] = {
            "clients": 0 if drained else clients,
            "openvpn": self.openvpn_ready and not drained,
            "view_revision": self.follower.view.revision,
            # Sessions, denied attempts and flow records waiting.
            "spooled": sum(len(sp) for sp in self.spools().values()),
        }
        if self.over_limit:
            # Bounded: a handful of names is enough to act on; the count says the rest.
            status["groups_over_limit"] = sorted(self.over_limit)[:MAX_REPORTED_GROUPS]
            status["groups_over_limit_count"] = len(self.over_limit)
        if drained:
            status["drained"] = True
        return Heartbeat(
            name=self.s.name,
            applied_revision=self.firewall.applied_revision if self.firewall else 0,
            ready=(self.ready()[0] and not self.draining) if ready is None else ready,
            status=status,
        )

    def spools(self) -> dict[str, Spool]:
        out: dict[str, Spool] = {}
        if self.shipper is not None:
            out["sessions"] = self.shipper.spool
        if self.flow_audit is not None:
            out["flows"] = self.flow_audit.spool
        return out

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the loop turns and every OpenVPN answers on its management socket."""
        loop_ok = self.heartbeat.loop_alive
        mgmt_ok = bool(self.supervisors) and all(
            s.session is not None for s in self.supervisors.values()
        )
        detail = {"loop": loop_ok, "management": mgmt_ok}
        return loop_ok and (mgmt_ok or self.draining), detail

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (serving): registered, firewall applied, OpenVPN (UDP and TCP) listening,
        and not past the point of a drain where its clients have been told to go. A draining
        pod says so (``draining``); the control plane hears it as not ready at once."""
        fw_ready = self.firewall is not None and self.firewall.ready
        ovpn = self.openvpn_ready
        audit: bool | str = "off"
        if self.flow_audit is not None:
            # Informational: a pod without flow audit still serves users (alert on it).
            audit = self.flow_audit.listener_up
        detail = {
            "registered": self.registration.registered,
            "config_applied": fw_ready,
            "openvpn": ovpn,
            "servers": {name: sup.ready for name, sup in self.supervisors.items()},
            "draining": self.draining,
            "control_plane": self.cp.reachable,
            "revision": self.follower.view.revision,
            "flow_audit": audit,
            # Informational: gateway users are unreachable without a session, but NAT users
            # are served, and a router outage must not empty the whole Service.
            "bgp_sessions": self.bgp.established if self.bgp is not None else "off",
        }
        ok = self.registration.registered and fw_ready and ovpn and not self.serving_ended
        return ok, detail

    async def probe_management(self) -> bool:
        if not self.supervisors:
            return False
        return all([await s.probe() for s in self.supervisors.values()])

    @property
    def view(self) -> FleetView:
        return self.follower.view

    def readings(self) -> Readings:
        """What /metrics reports, read from the parts (see agent/exporter.py)."""
        clients, fw, sup, flows = self.clients, self.firewall, self.supervisor, self.flow_audit
        established = clients.established() if clients else []
        return Readings(
            pod=self.s.name,
            state_dir=self.s.state_dir,
            crl_verify=self.s.crl_verify,
            clients=clients.all() if clients else [],
            last_status=list(clients.last_status) if clients else [],
            last_status_at=clients.last_status_at if clients else 0.0,
            view_revision=self.follower.view.revision,
            applied_revision=fw.applied_revision if fw else 0,
            applied_state=fw.applied_state if fw else None,
            dataplane_stats=self.dataplane.stats,
            spools=self.spools(),
            openvpn_ready=self.openvpn_ready,
            openvpn_version=sup.version if sup else None,
            servers_ready={name: s.ready for name, s in self.supervisors.items()},
            connections_by_server={
                name: sum(1 for c in established if c.server == name) for name in self.supervisors
            },
            draining=self.draining,
            ready=self.ready()[0],
            watch_connected=self.follower.connected,
            watch_last_event=self.follower.last_event,
            listener_counters=flows.listener.counters if flows and flows.listener else None,
            tracker_counters=flows.tracker.counters if flows else None,
            tracked_flows=len(flows.tracker) if flows else None,
            flow_listener_up=flows.listener_up if flows else None,
            flows_delivered=flows.delivered if flows else None,
            flows_refused=flows.refused if flows else None,
        )

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
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        self.paths.create()
        for url in self.s.control_planes:
            if url.startswith("http://") and not is_loopback_url(url):
                # Registration hands this pod its private key and the tls-crypt key.
                log.warning(
                    "the control plane URL %s is plain HTTP: the agent token and this pod's "
                    "keys cross the network unencrypted; use https:// with --ca-file",
                    url,
                )
        from vpnfleet.agent.health import serve_http

        http = asyncio.create_task(serve_http(self), name="http")
        tasks: list[asyncio.Task[None]] = []
        try:
            # First, before registering: a pod whose kernel settings are wrong (and cannot be
            # set from inside, as in an unprivileged container) stops with SysctlsMissing.
            await self.dataplane.ensure_sysctls()
            register = asyncio.create_task(self.registration.register())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([register, stop], return_when=asyncio.FIRST_COMPLETED)
            if not register.done():
                register.cancel()
                return
            stop.cancel()
            register.result()
            await self.follower.load()
            self.metrics.revision.set(self.follower.view.revision)
            self.registration.render_config()
            self._assemble()
            tasks = self._start_tasks()
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    log.error("task %s failed: %r", task.get_name(), task.exception())
                    self.request_stop()
            stop.cancel()
            await self.drain(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            http.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await http
            for spool in self.spools().values():
                spool.close()
            if self.clients is not None:
                self.clients.close()
            await self.sso.close()
            await self.cp.close()

    def _start_tasks(self) -> list[asyncio.Task[None]]:
        assert self.supervisors and self.firewall and self.shipper
        jobs: list[tuple[str, Awaitable[None]]] = [
            *((f"supervise-{name}", sup.run(self)) for name, sup in self.supervisors.items()),
            ("follow", self.follower.run()),
            ("firewall", self.firewall.run()),
            ("deliver", self.shipper.run()),
            ("reconcile", self._reconcile_loop()),
            ("heartbeat", self.heartbeat.run()),
            ("crl", self.registration.run_crl_refresh()),
        ]
        if self.denied_audit is not None:
            jobs.append(("denied", self.denied_audit.run()))
        if self.host_routes is not None:
            jobs.append(("host-routes", self.host_routes.run()))
        if self.bgp is not None:
            jobs.append(("bgp", self.bgp.run()))
        if self.flow_audit is not None:
            jobs += [
                ("flows", self.flow_audit.run_listener()),
                ("flow-deliver", self.flow_audit.run_delivery()),
            ]
        return [asyncio.create_task(job, name=name) for name, job in jobs]  # type: ignore[arg-type]

    async def drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Tell clients (of both servers) to reconnect elsewhere, close their sessions, tidy up,
        stop every openvpn."""
        self.draining = True
        clients = self.clients
        assert clients is not None and self.shipper is not None and self.supervisors
        log.info(
            "draining %d client(s) in %.0fs (readiness stays on until they have been told)",
            len(clients.established()),
            self.s.drain_delay,
        )
        # Meanwhile the Service stops sending new clients here (a terminating pod is out of
        # new connections; the lab's balancer does the same when /readyz says draining).
        await asyncio.sleep(self.s.drain_delay)
        told: set[tuple[str, int]] = set()
        deadline = time.monotonic() + self.s.drain_timeout
        while True:
            for client in clients.established():
                # Also those that connected during the drain (a pod that is not terminating,
                # e.g. a container restart, still gets new clients).
                # Plain RESTART, not RESTART,[N] ("next remote"): behind a Service the next
                # entry of a profile is the TCP fallback, where a UDP user would then stay.
                if client.key not in told:
                    told.add(client.key)
                    await clients.kick(client, "pod draining", halt=False)
            if not clients.all() or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        # Every client has been told (and OpenVPN has dropped them, or the time is up): stop
        # serving, so the Service forgets this pod's translations.
        self.serving_ended = True
        clients.end_all("pod drained")
        if self.bgp is not None:
            # Withdraw every route, then close the sessions: routers stop sending here now,
            # not when their hold timer runs out.
            await self.bgp.finish()
        if self.flow_audit is not None:
            await asyncio.sleep(0.3)  # the DESTROY events of the clients' last flows
        # Delivery ran through the moves; now one sender per spool, for a bounded time.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.flow_audit is not None:
            await self.flow_audit.finish(budget=3)
        await self.shipper.finish(budget=3)
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()))
        try:
            await self.dataplane.remove_all()
        except DataplaneError as exc:
            log.error("firewall cleanup failed: %s", exc)
        with contextlib.suppress(ControlPlaneError):
            await self.heartbeat.send(self._beat(ready=False, drained=True))
        log.info("drained; bye")
