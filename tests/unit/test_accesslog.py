"""Reading backend access logs and annotating them with the VPN user."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core.accesslog import (
    LogHit,
    annotate,
    annotate_line,
    parse_instant,
    parse_line,
    parse_time_local,
)

UTC = dt.UTC
NGINX = (
    '10.99.0.11:40000 - - [26/Nov/2026:16:04:05 +0100] "GET / HTTP/1.1" 200 612 "-" "curl/8.5.0"'
)
COMBINED = (
    '10.99.0.11 40000 - alice [26/Nov/2026:15:04:05 +0000] "GET / HTTP/1.1" 200 612 "-" "curl"'
)


def test_nginx_vpnfleet_format() -> None:
    hit = parse_line("nginx", NGINX + "\n")
    assert hit == LogHit("10.99.0.11", 40000, dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC), True)
    assert hit.window == 1.0 and hit.is_ipv4


def test_nginx_ipv6_client_is_read_but_is_no_pod() -> None:
    hit = parse_line("nginx", NGINX.replace("10.99.0.11:40000", "2001:db8::7:40000"))
    assert (hit.addr, hit.port, hit.is_ipv4) == ("2001:db8::7", 40000, False)


def test_combined_with_port_format() -> None:
    hit = parse_line("combined-with-port", COMBINED)
    assert (hit.addr, hit.port, hit.at) == (
        "10.99.0.11",
        40000,
        dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("time", "at", "whole"),
    [
        ("2026-11-26T15:04:05Z", dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC), True),
        ("2026-11-26T17:04:05.250+02:00",
         dt.datetime(2026, 11, 26, 15, 4, 5, 250000, tzinfo=UTC), False),
        ("26/Nov/2026:15:04:05 +0000", dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC), True),
        (1795705445.5, dt.datetime(2026, 11, 26, 15, 4, 5, 500000, tzinfo=UTC), False),
        ("1795705445.500", dt.datetime(2026, 11, 26, 15, 4, 5, 500000, tzinfo=UTC), False),
        (1795705445, dt.datetime(2026, 11, 26, 15, 4, 5, tzinfo=UTC), True),
    ],
)  # fmt: skip
def test_json_format_times(time: object, at: dt.datetime, whole: bool) -> None:
    line = json.dumps({"remote_addr": "10.99.0.11", "remote_port": "40000", "time": time})
    hit = parse_line("json", line)
    assert (hit.addr, hit.port, hit.at, hit.whole_seconds) == ("10.99.0.11", 40000, at, whole)


@pytest.mark.parametrize(
    ("fmt", "line", "reason"),
    [
        ("nginx", "", "not in the vpnfleet log_format"),
        ("nginx", NGINX.replace(":40000", ""), "has no client port"),
        ("nginx", NGINX.replace("40000", "0"), "client port 0 is out of range 1-65535"),
        ("nginx", NGINX.replace("40000", "65536"), "client port 65536 is out of range"),
        ("nginx", NGINX.replace(" +0100", ""), "has no time zone"),
        ("nginx", NGINX.replace("16:04:05", "16:04"), "is not like 26/Nov/2026:15:04:05 +0000"),
        ("nginx", NGINX.replace("Nov", "Foo"), "is not like"),
        ("nginx", NGINX.replace("26/Nov", "31/Nov"), "is not a valid date"),
        ("nginx", NGINX.replace("10.99.0.11", "pod-a"), "client address 'pod-a' is not an IP"),
        ("combined-with-port", COMBINED.replace(" 40000", " -"), "client port '-' is not a"),
        ("combined-with-port", "garbage", "not combined-with-port"),
        ("json", "not json", "the line is not JSON"),
        ("json", "[1, 2]", "not a JSON object"),
        ("json", '{"remote_addr": "10.0.0.1", "time": "2026-11-26T15:04:05Z"}',
         "the object has no remote_port"),
        ("json", '{"remote_addr": "10.0.0.1", "remote_port": 1, "time": "2026-11-26T15:04:05"}',
         "has no time zone; add Z or +HH:MM"),
        ("json", '{"remote_addr": "10.0.0.1", "remote_port": 99999, "time": 1795705445}',
         "client port 99999 is out of range"),
        ("json", '{"remote_addr": "10.0.0.1", "remote_port": true, "time": 1795705445}',
         "is not a number"),
        ("json", '{"remote_addr": "10.0.0.1", "remote_port": 1, "time": NaN}',
         "is not epoch seconds"),
    ],
)  # fmt: skip
def test_bad_lines_say_why(fmt: str, line: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_line(fmt, line)  # type: ignore[arg-type]
    assert reason in str(info.value)


def test_times_without_zone_are_errors() -> None:
    for text in ("2026-11-26T15:04:05", "2026-11-26 15:04:05", "2026-11-26"):
        with pytest.raises(ValueError, match="has no time zone"):
            parse_instant(text)
    with pytest.raises(ValueError, match="has no time zone"):
        parse_time_local("26/Nov/2026:15:04:05")


def test_url_decoded_plus_sign_is_a_zone() -> None:
    at, _ = parse_instant("2026-11-26T15:04:05 01:00")
    assert at == dt.datetime(2026, 11, 26, 14, 4, 5, tzinfo=UTC)


def test_annotate_keeps_every_line_in_place() -> None:
    text = (
        NGINX + "\n"
        + "junk\r\n"
        + NGINX.replace("40000", "40001") + "\r\n"
        + NGINX.replace("10.99.0.11:40000", "[::1]:80") + "\n"
        + NGINX.replace("40000", "40002")
    )  # fmt: skip
    warnings: list[tuple[int, str]] = []
    names = {40000: "alice", 40001: "bob"}

    def resolve(hits: list[LogHit]) -> list[str]:
        return [names.get(h.port, "-") for h in hits]

    out = list(
        annotate(
            io.StringIO(text, newline="\n"), "nginx", resolve, lambda n, r: warnings.append((n, r))
        )
    )
    assert out == [
        NGINX + " user=alice\n",
        "junk user=?\r\n",
        NGINX.replace("40000", "40001") + " user=bob\r\n",
        NGINX.replace("10.99.0.11:40000", "[::1]:80") + " user=-\n",
        NGINX.replace("40000", "40002") + " user=-",
    ]
    assert warnings == [(2, "the line is not in the vpnfleet log_format (ADDR:PORT - USER [TIME])")]


def test_annotate_asks_once_per_chunk_for_distinct_hits() -> None:
    lines = [NGINX + "\n"] * 3 + ["bad\n"] + [NGINX.replace("40000", "40001") + "\n"]
    calls: list[list[LogHit]] = []
    warned: list[int] = []

    def resolve(hits: list[LogHit]) -> list[str]:
        calls.append(hits)
        return ["u"] * len(hits)

    out = list(annotate(lines, "nginx", resolve, lambda n, _r: warned.append(n), chunk=2))
    assert len(out) == 5 and warned == [4]
    assert [len(c) for c in calls] == [1, 1, 1]  # [l1,l2] -> 1 distinct, [l3,bad], [l5]


def test_json_lines_stay_json() -> None:
    line = '{"remote_addr": "10.99.0.11", "remote_port": 40000, "time": 1795705445}  \n'
    out = annotate_line("json", line, "alice")
    assert json.loads(out)["vpnfleet_user"] == "alice" and out.endswith("}\n")
    assert json.loads(annotate_line("json", "{}", "-")) == {"vpnfleet_user": "-"}
    assert annotate_line("json", "not json\n", "?") == "not json user=?\n"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(),
            st.just(NGINX),
            st.just(COMBINED),
            st.just('{"remote_addr": "10.99.0.11", "remote_port": 1, "time": 1795705445}'),
        )
    ),
    st.sampled_from(["nginx", "combined-with-port", "json"]),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)
def test_annotate_output_has_as_many_lines_as_input(
    parts: list[str], fmt: str, ending: str, final_newline: bool
) -> None:
    text = ending.join(parts) + (ending if final_newline and parts else "")
    lines = list(io.StringIO(text, newline="\n"))
    out = list(
        annotate(lines, fmt, lambda hits: ["x"] * len(hits), lambda _n, _r: None, chunk=3)  # type: ignore[arg-type]
    )
    assert len(out) == len(lines)
    assert "".join(out).count("\n") == text.count("\n")
    for before, after in zip(lines, out, strict=True):
        assert after.endswith("\n") == before.endswith("\n")
        assert "user=" in after or '"vpnfleet_user"' in after
