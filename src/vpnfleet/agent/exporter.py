"""Scrape-time metrics of one pod agent: OpenVPN's clients and the agent's own state.

A prometheus_client custom collector: nothing is counted on the hot path, every value is read
from the agent's state when Prometheus scrapes (a connect or disconnect costs nothing extra).

Two families of names:

- ``openvpn_*``: the series of patrickjahns/openvpn_exporter (what the seed deployment ran
  against OpenVPN's status file), with the same names and the same ``server`` and
  ``common_name`` labels, so dashboards built for it keep working. ``server`` is the pod name.
  ``openvpn_up`` is added (that exporter has none; kumina/openvpn_exporter has one).
  docs/observability.md maps these to both exporters' names.
- ``vpnfleet_*``: what only the agent knows (readiness, policy revision lag, ipsets, spool,
  flow listener counters, certificate expiry of the files OpenVPN uses).

Label policy: the only unbounded label is ``common_name`` (one value per connected user), and it
can be capped (``VPNFLEET_METRICS_MAX_CLIENTS``, default 1000: with more users connected the
per-user series are left out and only per-pod totals remain) or switched off
(``VPNFLEET_METRICS_PER_CLIENT=0``). No label carries an address, a port or a timestamp: the
exporter's ``real_address``/``virtual_address``/``connection_time`` labels would create a new
series per connection and are answered by the audit API instead.

Who may see user names: the per-user series (``PER_USER_FAMILIES``, the ones with a
``common_name`` label) are served only on the agent's user-metrics listener (127.0.0.1:9177 by
default, optionally behind a bearer token); the probes listener every pod exposes on the pod
network serves :class:`WithoutUsers`, the same registry with those series left out.

A pod runs a UDP and (unless turned off) a TCP OpenVPN server. The ``openvpn_*`` series keep
their names and labels and count both servers together (``openvpn_up`` is 1 only while every
server runs); the split by protocol is in separate series, ``vpnfleet_openvpn_server_up`` and
``vpnfleet_connections_by_proto`` (label ``proto``), so no existing series changes shape.

One user with two sessions on the same pod (laptop and phone) yields one series per user:
bytes are summed over the sessions, ``openvpn_connected_since`` is the oldest session's start.
patrickjahns/openvpn_exporter emits two samples with the same labels there, and Prometheus
rejects the whole scrape.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vpnfleet.core import fwrender, fwstate
from vpnfleet.core.mgmt_protocol import StatusClient

log = logging.getLogger("vpnfleet.agent.metrics")

DEFAULT_MAX_CLIENTS = 1000
MODES = ("nat", "gateway")
USER_LABEL = "common_name"
PER_USER_FAMILIES = frozenset(
    {"openvpn_bytes_received", "openvpn_bytes_sent", "openvpn_connected_since"}
)


# ------------------------------------------------------------------ what the collector reads


class _Client(Protocol):
    @property
    def cid(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def connected_at(self) -> str: ...
    @property
    def established(self) -> bool: ...
    @property
    def tunnel_ip(self) -> str: ...


class _Spool(Protocol):
    def __len__(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def dropped(self) -> int: ...


@dataclass(frozen=True)
class Readings:
    """Everything the collector reads from an agent at scrape time, as plain values.

    Built by ``PodAgent.readings()`` from its parts' public state; optional fields are None
    when the agent does not run that part (flow audit off, no watch stream yet).
    """

    pod: str
    state_dir: Path
    crl_verify: bool
    clients: Sequence[_Client]
    last_status: Sequence[StatusClient]
    last_status_at: float
    view_revision: int
    applied_revision: int
    applied_state: fwstate.DesiredState | None
    dataplane_stats: Any
    spools: Mapping[str, _Spool]
    openvpn_ready: bool
    openvpn_version: str | None
    draining: bool
    ready: bool
    watch_connected: bool | None = None
    watch_last_event: float | None = None  # monotonic
    listener_counters: Any = None
    tracker_counters: Any = None
    tracked_flows: int | None = None
    flow_listener_up: bool | None = None
    flows_delivered: int | None = None
    flows_refused: int | None = None
    # Per OpenVPN server ("udp", "tcp"): running and attached; established sessions.
    servers_ready: Mapping[str, bool] | None = None
    connections_by_server: Mapping[str, int] | None = None


class AgentState(Protocol):
    """What the collector reads from (an agent, or a bench that builds readings alone)."""

    def readings(self) -> Readings: ...


# ------------------------------------------------------------------ configuration


_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class ExporterConfig:
    """Per-user series on or off, and how many users at most get them."""

    per_client: bool = True
    max_clients: int = DEFAULT_MAX_CLIENTS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ExporterConfig:
        """From VPNFLEET_METRICS_PER_CLIENT and VPNFLEET_METRICS_MAX_CLIENTS.

        A bad value is logged and replaced by the default: metrics must never keep the
        agent (and so the VPN) from starting.
        """
        env = os.environ if env is None else env
        per_client = env.get("VPNFLEET_METRICS_PER_CLIENT", "1").strip().lower() not in _FALSE
        raw = env.get("VPNFLEET_METRICS_MAX_CLIENTS", "").strip()
        max_clients = DEFAULT_MAX_CLIENTS
        if raw:
            try:
                max_clients = int(raw)
                if max_clients < 0:
                    raise ValueError
            except ValueError:
                log.warning(
                    "VPNFLEET_METRICS_MAX_CLIENTS=%r is not a whole number >= 0; using %d",
                    raw,
                    DEFAULT_MAX_CLIENTS,
                )
                max_clients = DEFAULT_MAX_CLIENTS
        return cls(per_client=per_client, max_clients=max_clients)


# ------------------------------------------------------------------ per-user aggregation


@dataclass
class UserTotals:
    """One common name's sessions on this pod, folded into one set of values."""

    sessions: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    connected_since: float | None = None


