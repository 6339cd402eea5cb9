"""The control plane's Prometheus metrics and its `/metrics` route.

- API latency: a small ASGI middleware times every request and labels it with the route
  *template* (``/api/v1/users/{name}``, never the raw path), the method and the status class;
  requests no route matched share one label value, so scanners cannot blow up cardinality.
  The watch stream is long-lived by design: it is counted as `vpnfleet_watch_subscribers`
  instead of polluting the latency histogram; streams refused at the replica's limit are
  counted in `vpnfleet_watch_refused_total` (and answered 503, which the histogram keeps).
- Fleet and database facts are read at scrape time in a worker thread with a timeout: a slow or
  unreachable database turns `vpnfleet_database_up` to 0 and leaves the database-derived
  series out (instead of hanging the scrape). A probe still running from an earlier scrape is
  awaited, never started twice, so a stuck database cannot pile up threads.
- PKI facts (CA and certificate expiry) change rarely and are re-read once a minute.

Every replica serves the same database-derived series; aggregate them with `max by (pod)` (the
rules and dashboard in deploy/ do). `/metrics` needs no token, like `/healthz`: it carries pod
names, counts and expiry times, no user names.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram
from prometheus_client import generate_latest as render
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.models import Certificate, PKIState, Pod, User, VpnSession
from vpnfleet.wire import CERT_EXPIRY_WARNING, POD_FORGET_AFTER

if TYPE_CHECKING:
    from vpnfleet.controlplane.state import AppState

log = logging.getLogger("vpnfleet.server.metrics")

WATCH_ROUTE = "/api/v1/watch"
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A pod whose last heartbeat is older than this is "silent" (the agent beats every 5 s).
POD_SILENT_AFTER = dt.timedelta(seconds=60)


# ------------------------------------------------------------------ database facts


@dataclass(frozen=True)
class PodFacts:
    """One recently heard-from pod as the control plane last heard from it."""

    name: str
    ready: bool
    last_heartbeat: float | None
    applied_revision: int
    clients: int | None
    spooled: int | None
    drained: bool


@dataclass(frozen=True)
class PKIFacts:
    """Expiry times (unix seconds) of the CA and of the soonest current leaf certificates."""

    ca_not_after: float | None
    soonest: dict[str, float] = field(default_factory=dict)  # kind -> notAfter
    expiring: dict[str, int] = field(default_factory=dict)  # kind -> count within 30 days
    read_at: float = 0.0


@dataclass(frozen=True)
class DbFacts:
    """One scrape's reading of the database; `up` False leaves everything else out."""

    up: bool
    probe_seconds: float | None = None
    pods: tuple[PodFacts, ...] = ()
    sessions_by_pod: dict[str, int] = field(default_factory=dict)
    pki: PKIFacts | None = None


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_pods(db: Session, now: dt.datetime) -> list[PodFacts]:
    """Pods heard from (or registered) within POD_FORGET_AFTER."""
    since = now - POD_FORGET_AFTER
    rows = db.execute(
        select(
            Pod.name,
            Pod.ready,
            Pod.last_heartbeat,
            Pod.applied_revision,
            Pod.status,
        ).where(
            (Pod.last_heartbeat >= since)
            | (Pod.last_heartbeat.is_(None) & (Pod.registered_at >= since))
        )
    ).all()
    out = []
    for name, ready, beat, applied, status in rows:
        status = status if isinstance(status, dict) else {}
        out.append(
            PodFacts(
                name=name,
                ready=bool(ready),
                last_heartbeat=beat.timestamp() if beat is not None else None,
                applied_revision=int(applied or 0),
                clients=_int_or_none(status.get("clients")),
                spooled=_int_or_none(status.get("spooled")),
                drained=bool(status.get("drained")),
            )
        )
    return sorted(out, key=lambda p: p.name)


