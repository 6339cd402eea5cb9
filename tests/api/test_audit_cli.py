"""`vpnfleet audit who|flows|sessions|annotate` as an investigator uses them (real processes)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.test_nat_audit import POD_IP, T0, iso, open_session, rec, send
from tests.conftest import Server

VPNFLEET = [sys.executable, "-m", "vpnfleet.cli.main"]
M = dt.timedelta(minutes=1)


def vpnfleet(
    server: Server, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env.update(VPNFLEET_URL=server.url, VPNFLEET_TOKEN=server.admin_token, COLUMNS="200")
    return subprocess.run(
        [*VPNFLEET, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def fleet(server: Server, admin: httpx.Client) -> Server:
    """alice used NAT port 40000 from 15:00 to 15:01, bob the same port 15:10-15:12."""
    for name in ("alice", "bob"):
        assert admin.post("/api/v1/users", json={"name": name}).status_code == 201
    with server.client(server.pod_token("pod1")) as agent:
        open_session(agent, "pod1-alice-0001", "alice", T0 - 60 * M, "198.51.100.7")
        open_session(agent, "pod1-bob-00002", "bob", T0 - 60 * M, "203.0.113.9", "10.200.0.3")
        send(
            agent,
            [
                rec("end", "pod1:1:1", T0, T0 + M),
                rec("end", "pod1:2:1", T0 + 10 * M, T0 + 12 * M, user="bob",
                    session="pod1-bob-00002", tunnel_ip="10.200.0.3"),
            ],
        )  # fmt: skip
    return server


def nginx_line(port: int, when: str, addr: str = POD_IP) -> str:
    return f'{addr}:{port} - - [{when}] "GET /x HTTP/1.1" 200 5 "-" "curl/8"'


def test_annotate_nginx_log_keeps_every_line(fleet: Server, tmp_path: Path) -> None:
    lines = [
        nginx_line(40000, "26/Nov/2026:15:00:30 +0000"),  # alice
        nginx_line(40000, "26/Nov/2026:16:11:00 +0100"),  # bob (same port, other zone)
        nginx_line(40000, "26/Nov/2026:15:05:00 +0000"),  # between the two: nobody
        "this is not an access log line",
        nginx_line(40000, "26/Nov/2026:15:00:30"),  # no zone
        nginx_line(443, "26/Nov/2026:15:00:30 +0000", addr="2001:db8::1"),  # not a pod
        nginx_line(40000, "26/Nov/2026:15:01:00 +0000"),  # last second of alice's flow
    ]
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "annotated.log"
    proc = vpnfleet(fleet, "audit", "annotate", "--format", "nginx", str(log), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    got = out.read_text().splitlines()
    users = ["alice", "bob", "-", "?", "?", "-", "alice"]
    assert got == [f"{line} user={u}" for line, u in zip(lines, users, strict=True)]
    assert "warning: line 4:" in proc.stderr and "warning: line 5:" in proc.stderr
    assert "annotated 7 line(s); 2 could not be read" in proc.stderr
    assert not (tmp_path / "annotated.log.partial").exists()


def test_annotate_json_from_stdin(fleet: Server) -> None:
    rows = [
        {"remote_addr": POD_IP, "remote_port": 40000, "time": iso(T0 + 11 * M), "uri": "/a"},
        {"remote_addr": POD_IP, "remote_port": "40000", "time": "2026-11-26T15:00:30"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    proc = vpnfleet(fleet, "audit", "annotate", "--format", "json", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["vpnfleet_user"] for o in out] == ["bob", "?"]
    assert out[0]["uri"] == "/a" and "has no time zone" in proc.stderr


def test_annotate_combined_with_port(fleet: Server, tmp_path: Path) -> None:
    line = f'{POD_IP} 40000 - - [26/Nov/2026:15:10:30 +0000] "GET / HTTP/1.1" 200 1 "-" "x"'
    log = tmp_path / "a.log"
    log.write_text(line + "\r\n")
    out = tmp_path / "b.log"
    proc = vpnfleet(
        fleet, "audit", "annotate", "--format", "combined-with-port", str(log), "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (line + " user=bob\r\n").encode()  # CRLF kept as it was


def test_annotate_refuses_unknown_format(fleet: Server, tmp_path: Path) -> None:
    proc = vpnfleet(fleet, "audit", "annotate", "--format", "apache", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--format 'apache' is not one of" in proc.stderr


# The three custom formats, each as an operator would copy it from the server's config.
COMBINED_PORT = (
    "log_format combined_port '$remote_addr - $remote_user [$time_local] '\n"
    '    \'"$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" '
    "$remote_port';"
)
JSON_FORMAT = (
    'log_format audit escape=json \'{"ts":$msec,"client":{"ip":"$remote_addr",'
    '"port":$remote_port},"request":"$request","status":$status}\';'
)
APACHE = (
    'LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{Referer}i\\" \\"%{User-Agent}i\\" '
    '%{remote}p" combined_port'
)


def test_annotate_with_nginx_combined_plus_port(fleet: Server, tmp_path: Path) -> None:
    def line(port: int, when: str, addr: str = POD_IP, req: str = "GET /x HTTP/1.1") -> str:
        return f'{addr} - - [{when}] "{req}" 200 5 "-" "curl/8" {port}'

    lines = [
        line(40000, "26/Nov/2026:15:00:30 +0000", req="GET /q?a=\\x22b\\x22 HTTP/1.1"),  # alice
        line(40000, "26/Nov/2026:16:11:00 +0100"),  # bob, another zone
        line(40000, "26/Nov/2026:15:05:00 +0000"),  # nobody
        nginx_line(40000, "26/Nov/2026:15:00:30 +0000"),  # the vpnfleet format: does not match
        line(40000, "26/Nov/2026:15:00:30 +0000", addr="2001:db8::1"),  # not a pod
    ]
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "annotated.log"
    proc = vpnfleet(fleet, "audit", "annotate", "--log-format", COMBINED_PORT, str(log),
                    "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    users = ["alice", "bob", "-", "?", "-"]
    assert out.read_text().splitlines() == [
        f"{x} user={u}" for x, u in zip(lines, users, strict=True)
    ]
    assert "warning: line 4: the line ends before the log format's $remote_port" in proc.stderr
    assert "annotated 5 line(s); 1 could not be read (user=?)" in proc.stderr


def test_annotate_with_an_nginx_json_format(fleet: Server) -> None:
    rows: list[dict[str, object] | str] = [
        {"ts": 1795705230.25, "client": {"ip": POD_IP, "port": 40000}, "request": "GET /"},
        {"ts": 1795705860.5, "client": {"ip": POD_IP, "port": 40000}, "status": 200},
        {"ts": 1795705845.0, "client": {"ip": POD_IP}, "status": 200},  # no port
        "not json at all",
    ]
    text = "".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows)
    proc = vpnfleet(fleet, "audit", "annotate", "--log-format", JSON_FORMAT, "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert [json.loads(o)["vpnfleet_user"] for o in out[:3]] == ["alice", "bob", "?"]
    assert json.loads(out[0])["request"] == "GET /"  # the line is kept as it was
    assert out[3] == "not json at all user=?"
    assert "reading the client address, port and time from $remote_addr, $remote_port, $msec" in (
        proc.stderr
    )
    assert "line 3: the object has no client.port" in proc.stderr
    assert "line 4: the line is not JSON" in proc.stderr


def test_annotate_with_an_apache_logformat(fleet: Server, tmp_path: Path) -> None:
    lines = [
        f'{POD_IP} - - [26/Nov/2026:15:11:00 +0000] "GET /a\\"b HTTP/1.1" 200 - "-" "x" 40000',
        f'{POD_IP} - - [26/Nov/2026:15:00:10 +0000] "GET / HTTP/1.1" 304 - "-" "x" 40000',
        f'{POD_IP} - - [26/Nov/2026:15:00:10 +0000] "GET / HTTP/1.1" 304 - "-" "x"',  # no port
    ]
    log = tmp_path / "access_log"
    log.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    out = tmp_path / "annotated"
    proc = vpnfleet(fleet, "audit", "annotate", "--apache-format", APACHE, str(log),
                    "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().decode().split("\r\n") == [
        lines[0] + " user=bob",
        lines[1] + " user=alice",
        lines[2] + " user=?",
        "",
    ]
    assert "line 3: the line ends before the log format's %{remote}p" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-format", "$remote_addr [$time_local]"],
         "--log-format: the log format has no client port ($remote_port)"),
        (["--apache-format", "%h %{remote}p %t %Y"],
         "--apache-format: %Y is not an Apache LogFormat directive"),
        (["--format", "json", "--log-format", "$remote_addr $remote_port $msec"],
         "give only one of --format and --log-format"),
    ],
)  # fmt: skip
def test_annotate_refuses_a_bad_format_before_reading(
    fleet: Server, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out.log"
    proc = vpnfleet(fleet, "audit", "annotate", *args, "-", "-o", str(out), stdin="x\n")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists() and not (tmp_path / "out.log.partial").exists()


def test_who_names_the_user_or_lists_candidates(fleet: Server) -> None:
    ok = vpnfleet(fleet, "audit", "who", "--ip", POD_IP, "--port", "40000",
                  "--at", "2026-11-26T15:11:00Z")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "was bob" in ok.stdout and "203.0.113.9" in ok.stdout
    # The time straight from the log line works too.
    local = vpnfleet(fleet, "audit", "who", "--ip", POD_IP, "--port", "40000",
                     "--at", "26/Nov/2026:15:00:30 +0000", "--json")  # fmt: skip
    assert local.returncode == 0 and json.loads(local.stdout)["user"] == "alice"

    miss = vpnfleet(fleet, "audit", "who", "--ip", POD_IP, "--port", "40000",
                    "--at", "2026-11-26T15:05:00Z")  # fmt: skip
    assert miss.returncode == 1
    assert "error: no flow covers 10.99.0.11:40000/tcp at 2026-11-26T15:05:00Z" in miss.stderr
    assert "nearest flows" in miss.stdout and "alice" in miss.stdout and "bob" in miss.stdout
    as_json = vpnfleet(fleet, "audit", "who", "--ip", POD_IP, "--port", "40000",
                       "--at", "2026-11-26T15:05:00Z", "--json")  # fmt: skip
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["status"] == "no_match"

    bad = vpnfleet(fleet, "audit", "who", "--ip", POD_IP, "--port", "40000",
                   "--at", "2026-11-26T15:05:00")  # fmt: skip
    assert bad.returncode == 2 and "has no time zone" in bad.stderr


def test_flows_and_sessions_listing(fleet: Server) -> None:
    proc = vpnfleet(fleet, "audit", "flows", "--user", "bob", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [f["flow_id"] for f in json.loads(proc.stdout)] == ["pod1:2:1"]
    table = vpnfleet(fleet, "audit", "flows", "--dst", "10.20.0.0/16")
    assert table.returncode == 0 and "alice" in table.stdout and "bob" in table.stdout
    sessions = vpnfleet(fleet, "audit", "sessions", "--user", "alice", "--json")
    assert [s["real_ip"] for s in json.loads(sessions.stdout)] == ["198.51.100.7"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--audit-retention", "0"], {}, "audit retention must be at least 1 day"),
        ([], {"VPNFLEET_AUDIT_RETENTION_DAYS": "30d"}, "'30d' is not a whole number of days"),
        (["--forwarded-allow-ips", "10.0.0.0/8,ingress!"], {}, "'ingress!' is not an IP"),
        ([], {"VPNFLEET_FORWARDED_ALLOW_IPS": "10.0.0.300"}, "'10.0.0.300' is not an IP"),
    ],
)
def test_server_refuses_bad_settings(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    proc = subprocess.run(
        [*VPNFLEET, "server", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