def _iso_to_unix(text: str) -> float | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def per_user(clients: Iterable[_Client], status: Sequence[StatusClient]) -> dict[str, UserTotals]:
    """Established sessions grouped by common name, with OpenVPN's byte counters.

    Presence comes from the agent's client table (updated on every CONNECT/DISCONNECT event),
    byte counters from OpenVPN's last `status` listing (refreshed every reconcile), matched by
    client id: a disconnected user disappears at once, not at the next reconcile. ``status``
    holds the rows of every OpenVPN server of the pod; client ids repeat across servers, so a
    row is matched by client id and tunnel address (the servers split the NAT pool).
    """
    by_cid = {
        (row.client_id, str(row.virtual_address)): row
        for row in status
        if row.client_id is not None
    }
    out: dict[str, UserTotals] = {}
    for c in clients:
        if not c.established:
            continue
        t = out.get(c.user)
        if t is None:
            t = out[c.user] = UserTotals()
        t.sessions += 1
        row = by_cid.get((c.cid, c.tunnel_ip))
        if row is not None and row.common_name == c.user:
            t.bytes_received += row.bytes_received
            t.bytes_sent += row.bytes_sent
        since = _iso_to_unix(c.connected_at)
        if since is None and row is not None and row.connected_since is not None:
            since = row.connected_since.timestamp()
        if since is not None and (t.connected_since is None or since < t.connected_since):
            t.connected_since = since
    return out


# ------------------------------------------------------------------ helpers with memory