def read_pki(db: Session, now: dt.datetime, live_pods: set[str]) -> PKIFacts:
    """CA expiry, and the soonest expiry among certificates in use.

    "In use": the newest unrevoked, unexpired certificate of an enabled user (client) or of a
    pod heard from lately (server). Superseded certificates and those of departed pods would
    otherwise keep an expiry alert firing for certificates nobody uses.
    """
    ca_pem = db.scalar(select(PKIState.ca_cert_pem).where(PKIState.id == 1))
    ca_not_after = pki.cert_info(ca_pem).not_after.timestamp() if ca_pem else None
    newest = (
        select(func.max(Certificate.id))
        .where(Certificate.revoked_at.is_(None))
        .group_by(Certificate.kind, Certificate.user_id, Certificate.pod_id)
    )
    rows = db.execute(
        select(Certificate.kind, Certificate.not_after, User.enabled, Pod.name)
        .outerjoin(User, User.id == Certificate.user_id)
        .outerjoin(Pod, Pod.id == Certificate.pod_id)
        .where(Certificate.id.in_(newest), Certificate.not_after > now)
    ).all()
    soonest: dict[str, float] = {}
    expiring: dict[str, int] = {"client": 0, "server": 0}
    for kind, not_after, enabled, pod_name in rows:
        in_use = (kind == "client" and enabled) or (kind == "server" and pod_name in live_pods)
        if not in_use:
            continue
        t = not_after.timestamp()
        soonest[kind] = min(soonest.get(kind, t), t)
        if not_after - now <= CERT_EXPIRY_WARNING:
            expiring[kind] = expiring.get(kind, 0) + 1
    return PKIFacts(ca_not_after, soonest, expiring, read_at=time.monotonic())


def read_facts(state: AppState, previous_pki: PKIFacts | None, pki_every: float) -> DbFacts:
    """Everything database-derived, in one short transaction (runs in a worker thread)."""
    started = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    with state.factory() as db, db.begin():
        db.execute(text("SELECT 1"))
        probe = time.perf_counter() - started
        pods = read_pods(db, now)
        sessions = {
            str(pod): int(n)
            for pod, n in db.execute(
                select(VpnSession.pod_name, func.count())
                .where(VpnSession.ended_at.is_(None))
                .group_by(VpnSession.pod_name)
            )
        }
        facts_pki = previous_pki
        if facts_pki is None or time.monotonic() - facts_pki.read_at >= pki_every:
            live = {p.name for p in pods if not p.drained}
            facts_pki = read_pki(db, now, live)
    return DbFacts(
        up=True, probe_seconds=probe, pods=tuple(pods), sessions_by_pod=sessions, pki=facts_pki
    )


# ------------------------------------------------------------------ the collector


