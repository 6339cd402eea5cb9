"""Where control-plane profiles send clients that cannot use UDP (VPNFLEET_PUBLIC_TCP_ENDPOINTS)."""

from __future__ import annotations

import pytest

from vpnfleet.controlplane.settings import ServerSettings, tcp_remotes

UDP = ["vpn.example.test:1194", "vpn.example.test:1195", "vpn2.example.test"]


def test_by_default_the_fallback_is_each_host_on_443(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPNFLEET_PUBLIC_TCP_ENDPOINTS", raising=False)
    s = ServerSettings.from_env(public_endpoints=UDP)
    assert tcp_remotes(s) == [("vpn.example.test", 443), ("vpn2.example.test", 443)]


def test_tcp_endpoints_of_their_own_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPNFLEET_PUBLIC_TCP_ENDPOINTS", "vpn-tcp.example.test, 203.0.113.9:8443")
    s = ServerSettings.from_env(public_endpoints=UDP)
    assert tcp_remotes(s) == [("vpn-tcp.example.test", 443), ("203.0.113.9", 8443)]
    monkeypatch.setenv("VPNFLEET_PUBLIC_TCP_ENDPOINTS", "off")
    assert tcp_remotes(ServerSettings.from_env(public_endpoints=UDP)) == []
    monkeypatch.setenv("VPNFLEET_PUBLIC_TCP_ENDPOINTS", "bad host:443")
    with pytest.raises(ValueError, match="invalid host"):
        ServerSettings.from_env(public_endpoints=UDP)
