"""Pure renderers for OpenVPN 2.6 configuration: the pod's server config and client profiles.

The server config is written for an agent that decides every client through the management
interface (`management-client-auth`) and hands out tunnel addresses itself with
`ifconfig-push` in its `client-auth` answer. That is why it uses an explicit `mode server` /
`tls-server` / `ifconfig` setup instead of the `server` helper: the helper would also create
an `ifconfig-pool`, and OpenVPN would then assign addresses behind the agent's back. With no
pool, a client that the agent does not give an address gets none.

Every value that reaches a config line is validated (ValueError with one clear sentence):
a newline in a path or host would otherwise inject directives.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "DATA_CIPHERS",
    "ClientProto",
    "ServerProto",
    "render_client_profile",
    "render_server_conf",
]

DATA_CIPHERS = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"

# UDP is the protocol users get; TCP is the fallback for networks that block UDP (its
# tunnel suffers from TCP-over-TCP retransmissions, so it is never the first choice).
# explicit-exit-notify (fast drain, prompt DISCONNECT) exists only on UDP: over TCP the
# closed connection tells the other side at once anyway.
ServerProto = Literal["udp", "udp4", "udp6", "tcp-server", "tcp4-server", "tcp6-server"]
ClientProto = Literal["udp", "udp4", "udp6"]
_PROTOS = ("udp", "udp4", "udp6")
_SERVER_PROTOS = (*_PROTOS, "tcp-server", "tcp4-server", "tcp6-server")
_TCP_CLIENT_PROTOS = ("tcp", "tcp4", "tcp6")

# How long a client waits for the server's first answer before trying the next connection
# entry. OpenVPN's default (120 s) would keep a user whose network drops UDP waiting two
# minutes before the TCP fallback; a pod answers a handshake within one round trip.
SERVER_POLL_TIMEOUT = 10

# Linux interface names: at most 15 bytes; keep to characters that never need quoting.
_DEV_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# Arguments written bare; anything else is quoted for OpenVPN's lexer.
_BARE_RE = re.compile(r"[A-Za-z0-9_./:@+=,-]+")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _arg(value: str, what: str) -> str:
    """One config argument, quoted when it holds characters the lexer would split on."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{what} contains a control character (newline, NUL, ...): {value!r}")
    if _BARE_RE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{what} must be an absolute path, got {value!r}")
    return _arg(value, what)


