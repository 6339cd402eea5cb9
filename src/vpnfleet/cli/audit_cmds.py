"""NAT audit commands on `vpnfleet audit`: who, flows, sessions, annotate.

Thin like the rest of the CLI: parsing of access logs is in :mod:`vpnfleet.core.accesslog`,
every answer comes from the control plane's `/api/v1/audit/*` endpoints.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from vpnfleet.cli.admin import JsonOpt, api, audit_app
from vpnfleet.cli.client import APIClient, CLIError
from vpnfleet.cli.output import emit_json, record, say, show, table
from vpnfleet.core import accesslog, logformat
from vpnfleet.core.accesslog import Format, LogHit

# A 10,000-line chunk is up to 10,000 lookups in one request: give it time.
ANNOTATE_TIMEOUT = 600.0
MAX_WARNINGS = 100

TimeOpt = Annotated[
    str | None, typer.Option(help="ISO 8601 time with zone, e.g. 2026-11-26T15:04:05Z.")
]


def _time(value: str | None, name: str) -> str | None:
    """A CLI time as ISO 8601 (accepts ISO with zone, nginx $time_local or epoch seconds)."""
    if value is None:
        return None
    try:
        return accesslog.parse_instant(value)[0].isoformat()
    except ValueError as exc:
        raise CLIError(f"{name}: {exc}", 2) from None


def _when(value: str | None) -> str:
    return "-" if value is None else value.replace("+00:00", "Z")


def _flow_summary(flow: dict[str, Any]) -> dict[str, Any]:
    dst = f"{flow['dst_ip']}:{flow['dst_port']}" if flow.get("dst_ip") else "(not recorded)"
    return {
        "flow": f"{flow['tunnel_ip']}:{flow['tunnel_port']} -> {dst} "
        f"as {flow['nat_ip']}:{flow['nat_port']}/{flow['proto']}",
        "flow_start": _when(flow["start_at"]),
        "flow_end": _when(flow["end_at"]) if flow["end_at"] else "open",
        "bytes_out_in": f"{flow['bytes_out'] if flow['bytes_out'] is not None else '?'} / "
        f"{flow['bytes_in'] if flow['bytes_in'] is not None else '?'}",
        "pod": flow["pod"],
    }


def _attributed_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        row = {"user": item["user"] or "(nobody)", **_flow_summary(item["flow"])}
        if "distance_seconds" in item:
            row = {"distance_s": item["distance_seconds"], "when": item["relation"], **row}
        rows.append(row)
    return rows


@audit_app.command("who")
def audit_who(
    ctx: typer.Context,
    ip: Annotated[str, typer.Option(help="The pod's IP as the backend logged it.")],
    port: Annotated[int, typer.Option(help="The client port the backend logged.")],
    at: Annotated[
        str, typer.Option(help="When: ISO 8601 with zone, or $time_local as in the log.")
    ],
    proto: Annotated[str, typer.Option(help="tcp, udp or icmp.")] = "tcp",
    dst: Annotated[
        str | None,
        typer.Option(help="The backend's own IP[:PORT]: tells apart flows sharing a port."),
    ] = None,
    window: Annotated[
        float | None,
        typer.Option(
            help="Seconds after --at the connection may have been seen "
            "(default: 1 for a time in whole seconds, else 0)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Who was POD_IP:PORT at a time? Exit 1 when no single user is known."""
    try:
        when, whole = accesslog.parse_instant(at)
    except ValueError as exc:
        raise CLIError(f"--at: {exc}", 2) from None
    if not 1 <= port <= 65535:
        raise CLIError(f"--port {port} is out of range 1-65535", 2)
    out = api(ctx).get(
        "/api/v1/audit/attribution",
        ip=ip,
        port=port,
        proto=proto,
        at=when.isoformat(),
        window=window if window is not None else (1.0 if whole else 0.0),
        dst=dst,
    )
    if as_json:
        emit_json(out)
        if out["user"] is None:
            raise typer.Exit(1)
        return
    if out["status"] == "match":
        say(out["message"])
        details: dict[str, Any] = {"user": out["user"] or "(nobody)"}
        s = out["session"]
        if s:
            details.update(
                session=f"{s['id']} ({s['uid']})",
                real_address=f"{s['real_ip'] or '?'}:{s['real_port'] or '?'}",
                tunnel_ip=s["tunnel_ip"],
                session_start=_when(s["started_at"]),
                session_end=_when(s["ended_at"]) if s["ended_at"] else "open",
            )
        details.update(_flow_summary(out["flow"]))
        record(details)
        return
    if out["matches"]:
        table(_attributed_rows(out["matches"]), ["user", "flow", "flow_start", "flow_end", "pod"])
        if out["user"] is not None:
            say(out["message"])
            return
    elif out["candidates"]:
        cols = ["distance_s", "when", "user", "flow", "flow_start", "flow_end", "pod"]
        table(_attributed_rows(out["candidates"]), cols, title="nearest flows")
    raise CLIError(out["message"])