class LagClock:
    """How long the oldest revision the agent knows of has waited to be enforced.

    Measured at scrape resolution: the agent does not timestamp revisions, so the clock keeps
    the scrape times at which each newer view revision was first seen. When the applied
    revision passes an observation, that observation is dropped; the age of the oldest one
    left is the lag. It reads low by at most one scrape interval, never high.
    """

    def __init__(self, keep: int = 1024) -> None:
        # Bounded: an agent stuck for days under constant changes would grow it by one entry
        # per scrape; dropping the oldest only makes the reported lag smaller, still > 0.
        self._seen: deque[tuple[float, int]] = deque(maxlen=keep)

    def observe(self, now: float, view_revision: int, applied_revision: int) -> float:
        """Record one scrape's revisions; the lag in seconds (0 when nothing is pending)."""
        if view_revision <= applied_revision:
            self._seen.clear()
            return 0.0
        while self._seen and self._seen[0][1] <= applied_revision:
            self._seen.popleft()
        if not self._seen or self._seen[-1][1] != view_revision:
            self._seen.append((now, view_revision))
        return max(0.0, now - self._seen[0][0])


class FileExpiry:
    """Expiry of a PEM file (certificate notAfter or CRL nextUpdate), re-read only on change."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self._key: tuple[int, int] | None = None
        self._value: float | None = None

    def value(self) -> float | None:
        """Unix time, or None when the file is missing or unreadable."""
        try:
            st = self.path.stat()
        except OSError:
            self._key, self._value = None, None
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._key, self._value = key, self._read()
        return self._value

    def _read(self) -> float | None:
        try:
            data = self.path.read_bytes()
            if self.kind == "crl":
                next_update = x509.load_pem_x509_crl(data).next_update_utc
                return None if next_update is None else next_update.timestamp()
            return x509.load_pem_x509_certificate(data).not_valid_after_utc.timestamp()
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s for metrics: %s", self.path.name, exc)
            return None


def _version_labels(version: Any) -> tuple[str, str] | None:
    """("2.6.14", "x86_64-pc-linux-gnu") from `version`'s "OpenVPN 2.6.14 x86_64-... [SSL]"."""
    text = getattr(version, "openvpn", version)
    if not isinstance(text, str):
        return None
    words = text.split()
    if len(words) >= 3 and words[0] == "OpenVPN":
        return words[1], words[2]
    return (words[0], "") if words else None


# ------------------------------------------------------------------ the collector