def _int_in(value: int, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _proto(value: str, allowed: Sequence[str] = _PROTOS) -> str:
    if value not in allowed:
        raise ValueError(f"proto must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _extra(lines: Sequence[str]) -> list[str]:
    out = []
    for n, line in enumerate(lines, start=1):
        if not isinstance(line, str) or _CONTROL_RE.search(line):
            raise ValueError(f"extra config line {n} contains a control character: {line!r}")
        if line.lstrip().startswith("<"):
            raise ValueError(f"extra config line {n} opens an inline block: {line!r}")
        out.append(line)
    return out


def _gateway(value: str | ipaddress.IPv4Interface) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(value)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise ValueError(
            f"pool gateway {value!r} is not an IPv4 address with prefix, like 10.8.0.1/24"
        ) from None
    net = iface.network
    if net.prefixlen > 30:
        raise ValueError(f"pool gateway {iface} leaves no room for clients (prefix > /30)")
    if iface.ip in (net.network_address, net.broadcast_address):
        raise ValueError(
            f"pool gateway {iface} is the network or broadcast address; use a host address"
        )
    return iface


def render_server_conf(
    *,
    pool_gateway: str | ipaddress.IPv4Interface,
    management_socket: str,
    ca_path: str,
    cert_path: str,
    key_path: str,
    tls_crypt_path: str,
    crl_path: str | None = None,
    dev: str = "tun0",
    port: int = 1194,
    proto: ServerProto = "udp",
    local: str | None = None,
    management_hold: bool = True,
    keepalive: tuple[int, int] = (10, 60),
    hand_window: int = 60,
    auth_token: tuple[str, int] | None = None,
    verb: int = 3,
    max_clients: int | None = None,
    duplicate_cn: bool = True,
    dco: bool = False,
    extra_lines: Sequence[str] = (),
) -> str:
    """Render the server config of one pod.

    `pool_gateway` is the server's own tunnel address with the pool's prefix (`10.8.0.1/24`);
    clients get their address only from the agent's `ifconfig-push`. `management_hold` makes
    OpenVPN wait for `hold release`, so no client is accepted before the agent is attached.
    `duplicate_cn` lets one certificate hold several sessions: the agent enforces session
    limits, and without it OpenVPN would silently drop an older session of the same CN.
    `dco=False` writes `disable-dco`, so the tunnel behaves the same on every node whether or
    not the host kernel has the ovpn-dco module. `hand_window` (seconds) bounds a TLS handshake
    and also how long a client may wait in `client-pending-auth` (a single sign-on login).
    `auth_token` = (secret path, lifetime seconds) turns on OpenVPN's auth-gen-token with
    `external-auth`: a client admitted after a single sign-on login gets a token it presents
    when it reconnects (to any pod with the same secret), and the agent sees its state
    (`session_state`) at CONNECT instead of OpenVPN admitting it alone.
    """
    gw = _gateway(pool_gateway)
    if not isinstance(dev, str) or not _DEV_RE.fullmatch(dev):
        raise ValueError(f"dev must be an interface name of 1-15 letters/digits/._-, got {dev!r}")
    _int_in(port, 1, 65535, "port")
    _proto(proto, _SERVER_PROTOS)
    ping, restart = keepalive
    _int_in(ping, 1, 3600, "keepalive interval")
    _int_in(restart, 2 * ping, 86400, "keepalive timeout (at least twice the interval)")
    _int_in(verb, 0, 11, "verb")
    _int_in(hand_window, 10, 3600, "hand-window")
    if local is not None:
        try:
            ipaddress.ip_address(local)
        except ValueError:
            raise ValueError(f"local must be an IP address, got {local!r}") from None

    lines = [
        "# Rendered by vpnfleet: the agent owns this file and rewrites it; do not edit.",
        "mode server",
        "tls-server",
        f"dev {dev}",
        "dev-type tun",
        "topology subnet",
        f"ifconfig {gw.ip} {gw.netmask}",
        # No ifconfig-pool: the agent assigns every address via ifconfig-push.
        'push "topology subnet"',
        f'push "route-gateway {gw.ip}"',
        f"proto {proto}",
        f"port {port}",
    ]
    if local is not None:
        lines.append(f"local {local}")
    lines += [
        f"management {_path(management_socket, 'management socket')} unix",
        "management-client-auth",
        # With management-client-auth, OpenVPN 2.6 fails the TLS handshake of a client that
        # sends no username/password; ours authenticate by certificate only.
        "auth-user-pass-optional",
    ]
    if management_hold:
        lines.append("management-hold")
    lines += [
        f"ca {_path(ca_path, 'CA path')}",
        f"cert {_path(cert_path, 'certificate path')}",
        f"key {_path(key_path, 'key path')}",
        f"tls-crypt {_path(tls_crypt_path, 'tls-crypt key path')}",
    ]
    if crl_path is not None:
        # OpenVPN re-reads the CRL file when it changes, so the agent can update it live.
        lines.append(f"crl-verify {_path(crl_path, 'CRL path')}")
    lines += [
        "dh none",
        "remote-cert-tls client",
        "tls-version-min 1.2",
        f"data-ciphers {DATA_CIPHERS}",
        f"keepalive {ping} {restart}",
        f"hand-window {hand_window}",
    ]
    if auth_token is not None:
        token_path, lifetime = auth_token
        _int_in(lifetime, 60, 365 * 86400, "auth-token lifetime")
        lines += [
            # Renewal time = lifetime: a token not renewed within twice the renewal time
            # expires, and with the default (reneg-sec, 1 h) a laptop closed for 2 h would
            # have to log in again well within the session lifetime.
            f"auth-gen-token {lifetime} {lifetime} external-auth",
            f"auth-gen-token-secret {_path(token_path, 'auth-token secret path')}",
        ]
    if proto in _PROTOS:
        # Tell clients to reconnect at once when this server stops (drain, restart).
        lines.append("explicit-exit-notify 1")
    lines += [
        # No scripts: every decision goes through the management interface.
        "script-security 1",
        f"verb {verb}",
    ]
    if duplicate_cn:
        lines.append("duplicate-cn")
    if max_clients is not None:
        lines.append(f"max-clients {_int_in(max_clients, 1, 1_000_000, 'max_clients')}")
    if not dco:
        lines.append("disable-dco")
    lines += _extra(extra_lines)
    return "\n".join(lines) + "\n"


def _validate_host(host: str) -> str:
    if not isinstance(host, str) or not host:
        raise ValueError("remote host must be a non-empty string")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"remote host {host!r} is neither an IP address nor a valid DNS name")
    return host


def _pem_block(tag: str, pem: str, markers: Sequence[str], what: str) -> list[str]:
    if not isinstance(pem, str) or not any(m in pem for m in markers):
        raise ValueError(f"{what} is not PEM text (expected {markers[0]!r})")
    # '<' would let the text close the inline block early and inject directives.
    if "<" in pem or "\x00" in pem:
        raise ValueError(f"{what} contains characters that cannot appear in PEM text")
    return [f"<{tag}>", pem.strip(), f"</{tag}>"]


_USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,127}")


