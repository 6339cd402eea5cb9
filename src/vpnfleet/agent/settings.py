"""Agent settings: every flag also comes from a VPNFLEET_* environment variable (pod specs)."""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vpnfleet import tlspin
from vpnfleet.agent.podaddr import Found
from vpnfleet.core import netparse
from vpnfleet.core.birdconf import BgpConfig
from vpnfleet.core.secretstrength import require_strong

# Per-user metric series name the connected users: served on their own listener, on loopback
# unless the operator says otherwise (docs/observability.md, "Who may see user names").
DEFAULT_USER_METRICS_LISTEN = "127.0.0.1:9177"


@dataclass
class AgentSettings:
    # One control-plane URL, or several separated by commas (replicas, tried in this order;
    # see agent/cpclient.py and docs/operations.md, "Rolling upgrades and failover").
    server: str
    token: str
    name: str
    public_endpoint: str | None = None
    http: str = "0.0.0.0:9176"
    user_metrics_listen: str = DEFAULT_USER_METRICS_LISTEN  # "off": no per-user series at all
    user_metrics_token: str | None = None
    state_dir: Path = Path("/var/lib/vpnfleet-agent")
    uplink: str | None = None
    template: str = "default"
    pod_ip: str | None = None
    openvpn: str = "openvpn"
    port: int = 1194
    proto: str = "udp"
    # The TCP fallback server (docs/operations.md, "TCP fallback"): None turns it off.
    tcp_port: int | None = 443
    push_routes: list[str] = field(default_factory=list)
    fw_prefix: str = "vpnf"
    # Revocation is enforced at CONNECT (the user's current certificate serial), which lets
    # the client show why. crl_verify adds OpenVPN's own CRL check at the TLS handshake:
    # defence in depth, but a revoked client then only sees a TLS failure.
    crl_verify: bool = False
    reconcile_interval: float = 5.0
    heartbeat_interval: float = 5.0
    drain_timeout: float = 10.0
    # After readiness turns false, wait this long before moving clients, so the Service has
    # stopped sending new clients here by the time they reconnect.
    drain_delay: float = 3.0
    log_format: str = "text"
    # NAT audit (docs/audit.md): record every flow from a tunnel address, with or without its
    # destination (RFC 6888 REQ-12 lets operators leave destinations out), and print each
    # record as a JSON line on stdout ("stdout") or not ("off").
    flow_audit: bool = True
    flow_destinations: bool = True
    flow_log: str = "stdout"
    flow_spool_mb: int = 1024
    # Denied attempts (docs/audit.md): read the firewall's NFLOG of dropped packets.
    denied_audit: bool = True
    # The CA the control plane's HTTPS certificate must chain to (docs/operations.md, "TLS").
    ca_file: Path | None = None
    # BGP (docs/bgp.md): announce each hosted gateway user's /32 through a BIRD this agent runs.
    bgp: bool = False
    bgp_asn: str | None = None
    bgp_router_id: str | None = None  # default: pod_ip
    bgp_neighbors: list[str] = field(default_factory=list)  # ADDRESS:ASN
    bgp_hold_time: str | None = None  # seconds; default birdconf.DEFAULT_HOLD_TIME
    bird: str = "bird"
    # Set by validate() when bgp is on.
    bgp_config: BgpConfig | None = field(default=None, init=False)
    # How pod_ip was found when the pod spec did not give it (agent/podaddr.py), for the log.
    pod_ip_source: str | None = field(default=None, init=False)

    @classmethod
    def from_env(
        cls, *, find_pod_ip: Callable[[str | None], Found | None] | None = None, **flags: object
    ) -> AgentSettings:
        """Flags win over environment variables; missing required values raise ValueError.

        With ``find_pod_ip`` (the agent command passes agent/podaddr.discover), a pod IP given
        neither as a flag nor in the environment is read from the pod's own interfaces."""
        env = os.environ

        def pick(key: str, var: str) -> object:
            value = flags.get(key)
            return value if value not in (None, [], "") else env.get(var)

        values: dict[str, object] = {}
        for key, var in (
            ("server", "VPNFLEET_SERVER"),
            ("token", "VPNFLEET_AGENT_TOKEN"),
            ("name", "VPNFLEET_POD_NAME"),
            ("public_endpoint", "VPNFLEET_PUBLIC_ENDPOINT"),
            ("http", "VPNFLEET_HTTP"),
            ("user_metrics_listen", "VPNFLEET_USER_METRICS_LISTEN"),
            ("uplink", "VPNFLEET_UPLINK"),
            ("template", "VPNFLEET_TEMPLATE"),
            ("pod_ip", "VPNFLEET_POD_IP"),
            ("openvpn", "VPNFLEET_OPENVPN"),
            ("log_format", "VPNFLEET_LOG_FORMAT"),
            ("bgp_asn", "VPNFLEET_BGP_ASN"),
            ("bgp_router_id", "VPNFLEET_BGP_ROUTER_ID"),
            ("bgp_hold_time", "VPNFLEET_BGP_HOLD_TIME"),
            ("bird", "VPNFLEET_BIRD"),
        ):
            value = pick(key, var)
            if value is not None:
                values[key] = value
        for key, var in (
            ("crl_verify", "VPNFLEET_CRL_VERIFY"),
            ("flow_audit", "VPNFLEET_FLOW_AUDIT"),
            ("flow_destinations", "VPNFLEET_FLOW_DESTINATIONS"),
            ("denied_audit", "VPNFLEET_DENIED_AUDIT"),
            ("bgp", "VPNFLEET_BGP"),
        ):
            flag = flags.get(key)
            if flag is None and env.get(var):
                flag = _boolean(env[var], var)
            if flag is not None:
                values[key] = bool(flag)
        flow_log = pick("flow_log", "VPNFLEET_FLOW_LOG")
        if flow_log is not None:
            values["flow_log"] = flow_log
        spool_mb = pick("flow_spool_mb", "VPNFLEET_FLOW_SPOOL_MB")
        if spool_mb is not None:
            try:
                values["flow_spool_mb"] = int(str(spool_mb))
            except ValueError:
                raise ValueError("VPNFLEET_FLOW_SPOOL_MB must be a whole number of MiB") from None
        ca_file = pick("ca_file", "VPNFLEET_CA_FILE")
        if ca_file is not None:
            values["ca_file"] = Path(str(ca_file))
        state_dir = pick("state_dir", "VPNFLEET_STATE_DIR")
        if state_dir is not None:
            values["state_dir"] = Path(str(state_dir))
        routes = flags.get("push_routes") or [
            r.strip() for r in env.get("VPNFLEET_PUSH_ROUTES", "").split(",") if r.strip()
        ]
        values["push_routes"] = list(routes)  # type: ignore[call-overload]
        tcp_port = pick("tcp_port", "VPNFLEET_TCP_PORT")
        if tcp_port is not None:
            values["tcp_port"] = _tcp_port(str(tcp_port))
        neighbors = flags.get("bgp_neighbors") or [
            n.strip() for n in env.get("VPNFLEET_BGP_NEIGHBORS", "").split(",") if n.strip()
        ]
        values["bgp_neighbors"] = list(neighbors)  # type: ignore[call-overload]
        for key, var in (
            ("heartbeat_interval", "VPNFLEET_HEARTBEAT_INTERVAL"),
            ("reconcile_interval", "VPNFLEET_RECONCILE_INTERVAL"),
            ("drain_delay", "VPNFLEET_DRAIN_DELAY"),
        ):
            if env.get(var):
                try:
                    values[key] = float(env[var])
                except ValueError:
                    raise ValueError(f"{var} must be a number of seconds") from None
        metrics_token_file = pick("user_metrics_token_file", "VPNFLEET_USER_METRICS_TOKEN_FILE")
        if metrics_token_file is not None:
            values["user_metrics_token"] = Path(str(metrics_token_file)).read_text().strip()
        elif env.get("VPNFLEET_USER_METRICS_TOKEN"):
            values["user_metrics_token"] = env["VPNFLEET_USER_METRICS_TOKEN"]
        if values.get("token") is None and env.get("VPNFLEET_AGENT_TOKEN_FILE"):
            values["token"] = Path(env["VPNFLEET_AGENT_TOKEN_FILE"]).read_text().strip()
        for required, hint in (
            ("server", "--server or VPNFLEET_SERVER"),
            ("token", "--token or VPNFLEET_AGENT_TOKEN(_FILE)"),
            ("name", "--name or VPNFLEET_POD_NAME"),
        ):
            if not values.get(required):
                raise ValueError(f"missing {required}: give {hint}")
        found = None
        if not values.get("pod_ip") and find_pod_ip is not None:
            uplink = values.get("uplink")
            found = find_pod_ip(str(uplink) if uplink else None)
            if found is not None:
                values["pod_ip"] = found.address
        settings = cls(**values)  # type: ignore[arg-type]
        settings.pod_ip_source = found.source if found is not None else None
        settings.validate()
        return settings

    @property
    def control_planes(self) -> list[str]:
        """The control-plane URLs, in the order given."""
        return [u.strip() for u in self.server.split(",") if u.strip()]

    def validate(self) -> None:
        netparse.validate_name(self.name, "pod name")
        netparse.parse_listen(self.http)
        if self.user_metrics_listen != "off":
            _, port = netparse.parse_listen(self.user_metrics_listen)
            if port == netparse.parse_listen(self.http)[1]:
                raise ValueError(
                    f"the user metrics listener needs a port of its own ({port} is --http's)"
                )
        if self.user_metrics_token is not None:
            require_strong(self.user_metrics_token, "VPNFLEET_USER_METRICS_TOKEN(_FILE)")
        if not self.control_planes:
            raise ValueError("missing server: give --server or VPNFLEET_SERVER")
        if len(set(self.control_planes)) != len(self.control_planes):
            raise ValueError(f"server {self.server!r} names the same URL twice")
        for url in self.control_planes:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server {url!r} must be an http:// or https:// URL")
            if self.ca_file is not None and not url.startswith("https://"):
                raise ValueError(f"a CA file is given but the server URL is not https:// ({url})")
        if self.ca_file is not None:
            tlspin.pinned_context(self.ca_file)  # a missing or bad file stops the start
        if self.public_endpoint:
            netparse.parse_endpoint(self.public_endpoint)
        if self.pod_ip:
            ipaddress.IPv4Address(self.pod_ip)
        for route in self.push_routes:
            netparse.parse_destination(route)
        if not 0.2 <= self.heartbeat_interval <= 300 or not 0.5 <= self.reconcile_interval <= 3600:
            raise ValueError("heartbeat/reconcile intervals are out of range")
        if self.proto != "udp":
            raise ValueError("only proto udp is supported")
        if self.tcp_port is not None and not 1 <= self.tcp_port <= 65535:
            raise ValueError(f"the TCP port must be from 1 to 65535 (or off), not {self.tcp_port}")
        if self.log_format not in ("text", "json"):
            raise ValueError("log format must be 'text' or 'json'")
        if self.flow_log not in ("stdout", "off"):
            raise ValueError("flow log must be 'stdout' or 'off'")
        if not 1 <= self.flow_spool_mb <= 1_048_576:
            raise ValueError("flow spool size must be between 1 and 1048576 MiB")
        if self.bgp:
            self.bgp_config = BgpConfig.build(
                asn=self.bgp_asn,
                router_id=self.bgp_router_id,
                pod_ip=self.pod_ip,
                neighbors=self.bgp_neighbors,
                hold_time=self.bgp_hold_time,
            )
            if shutil.which(self.bird) is None:
                raise ValueError(
                    f"BGP is on but BIRD ({self.bird}) is not installed: install the bird2 "
                    "package or give --bird PATH"
                )
        else:
            given = [
                opt
                for opt, value in (
                    ("--bgp-asn", self.bgp_asn),
                    ("--bgp-router-id", self.bgp_router_id),
                    ("--bgp-neighbor", self.bgp_neighbors),
                    ("--bgp-hold-time", self.bgp_hold_time),
                )
                if value
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} given but BGP is off: add --bgp (or VPNFLEET_BGP=true)"
                )

    @property
    def servers(self) -> tuple[str, ...]:
        """The pod's OpenVPN servers: UDP always, TCP unless turned off."""
        return ("udp",) if self.tcp_port is None else ("udp", "tcp")


def _tcp_port(text: str) -> int | None:
    value = text.strip().lower()
    if value in ("off", "0", "false", "no"):
        return None
    if not value.isdigit():
        raise ValueError(f"VPNFLEET_TCP_PORT must be a port number or 'off', not {text!r}")
    return int(value)


def _boolean(text: str, var: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{var} must be true or false, not {text!r}")
