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


def config(directory: Path, port: int = NGINX_PORT) -> str:
    """The nginx.conf of the lab backend (foreground, all paths under ``directory``)."""
    d = directory
    return f"""daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format vpnfleet {LOG_FORMAT};
    access_log {d}/access.log vpnfleet;
    client_body_temp_path {d}/work/body;
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
