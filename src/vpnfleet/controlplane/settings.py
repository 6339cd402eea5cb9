"""Control plane settings: flags, environment variables and their defaults."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from vpnfleet import tokenbinding
from vpnfleet.controlplane import servertls
from vpnfleet.core import netparse
from vpnfleet.core.secretstrength import require_strong
from vpnfleet.privatefiles import tighten

TCP_PORT = 443  # the TCP fallback's port when an endpoint names none (the agent's default)

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "vpnfleet"


# Whole-number variables: setting, variable, what the number counts (for the error).
_WHOLE_NUMBERS = (
    ("audit_retention_days", "VPNFLEET_AUDIT_RETENTION_DAYS", " of days"),
    ("max_body_bytes", "VPNFLEET_MAX_BODY_BYTES", " of bytes"),
    ("pod_lease_seconds", "VPNFLEET_POD_LEASE_SECONDS", ""),
    ("watch_max_subscribers", "VPNFLEET_WATCH_MAX_SUBSCRIBERS", " of streams"),
    ("database_pool_size", "VPNFLEET_DATABASE_POOL_SIZE", " of connections"),
)
# The fewest pooled connections a replica works with: the reserve for its own background
# work (state.RESERVED_SESSIONS) plus one request.
MIN_POOL = 5


@dataclass
class ServerSettings:
    """Everything `vpnfleet server` needs; `from_env` fills the gaps from VPNFLEET_* variables."""

    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR)
    database_url: str | None = None
    listen: str = "127.0.0.1:8000"
    public_endpoints: list[str] = field(default_factory=list)
    # The TCP fallback's HOST[:PORT]s (port 443 when left out). None: each public endpoint's
    # host on 443 (one address serving both protocols); []: profiles list UDP only ("off").
    public_tcp_endpoints: list[str] | None = None
    secret: str | None = None
    bootstrap_token: str | None = None
    change_log_keep: int = 100_000
    watch_poll_interval: float = 0.2
    heartbeat_interval: float = 15.0
    log_format: str = "text"
    # Days to keep flows and denied attempts; None keeps them forever.
    audit_retention_days: int | None = None
    # Largest request body for every route but the batch routes (controlplane/intake.py).
    max_body_bytes: int = 1 << 20
    # Seconds without a heartbeat after which a pod's sessions are closed and its name may
    # enroll again (controlplane/podleases.py). Agents heartbeat every 5 s by default.
    pod_lease_seconds: int = 90
    # HTTPS (docs/operations.md, "TLS"): the operator's certificate and key, or DNS names/IPs
    # for a certificate made at first start from a control-plane CA of its own.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_self_signed: list[str] = field(default_factory=list)
    # URLs clients reach this server at, beyond loopback and the certificate's names: the
    # first admin token file may be sent there (vpnfleet/tokenbinding.py).
    advertise_urls: list[str] = field(default_factory=list)
    # Open watch streams one replica serves at once; past it a new one is refused with 503
    # (controlplane/watch.py). One per pod and per gateway-routes follower, plus operators.
    watch_max_subscribers: int = 2_000
    # Proxies (ingress controllers, load balancers) whose X-Forwarded-For / X-Forwarded-Proto
    # this server believes: the address a request came from is then the one they forwarded
    # (single sign-on's same_address check needs the browsers' real addresses). Loopback only
    # by default, as uvicorn does.
    forwarded_allow_ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    # PostgreSQL connections a replica keeps open (controlplane/db.py): requests beyond them
    # wait their turn in the server instead of opening and closing connections of their own.
    database_pool_size: int = 20

    @classmethod
    def from_env(cls, **overrides: object) -> ServerSettings:
        env = os.environ
        values: dict[str, object] = {}
        if "VPNFLEET_DATA_DIR" in env:
            values["data_dir"] = Path(env["VPNFLEET_DATA_DIR"])
        if "VPNFLEET_DATABASE_URL" in env:
            values["database_url"] = env["VPNFLEET_DATABASE_URL"]
        if "VPNFLEET_LISTEN" in env:
            values["listen"] = env["VPNFLEET_LISTEN"]
        if "VPNFLEET_PUBLIC_ENDPOINTS" in env:
            values["public_endpoints"] = [
                e.strip() for e in env["VPNFLEET_PUBLIC_ENDPOINTS"].split(",") if e.strip()
            ]
        if "VPNFLEET_PUBLIC_TCP_ENDPOINTS" in env:
            values["public_tcp_endpoints"] = _tcp_endpoints(env["VPNFLEET_PUBLIC_TCP_ENDPOINTS"])
        if "VPNFLEET_SECRET" in env:
            values["secret"] = env["VPNFLEET_SECRET"]
        if "VPNFLEET_BOOTSTRAP_TOKEN" in env:
            values["bootstrap_token"] = env["VPNFLEET_BOOTSTRAP_TOKEN"]
        for key, var in (("tls_cert", "VPNFLEET_TLS_CERT"), ("tls_key", "VPNFLEET_TLS_KEY")):
            if env.get(var, "").strip():
                values[key] = Path(env[var].strip())
        for key, var in (
            ("tls_self_signed", "VPNFLEET_TLS_SELF_SIGNED"),
            ("advertise_urls", "VPNFLEET_ADVERTISE_URLS"),
        ):
            if env.get(var, "").strip():
                values[key] = [e.strip() for e in env[var].split(",") if e.strip()]
        if env.get("VPNFLEET_FORWARDED_ALLOW_IPS", "").strip():
            raw_ips = env["VPNFLEET_FORWARDED_ALLOW_IPS"]
            values["forwarded_allow_ips"] = [e.strip() for e in raw_ips.split(",") if e.strip()]
        for key, var, unit in _WHOLE_NUMBERS:
            raw = env.get(var, "").strip()
            if raw:
                if not raw.isdigit():
                    raise ValueError(f"{var} {raw!r} is not a whole number{unit}")
                values[key] = int(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        netparse.parse_listen(self.listen)
        if not 10 <= self.pod_lease_seconds <= 86_400:
            raise ValueError("pod lease must be between 10 seconds and 1 day")
        if not 4096 <= self.max_body_bytes <= 1 << 30:
            raise ValueError("max body size must be between 4096 bytes and 1 GiB")
        if not MIN_POOL <= self.database_pool_size <= 1_000:
            raise ValueError(
                f"VPNFLEET_DATABASE_POOL_SIZE must be between {MIN_POOL} and 1,000 connections"
            )
        if not 1 <= self.watch_max_subscribers <= 1_000_000:
            raise ValueError(
                "VPNFLEET_WATCH_MAX_SUBSCRIBERS (the watch stream limit) must be between 1 and "
                "1,000,000"
            )
        for entry in self.forwarded_allow_ips:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(
                        f"forwarded-allow-ips: {entry!r} is not an IP address, a network "
                        "(CIDR) or '*'"
                    ) from None
        if self.audit_retention_days is not None and self.audit_retention_days < 1:
            raise ValueError("audit retention must be at least 1 day (leave it unset: forever)")
        for endpoint in self.public_endpoints:
            netparse.parse_endpoint(endpoint)
        for endpoint in self.public_tcp_endpoints or []:
            netparse.parse_endpoint(endpoint, TCP_PORT)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key (VPNFLEET_TLS_CERT/_KEY)")
        if self.tls_cert is not None and self.tls_self_signed:
            raise ValueError("--tls-self-signed and --tls-cert exclude each other: choose one")
        for name in self.tls_self_signed:
            servertls.validate_name(name)
        for advertised in self.advertise_urls:
            scheme = tokenbinding.origin(advertised)[0]
            if self.tls_enabled and scheme != "https":
                raise ValueError(f"advertised URL {advertised!r} must be https: TLS is on")
            if not self.tls_enabled and scheme != "http":
                raise ValueError(f"advertised URL {advertised!r} must be http: TLS is off")
        # Weak secrets are refused at start (core/secretstrength.py); the value is never shown.
        if self.bootstrap_token is not None:
            require_strong(self.bootstrap_token, "VPNFLEET_BOOTSTRAP_TOKEN")
        if self.secret is not None:
            require_strong(self.secret, "VPNFLEET_SECRET")
        url = self.resolved_database_url
        if not (url.startswith("sqlite") or url.startswith("postgresql+psycopg://")):
            raise ValueError(
                "database URL must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )

    @property
    def pod_lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.pod_lease_seconds)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None or bool(self.tls_self_signed)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'vpnfleet.db'}"

    def ensure_data_dir(self) -> None:
        """Create the data dir 0700; an existing one is the operator's (a volume) and stays."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def resolved_secret(self) -> str:
        """The key-sealing secret: VPNFLEET_SECRET, or a file created once in the data dir."""
        if self.secret:
            return self.secret
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.ensure_data_dir()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
        tighten(path)  # one made readable by someone else since is taken back
        value = path.read_text().strip()
        require_strong(value, f"the sealing secret in {path}")
        return value


def _tcp_endpoints(text: str) -> list[str]:
    """VPNFLEET_PUBLIC_TCP_ENDPOINTS: comma-separated HOST[:PORT]s, or "off"."""
    if text.strip().lower() == "off":
        return []
    return [e.strip() for e in text.split(",") if e.strip()]


def tcp_remotes(settings: ServerSettings) -> list[tuple[str, int]]:
    """Where profiles send clients that cannot use UDP (see ``public_tcp_endpoints``)."""
    if settings.public_tcp_endpoints is None:
        hosts = dict.fromkeys(netparse.parse_endpoint(e)[0] for e in settings.public_endpoints)
        return [(host, TCP_PORT) for host in hosts]
    return [netparse.parse_endpoint(e, TCP_PORT) for e in settings.public_tcp_endpoints]
