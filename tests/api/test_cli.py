"""The CLI as a newcomer uses it: real processes against a real control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import Server

VPNFLEET = [sys.executable, "-m", "vpnfleet.cli.main"]


def run(
    server: Server,
    *args: str,
    token: str | None = None,
    ok: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    full.update(VPNFLEET_URL=server.url, VPNFLEET_TOKEN=token or server.admin_token, COLUMNS="200")
    full.update(env or {})
    proc = subprocess.run([*VPNFLEET, *args], capture_output=True, text=True, env=full, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_newcomer_flow(server: Server, tmp_path: Path) -> None:
    user = json.loads(
        run(server, "user", "add", "alice", "--email", "alice@example.com", "--json").stdout
    )
    assert user["id"] >= 1 and user["name"] == "alice"
    group = json.loads(run(server, "group", "add", "devs", "--json").stdout)
    assert group["id"] >= 1
    rule = json.loads(
        run(
            server,
            "rule",
            "add",
            "devs",
            "10.20.0.0/16",
            "--proto",
            "tcp",
            "--ports",
            "443,8080-8090",
            "--json",
        ).stdout
    )
    assert rule["id"] >= 1 and rule["ports"] == "443,8080-8090"
    run(server, "group", "add-member", "devs", "alice")
    listed = json.loads(run(server, "user", "list", "--json").stdout)
    assert listed[0]["groups"] == ["devs"]
    assert "alice" in run(server, "user", "list").stdout

    profile = tmp_path / "alice.ovpn"
    run(server, "user", "profile", "alice", "-o", str(profile))
    assert oct(profile.stat().st_mode & 0o777) == "0o600"
    text = profile.read_text()
    cert_pem = text.split("<cert>\n", 1)[1].split("</cert>", 1)[0]
    old_serial = x509.load_pem_x509_certificate(cert_pem.encode()).serial_number
    fingerprint = x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256())
    assert listed[0]["certificate"]["fingerprint_sha256"] == fingerprint.hex()

    run(server, "user", "reissue", "alice")
    crl = x509.load_pem_x509_crl(run(server, "pki", "crl").stdout.encode())
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    shown = json.loads(run(server, "user", "show", "alice", "--json").stdout)
    assert int(shown["certificate"]["serial"]) != old_serial
    actions = [r["action"] for r in json.loads(run(server, "audit", "admin", "--json").stdout)]
    assert actions[:2] == ["user.reissue", "user.profile"] and "rule.create" in actions
    pools = json.loads(run(server, "pool", "list", "--json").stdout)
    assert {p["kind"] for p in pools} == {"nat", "gateway"}
    assert json.loads(run(server, "pki", "show", "--json").stdout)["issued"] == 2


def test_token_create_prints_secret_once(server: Server) -> None:
    created = json.loads(
        run(server, "token", "create", "auditor1", "--role", "auditor", "--json").stdout
    )
    assert created["token"].startswith("vpf_") and created["id"] >= 1
    listing = run(server, "token", "list", "--json").stdout
    assert created["token"] not in listing
    denied = run(server, "user", "add", "x", token=created["token"], ok=False)
    assert denied.returncode == 1 and "may not" in denied.stderr
    run(server, "token", "revoke", "auditor1")
    gone = run(server, "audit", "admin", token=created["token"], ok=False)
    assert gone.returncode == 1 and "revoked" in gone.stderr


def test_errors_are_one_sentence_and_nonzero(server: Server) -> None:
    bad = run(server, "rule", "add", "nogroup", "10.0.0.1/24", ok=False)
    assert bad.returncode == 1 and "host bits" in bad.stderr and "Traceback" not in bad.stderr
    missing = run(server, "user", "show", "ghost", ok=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    usage = run(server, "user", "set", "ghost", ok=False)
    assert usage.returncode == 2 and "nothing to change" in usage.stderr
    when = run(server, "audit", "admin", "--since", "2026-01-01T00:00:00", ok=False)
    assert when.returncode == 2 and "time zone" in when.stderr
    unknown = run(server, "user", "frobnicate", ok=False)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_unreachable_control_plane(server: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(VPNFLEET_URL="http://127.0.0.1:9", VPNFLEET_TOKEN="x")
    proc = subprocess.run(
        [*VPNFLEET, "user", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 1 and "cannot reach the control plane" in proc.stderr


def test_stored_text_is_printed_as_text(server: Server) -> None:
    # Descriptions and e-mails are free text an operator (or a directory) stored: they must
    # neither break the listing (rich markup errors on "[/bad]") nor reach the terminal as
    # markup or escape sequences.
    description = "[/bad] [link=https://evil.example]click[/link] \x1b[2J\x1b]0;owned\x07 \u202eabc"
    with server.client() as c:
        assert c.post("/api/v1/groups", json={"name": "odd", "description": description}).is_success
        email = "[bold]x[/bold]\x1b[31m@example.com"
        assert c.post("/api/v1/users", json={"name": "mallory", "email": email}).is_success
    groups = run(server, "group", "list")
    assert "[/bad] [link=https://evil.example]click[/link]" in groups.stdout
    assert "\\x1b[2J\\x1b]0;owned\\x07 \\u202eabc" in groups.stdout
    users = run(server, "user", "list")
    assert "[bold]x[/bold]\\x1b[31m@example.com" in users.stdout
    for out in (groups.stdout, users.stdout):
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    # JSON output keeps the stored text exactly (escaped by JSON itself).
    listed = json.loads(run(server, "group", "list", "--json").stdout)
    assert [g["description"] for g in listed if g["name"] == "odd"] == [description]


def test_pod_revoke_and_forget(server: Server) -> None:
    with server.client(server.pod_token("pod-x")) as pod:
        pod.post("/api/v1/agent/register", json={"name": "pod-x"}).raise_for_status()
    out = run(server, "pod", "revoke", "pod-x")
    assert "revoked pod pod-x: 1 credential(s), 1 certificate(s), 0 session(s) closed" in out.stdout
    again = run(server, "pod", "revoke", "pod-x", ok=False)
    assert again.returncode == 1 and "already revoked" in again.stderr
    listed = json.loads(run(server, "pod", "list", "--json").stdout)
    assert [p["name"] for p in listed] == ["pod-x"] and listed[0]["ready"] is False
    assert "forgot pod pod-x" in run(server, "pod", "forget", "pod-x").stdout
    assert json.loads(run(server, "pod", "list", "--json").stdout) == []
    ghost = run(server, "pod", "revoke", "ghost", ok=False)
    assert ghost.returncode == 1 and "does not exist" in ghost.stderr
