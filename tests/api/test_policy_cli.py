"""`vpnfleet policy ...` and `vpnfleet user access` as real processes against a real server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx

from tests.api.test_cli import VPNFLEET, run
from tests.api.test_policy import POLICY, eventually, register_pod
from tests.conftest import Server


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def offline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a control plane address where nothing listens and no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(VPNFLEET_URL="http://127.0.0.1:9", VPNFLEET_DATA_DIR=str(cwd / "none"))
    env["COLUMNS"] = "200"
    return subprocess.run(
        [*VPNFLEET, *args], capture_output=True, text=True, env=env, timeout=60, cwd=cwd
    )


def test_dry_run_then_apply_then_no_changes(server: Server, tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    dry = run(server, "policy", "apply", "-f", str(path), "--dry-run").stdout
    assert "+ group devs (Developers)" in dry
    assert "+ grant devs: 10.10.0.0/16 tcp 22,443,8000-8100" in dry
    assert "+ grant devs: 10.20.0.5 any" in dry
    assert "+ user gary: mode gateway; max_sessions 1; enabled; groups devs, ops" in dry
    assert "+ member ops/gary" in dry
    assert "dry run:" in dry and "nothing was written" in dry
    assert json.loads(run(server, "user", "list", "--json").stdout) == []

    applied = run(server, "policy", "apply", "-f", str(path)).stdout
    assert f"applied {path} at revision" in applied and "2 users created" in applied
    users = json.loads(run(server, "user", "list", "--json").stdout)
    assert [u["name"] for u in users] == ["alice", "gary"]

    again = run(server, "policy", "apply", "-f", str(path)).stdout
    assert again.strip() == f"no changes: the control plane already matches {path}"

    changed = write(tmp_path, POLICY.replace("max_sessions: 2", "max_sessions: 3"), "v2.yaml")
    out = json.loads(run(server, "policy", "apply", "-f", str(changed), "--json").stdout)
    assert out["users"]["updated"] == [
        {"name": "alice", "changes": [{"field": "max_sessions", "old": 2, "new": 3}]}
    ]
    listing = run(server, "policy", "apply", "-f", str(path), "--dry-run").stdout
    assert "~ user alice: max_sessions 3 -> 2" in listing


def test_prune_flag_deletes_what_the_file_does_not_name(server: Server, tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    run(server, "policy", "apply", "-f", str(path))
    run(server, "user", "add", "bob")
    kept = run(server, "policy", "apply", "-f", str(path)).stdout
    assert "no changes" in kept
    pruned = run(server, "policy", "apply", "-f", str(path), "--prune").stdout
    assert "- user bob (certificate revoked)" in pruned
    names = [u["name"] for u in json.loads(run(server, "user", "list", "--json").stdout)]
    assert names == ["alice", "gary"]


def test_syntax_errors_are_reported_locally_before_any_network_call(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        POLICY.replace('ports: "22,443,8000-8100"', 'ports: "22,70000"').replace(
            "groups: [devs, ops]", "groups: [devs, opz]"
        ),
    )
    for args in (("policy", "apply", "-f", str(bad)), ("policy", "check", "-f", str(bad))):
        proc = offline(*args, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.splitlines()
        assert f"{bad}:4: error: users.gary.groups[1]: group 'opz' is not defined" in lines[0]
        assert lines[1] == (
            f"{bad}:9: error: groups.devs.grants[0].ports: port 70000 is out of range 1-65535"
        )
        assert "cannot reach" not in proc.stderr and "Traceback" not in proc.stderr
    dup = write(tmp_path, "version: 1\nusers:\n  a: {}\n  a: {}\n", "dup.yaml")
    proc = offline("policy", "apply", "-f", str(dup), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 1 and f"{dup}:4: error: users.a: duplicate key 'a'" in proc.stderr


def test_check_is_offline_and_usage_errors_exit_2(tmp_path: Path) -> None:
    good = write(tmp_path, POLICY)
    proc = offline("policy", "check", "-f", str(good), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{good} is valid: 2 user(s), 2 group(s), 3 grant(s)"
    as_json = json.loads(offline("policy", "check", "-f", str(good), "--json", cwd=tmp_path).stdout)
    assert as_json["valid"] is True and as_json["grants"] == 3
    missing = offline("policy", "apply", "-f", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_file = offline("policy", "apply", cwd=tmp_path)
    assert no_file.returncode == 2 and "--file" in no_file.stderr
    overlap = write(
        tmp_path,
        POLICY.replace(
            "      - {destination: 10.20.0.5, proto: any}\n",
            "      - {destination: 10.20.0.5, proto: any}\n      - {destination: 10.10.1.0/24}\n",
        ),
        "overlap.yaml",
    )
    warned = offline("policy", "check", "-f", str(overlap), cwd=tmp_path)
    assert warned.returncode == 0
    assert f"{overlap}:11: warning: groups.devs.grants[2]: 10.10.1.0/24 any overlaps" in (
        warned.stderr
    )


def test_export_round_trip_through_a_file(server: Server, tmp_path: Path) -> None:
    run(server, "policy", "apply", "-f", str(write(tmp_path, POLICY)))
    run(server, "rule", "add", "ops", "10.30.0.0/16", "--proto", "udp", "--ports", "53")
    out = tmp_path / "exported.yaml"
    proc = run(server, "policy", "export", "-o", str(out))
    assert f"wrote {out}" in proc.stderr
    text = out.read_text()
    assert "{destination: 10.30.0.0/16, proto: udp, ports: '53'}" in text
    assert run(server, "policy", "export").stdout == text
    assert "no changes" in run(server, "policy", "apply", "-f", str(out), "--prune").stdout
    assert run(server, "policy", "check", "-f", str(out)).returncode == 0


def test_user_access_table_and_json(server: Server, admin: httpx.Client, tmp_path: Path) -> None:
    run(server, "policy", "apply", "-f", str(write(tmp_path, POLICY)))
    agent = register_pod(admin, "pod-a")
    table = run(server, "user", "access", "gary").stdout
    assert "10.10.0.0/16" in table and "22,443,8000-8100" in table and "icmp" in table
    assert "pod-a" in table and "enforced everywhere" in table
    data = json.loads(run(server, "user", "access", "gary", "--json").stdout)
    assert data["groups"] == ["devs", "ops"] and data["enforced_everywhere"] is False
    agent.post(
        "/api/v1/agent/heartbeat",
        json={"name": "pod-a", "applied_revision": data["current_revision"], "ready": True},
    ).raise_for_status()
    eventually(
        lambda: (
            json.loads(run(server, "user", "access", "gary", "--json").stdout)[
                "enforced_everywhere"
            ]
            is True
        )
    )
    missing = run(server, "user", "access", "ghost", ok=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
