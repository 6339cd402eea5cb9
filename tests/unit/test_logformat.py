"""Compiling an operator's own nginx log_format / Apache LogFormat into a line parser."""

from __future__ import annotations

import datetime as dt
import io
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core.accesslog import LogHit, annotate, annotate_line
from vpnfleet.core.logformat import LogFormatError, compile_format

UTC = dt.UTC
T = dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC)

# nginx's predefined `combined`, with the port appended (the first case).
COMBINED_PORT = (
    "log_format combined_port '$remote_addr - $remote_user [$time_local] '\n"
    "                         '\"$request\" $status $body_bytes_sent '\n"
    '                         \'"$http_referer" "$http_user_agent" $remote_port\';'
)
COMBINED_LINE = (
    '10.99.0.11 - - [26/Nov/2026:16:04:05 +0100] "GET /a HTTP/1.1" 200 612 "-" "curl/8.5.0" 40000'
)
# An escape=json format: the port a number, the time $msec, the client nested.
JSON_FORMAT = (
    'log_format audit escape=json \'{"ts":$msec,"client":{"ip":"$remote_addr",'
    '"port":$remote_port},"request":"$request","status":$status,"ua":"$http_user_agent"}\';'
)
JSON_LINE = (
    '{"ts":1795705445.123,"client":{"ip":"10.99.0.11","port":40000},'
    '"request":"GET /q?a=\\"b\\" HTTP/1.1","status":200,"ua":"curl"}'
)
# Apache's `combined` with %{remote}p (the third case), as written in httpd.conf.
APACHE = (
    'LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{Referer}i\\" \\"%{User-Agent}i\\" %{remote}p" '
    "combined_port"
)
APACHE_LINE = (
    '10.99.0.11 - - [26/Nov/2026:15:04:05 +0000] "GET /x HTTP/1.1" 200 - "-" "curl/8" 40000'
)


def hit(fmt: str, line: str, dialect: str = "nginx") -> LogHit:
    return compile_format(dialect, fmt).parse(line)  # type: ignore[arg-type]


def test_nginx_combined_plus_port() -> None:
    got = hit(COMBINED_PORT, COMBINED_LINE)
    assert got == LogHit("10.99.0.11", 40000, T, True)
    assert got.window == 1.0


def test_nginx_bare_string_and_quoted_pieces_give_the_same_parser() -> None:
    bare = (
        '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
        '"$http_referer" "$http_user_agent" $remote_port'
    )
    quoted = "'$remote_addr - $remote_user [$time_local] ' '\"$request\" $status "
    quoted += '$body_bytes_sent "$http_referer" "$http_user_agent" $remote_port\''
    newline_after_name = "log_format combined_port\n    " + quoted + ";"
    double = '"' + bare.replace('"', '\\"') + '"'  # nginx's double-quoted string
    for fmt in (bare, quoted, COMBINED_PORT, newline_after_name, double):
        assert hit(fmt, COMBINED_LINE).port == 40000


@pytest.mark.parametrize(
    "request_text",
    [
        'GET /a\\x22b\\x22 HTTP/1.1',  # nginx escapes a quote as \x22
        'GET /a\\"b HTTP/1.1',  # Apache escapes it as \"
        "-",  # nginx logs an empty request line as "-"... or as ""
        "",
        "GET /with space [and brackets] HTTP/1.1",
    ],
)  # fmt: skip
def test_quoted_fields_with_escapes_and_dashes(request_text: str) -> None:
    line = COMBINED_LINE.replace("GET /a HTTP/1.1", request_text)
    assert hit(COMBINED_PORT, line) == LogHit("10.99.0.11", 40000, T, True)
    assert hit(APACHE, APACHE_LINE.replace("GET /x HTTP/1.1", request_text), "apache").port == 40000


def test_dash_values_in_numeric_and_user_fields() -> None:
    line = COMBINED_LINE.replace("200 612", "400 -").replace(" - - ", " - bob ")
    assert hit(COMBINED_PORT, line).port == 40000
    assert hit(APACHE, APACHE_LINE, "apache").port == 40000  # %b is "-" for no body


