"""The reverse-lookup decision: which flow covers a time, and what is said when none does."""

from __future__ import annotations

import datetime as dt

import pytest

from vpnfleet.core.attribution import (
    LONG_CLASS,
    OPEN_CLASS,
    FlowSpan,
    Query,
    decide,
    duration_class,
    human_duration,
    iso,
    parse_dst,
    parse_query,
)

T0 = dt.datetime(2026, 11, 26, 15, 0, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)
M = dt.timedelta(minutes=1)


def span(i: int, start: dt.timedelta, end: dt.timedelta | None, user: str = "alice",
         **kw: object) -> FlowSpan:  # fmt: skip
    return FlowSpan(i, T0 + start, None if end is None else T0 + end, user, "10.20.0.5", 443,
                    **kw)  # type: ignore[arg-type]  # fmt: skip


def q(at: dt.timedelta, window: dt.timedelta = dt.timedelta(0)) -> Query:
    return Query("10.99.0.11", 40000, "tcp", T0 + at, window)


def test_the_covering_flow_wins_over_reused_ports() -> None:
    flows = [span(1, 0 * M, 1 * M), span(2, 10 * M, 11 * M, "bob")]
    d = decide(q(10 * M + 30 * S), flows)
    assert d.status == "match" and [f.row_id for f in d.matches] == [2] and d.users == ["bob"]


def test_whole_second_window_reaches_a_flow_starting_within_the_second() -> None:
    flow = span(1, 500 * dt.timedelta(milliseconds=1), 1 * M)
    assert decide(q(0 * M), [flow]).status == "no_match"
    assert decide(q(0 * M, S), [flow]).status == "match"


def test_open_flow_ends_with_its_session_or_a_reuse_of_its_tuple() -> None:
    open_flow = span(1, 0 * M, None, session_end=T0 + 5 * M)
    assert decide(q(4 * M), [open_flow]).status == "match"
    assert decide(q(6 * M), [open_flow]).status == "no_match"
    reused = span(1, 0 * M, None, reused_at=T0 + 2 * M)
    assert decide(q(3 * M), [reused]).status == "no_match"
    assert decide(q(1 * M), [span(1, 0 * M, None)]).status == "match"  # still open


def test_two_covering_flows_are_ambiguous_newest_first() -> None:
    d = decide(q(3 * M), [span(1, 0 * M, 5 * M), span(2, 1 * M, 6 * M, "bob")])
    assert d.status == "ambiguous" and [f.row_id for f in d.matches] == [2, 1]
    assert d.users == ["bob", "alice"]


def test_no_match_ranks_candidates_by_distance() -> None:
    nearby = [span(1, 0 * M, 1 * M), span(2, 4 * M, 5 * M), span(3, 20 * M, 21 * M)]
    d = decide(q(3 * M), [], nearby, max_candidates=2)
    assert d.status == "no_match"
    assert [(f.row_id, dist) for f, dist in d.candidates] == [(2, 1 * M), (1, 2 * M)]


def test_before_the_retention_horizon_is_expired_unless_covered() -> None:
    horizon = T0 + 1 * dt.timedelta(days=1)
    assert decide(q(5 * M), [], horizon=horizon).status == "expired"
    assert decide(q(5 * M), [span(1, 0 * M, 10 * M)], horizon=horizon).status == "match"


def test_parse_query_errors_are_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"^port 0 is out of range 1-65535$"):
        parse_query("10.0.0.1", 0, "tcp", T0)
    with pytest.raises(ValueError, match=r"^proto 'gre' is not one of tcp, udp, icmp$"):
        parse_query("10.0.0.1", 1, "gre", T0)
    with pytest.raises(ValueError, match="needs a time zone"):
        parse_query("10.0.0.1", 1, "tcp", T0.replace(tzinfo=None))
    with pytest.raises(ValueError, match="between 0 and 3600"):
        parse_query("10.0.0.1", 1, "tcp", T0, window=-1)
    query = parse_query(" 10.0.0.1 ", 1, "UDP", T0, 1, "10.20.0.5:443")
    assert (query.ip, query.proto, query.dst_ip, query.dst_port) == (
        "10.0.0.1",
        "udp",
        "10.20.0.5",
        443,
    )
    assert parse_dst("10.20.0.5") == ("10.20.0.5", None)
    with pytest.raises(ValueError, match="not IPv4"):
        parse_dst("backend:443")


def test_readable_times() -> None:
    assert iso(T0) == "2026-11-26T15:00:00Z"
    assert iso(T0 + dt.timedelta(milliseconds=250)) == "2026-11-26T15:00:00.250Z"
    assert [human_duration(d) for d in (0.25 * S, 4.2 * S, 200 * S, 125 * M, 76 * 60 * M)] == [
        "250 ms", "4.2 s", "3 min 20 s", "2 h 5 min", "3 d 4 h",
    ]  # fmt: skip


def test_duration_classes_bound_the_lookup() -> None:
    assert [duration_class(T0, T0 + d) for d in (0 * S, 60 * S, 61 * S, 60 * M, 24 * 60 * M)] == [
        0, 0, 1, 1, 2,
    ]  # fmt: skip
    assert duration_class(T0, T0 + 24 * 60 * M + S) == LONG_CLASS
    assert duration_class(T0, None) == OPEN_CLASS
