"""The agent's own Prometheus metrics (a per-agent registry, so tests can run several)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vpnfleet.agent.exporter import AgentCollector, WithoutUsers

if TYPE_CHECKING:
    from vpnfleet.agent.exporter import AgentState


class AgentMetrics:
    """vpnfleet_* series of one agent. No label carries an unbounded value.

    With `agent`, the scrape-time series of agent/exporter.py (openvpn_* per pod and per user,
    policy lag, ipsets, spool, certificate expiry) are served from the same registry.
    ``registry`` holds everything (the user-metrics listener serves it); ``fleet_registry``
    is the same without per-user series (the probes listener on the pod network serves it).
    """

    def __init__(self, pod: str, agent: AgentState | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "vpnfleet_auth_decisions_total", "CONNECT decisions by result", ["result"], registry=r
        )
        self.decision_seconds = Histogram(
            "vpnfleet_auth_decision_seconds",
            "Time from CONNECT to the client-auth/deny answer",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.connects = Counter("vpnfleet_connects_total", "Established sessions", registry=r)
        self.disconnects = Counter("vpnfleet_disconnects_total", "Ended sessions", registry=r)
        self.clients = Gauge("vpnfleet_clients", "Connected clients", registry=r)
        self.revision = Gauge(
            "vpnfleet_view_revision", "Control-plane revision of the agent's view", registry=r
        )
        self.dataplane_seconds = Histogram(
            "vpnfleet_dataplane_apply_seconds",
            "Time to bring the firewall to the desired state",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r,
        )
        self.dataplane_errors = Counter(
            "vpnfleet_dataplane_errors_total", "Failed firewall updates", registry=r
        )
        self.drift_repairs = Counter(
            "vpnfleet_dataplane_drift_repairs_total",
            "Firewall drift found and repaired",
            registry=r,
        )
        self.groups_over_limit = Gauge(
            "vpnfleet_firewall_groups_over_limit",
            "Groups granting nothing because the firewall would exceed its element limit",
            registry=r,
        )
        self.openvpn_restarts = Counter(
            "vpnfleet_openvpn_restarts_total", "Times openvpn stopped and was restarted", registry=r
        )
        self.spooled = Gauge(
            "vpnfleet_session_records_spooled",
            "Session records waiting for the control plane",
            registry=r,
        )
        self.cp_up = Gauge(
            "vpnfleet_control_plane_up", "1 if the control plane answered lately", registry=r
        )
        self.denied = Counter(
            "vpnfleet_denied_packets_total",
            "Packets from clients that no grant allowed",
            registry=r,
        )
        self.bgp_routes = Gauge(
            "vpnfleet_bgp_announced_routes",
            "Gateway-user /32 routes this pod announces over BGP",
            registry=r,
        )
        self.bgp_sessions = Gauge(
            "vpnfleet_bgp_sessions_established",
            "BGP sessions of this pod's speaker that are up",
            registry=r,
        )
        self.info = Gauge("vpnfleet_agent_info", "Agent identity", ["pod"], registry=r)
        self.info.labels(pod=pod).set(1)
        self.collector: AgentCollector | None = None
        if agent is not None:
            self.collector = AgentCollector(agent)
            r.register(self.collector)
        self.fleet_registry = CollectorRegistry(auto_describe=False)
        self.fleet_registry.register(WithoutUsers(r))