@pytest.mark.parametrize("client", ["2001:db8::1", "::ffff:10.99.0.11", "fe80::1"])
def test_ipv6_clients_are_read_and_are_no_pods(client: str) -> None:
    got = hit(COMBINED_PORT, COMBINED_LINE.replace("10.99.0.11", client))
    assert got.port == 40000 and not got.is_ipv4
    # Address and port joined by ":" as the vpnfleet format does: the last colon splits them.
    joined = '$remote_addr:$remote_port [$time_local] "$request"'
    got = hit(joined, f'{client}:40000 [26/Nov/2026:15:04:05 +0000] "GET / HTTP/1.1"')
    assert (got.addr, got.port) == (str(__import__("ipaddress").ip_address(client)), 40000)


def test_nginx_json_format() -> None:
    fmt = compile_format("nginx", JSON_FORMAT)
    assert fmt.is_json and fmt.describes == "$remote_addr, $remote_port, $msec"
    got = fmt.parse(JSON_LINE)
    assert got == LogHit("10.99.0.11", 40000, T.replace(microsecond=123000), False)
    assert got.window == 0.0
    # Quoted numbers (escape=json writes "$remote_port" as a string when quoted) work too.
    assert fmt.parse(JSON_LINE.replace(":40000", ':"40000"')).port == 40000


