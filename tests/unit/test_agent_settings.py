"""Agent settings from flags and VPNFLEET_* variables: the flow-audit options and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpnfleet.agent.settings import AgentSettings
from vpnfleet.controlplane import pki

BASE = {"VPNFLEET_SERVER": "http://cp:8000", "VPNFLEET_AGENT_TOKEN": "t", "VPNFLEET_POD_NAME": "p1"}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_flow_audit_defaults_on_with_destinations_and_stdout(env: pytest.MonkeyPatch) -> None:
    s = AgentSettings.from_env()
    assert (s.flow_audit, s.flow_destinations, s.flow_log, s.flow_spool_mb) == (
        True, True, "stdout", 1024)  # fmt: skip


def test_flow_options_from_the_environment_and_flags_win(env: pytest.MonkeyPatch) -> None:
    env.setenv("VPNFLEET_FLOW_DESTINATIONS", "false")
    env.setenv("VPNFLEET_FLOW_LOG", "off")
    env.setenv("VPNFLEET_FLOW_SPOOL_MB", "64")
    s = AgentSettings.from_env()
    assert (s.flow_destinations, s.flow_log, s.flow_spool_mb) == (False, "off", 64)
    s = AgentSettings.from_env(flow_destinations=True, flow_audit=False)
    assert (s.flow_destinations, s.flow_audit) == (True, False)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("VPNFLEET_FLOW_AUDIT", "perhaps", "VPNFLEET_FLOW_AUDIT must be true or false"),
        ("VPNFLEET_FLOW_LOG", "syslog", "flow log must be 'stdout' or 'off'"),
        ("VPNFLEET_FLOW_SPOOL_MB", "1G", "whole number of MiB"),
        ("VPNFLEET_FLOW_SPOOL_MB", "0", "between 1 and"),
        ("VPNFLEET_CRL_VERIFY", "maybe", "VPNFLEET_CRL_VERIFY must be true or false"),
    ],
)
def test_bad_values_are_refused_clearly(
    env: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    env.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        AgentSettings.from_env()


def test_ca_file_pins_the_control_plane_ca(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(pki.create_ca().cert_pem)
    env.setenv("VPNFLEET_SERVER", "https://cp.vpnfleet.svc:8443")
    env.setenv("VPNFLEET_CA_FILE", str(ca))
    assert AgentSettings.from_env().ca_file == ca
    with pytest.raises(ValueError, match="does not exist"):
        AgentSettings.from_env(ca_file=ca.with_name("missing.pem"))
    ca.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        AgentSettings.from_env()
    env.setenv("VPNFLEET_SERVER", "http://cp:8000")
    with pytest.raises(ValueError, match="server URL is not https"):
        AgentSettings.from_env()


def test_the_tcp_fallback_is_on_at_443_and_can_be_moved_or_turned_off(
    env: pytest.MonkeyPatch,
) -> None:
    s = AgentSettings.from_env()
    assert (s.tcp_port, s.servers) == (443, ("udp", "tcp"))
    env.setenv("VPNFLEET_TCP_PORT", "8443")
    assert AgentSettings.from_env().tcp_port == 8443
    assert AgentSettings.from_env(tcp_port="off").servers == ("udp",)  # the flag wins
    env.setenv("VPNFLEET_TCP_PORT", "off")
    assert AgentSettings.from_env().servers == ("udp",)
    for bad in ("https", "70000"):
        env.setenv("VPNFLEET_TCP_PORT", bad)
        with pytest.raises(ValueError, match=r"TCP port|VPNFLEET_TCP_PORT"):
            AgentSettings.from_env()