def _g(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _c(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


# Flow listener / tracker counters: only when the agent runs the flow audit.
_LISTENER_COUNTERS = (
    ("events", "vpnfleet_flow_events", "conntrack events received"),
    ("overruns", "vpnfleet_flow_event_overruns", "Socket overruns: the kernel dropped events"),
    ("decode_errors", "vpnfleet_flow_decode_errors", "conntrack messages that did not decode"),
    ("resyncs", "vpnfleet_flow_resyncs", "Full conntrack dumps after lost events"),
    ("resync_failures", "vpnfleet_flow_resync_failures", "conntrack dumps that failed"),
)
_TRACKER_COUNTERS = (
    ("records", "vpnfleet_flow_records", "Flow records produced"),
    ("unattributed", "vpnfleet_flow_records_unattributed", "Flows from an unowned tunnel IP"),
    ("evicted", "vpnfleet_flow_records_evicted", "Open flows forgotten to bound memory"),
    ("inferred_ends", "vpnfleet_flow_ends_inferred", "Flow ends found by a resync"),
)
_DATAPLANE_COUNTERS = (
    ("full_applies", "vpnfleet_dataplane_full_applies", "Firewall rebuilt in full"),
    ("diff_applies", "vpnfleet_dataplane_diff_applies", "Firewall updated by set operations"),
    ("fallbacks", "vpnfleet_dataplane_fallbacks", "Diff applies that fell back to a full one"),
    ("flows_killed", "vpnfleet_conntrack_flows_killed", "conntrack entries cut on revocation"),
)


class AgentCollector(Collector):
    """Computes the agent's scrape-time series from its state (see the module docstring)."""

    def __init__(
        self,
        agent: AgentState,
        config: ExporterConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.config = config or ExporterConfig.from_env()
        self.clock = clock
        self.lag = LagClock()
        self._files: dict[str, FileExpiry] = {}

    def describe(self) -> list[Metric]:
        # Families without samples: lets the registry check names at registration without
        # reading an agent that may not be fully built yet.
        return [*self._families().values(), *self._optional_families().values()]

    # -- family declarations (one place, so describe() and collect() agree)

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        s, cn = ("server",), ("server", "common_name")
        fams: list[GaugeMetricFamily | CounterMetricFamily] = [
            _g("openvpn_up", "1 if OpenVPN runs and the agent holds its management interface", s),
            _g("openvpn_last_updated", "Unix time OpenVPN's client list was last read", s),
            _g("openvpn_connections", "Established client sessions", s),
            _g("openvpn_bytes_received", "Bytes received from the user, summed over sessions", cn),
            _g("openvpn_bytes_sent", "Bytes sent to the user, summed over sessions", cn),
            _g("openvpn_connected_since", "Unix time the user's oldest session started", cn),
            _g("vpnfleet_agent_ready", "1 if the pod is ready for clients (/readyz)"),
            _g("vpnfleet_agent_draining", "1 while the pod drains (SIGTERM)"),
            _g("vpnfleet_clients_by_mode", "Established sessions by connection mode", ("mode",)),
            _g("vpnfleet_clients_received_bytes", "Bytes received over all current sessions"),
            _g("vpnfleet_clients_sent_bytes", "Bytes sent over all current sessions"),
            _g(
                "vpnfleet_metrics_client_series",
                "Users with per-user openvpn_* series in this scrape",
            ),
            _g(
                "vpnfleet_metrics_clients_truncated",
                "1 if per-user series were left out (over VPNFLEET_METRICS_MAX_CLIENTS)",
            ),
            _g("vpnfleet_policy_applied_revision", "Revision the firewall enforces"),
            _g(
                "vpnfleet_policy_revision_lag",
                "Revisions the agent knows of but does not enforce yet",
            ),
            _g(
                "vpnfleet_policy_lag_seconds",
                "Age of the oldest revision not enforced yet (scrape resolution)",
            ),
            _g("vpnfleet_ipset_entries", "Entries of each ipset as last applied", ("set",)),
            _g("vpnfleet_spool_records", "Records waiting for the control plane", ("spool",)),
            _g(
                "vpnfleet_spool_bytes",
                "Size of the records waiting for the control plane",
                ("spool",),
            ),
            _c("vpnfleet_spool_dropped", "Records lost because the spool was full", ("spool",)),
            _g("vpnfleet_ca_expiry_timestamp_seconds", "notAfter of the CA file OpenVPN uses"),
            _g(
                "vpnfleet_server_cert_expiry_timestamp_seconds",
                "notAfter of this pod's server certificate",
            ),
        ]
        fams += [_c(name, doc) for _, name, doc in _DATAPLANE_COUNTERS]
        return {f.name: f for f in fams}

    @staticmethod
    def _optional_families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        # Emitted only when the agent has what they describe.
        fams: list[GaugeMetricFamily | CounterMetricFamily] = [
            _g("openvpn_server_info", "OpenVPN version", ("server", "version", "arch")),
            _g(
                "vpnfleet_openvpn_server_up",
                "1 if the pod's OpenVPN server for this protocol runs and is attached",
                ("proto",),
            ),
            _g("vpnfleet_connections_by_proto", "Established sessions by protocol", ("proto",)),
            _g(
                "vpnfleet_crl_next_update_timestamp_seconds",
                "nextUpdate of the CRL OpenVPN checks (only with --crl-verify)",
            ),
            _g("vpnfleet_watch_connected", "1 while the watch stream to the control plane is open"),
            _g(
                "vpnfleet_watch_last_event_age_seconds",
                "Seconds since the watch stream last delivered anything (heartbeats included)",
            ),
            _g("vpnfleet_flows_tracked", "Open flows the tracker remembers"),
            _g("vpnfleet_flow_listener_up", "1 while the conntrack flow listener runs"),
            _c("vpnfleet_flow_records_delivered", "Flow records the control plane stored"),
            _c("vpnfleet_flow_records_refused", "Flow records the control plane refused"),
        ]
        fams += [_c(name, doc) for _, name, doc in (*_LISTENER_COUNTERS, *_TRACKER_COUNTERS)]
        return {f.name: f for f in fams}

    # -- collection

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        extra = self._optional_families()
        r = self.agent.readings()
        now = self.clock()
        self._openvpn(r, fams, extra)
        self._policy(r, now, fams)
        self._spool(r, fams)
        self._files_expiry(r, fams, extra)
        self._optional(r, extra)
        yield from fams.values()
        for fam in extra.values():
            if fam.samples:
                yield fam

    def _openvpn(
        self,
        r: Readings,
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily],
        extra: dict[str, GaugeMetricFamily | CounterMetricFamily],
    ) -> None:
        server = r.pod
        clients = list(r.clients)
        users = per_user(clients, list(r.last_status))
        established = [c for c in clients if c.established]
        fams["openvpn_up"].add_metric([server], 1.0 if r.openvpn_ready else 0.0)
        if r.last_status_at > 0:
            fams["openvpn_last_updated"].add_metric([server], r.last_status_at)
        fams["openvpn_connections"].add_metric([server], len(established))
        by_mode = dict.fromkeys(MODES, 0)
        for c in established:
            by_mode[c.mode] = by_mode.get(c.mode, 0) + 1
        for mode, n in by_mode.items():
            fams["vpnfleet_clients_by_mode"].add_metric([mode], n)
        fams["vpnfleet_clients_received_bytes"].add_metric(
            [], sum(u.bytes_received for u in users.values())
        )
        fams["vpnfleet_clients_sent_bytes"].add_metric(
            [], sum(u.bytes_sent for u in users.values())
        )
        cfg = self.config
        truncated = cfg.per_client and len(users) > cfg.max_clients
        exported = 0
        if cfg.per_client and not truncated:
            received = fams["openvpn_bytes_received"]
            sent = fams["openvpn_bytes_sent"]
            since = fams["openvpn_connected_since"]
            for cn, t in users.items():
                labels = [server, cn]
                received.add_metric(labels, t.bytes_received)
                sent.add_metric(labels, t.bytes_sent)
                if t.connected_since is not None:
                    since.add_metric(labels, t.connected_since)
            exported = len(users)
        fams["vpnfleet_metrics_client_series"].add_metric([], exported)
        fams["vpnfleet_metrics_clients_truncated"].add_metric([], 1.0 if truncated else 0.0)
        version = _version_labels(r.openvpn_version)
        if version is not None:
            extra["openvpn_server_info"].add_metric([server, *version], 1.0)
        for proto, up in (r.servers_ready or {}).items():
            extra["vpnfleet_openvpn_server_up"].add_metric([proto], 1.0 if up else 0.0)
        for proto, n in (r.connections_by_server or {}).items():
            extra["vpnfleet_connections_by_proto"].add_metric([proto], n)

    def _policy(
        self, r: Readings, now: float, fams: dict[str, GaugeMetricFamily | CounterMetricFamily]
    ) -> None:
        fams["vpnfleet_agent_ready"].add_metric([], 1.0 if r.ready else 0.0)
        fams["vpnfleet_agent_draining"].add_metric([], 1.0 if r.draining else 0.0)
        view, applied = r.view_revision, r.applied_revision
        fams["vpnfleet_policy_applied_revision"].add_metric([], applied)
        fams["vpnfleet_policy_revision_lag"].add_metric([], max(0, view - applied))
        fams["vpnfleet_policy_lag_seconds"].add_metric([], self.lag.observe(now, view, applied))
        if r.applied_state is not None:
            for name, spec in fwrender.desired_sets(r.applied_state).items():
                fams["vpnfleet_ipset_entries"].add_metric([name], len(spec.elements))
        for attr, name, _ in _DATAPLANE_COUNTERS:
            value = getattr(r.dataplane_stats, attr, None)
            if isinstance(value, int | float):
                fams[name].add_metric([], value)

    @staticmethod
    def _spool(r: Readings, fams: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        # sessions (and denied attempts) always; flows when the agent records them.
        for name in ("sessions", *(n for n in r.spools if n != "sessions")):
            spool = r.spools.get(name)
            records, size, dropped = (
                (0, 0, 0) if spool is None else (len(spool), spool.size_bytes, spool.dropped)
            )
            fams["vpnfleet_spool_records"].add_metric([name], records)
            fams["vpnfleet_spool_bytes"].add_metric([name], size)
            fams["vpnfleet_spool_dropped"].add_metric([name], dropped)

    def _file(self, path: Path, kind: str) -> float | None:
        key = f"{kind}:{path}"
        reader = self._files.get(key)
        if reader is None:
            reader = self._files[key] = FileExpiry(path, kind)
        return reader.value()

    def _files_expiry(
        self,
        r: Readings,
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily],
        extra: dict[str, GaugeMetricFamily | CounterMetricFamily],
    ) -> None:
        d = Path(r.state_dir)
        for file, name in (
            ("ca.crt", "vpnfleet_ca_expiry_timestamp_seconds"),
            ("server.crt", "vpnfleet_server_cert_expiry_timestamp_seconds"),
        ):
            value = self._file(d / file, "cert")
            if value is not None:
                fams[name].add_metric([], value)
        # The agent refreshes its CRL copy only when a revocation happens; OpenVPN refuses
        # every client once it has expired, but only when it checks it (--crl-verify).
        if r.crl_verify:
            value = self._file(d / "crl.pem", "crl")
            if value is not None:
                extra["vpnfleet_crl_next_update_timestamp_seconds"].add_metric([], value)

    @staticmethod
    def _optional(r: Readings, extra: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        if r.watch_connected is not None:
            extra["vpnfleet_watch_connected"].add_metric([], 1.0 if r.watch_connected else 0.0)
        if r.watch_last_event is not None and r.watch_last_event > 0:
            # A monotonic timestamp: only its age is meaningful outside the process.
            age = max(0.0, time.monotonic() - r.watch_last_event)
            extra["vpnfleet_watch_last_event_age_seconds"].add_metric([], age)
        if r.listener_counters is not None:
            for attr, name, _ in _LISTENER_COUNTERS:
                value = getattr(r.listener_counters, attr, None)
                if isinstance(value, int | float):
                    extra[name].add_metric([], value)
        if r.tracker_counters is not None:
            for attr, name, _ in _TRACKER_COUNTERS:
                value = getattr(r.tracker_counters, attr, None)
                if isinstance(value, int | float):
                    extra[name].add_metric([], value)
        if r.tracked_flows is not None:
            extra["vpnfleet_flows_tracked"].add_metric([], r.tracked_flows)
        if r.flow_listener_up is not None:
            extra["vpnfleet_flow_listener_up"].add_metric([], 1.0 if r.flow_listener_up else 0.0)
        for value, name in (
            (r.flows_delivered, "vpnfleet_flow_records_delivered"),
            (r.flows_refused, "vpnfleet_flow_records_refused"),
        ):
            if value is not None:
                extra[name].add_metric([], value)


class WithoutUsers(Collector):
    """A registry's series with every per-user one left out: what the pod network may read.

    Whole families in ``PER_USER_FAMILIES`` go (not even their HELP lines remain), and any
    other sample that carries a ``common_name`` label is dropped too, so a per-user series
    added later cannot leak by being forgotten here.
    """

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        return []  # the wrapped registry has checked the names already

    def collect(self) -> Iterator[Metric]:
        for fam in self._registry.collect():
            if fam.name in PER_USER_FAMILIES:
                continue
            if any(USER_LABEL in sample.labels for sample in fam.samples):
                fam.samples = [s for s in fam.samples if USER_LABEL not in s.labels]
            yield fam