def test_json_format_with_iso_time_and_joined_client() -> None:
    fmt = compile_format(
        "nginx",
        '{"time":"$time_iso8601","client":"$remote_addr:$remote_port","req":"$request"}',
    )
    got = fmt.parse('{"time":"2026-11-26T16:04:05+01:00","client":"10.99.0.11:40000","req":""}')
    assert got == LogHit("10.99.0.11", 40000, T, True)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "the line is not JSON"),
        ("[1]", "not a JSON object"),
        ('{"ts":1795705445.1,"client":{"ip":"10.99.0.11"}}', "the object has no client.port"),
        ('{"ts":1795705445.1,"client":{"ip":"10.99.0.11","port":null}}',
         "client.port is null, not a value"),
        ('{"ts":"yesterday","client":{"ip":"10.99.0.11","port":1}}',
         "ts is 'yesterday', not like '$msec'"),
        ('{"ts":1795705445.1,"client":{"ip":"pod-a","port":1}}', "'pod-a' is not an IP"),
    ],
)  # fmt: skip
def test_json_lines_that_do_not_fit_say_why(line: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        hit(JSON_FORMAT, line)
    assert reason in str(info.value)


def test_apache_combined_with_remote_port() -> None:
    assert hit(APACHE, APACHE_LINE, "apache") == LogHit("10.99.0.11", 40000, T, True)
    # The string alone, with plain quotes, as one would pass it on a command line.
    bare = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i" %{remote}p'
    assert hit(bare, APACHE_LINE, "apache").port == 40000


def test_apache_prefers_the_connection_peer_and_reads_strftime_times() -> None:
    # %a may be rewritten by mod_remoteip; %{c}a is the connection's peer: the pod.
    fmt = '%a %{c}a:%{remote}p %{%Y-%m-%dT%H:%M:%S%z}t %>s "%r"'
    got = hit(fmt, '198.51.100.1 10.99.0.11:40000 2026-11-26T16:04:05+0100 200 "GET /"', "apache")
    assert got == LogHit("10.99.0.11", 40000, T, True)
    msec = hit("%h %{remote}p %{msec}t", "10.99.0.11 40000 1795705445123", "apache")
    assert msec.at == T.replace(microsecond=123000) and not msec.whole_seconds
    sec = hit("%h %{remote}p %{sec}t", "10.99.0.11 40000 1795705445", "apache")
    assert sec.at == T and sec.whole_seconds


def test_the_most_exact_time_and_the_real_peer_win() -> None:
    fmt = "$remote_addr $realip_remote_addr $realip_remote_port [$time_local] $msec"
    got = hit(fmt, "203.0.113.5 10.99.0.11 40000 [26/Nov/2026:15:04:05 +0000] 1795705445.250")
    assert (got.addr, got.port, got.at.microsecond, got.whole_seconds) == (
        "10.99.0.11",
        40000,
        250000,
        False,
    )


def test_unknown_nginx_variables_are_generic_fields() -> None:
    fmt = "$host:$server_port $remote_addr:$remote_port [$time_local] $upstream_addr ${foo}x"
    line = "www.example.org:443 10.99.0.11:40000 [26/Nov/2026:15:04:05 +0000] 10.0.0.5:80, - -x"
    with pytest.raises(ValueError):  # "10.0.0.5:80, -" has a space: not one generic field
        hit(fmt, line)
    assert hit(fmt, line.replace(", -", "")).port == 40000


@pytest.mark.parametrize(
    ("dialect", "fmt", "message"),
    [
        ("nginx", "$remote_addr [$time_local]",
         "the log format has no client port ($remote_port) (behind NAT"),
        ("nginx", '$remote_port [$time_local] "$request"', "has no client address ($remote_addr)"),
        ("nginx", "$remote_addr $remote_port $status", "has no time ($time_local, $time_iso8601"),
        ("nginx", '"$request" $status',
         "has no client address ($remote_addr), client port ($remote_port) and time"),
        ("apache", '%h %t "%r"', "has no client port (%{remote}p)"),
        ("apache", "%h %{remote}p %>s", "has no time (%t or %{...%z}t)"),
        ("apache", "%h %{remote}p %t %Q", "%Q is not an Apache LogFormat directive"),
        ("apache", "%h %{remote}p %t %i", "%i needs a name: %{Name}i"),
        ("apache", "%h %{peer}p %t", "%p takes {canonical}, {local} or {remote}"),
        ("apache", "%h %{remote}p %{%d/%b/%Y:%H:%M:%S}t", "has no time zone (%z)"),
        ("apache", "%h %{remote}p %{%d %c %z}t", "the strftime conversion %c is not supported"),
        ("apache", "%h %{remote}p %t %", "is not a directive"),
        ("nginx", "$remote_addr$remote_port [$time_local]",
         "$remote_addr and $remote_port have nothing between them"),
        ("nginx", "$remote_addr $remote_port $time_local$status",
         "$time_local and $status have nothing between them"),
        ("nginx", "$remote_addr $remote_port [$time_local] $ x", "'$' in '] $ x' is not followed"),
        ("nginx", "", "the log format is empty"),
        ("nginx", "log_format main;", "needs a name and a format string"),
        ("nginx", "log_format main '$remote_addr", "a quote ' is not closed"),
        ("nginx", "escape=xml '$remote_addr'", "escape=xml is not default, json or none"),
        ("nginx", '{"a":"$remote_addr","p":$remote_port,"t":"$msec"',
         "the JSON log format is not valid JSON"),
        ("nginx", '{"a":"$remote_addr","t":"$msec"}', "has no client port"),
    ],
)  # fmt: skip
def test_bad_formats_are_refused_naming_what_is_wrong(dialect: str, fmt: str, message: str) -> None:
    with pytest.raises(LogFormatError) as info:
        compile_format(dialect, fmt)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "does not match the log format from its start"),
        (COMBINED_LINE[:-6], "the line ends before the log format's $remote_port"),
        (COMBINED_LINE.replace("[26/", "[2x/"), "does not match the log format at $time_local"),
        (COMBINED_LINE + " extra", "the line has more text than the log format"),
        (COMBINED_LINE.replace(" 40000", " -"), "client port '-' is not a number"),
        (COMBINED_LINE.replace(" 40000", " 70000"), "client port 70000 is out of range"),
        (COMBINED_LINE.replace(" +0100", ""), "has no time zone"),
        (COMBINED_LINE.replace("10.99.0.11", "-"), "client address '-' is not an IP"),
    ],
)  # fmt: skip
def test_lines_that_do_not_match_say_where(line: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        hit(COMBINED_PORT, line)
    assert reason in str(info.value)


def test_annotate_with_a_compiled_format_keeps_and_marks_lines() -> None:
    fmt = compile_format("nginx", COMBINED_PORT)
    lines = [
        COMBINED_LINE + "\n",
        "garbage\r\n",
        COMBINED_LINE.replace(" 40000", " 40001") + "\n",
        COMBINED_LINE.replace("10.99.0.11", "2001:db8::1"),
    ]
    warned: list[tuple[int, str]] = []
    users = {40000: "alice", 40001: "bob"}
    out = list(
        annotate(
            lines, fmt, lambda hs: [users[h.port] for h in hs], lambda n, r: warned.append((n, r))
        )
    )
    assert out == [
        COMBINED_LINE + " user=alice\n",
        "garbage user=?\r\n",
        COMBINED_LINE.replace(" 40000", " 40001") + " user=bob\n",
        COMBINED_LINE.replace("10.99.0.11", "2001:db8::1") + " user=-",
    ]
    assert warned == [(2, "the line ends before the log format's $remote_user")]


def test_annotated_json_lines_stay_json() -> None:
    fmt = compile_format("nginx", JSON_FORMAT)
    out = annotate_line(fmt, JSON_LINE + "\n", "alice")
    assert json.loads(out)["vpnfleet_user"] == "alice" and out.endswith("}\n")
    assert annotate_line(fmt, "oops\n", "?") == "oops user=?\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(), st.just(COMBINED_LINE), st.just(JSON_LINE))), st.booleans())
def test_any_input_gives_one_line_per_line(parts: list[str], json_format: bool) -> None:
    fmt = compile_format("nginx", JSON_FORMAT if json_format else COMBINED_PORT)
    lines = list(io.StringIO("\n".join(parts), newline="\n"))
    out = list(annotate(lines, fmt, lambda hs: ["x"] * len(hs), lambda _n, _r: None, chunk=3))
    assert len(out) == len(lines)
    for before, after in zip(lines, out, strict=True):
        assert after.endswith("\n") == before.endswith("\n")


@pytest.mark.parametrize(
    ("time_format", "text"),
    [
        ("%{end:%d/%b/%Y:%H:%M:%S %z}t", "26/Nov/2026:16:04:05 +0100"),
        ("%{begin:%F %T %z}t", "2026-11-26 15:04:05 +0000"),
        ("%{%a %e %b %Y %H:%M:%S %z}t", "Thu 26 Nov 2026 15:04:05 Z"),
        ("[%{%d/%m/%y %H.%M.%S%z}t]", "[26/11/26 10.04.05-0500]"),
        ("%{usec}t", "1795705445000000"),
    ],
)  # fmt: skip
def test_apache_time_formats(time_format: str, text: str) -> None:
    got = hit(f"%a %{{remote}}p {time_format} %>s", f"10.99.0.11 40000 {text} 200", "apache")
    assert got.at == T


def test_apache_time_that_does_not_fit_its_strftime_says_so() -> None:
    with pytest.raises(ValueError, match="is not like '%d/%b/%Y:%H:%M:%S %z'"):
        hit(
            "%a %{remote}p %{%d/%b/%Y:%H:%M:%S %z}t",
            "10.0.0.1 1 31/Feb/2026:15:04:05 +0000",
            "apache",
        )


def test_variables_back_to_back_are_read_as_one_field() -> None:
    fmt = '"$host$request_uri" $remote_addr:$remote_port [$time_local] "$http_user_agent$status"'
    line = '"example.org/a/b?c" 10.99.0.11:40000 [26/Nov/2026:15:04:05 +0000] "curl200"'
    assert hit(fmt, line) == LogHit("10.99.0.11", 40000, T, True)


@pytest.mark.parametrize("junk", ["a" * 100_000, "a:" * 50_000, '"' * 100_000, "x " * 50_000])
def test_a_long_line_that_does_not_match_is_refused_at_once(junk: str) -> None:
    # Two unbounded patterns side by side ($host$request_uri) once took a minute on such a
    # line (quadratic backtracking); linear, it takes milliseconds. The bound is 500x that.
    fmt = compile_format("nginx", '$host$request_uri $remote_addr:$remote_port [$time_local] "$x"')
    start = time.perf_counter()
    with pytest.raises(ValueError):
        fmt.parse(junk)
    assert time.perf_counter() - start < 10
