"""Registration: the pod's identity and OpenVPN material from the control plane, kept on disk.

On its first start a pod enrolls: it sends its name with the enrollment token (the Secret
every pod starts with) and receives a credential of its own, bound to that name, kept in the
state directory (0600) and used for everything after. The control plane refuses a name that a
live pod holds, so the enrollment token alone can never obtain another pod's key.

At start the agent registers (its name, template, endpoint and pod IP) and receives its
bootstrap: the pod's server certificate and key, the CA, the CRL, the tls-crypt key and the
address pools. They are written to the state directory with OpenVPN's config, and the bootstrap
is cached so a pod can restart while the control plane is away. The CRL is refreshed when a
revocation is announced and every few hours (CRLs expire; OpenVPN refuses everyone with an
expired one when it checks it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.statedir import StateDir, write_private
from vpnfleet.core import ipam, ovpn_config, webauth
from vpnfleet.wire import Bootstrap, EnrollRequest, RegisterRequest

SSO_SESSION_DEFAULT = 12 * 3600  # a control plane that sends the secret without a lifetime

log = logging.getLogger("vpnfleet.agent")

TUN_DEV = "tun0"
# One tunnel device per OpenVPN server of the pod.
TUN_DEVS = {"udp": TUN_DEV, "tcp": "tun1"}
CRL_REFRESH = 6 * 3600.0  # seconds between CRL downloads when OpenVPN checks the CRL


class Registration:
    """Registers the pod and keeps the files OpenVPN runs from."""

    def __init__(self, settings: AgentSettings, cp: ControlPlane, paths: StateDir) -> None:
        self._s = settings
        self._cp = cp
        self.paths = paths
        self.boot: Bootstrap | None = None
        self._crl_at = time.monotonic()

    @property
    def registered(self) -> bool:
        return self.boot is not None

    @property
    def nat_pool(self) -> ipaddress.IPv4Network:
        assert self.boot is not None, "not registered"
        return ipaddress.IPv4Network(self.boot.nat_pool)

    @property
    def gateway_pool(self) -> ipaddress.IPv4Network | None:
        assert self.boot is not None, "not registered"
        return ipaddress.IPv4Network(self.boot.gateway_pool) if self.boot.gateway_pool else None

    @property
    def auth_tokens(self) -> bool:
        """Whether the servers hand out auth tokens (the control plane sent the secret)."""
        assert self.boot is not None, "not registered"
        return self.boot.auth_token_key is not None

    @property
    def sso_lifetime(self) -> int | None:
        """Seconds a single sign-on login lasts (the auth tokens' lifetime), None without
        tokens."""
        token = self._auth_token()
        return None if token is None else token[1]

    async def register(self) -> Bootstrap:
        """Register with the control plane, or fall back to the cached bootstrap.

        Retries with backoff while the control plane is unreachable and no cache exists;
        raises ControlPlaneError when it refuses (a 4xx: retrying would not help).
        """
        req = RegisterRequest(
            name=self._s.name,
            template=self._s.template,
            public_endpoint=self._s.public_endpoint,
            pod_ip=self._s.pod_ip,
        )
        delay = 0.5
        while True:
            try:
                await self._credential()
                boot = await self._cp.register(req)
                break
            except ControlPlaneError as exc:
                if exc.status == 401 and self.paths.credential.exists():
                    # Revoked, or the control plane no longer knows it (a new database):
                    # enroll again; a revoked pod's name is refused there.
                    log.warning("the pod credential was refused (%s); enrolling again", exc)
                    self.paths.credential.unlink()
                    continue
                if exc.status == 409 and "enroll" in str(exc):
                    # The name is held by a live pod (or by this pod before it lost its
                    # credential): it frees up when that lease ends.
                    log.warning("%s; retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
                    continue
                if not exc.retryable:
                    raise
                cached = self._cached()
                if (
                    cached is not None
                    and cached.name == self._s.name
                    and self.paths.credential.exists()
                ):
                    log.warning("control plane unreachable (%s); starting from cached state", exc)
                    boot = cached
                    break
                log.warning("cannot register yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        self._write(boot)
        self.boot = boot
        log.info("registered as pod %s (NAT pool %s)", boot.name, boot.nat_pool)
        return boot

    async def _credential(self) -> None:
        """Use the pod's own credential, enrolling first if it has none yet."""
        try:
            token = self.paths.credential.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            self._cp.use_token(self._s.token)
            got = await self._cp.enroll(EnrollRequest(name=self._s.name))
            write_private(self.paths.credential, got.token + "\n")
            token = got.token
            log.info("enrolled as pod %s: credential stored in the state directory", got.name)
        self._cp.use_token(token)

    def _cached(self) -> Bootstrap | None:
        try:
            return Bootstrap.model_validate_json(self.paths.bootstrap.read_text())
        except (OSError, ValueError):
            return None

    def _write(self, boot: Bootstrap) -> None:
        p = self.paths
        write_private(p.ca, boot.ca_pem)
        write_private(p.cert, boot.cert_pem)
        write_private(p.key, boot.key_pem)
        write_private(p.tls_crypt, boot.tls_crypt_key)
        if boot.auth_token_key is not None:
            write_private(p.auth_token, boot.auth_token_key)
        write_private(p.crl, boot.crl_pem)
        # Kept so the agent can restart while the control plane is away.
        write_private(p.bootstrap, boot.model_dump_json())

    def render_config(self) -> None:
        """The config of each OpenVPN server of this pod (UDP, and TCP unless turned off).

        Each server gets its own part of the NAT pool (``ipam.server_pools``) and tunnel
        device: the two never hand out the same address, and the kernel routes every client
        address into the device of the server that holds it.
        """
        servers = self._s.servers
        p = self.paths
        for server, pool in zip(
            servers, ipam.server_pools(self.nat_pool, len(servers)), strict=True
        ):
            gw = ipaddress.IPv4Interface(f"{ipam.server_address(pool)}/{pool.prefixlen}")
            port = self._s.port if server == "udp" else self._s.tcp_port
            assert port is not None
            conf = ovpn_config.render_server_conf(
                pool_gateway=gw,
                management_socket=str(p.server(server).mgmt_socket),
                ca_path=str(p.ca),
                cert_path=str(p.cert),
                key_path=str(p.key),
                tls_crypt_path=str(p.tls_crypt),
                crl_path=str(p.crl) if self._s.crl_verify else None,
                dev=TUN_DEVS[server],
                port=port,
                proto="udp" if server == "udp" else "tcp-server",
                management_hold=True,
                # A connection waiting for its user's single sign-on login is kept this long.
                hand_window=webauth.PENDING_MAX,
                auth_token=self._auth_token(),
            )
            write_private(p.server(server).conf, conf)

    def _auth_token(self) -> tuple[str, int] | None:
        boot = self.boot
        if boot is None or boot.auth_token_key is None:
            return None
        return str(self.paths.auth_token), boot.sso_session_seconds or SSO_SESSION_DEFAULT

    async def refresh_crl(self) -> None:
        """Download the CRL (a revocation was announced, or the copy is getting old)."""
        try:
            crl = await self._cp.crl()
        except ControlPlaneError as exc:
            log.warning("could not refresh the CRL: %s", exc)
            return
        write_private(self.paths.crl, crl)
        self._crl_at = time.monotonic()
        log.info("CRL updated")

    async def run_crl_refresh(self) -> None:
        """Keep OpenVPN's CRL fresh while it checks it (``--crl-verify``); until cancelled."""
        while True:
            await asyncio.sleep(60)
            if self._s.crl_verify and time.monotonic() - self._crl_at > CRL_REFRESH:
                await self.refresh_crl()