@audit_app.command("flows")
def audit_flows(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option()] = None,
    pod: Annotated[str | None, typer.Option()] = None,
    since: TimeOpt = None,
    until: TimeOpt = None,
    dst: Annotated[str | None, typer.Option(help="Destination IP or CIDR.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """NAT flows that started in a time range, newest first."""
    rows = api(ctx).get_all(
        "/api/v1/audit/flows",
        total=limit,
        user=user,
        pod=pod,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        dst=dst,
    )
    if as_json:
        emit_json(rows)
        return
    table(
        [{"user": r["user"] or "(nobody)", **_flow_summary(r)} for r in rows],
        ["flow_start", "flow_end", "user", "flow", "bytes_out_in", "pod"],
    )


@audit_app.command("sessions")
def audit_sessions(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option()] = None,
    since: TimeOpt = None,
    until: TimeOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """VPN sessions alive in a time range, newest first."""
    rows = api(ctx).get_all(
        "/api/v1/sessions",
        total=limit,
        user=user,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
    )
    cols = ["id", "user", "pod", "real_ip", "tunnel_ip", "started_at", "ended_at", "end_reason"]
    show(rows, as_json, cols)


def _user_field(result: dict[str, Any]) -> str:
    """What annotate writes for one lookup result."""
    if result["user"] is not None:
        return str(result["user"])
    names = sorted({m["user"] for m in result["matches"] if m["user"]})
    return ",".join(names) if names else accesslog.UNKNOWN


class _Annotator:
    """Sends each chunk's lookups as one request and tallies what came back."""

    def __init__(self, client: APIClient, proto: str, dst: str | None) -> None:
        self.client = client
        self.proto = proto
        self.dst = dst
        self.unreadable = 0
        self.expired = 0

    def resolve(self, hits: list[LogHit]) -> list[str]:
        body = {
            "queries": [
                {
                    "ip": h.addr,
                    "port": h.port,
                    "proto": self.proto,
                    "at": h.at.isoformat(),
                    "window": h.window,
                    "dst": self.dst,
                }
                for h in hits
            ],
            "candidates": False,
        }
        results = self.client.post("/api/v1/audit/attribution", body)["results"]
        self.expired += sum(1 for r in results if r["status"] == "expired")
        return [_user_field(r) for r in results]

    def warn(self, line: int, reason: str) -> None:
        self.unreadable += 1
        if self.unreadable <= MAX_WARNINGS:
            say(f"warning: line {line}: {reason}", err=True)


def _lines(source: TextIO) -> Iterator[str]:
    yield from source


@contextlib.contextmanager
def _open_input(path: Path) -> Iterator[TextIO]:
    # newline="\n": split on LF only and keep every other byte (CR, form feeds) as it was;
    # surrogateescape: bytes that are not UTF-8 come out exactly as they went in.
    if str(path) == "-":
        stdin = io.TextIOWrapper(
            sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="\n"
        )
        try:
            yield stdin
        finally:
            stdin.detach()  # closing the wrapper would close the process's stdin
        return
    try:
        fh = path.open(encoding="utf-8", errors="surrogateescape", newline="\n")
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}", 2) from None
    with fh:
        yield fh


def _annotate_format(fmt: str | None, nginx: str | None, apache: str | None) -> Format:
    """One of the fixed formats, or the operator's own format compiled (checked before any
    line is read: a format that cannot name the person is refused at once)."""
    given = [n for n, v in (("--format", fmt), ("--log-format", nginx), ("--apache-format", apache))
             if v is not None]  # fmt: skip
    if len(given) > 1:
        raise CLIError(f"give only one of {' and '.join(given)}", 2)
    try:
        if nginx is not None:
            return logformat.compile_format("nginx", nginx)
        if apache is not None:
            return logformat.compile_format("apache", apache)
    except logformat.LogFormatError as exc:
        raise CLIError(f"--{'log' if nginx is not None else 'apache'}-format: {exc}", 2) from None
    chosen = fmt or "nginx"
    for known in accesslog.FORMATS:
        if chosen == known:
            return known
    raise CLIError(
        f"--format {chosen!r} is not one of {', '.join(accesslog.FORMATS)} "
        "(for another layout give its string with --log-format or --apache-format)",
        2,
    )


@audit_app.command("annotate")
def audit_annotate(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Access log to annotate ('-' for stdin).")],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="nginx (log_format vpnfleet, the default), combined-with-port, json.",
        ),
    ] = None,
    nginx_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="The backend's own nginx log_format string (or the whole "
            "'log_format NAME ...;' line from nginx.conf) instead of --format.",
        ),
    ] = None,
    apache_format: Annotated[
        str | None,
        typer.Option(
            "--apache-format",
            help="The backend's own Apache LogFormat string (or the whole LogFormat line) "
            "instead of --format.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    proto: Annotated[str, typer.Option(help="Protocol of the logged connections.")] = "tcp",
    dst: Annotated[
        str | None,
        typer.Option(help="This backend's IP[:PORT]: tells apart flows sharing a pod port."),
    ] = None,
) -> None:
    """Append the VPN user to every line of a backend access log (user=- if none, ? if the
    line could not be read). Never drops a line."""
    log_format = _annotate_format(fmt, nginx_format, apache_format)
    if proto.lower() not in ("tcp", "udp", "icmp"):
        raise CLIError(f"--proto {proto!r} is not one of tcp, udp, icmp", 2)
    if isinstance(log_format, logformat.CompiledFormat):
        # Which variables were picked matters when a format has several (realip, $msec).
        say(f"reading the client address, port and time from {log_format.describes}", err=True)
    base = api(ctx)
    annotator = _Annotator(
        APIClient(base.url, base.token, timeout=ANNOTATE_TIMEOUT, ca_file=base.ca_file),
        proto.lower(),
        dst,
    )
    # Written next to the target and renamed at the end: a failed run leaves no half file.
    partial = None if output is None else output.with_name(output.name + ".partial")
    lines = 0
    try:
        with _open_input(file) as source:
            sink: TextIO
            if partial is None:
                sink = io.TextIOWrapper(
                    sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="\n"
                )
            else:
                sink = partial.open("w", encoding="utf-8", errors="surrogateescape", newline="\n")
            try:
                for line in accesslog.annotate(
                    _lines(source), log_format, annotator.resolve, annotator.warn
                ):
                    sink.write(line)
                    lines += 1
            finally:
                sink.flush()
                if partial is not None:
                    sink.close()
                else:
                    sink.detach()
        if partial is not None and output is not None:
            os.replace(partial, output)
    except OSError as exc:
        raise CLIError(f"cannot write the annotated log: {exc.strerror}") from None
    finally:
        if partial is not None and partial.exists():
            partial.unlink()
    summary = f"annotated {lines} line(s)"
    if annotator.unreadable:
        summary += f"; {annotator.unreadable} could not be read (user=?)"
        if annotator.unreadable > MAX_WARNINGS:
            summary += f", the first {MAX_WARNINGS} are listed above"
    if annotator.expired:
        summary += f"; {annotator.expired} lookup(s) were older than the retention (user=-)"
    say(summary, err=True)
