"""Parse throughput of `audit annotate`: a compiled operator format vs the fixed parsers.

    .venv/bin/python bench/logformat_parse.py [--lines 200000] [--rounds 3]

Synthetic access-log lines (random pod addresses, ports, times, paths and user agents, a
fifth of the requests with an nginx-escaped quote) in each layout. For each of the three
fixed formats (`--format nginx`, `combined-with-port`, `json`), the same layout is also given
as its log_format string and compiled (`--log-format`): the pair parses identical lines, so the
ratio is the cost of the generic compiler over the hand-written parser. Then the issue's three
custom formats (nginx combined + $remote_port, an escape=json format with $msec, Apache
combined + %{remote}p) on their own. Each parser runs `parse_line` over every line (what
annotate does per line before the lookups), best of --rounds, the two parsers of a pair
taking turns in each round, in one process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sys
import time
from collections.abc import Callable

from vpnfleet.core.accesslog import Format, parse_line
from vpnfleet.core.logformat import compile_format

BASE = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
AGENTS = ("curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")

VPNFLEET_FMT = (
    '$remote_addr:$remote_port - $remote_user [$time_local] "$request" $status '
    '$body_bytes_sent "$http_referer" "$http_user_agent"'
)
COMBINED_WITH_PORT_FMT = (
    '$remote_addr $remote_port - $remote_user [$time_local] "$request" $status '
    '$body_bytes_sent "$http_referer" "$http_user_agent"'
)
JSON_FMT = (
    'escape=json {"remote_addr":"$remote_addr","remote_port":"$remote_port",'
    '"time":"$time_iso8601","request":"$request","status":$status}'
)
COMBINED_PORT_FMT = (
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent" $remote_port'
)
AUDIT_JSON_FMT = (
    'escape=json {"ts":$msec,"client":{"ip":"$remote_addr","port":$remote_port},'
    '"request":"$request","status":$status}'
)
APACHE_FMT = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %{remote}p'


def requests(n: int, seed: int = 7) -> list[dict[str, object]]:
    rnd = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        at = BASE + dt.timedelta(milliseconds=rnd.randrange(86_400_000))
        path = f"/app/{rnd.randrange(10_000)}?q={i}"
        if rnd.random() < 0.2:
            path += "&name=\\x22quoted\\x22"
        out.append(
            {
                "addr": f"10.99.0.{rnd.randrange(1, 250)}",
                "port": rnd.randrange(1024, 65536),
                "at": at,
                "request": f"GET {path} HTTP/1.1",
                "status": rnd.choice((200, 200, 304, 404)),
                "bytes": rnd.randrange(0, 100_000),
                "agent": rnd.choice(AGENTS),
            }
        )
    return out


def _local(at: dt.datetime) -> str:
    return at.strftime("%d/%b/%Y:%H:%M:%S +0000")


def render(layout: str, r: dict[str, object]) -> str:
    at = r["at"]
    assert isinstance(at, dt.datetime)
    tail = f'"{r["request"]}" {r["status"]} {r["bytes"]} "-" "{r["agent"]}"'
    if layout == "vpnfleet":
        return f"{r['addr']}:{r['port']} - - [{_local(at)}] {tail}"
    if layout == "combined-with-port":
        return f"{r['addr']} {r['port']} - - [{_local(at)}] {tail}"
    if layout == "combined_port":
        return f"{r['addr']} - - [{_local(at)}] {tail} {r['port']}"
    if layout == "apache":
        return f"{r['addr']} - - [{_local(at)}] {tail.replace(' 0 ', ' - ')} {r['port']}"
    if layout == "json":
        return json.dumps(
            {
                "remote_addr": r["addr"],
                "remote_port": str(r["port"]),
                "time": at.isoformat(timespec="seconds"),
                "request": r["request"],
                "status": r["status"],
            },
            separators=(",", ":"),
        )
    assert layout == "audit_json"
    return json.dumps(
        {
            "ts": round(at.timestamp(), 3),
            "client": {"ip": r["addr"], "port": r["port"]},
            "request": r["request"],
            "status": r["status"],
        },
        separators=(",", ":"),
    )


def _once(fmt: Format, lines: list[str]) -> float:
    # CPU time of this process: the machine is shared, and wall time would count the others.
    start = time.process_time()
    for line in lines:
        parse_line(fmt, line)  # raises if a line does not parse
    return time.process_time() - start


def throughput(fmts: list[Format], lines: list[str], rounds: int) -> list[float]:
    """Lines per CPU second of each parser, best of ``rounds``. The parsers take turns within
    each round, so a burst of load on the shared machine hits both alike."""
    best = [float("inf")] * len(fmts)
    for _ in range(rounds):
        for i, fmt in enumerate(fmts):
            best[i] = min(best[i], _once(fmt, lines))
    return [len(lines) / b for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    reqs = requests(args.lines)
    print(f"{args.lines:,} lines per layout, best of {args.rounds}; Python "
          f"{platform.python_version()}, {platform.machine()}")  # fmt: skip
    pairs: list[tuple[str, str, Format, Callable[[], Format]]] = [
        ("vpnfleet", "nginx", "nginx", lambda: compile_format("nginx", VPNFLEET_FMT)),
        ("combined-with-port", "combined-with-port", "combined-with-port",
         lambda: compile_format("nginx", COMBINED_WITH_PORT_FMT)),
        ("json", "json", "json", lambda: compile_format("nginx", JSON_FMT)),
    ]  # fmt: skip
    print("\n| layout | fixed --format | lines/CPU s | compiled | lines/CPU s | ratio |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for layout, label, fixed, compiled in pairs:
        lines = [render(layout, r) for r in reqs]
        fmt = compiled()
        # Same lines, same answers: the comparison is fair only if both read the same thing.
        for line in lines[:1000]:
            assert parse_line(fixed, line) == parse_line(fmt, line), line
        a, b = throughput([fixed, fmt], lines, args.rounds)
        print(f"| {layout} | `{label}` | {a:,.0f} | `--log-format` | {b:,.0f} | {b / a:.2f} |")
    print("\n| issue's custom format | lines/CPU s |")
    print("| --- | ---: |")
    for layout, dialect, text in (
        ("combined_port", "nginx", COMBINED_PORT_FMT),
        ("audit_json", "nginx", AUDIT_JSON_FMT),
        ("apache", "apache", APACHE_FMT),
    ):
        lines = [render(layout, r) for r in reqs]
        fmt = compile_format(dialect, text)  # type: ignore[arg-type]
        print(f"| {layout} ({dialect}) | {throughput([fmt], lines, args.rounds)[0]:,.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
