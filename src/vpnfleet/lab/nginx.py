"""A real nginx backend for the lab, logging the client port as the NAT audit needs.

It answers every request with ``ok <uri>`` and writes ``<dir>/access.log`` in the
``vpnfleet`` log format documented in docs/audit.md (``$remote_addr:$remote_port`` first),
the input ``vpnfleet audit annotate --format nginx`` reads. Everything nginx writes (pid,
temp files, logs) stays in its own directory, so it runs beside a system nginx untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vpnfleet.lab import topology

NGINX_PORT = 8088

# The log_format of docs/audit.md, word for word.
LOG_FORMAT = (
    "'$remote_addr:$remote_port - $remote_user [$time_local] '\n"
    '                        \'"$request" $status $body_bytes_sent "$http_referer" '
    '"$http_user_agent"\''
)


# Two more logs of the same requests in layouts operators use, read with
# `vpnfleet audit annotate --log-format` (docs/audit.md): nginx's `combined` with the port
# appended, and JSON lines (escape=json) with the exact time ($msec) and the client nested.
CUSTOM_FORMATS = {
    "combined_port": (
        "'$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent '\n"
        '        \'"$http_referer" "$http_user_agent" $remote_port\''
    ),
    "audit_json": (
        'escape=json \'{"ts":$msec,"client":{"ip":"$remote_addr",'
        '"port":$remote_port},"request":"$request","status":$status}\''
    ),
}


def custom_log(directory: Path, name: str) -> Path:
    """Where nginx writes the log in the ``CUSTOM_FORMATS[name]`` layout."""
    return directory / f"access.{name}.log"


def config(directory: Path, port: int = NGINX_PORT) -> str:
    """The nginx.conf of the lab backend (foreground, all paths under ``directory``)."""
    d = directory
    custom = "".join(
        f"    log_format {name} {fmt};\n    access_log {custom_log(d, name)} {name};\n"
        for name, fmt in CUSTOM_FORMATS.items()
    )
    return f"""daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format vpnfleet {LOG_FORMAT};
    access_log {d}/access.log vpnfleet;
{custom}    client_body_temp_path {d}/work/body;
    proxy_temp_path {d}/work/proxy;
    fastcgi_temp_path {d}/work/fastcgi;
    uwsgi_temp_path {d}/work/uwsgi;
    scgi_temp_path {d}/work/scgi;
    server {{
        listen {port};
        default_type text/plain;
        location / {{ return 200 "ok $uri\\n"; }}
    }}
}}
"""


def available() -> bool:
    return shutil.which("nginx") is not None


def start(namespace: str, directory: Path, port: int = NGINX_PORT) -> topology.LabProcess:
    """Run nginx in ``namespace`` (foreground, stopped with the lab's other processes)."""
    (directory / "work").mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, port))
    return topology.spawn_in(
        namespace,
        "nginx",
        "-c",
        str(conf),
        "-p",
        str(directory),
        "-e",
        str(directory / "error.log"),
        log_path=directory / "nginx.log",
    )