class FleetCollector(Collector):
    """Serves the last DbFacts (set by `ControlPlaneMetrics.refresh`) and the hub's head."""

    def __init__(self) -> None:
        self.facts = DbFacts(up=False)
        self.head = 0
        # The change hub's own counts (controlplane/watch.py), copied at each refresh.
        self.watch_limit = 0
        self.watch_refused = 0
        self.watch_log_reads = 0
        # The snapshot cache's counts (controlplane/snapshotcache.py), copied at each refresh.
        self.snapshot_builds = 0
        self.snapshot_shared = 0
        self.clock = time.time

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = self.facts
        up = GaugeMetricFamily("vpnfleet_database_up", "1 if SELECT 1 answered within the timeout")
        up.add_metric([], 1.0 if f.up else 0.0)
        yield up
        head = GaugeMetricFamily(
            "vpnfleet_changelog_head_revision", "Newest revision this replica has seen"
        )
        head.add_metric([], self.head)
        yield head
        limit = GaugeMetricFamily(
            "vpnfleet_watch_subscriber_limit",
            "Most watch streams this replica serves at once (VPNFLEET_WATCH_MAX_SUBSCRIBERS)",
        )
        limit.add_metric([], self.watch_limit)
        yield limit
        yield CounterMetricFamily(
            "vpnfleet_watch_refused",
            "Watch streams refused (503) because the replica served its limit",
            value=self.watch_refused,
        )
        yield CounterMetricFamily(
            "vpnfleet_watch_log_reads",
            "Reads of the change log for streams further behind than the in-memory ring",
            value=self.watch_log_reads,
        )
        yield CounterMetricFamily(
            "vpnfleet_snapshot_builds",
            "Fleet snapshots this replica built for agents",
            value=self.snapshot_builds,
        )
        yield CounterMetricFamily(
            "vpnfleet_snapshot_shared",
            "Snapshot requests that came during a build and shared the next one with others",
            value=self.snapshot_shared,
        )
        if not f.up:
            return
        if f.probe_seconds is not None:
            probe = GaugeMetricFamily(
                "vpnfleet_database_probe_seconds", "Time SELECT 1 took at this scrape"
            )
            probe.add_metric([], f.probe_seconds)
            yield probe
        yield from self._pods(f)
        yield from self._pki(f.pki)

    def _pods(self, f: DbFacts) -> Iterator[Metric]:
        now = self.clock()
        states = {"ready": 0, "not_ready": 0, "silent": 0, "drained": 0}
        ready = GaugeMetricFamily(
            "vpnfleet_pod_ready", "1 if the pod said it is ready", labels=["pod"]
        )
        beat = GaugeMetricFamily(
            "vpnfleet_pod_last_heartbeat_timestamp_seconds",
            "Unix time of the pod's last heartbeat",
            labels=["pod"],
        )
        applied = GaugeMetricFamily(
            "vpnfleet_pod_applied_revision",
            "Revision the pod last said it enforces",
            labels=["pod"],
        )
        lag = GaugeMetricFamily(
            "vpnfleet_pod_revision_lag",
            "Head revision minus the pod's applied revision (as of its last heartbeat)",
            labels=["pod"],
        )
        clients = GaugeMetricFamily(
            "vpnfleet_pod_clients", "Clients the pod reported at its last heartbeat", labels=["pod"]
        )
        spooled = GaugeMetricFamily(
            "vpnfleet_pod_spooled_records", "Records the pod had not delivered yet", labels=["pod"]
        )
        live = GaugeMetricFamily(
            "vpnfleet_pod_sessions_live", "Open sessions recorded for the pod", labels=["pod"]
        )
        quiet = POD_SILENT_AFTER.total_seconds()
        for p in f.pods:
            silent = p.last_heartbeat is None or now - p.last_heartbeat > quiet
            if p.drained:
                states["drained"] += 1
                continue
            states["silent" if silent else "ready" if p.ready else "not_ready"] += 1
            ready.add_metric([p.name], 1.0 if p.ready and not silent else 0.0)
            if p.last_heartbeat is not None:
                beat.add_metric([p.name], p.last_heartbeat)
            applied.add_metric([p.name], p.applied_revision)
            lag.add_metric([p.name], max(0, self.head - p.applied_revision))
            if p.clients is not None:
                clients.add_metric([p.name], p.clients)
            if p.spooled is not None:
                spooled.add_metric([p.name], p.spooled)
            live.add_metric([p.name], f.sessions_by_pod.get(p.name, 0))
        pods = GaugeMetricFamily(
            "vpnfleet_pods",
            "Pods heard from within the last hour, by state (silent: no heartbeat for 60 s)",
            labels=["state"],
        )
        for state, n in states.items():
            pods.add_metric([state], n)
        total = GaugeMetricFamily("vpnfleet_sessions_live", "Open sessions in the whole fleet")
        total.add_metric([], sum(f.sessions_by_pod.values()))
        yield from (pods, ready, beat, applied, lag, clients, spooled, live, total)

    @staticmethod
    def _pki(facts: PKIFacts | None) -> Iterator[Metric]:
        if facts is None:
            return
        if facts.ca_not_after is not None:
            ca = GaugeMetricFamily("vpnfleet_ca_expiry_timestamp_seconds", "notAfter of the CA")
            ca.add_metric([], facts.ca_not_after)
            yield ca
        soonest = GaugeMetricFamily(
            "vpnfleet_cert_expiry_soonest_timestamp_seconds",
            "Soonest notAfter among certificates in use, by kind (client, server)",
            labels=["kind"],
        )
        for kind, t in sorted(facts.soonest.items()):
            soonest.add_metric([kind], t)
        yield soonest
        expiring = GaugeMetricFamily(
            "vpnfleet_certs_expiring_soon",
            "Certificates in use that expire within 30 days, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(facts.expiring.items()):
            expiring.add_metric([kind], n)
        yield expiring


# ------------------------------------------------------------------ registry and refresh


class ControlPlaneMetrics:
    """The registry of one app (tests run several apps in one process)."""

    def __init__(self, db_timeout: float = 2.0, pki_every: float = 60.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.db_timeout = db_timeout
        self.pki_every = pki_every
        self.latency = Histogram(
            "vpnfleet_api_request_duration_seconds",
            "API requests by route template, method and status class",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.watch_subscribers = Gauge(
            "vpnfleet_watch_subscribers", "Open watch streams on this replica", registry=r
        )
        self.fleet = FleetCollector()
        r.register(self.fleet)
        self._probe: asyncio.Future[DbFacts] | None = None

    async def refresh(self, state: AppState) -> None:
        """Read the database-derived facts, within `db_timeout`, for the next render."""
        hub = state.hub
        self.fleet.head = hub.head
        self.fleet.watch_limit = hub.max_subscribers
        self.fleet.watch_refused = hub.refused
        self.fleet.watch_log_reads = hub.old_reads
        self.fleet.snapshot_builds = state.snapshots.builds
        self.fleet.snapshot_shared = state.snapshots.shared
        if self._probe is None or self._probe.done():
            previous = self.fleet.facts.pki
            self._probe = asyncio.ensure_future(
                run_in_threadpool(read_facts, state, previous, self.pki_every)
            )
        try:
            # shield: a timeout abandons the wait, not the probe (a thread cannot be killed);
            # the next scrape picks up its result or keeps waiting on it.
            self.fleet.facts = await asyncio.wait_for(asyncio.shield(self._probe), self.db_timeout)
        except TimeoutError:
            log.warning("metrics: database probe exceeded %.1fs", self.db_timeout)
            self.fleet.facts = DbFacts(up=False)
        except Exception as exc:  # any database failure is "down", never a failed scrape
            log.warning("metrics: database probe failed: %s", type(exc).__name__)
            self.fleet.facts = DbFacts(up=False)

    def render(self) -> bytes:
        return render(self.registry)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED


class MetricsMiddleware:
    """Times requests by route template; counts open watch streams."""

    def __init__(self, app: ASGIApp, metrics: ControlPlaneMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        watching = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, watching
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # The router has matched by now (it wrote scope["route"]).
                if status < 400 and _route_template(scope) == WATCH_ROUTE:
                    watching = True
                    self.metrics.watch_subscribers.inc()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if watching:
                self.metrics.watch_subscribers.dec()
            else:
                method = scope.get("method", "")
                self.metrics.latency.labels(
                    route=_route_template(scope),
                    method=method if method in METHODS else "OTHER",
                    status=f"{status // 100}xx",
                ).observe(time.perf_counter() - started)


router = APIRouter(tags=["system"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this replica (no token needed, like /healthz)."""
    m: ControlPlaneMetrics = request.app.state.metrics
    await m.refresh(request.app.state.vpnfleet)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, db_timeout: float = 2.0) -> ControlPlaneMetrics:
    """Add the middleware and the `/metrics` route to `app` (call once, before it serves)."""
    m = ControlPlaneMetrics(db_timeout=db_timeout)
    app.state.metrics = m
    app.add_middleware(MetricsMiddleware, metrics=m)
    app.include_router(router)
    return m
