"""Server config and client profile rendering (the e2e tests run both with real openvpn)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vpnfleet.controlplane import pki
from vpnfleet.core.ovpn_config import render_client_profile, render_server_conf


def server(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "pool_gateway": "10.77.0.1/24",
        "management_socket": "/run/vpnfleet/mgmt.sock",
        "ca_path": "/etc/vpnfleet/ca.crt",
        "cert_path": "/etc/vpnfleet/server.crt",
        "key_path": "/etc/vpnfleet/server.key",
        "tls_crypt_path": "/etc/vpnfleet/tls-crypt.key",
        "crl_path": "/etc/vpnfleet/crl.pem",
    }
    kwargs.update(overrides)
    return render_server_conf(**kwargs)


def directives(conf: str) -> list[str]:
    return [line for line in conf.splitlines() if line and not line.startswith("#")]


def test_server_conf_has_the_agent_driven_setup() -> None:
    lines = directives(server())
    for expected in [
        "mode server",
        "tls-server",
        "dev tun0",
        "topology subnet",
        "ifconfig 10.77.0.1 255.255.255.0",
        'push "topology subnet"',
        'push "route-gateway 10.77.0.1"',
        "proto udp",
        "port 1194",
        "management /run/vpnfleet/mgmt.sock unix",
        "management-client-auth",
        "auth-user-pass-optional",
        "management-hold",
        "ca /etc/vpnfleet/ca.crt",
        "cert /etc/vpnfleet/server.crt",
        "key /etc/vpnfleet/server.key",
        "tls-crypt /etc/vpnfleet/tls-crypt.key",
        "crl-verify /etc/vpnfleet/crl.pem",
        "dh none",
        "remote-cert-tls client",
        "keepalive 10 60",
        "explicit-exit-notify 1",
        "script-security 1",
        "verb 3",
        "data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        "disable-dco",
        "duplicate-cn",
    ]:
        assert expected in lines, expected
    # Addresses come only from the agent's ifconfig-push: no pool, no `server` helper,
    # no scripts, no status file.
    words = {line.split()[0] for line in lines}
    assert not words & {"server", "ifconfig-pool", "ifconfig-pool-persist", "status"}
    hooks = {"up", "down", "client-connect", "client-disconnect", "learn-address", "tls-verify"}
    assert not words & (hooks | {"auth-user-pass-verify"})
    assert len(lines) == len(set(lines))


def test_server_conf_options() -> None:
    lines = directives(
        server(
            pool_gateway="100.64.8.1/21",
            dev="vpn7",
            port=4443,
            proto="udp4",
            local="198.18.30.1",
            management_hold=False,
            crl_path=None,
            keepalive=(5, 30),
            verb=4,
            max_clients=500,
            duplicate_cn=False,
            dco=True,
            extra_lines=["txqueuelen 1000"],
        )
    )
    assert "ifconfig 100.64.8.1 255.255.248.0" in lines
    assert 'push "route-gateway 100.64.8.1"' in lines
    assert {"dev vpn7", "dev-type tun", "port 4443", "proto udp4", "local 198.18.30.1"} <= set(
        lines
    )
    assert {"keepalive 5 30", "verb 4", "max-clients 500", "txqueuelen 1000"} <= set(lines)
    for absent in ("management-hold", "disable-dco", "duplicate-cn"):
        assert absent not in lines
    assert not any(line.startswith("crl-verify") for line in lines)


def test_server_conf_quotes_paths_with_spaces() -> None:
    conf = server(ca_path='/etc/vpn fleet/ca "x".crt')
    assert 'ca "/etc/vpn fleet/ca \\"x\\".crt"' in conf.splitlines()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool_gateway": "10.77.0.0/24"}, "network or broadcast"),
        ({"pool_gateway": "10.77.0.255/24"}, "network or broadcast"),
        ({"pool_gateway": "10.77.0.1/31"}, "no room"),
        ({"pool_gateway": "10.77.0.1"}, "no room"),
        ({"pool_gateway": "fd00::1/64"}, "IPv4"),
        ({"pool_gateway": "gateway"}, "IPv4"),
        ({"dev": "a-very-long-interface"}, "dev"),
        ({"dev": "tun0\nscript-security 3"}, "dev"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"proto": "tcp"}, "proto"),
        ({"proto": "tcp-client"}, "proto"),
        ({"local": "pod.example"}, "local"),
        ({"keepalive": (10, 15)}, "keepalive"),
        ({"verb": 12}, "verb"),
        ({"management_socket": "mgmt.sock"}, "absolute"),
        ({"key_path": "/etc/k\nup /bin/sh"}, "control character"),
        ({"extra_lines": ["verb 3\nscript-security 3"]}, "control character"),
        ({"extra_lines": ["<ca>"]}, "inline"),
        ({"max_clients": 0}, "max_clients"),
    ],
)
def test_server_conf_rejects_bad_input(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server(**overrides)


@pytest.fixture(scope="module")
def material() -> dict[str, Any]:
    ca = pki.create_ca()
    client = pki.issue_client_cert(ca, "alice")
    return {
        "ca_pem": ca.cert_pem,
        "cert_pem": client.cert_pem,
        "key_pem": client.key_pem,
        "tls_crypt_key": pki.generate_tls_crypt_key(),
    }


def test_client_profile(material: dict[str, Any]) -> None:
    profile = render_client_profile(
        remotes=[("vpn.example.com", 1194)],
        server_name_prefix="vpnfleet-pod-",
        name="alice",
        **material,
    )
    lines = profile.splitlines()
    assert lines[0] == "# vpnfleet client profile: alice"
    for expected in [
        "client",
        "dev tun",
        "proto udp",
        "remote vpn.example.com 1194",
        "nobind",
        "remote-cert-tls server",
        "verify-x509-name vpnfleet-pod- name-prefix",
        "auth-nocache",
        "resolv-retry infinite",
        "persist-key",
        "persist-tun",
        "verb 3",
    ]:
        assert expected in lines, expected
    assert "remote-random" not in lines  # nothing to randomise with one remote
    for tag, pem in [
        ("ca", material["ca_pem"]),
        ("cert", material["cert_pem"]),
        ("key", material["key_pem"]),
        ("tls-crypt", material["tls_crypt_key"]),
    ]:
        assert f"<{tag}>\n{pem.strip()}\n</{tag}>" in profile
    assert profile.endswith("</tls-crypt>\n")


def test_client_profile_several_remotes_and_no_name_pinning(material: dict[str, Any]) -> None:
    profile = render_client_profile(
        remotes=[("198.51.100.7", 1194), ("2001:db8::5", 443), ("vpn2.example.com.", 1195)],
        proto="udp4",
        **material,
    )
    lines = profile.splitlines()
    assert [line for line in lines if line.startswith("remote ")] == [
        "remote 198.51.100.7 1194",
        "remote 2001:db8::5 443",
        "remote vpn2.example.com. 1195",
    ]
    assert "remote-random" in lines and "proto udp4" in lines
    assert not any(line.startswith("verify-x509-name") for line in lines)


@pytest.mark.parametrize(
    ("remotes", "message"),
    [
        ([], "at least one remote"),
        ([("", 1194)], "non-empty"),
        ([("-bad.example", 1194)], "valid DNS name"),
        ([("a..b", 1194)], "valid DNS name"),
        ([("exa mple.com", 1194)], "valid DNS name"),
        ([("vpn.example.com\nup /bin/sh", 1194)], "valid DNS name"),
        ([("x" * 64 + ".com", 1194)], "valid DNS name"),
        ([("vpn.example.com", 0)], "port"),
        ([("vpn.example.com", 70000)], "port"),
    ],
)
def test_client_profile_rejects_bad_remotes(
    material: dict[str, Any], remotes: list[tuple[str, int]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_client_profile(remotes=remotes, **material)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ca_pem", "not a pem", "not PEM"),
        ("key_pem", "-----BEGIN CERTIFICATE-----", "not PEM"),
        ("tls_crypt_key", "garbage", "not PEM"),
        ("cert_pem", "-----BEGIN CERTIFICATE-----\n</cert>\nscript-security 3\n", "cannot appear"),
    ],
)
def test_client_profile_rejects_bad_material(
    material: dict[str, Any], field: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_client_profile(remotes=[("vpn.example.com", 1194)], **{**material, field: value})


def test_client_profile_rejects_bad_options(material: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="proto"):
        render_client_profile(remotes=[("h.example", 1)], proto="tcp-client", **material)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="control character"):
        render_client_profile(remotes=[("h.example", 1)], name="a\nb", **material)
    with pytest.raises(ValueError, match="control character"):
        render_client_profile(remotes=[("h.example", 1)], server_name_prefix="pod\nx", **material)


# ------------------------------------------------------------------ TCP fallback


def test_tcp_server_conf_has_no_udp_only_options() -> None:
    lines = directives(server(proto="tcp-server", port=443, dev="tun1"))
    assert {"proto tcp-server", "port 443", "dev tun1"} <= set(lines)
    # explicit-exit-notify is a UDP feature: OpenVPN refuses it on a TCP server.
    assert "explicit-exit-notify 1" not in lines
    assert "explicit-exit-notify 1" in directives(server())


def connection_blocks(profile: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in profile.splitlines():
        if line == "<connection>":
            current = []
        elif line == "</connection>":
            assert current is not None
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_client_profile_lists_udp_first_then_tcp(material: dict[str, Any]) -> None:
    profile = render_client_profile(
        remotes=[("vpn.example.com", 1194), ("198.51.100.7", 1194)],
        tcp_remotes=[("vpn-tcp.example.com", 443)],
        server_name_prefix="vpnfleet-pod-",
        **material,
    )
    assert connection_blocks(profile) == [
        ["remote vpn.example.com 1194 udp", "server-poll-timeout 10", "explicit-exit-notify 1"],
        ["remote 198.51.100.7 1194 udp", "server-poll-timeout 10", "explicit-exit-notify 1"],
        ["remote vpn-tcp.example.com 443 tcp", "server-poll-timeout 10"],
    ]
    outside = [line for line in profile.split("</connection>")[-1].splitlines() if line]
    # remote-random would shuffle TCP ahead of UDP; global proto/remote would add an entry.
    assert "remote-random" not in profile.splitlines()
    assert not any(line.startswith(("proto ", "remote ")) for line in outside)
    assert {"remote-cert-tls server", "verify-x509-name vpnfleet-pod- name-prefix"} <= set(outside)
    udp4 = render_client_profile(
        remotes=[("h.example", 1194)], tcp_remotes=[("h.example", 443)], proto="udp4", **material
    )
    assert [b[0] for b in connection_blocks(udp4)] == [
        "remote h.example 1194 udp4",
        "remote h.example 443 tcp4",
    ]
    with pytest.raises(ValueError, match="port"):
        render_client_profile(
            remotes=[("h.example", 1194)], tcp_remotes=[("h.example", 0)], **material
        )


_PROFILE_RE = re.compile(r"Connection profiles \[(\d+)\]:")
_SETTING_RE = re.compile(r"^\s+(\w+) = (.*)$")


def stock_client_parse(profile: str, tmp: Path) -> list[dict[str, str]]:
    """What a stock OpenVPN client makes of ``profile``: its connection list.

    OpenVPN has no parse-only switch, but at ``--verb 4`` it prints every parsed option,
    connection entries included, before it opens any socket; a profile it refuses ends it at
    once with "Options error". It runs in a network namespace of its own with nothing in it
    (so it can reach nobody) and is stopped as soon as the listing is out.
    """
    path = tmp / "profile.ovpn"
    path.write_text(profile)
    path.chmod(0o600)
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    proc = subprocess.Popen(
        [*unshare, "openvpn", "--config", str(path), "--verb", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            out.append(line)
            if "Options error" in line:
                raise AssertionError(f"openvpn refused the profile: {line.strip()}")
            if "Connection profiles END" in line or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait(timeout=10)
    entries: list[dict[str, str]] = []
    for line in out:
        text = line.split(" ", 3)[-1] if line[:2].isdigit() else line  # after the timestamp
        if m := _PROFILE_RE.search(text):
            entries.append({})
        elif entries and (m := _SETTING_RE.match(text.rstrip("\n"))):
            entries[-1][m.group(1)] = m.group(2).strip("'")
        if "Connection profiles END" in text:
            return entries
    raise AssertionError("openvpn printed no connection list:\n" + "".join(out[-20:]))


def test_a_stock_client_reads_the_connection_blocks(
    material: dict[str, Any], tmp_path: Path
) -> None:
    profile = render_client_profile(
        remotes=[("vpn.example.com", 1194)],
        tcp_remotes=[("vpn-tcp.example.com", 443)],
        server_name_prefix="vpnfleet-pod-",
        name="alice",
        username="alice",
        **material,
    )
    # The user name single sign-on tokens are signed for, inline (OpenVPN reads it too).
    assert "<auth-user-pass>\nalice\ncertificate-only\n</auth-user-pass>" in profile
    entries = stock_client_parse(profile, tmp_path)
    got = [
        (
            e["proto"],
            e["remote"],
            e["remote_port"],
            e["connect_timeout"],
            e["explicit_exit_notification"],
        )
        for e in entries
    ]
    assert got == [
        ("udp", "vpn.example.com", "1194", "10", "1"),
        ("tcp-client", "vpn-tcp.example.com", "443", "10", "0"),
    ]
    # The check itself is not blind: an option OpenVPN forbids inside a block is refused.
    bad = profile.replace(
        "server-poll-timeout 10\n</connection>", "remote-cert-tls server\n</connection>", 1
    )
    assert bad != profile
    with pytest.raises(AssertionError, match="cannot be used in this context"):
        stock_client_parse(bad, tmp_path)


def test_a_stock_client_reads_the_udp_only_profile(
    material: dict[str, Any], tmp_path: Path
) -> None:
    profile = render_client_profile(
        remotes=[("vpn.example.com", 1194), ("h.example", 1195)], **material
    )
    entries = stock_client_parse(profile, tmp_path)
    assert [(e["proto"], e["remote"], e["remote_port"]) for e in entries] == [
        ("udp", "vpn.example.com", "1194"),
        ("udp", "h.example", "1195"),
    ]


def test_server_conf_hands_out_auth_tokens_decided_by_the_agent() -> None:
    lines = directives(server(hand_window=300, auth_token=("/state/auth-token.key", 43200)))
    assert "hand-window 300" in lines
    # external-auth: a reconnect with a token still comes to the agent (session_state).
    assert "auth-gen-token 43200 43200 external-auth" in lines
    assert "auth-gen-token-secret /state/auth-token.key" in lines
    assert not any(line.startswith("auth-gen-token") for line in directives(server()))
    with pytest.raises(ValueError, match="auth-token lifetime"):
        server(auth_token=("/state/auth-token.key", 5))


def test_the_auth_token_secret_has_openvpns_own_format(tmp_path: Path) -> None:
    """The same PEM block and size as `openvpn --genkey auth-token` writes."""
    ours = pki.generate_auth_token_key().splitlines()
    theirs_path = tmp_path / "theirs.key"
    subprocess.run(["openvpn", "--genkey", "auth-token", str(theirs_path)], check=True)
    theirs = theirs_path.read_text().splitlines()
    assert (ours[0], ours[-1]) == (theirs[0], theirs[-1])
    assert [len(line) for line in ours] == [len(line) for line in theirs]
    assert len(base64.b64decode("".join(ours[1:-1]))) == 128


@pytest.mark.parametrize("bad", ["", "Alice", "a\nb", "a<b", "x" * 200])
def test_a_profile_refuses_a_user_name_it_cannot_carry(material: dict[str, Any], bad: str) -> None:
    with pytest.raises(ValueError, match="not a user name"):
        render_client_profile(remotes=[("vpn.example.com", 1194)], username=bad, **material)