def render_client_profile(
    *,
    remotes: Sequence[tuple[str, int]],
    ca_pem: str,
    cert_pem: str,
    key_pem: str,
    tls_crypt_key: str,
    proto: ClientProto = "udp",
    tcp_remotes: Sequence[tuple[str, int]] = (),
    server_name_prefix: str | None = None,
    name: str | None = None,
    verb: int = 3,
    username: str | None = None,
) -> str:
    """Render a self-contained client profile (.ovpn) with inline CA, cert, key and tls-crypt.

    `username` (the certificate's user) goes in an inline `<auth-user-pass>` with a
    placeholder password the servers ignore: OpenVPN signs the single sign-on session token
    it hands the client for the user name the client sent, so a token is then good for this
    user only (without it, for any certificate: docs/sso.md).

    Each pod has its own server certificate, so the profile does not pin one server name:
    `remote-cert-tls server` already rejects anything but a serverAuth certificate from our
    CA (client certificates cannot pose as a pod), and `server_name_prefix`, when given,
    additionally requires the server CN to start with it (`verify-x509-name ... name-prefix`).

    Without `tcp_remotes` the profile lists the UDP `remotes` (`remote-random` spreads
    clients over several). With them, it lists one `<connection>` block per remote, every UDP
    one first and then the TCP ones: OpenVPN tries them in order, so a client whose network
    blocks UDP falls back to TCP after `server-poll-timeout`. Only connection-level options
    (remote, explicit-exit-notify, server-poll-timeout) are inside the blocks; everything else
    stays global (OpenVPN refuses e.g. `remote-cert-tls` inside a block). `remote-random` is
    left out then, since it would shuffle TCP entries ahead of UDP ones: the caller orders the
    UDP remotes (the control plane rotates them per user to spread the load).
    """
    if not remotes:
        raise ValueError("a client profile needs at least one remote (host, port)")
    _proto(proto)
    _int_in(verb, 0, 11, "verb")
    for host, port in [*remotes, *tcp_remotes]:
        _validate_host(host)
        _int_in(port, 1, 65535, f"port of remote {host}")
    lines: list[str] = []
    if name is not None:
        if _CONTROL_RE.search(name):
            raise ValueError(f"profile name contains a control character: {name!r}")
        lines.append(f"# vpnfleet client profile: {name}")
    lines += ["client", "dev tun"]
    if tcp_remotes:
        tcp = _TCP_CLIENT_PROTOS[_PROTOS.index(proto)]
        for host, port in remotes:
            lines += [
                "<connection>",
                f"remote {host} {port} {proto}",
                f"server-poll-timeout {SERVER_POLL_TIMEOUT}",
                # Tell the pod at once when the client goes away (UDP only).
                "explicit-exit-notify 1",
                "</connection>",
            ]
        for host, port in tcp_remotes:
            lines += [
                "<connection>",
                f"remote {host} {port} {tcp}",
                f"server-poll-timeout {SERVER_POLL_TIMEOUT}",
                "</connection>",
            ]
    else:
        lines.append(f"proto {proto}")
        lines += [f"remote {host} {port}" for host, port in remotes]
        if len(remotes) > 1:
            lines.append("remote-random")
    lines += [
        "resolv-retry infinite",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
    ]
    if server_name_prefix is not None:
        prefix = _arg(server_name_prefix, "server name prefix")
        lines.append(f"verify-x509-name {prefix} name-prefix")
    lines.append("auth-nocache")
    if username is not None:
        if not _USERNAME_RE.fullmatch(username):
            raise ValueError(f"not a user name for a profile: {username!r}")
        lines += ["<auth-user-pass>", username, "certificate-only", "</auth-user-pass>"]
    if not tcp_remotes:
        # Tell the pod at once when the client goes away, so the session closes promptly.
        lines.append("explicit-exit-notify 1")
    lines.append(f"verb {verb}")
    lines += _pem_block("ca", ca_pem, ("-----BEGIN CERTIFICATE-----",), "CA certificate")
    lines += _pem_block("cert", cert_pem, ("-----BEGIN CERTIFICATE-----",), "client certificate")
    lines += _pem_block("key", key_pem, ("PRIVATE KEY-----",), "client key")
    lines += _pem_block(
        "tls-crypt", tls_crypt_key, ("-----BEGIN OpenVPN Static key V1-----",), "tls-crypt key"
    )
    return "\n".join(lines) + "\n"
