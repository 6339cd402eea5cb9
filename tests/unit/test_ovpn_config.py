"""Server config and client profile rendering (the e2e tests run both with real openvpn)."""

from __future__ import annotations

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
        ({"proto": "tcp-server"}, "proto"),
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
