"""The control plane's own HTTPS certificate, its settings, and the token binding record."""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vpnfleet import tokenbinding
from vpnfleet.cli import client
from vpnfleet.controlplane import servertls
from vpnfleet.controlplane.settings import ServerSettings

SVC = "vpnfleet-controlplane.vpnfleet.svc"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_self_signed_certificate_names_usage_and_files(tmp_path: Path) -> None:
    tls = servertls.ensure_self_signed(tmp_path / "tls", [SVC, "10.96.0.10"])
    cert = _cert(tls.cert_file)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SVC, "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.96.0.10"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert tls.ca_file is not None
    cert.verify_directly_issued_by(_cert(tls.ca_file))
    assert _cert(tls.ca_file).subject.rfc4514_string() == "CN=vpnfleet control plane CA"
    for key in (tls.key_file, tls.ca_file.with_name(servertls.CA_KEY)):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700


def test_restart_keeps_the_certificate_and_a_new_name_keeps_the_ca(tmp_path: Path) -> None:
    first = servertls.ensure_self_signed(tmp_path, [SVC])
    assert first.ca_file is not None
    cert_pem, ca_pem = first.cert_file.read_text(), first.ca_file.read_text()
    again = servertls.ensure_self_signed(tmp_path, [SVC])
    assert again.cert_file.read_text() == cert_pem
    wider = servertls.ensure_self_signed(tmp_path, [SVC, "cp.example.com"])
    assert wider.cert_file.read_text() != cert_pem
    assert "cp.example.com" in wider.names
    assert first.ca_file.read_text() == ca_pem  # clients keep their pinned CA file


@pytest.mark.parametrize("name", ["", "*.example.com", "bad name", "a..b", "x" * 64 + ".com"])
def test_bad_tls_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a DNS name or IP address"):
        ServerSettings(tls_self_signed=[name]).validate()


def test_operator_pair_must_match(tmp_path: Path) -> None:
    one = servertls.ensure_self_signed(tmp_path / "one", [SVC])
    two = servertls.ensure_self_signed(tmp_path / "two", [SVC])
    with pytest.raises(ValueError, match=r"cannot use TLS certificate .*server\.pem with key"):
        servertls.operator_pair(one.cert_file, two.key_file)
    with pytest.raises(ValueError, match="No such file"):
        servertls.operator_pair(tmp_path / "missing.pem", one.key_file)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls_cert": Path("c.pem")}, "give both --tls-cert and --tls-key"),
        (
            {"tls_cert": Path("c"), "tls_key": Path("k"), "tls_self_signed": [SVC]},
            "exclude each other",
        ),
        ({"tls_self_signed": [SVC], "advertise_urls": ["http://cp:8000"]}, "must be https"),
        ({"advertise_urls": ["https://cp:8000"]}, "must be http: TLS is off"),
        ({"advertise_urls": ["ftp://cp"]}, "not an http:// or https:// URL"),
    ],
)
def test_tls_settings_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(**kwargs).validate()  # type: ignore[arg-type]


def test_tls_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPNFLEET_TLS_SELF_SIGNED", f"{SVC}, 10.0.0.1")
    monkeypatch.setenv("VPNFLEET_ADVERTISE_URLS", "https://cp.example.com:8443")
    settings = ServerSettings.from_env()
    assert settings.tls_self_signed == [SVC, "10.0.0.1"] and settings.tls_enabled
    assert settings.advertise_urls == ["https://cp.example.com:8443"]


def test_server_urls() -> None:
    assert tokenbinding.server_urls("0.0.0.0", 8000, None) == (
        "http://127.0.0.1:8000",
        "http://localhost:8000",
    )
    assert tokenbinding.server_urls("10.1.2.3", 8443, ("*.x.com", SVC), ["https://a.b"]) == (
        "https://10.1.2.3:8443",
        f"https://{SVC}:8443",
        "https://a.b",
    )
    assert tokenbinding.server_urls("[::1]", 80, None)[0] == "http://[::1]:80"


def test_allows_compares_scheme_host_and_port() -> None:
    binding = tokenbinding.TokenBinding(("https://cp.example.com", "http://127.0.0.1:8000"))
    assert tokenbinding.allows(binding, "https://CP.example.com:443/api")
    assert tokenbinding.allows(binding, "http://127.0.0.1:8000/")
    assert not tokenbinding.allows(binding, "http://cp.example.com")
    assert not tokenbinding.allows(binding, "https://cp.example.com:8443")
    assert not tokenbinding.allows(binding, "https://cp.example.com.evil.test")
    assert not tokenbinding.allows(binding, "http://127.0.0.1:8001")


def _local_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("VPNFLEET_URL", "VPNFLEET_TOKEN", "VPNFLEET_TOKEN_FILE", "VPNFLEET_CA_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VPNFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("VPNFLEET_DATA_DIR", str(tmp_path))
    path = tmp_path / "admin-token"
    path.write_text("vpf_secret\n")
    return path


def test_cli_sends_the_file_token_only_where_it_is_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _local_token(tmp_path, monkeypatch)
    ca = str(tmp_path / "tls" / "ca.pem")
    tokenbinding.write(path, tokenbinding.TokenBinding(("https://127.0.0.1:8443",), ca))
    assert client.resolve("https://127.0.0.1:8443", None) == (
        "https://127.0.0.1:8443",
        "vpf_secret",
        ca,
    )
    with pytest.raises(
        client.CLIError, match=re.escape("was created for https://127.0.0.1:8443, not")
    ):
        client.resolve("https://cp.attacker.test", None)
    # The same refusal for the file named by VPNFLEET_TOKEN_FILE...
    monkeypatch.setenv("VPNFLEET_TOKEN_FILE", str(path))
    with pytest.raises(client.CLIError, match="pass --token or set VPNFLEET_TOKEN"):
        client.resolve("http://127.0.0.1:8443", None)
    # ...while an explicit token is the user's choice.
    assert client.resolve("https://cp.attacker.test", "vpf_mine")[1] == "vpf_mine"


def test_legacy_token_file_without_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _local_token(tmp_path, monkeypatch)
    assert client.resolve("http://127.0.0.1:8000", None)[1] == "vpf_secret"
    with pytest.raises(client.CLIError, match="only sent to this host"):
        client.resolve("http://cp.example.com:8000", None)
    # A file the user names on purpose reads as it always did.
    monkeypatch.setenv("VPNFLEET_TOKEN_FILE", str(path))
    assert client.resolve("http://cp.example.com:8000", None)[1] == "vpf_secret"


def test_damaged_record_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _local_token(tmp_path, monkeypatch)
    tokenbinding.binding_path(path).write_text("{not json")
    with pytest.raises(client.CLIError, match="not a token binding record"):
        client.resolve("http://127.0.0.1:8000", None)


def test_server_cert_command_makes_a_pair_the_server_accepts(tmp_path: Path) -> None:
    """`vpnfleet server-cert` (for a Secret shared by replicas) writes what --tls-cert/--tls-key
    then serve; a bad name is refused with exit code 2 and nothing written."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vpnfleet.cli.main", "server-cert"]
    bad = subprocess.run(
        [*cmd, str(tmp_path / "bad"), "--name", "no spaces"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a DNS name or IP address" in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run(
        [*cmd, str(tmp_path / "tls"), "--name", SVC], capture_output=True, text=True, check=True
    )
    assert "ca.pem" in ok.stdout
    pair = servertls.operator_pair(tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key")
    assert SVC in pair.names
