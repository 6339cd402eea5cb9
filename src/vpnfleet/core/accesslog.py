"""Backend access logs: find the client address, client port and time on each line, and
write the line back with the VPN user appended. Pure; the CLI does the I/O and the lookups.

Formats (see docs/audit.md for the nginx configuration):

- ``nginx``: the ``vpnfleet`` log_format, ``$remote_addr:$remote_port - $remote_user
  [$time_local] "$request" ...``;
- ``combined-with-port``: nginx's ``combined`` with ``$remote_port`` as the second field,
  ``$remote_addr $remote_port - $remote_user [$time_local] "$request" ...``;
- ``json``: one object per line with ``remote_addr``, ``remote_port`` and ``time`` (ISO 8601
  with a zone, ``$time_local``, or epoch seconds like ``$msec``);
- any other nginx ``log_format`` or Apache ``LogFormat``: compiled by
  :mod:`vpnfleet.core.logformat` into a :class:`LineParser`.

A log time with whole seconds (``$time_local``, ``$time_iso8601``) only says the request
happened within that second, so it is looked up as the range ``[t, t + 1 s]``.

Annotation never drops or merges a line: every input line yields exactly one output line,
the line as it was plus ``user=NAME`` (``user=-``: no flow covers it, ``user=?``: the line
could not be read). A JSON line gets a ``"vpnfleet_user"`` key instead, so it stays JSON.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

LogFormat = Literal["nginx", "combined-with-port", "json"]
FORMATS: tuple[LogFormat, ...] = ("nginx", "combined-with-port", "json")
JSON_KEY = "vpnfleet_user"
UNKNOWN = "-"  # no flow covers the line (or the client was not a pod)
UNREADABLE = "?"  # the line could not be parsed
CHUNK = 10_000  # lines per lookup request (the API takes up to 10,000 queries)

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_TIME_LOCAL = re.compile(
    r"(\d{1,2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})"
)
_NO_ZONE = re.compile(r"\d{1,2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2}")
_FRACTION = re.compile(r"\d{2}:\d{2}:\d{2}[.,]\d")
_EPOCH = re.compile(r"\d{9,11}(\.\d+)?")
# Everything up to the first "[...]": the bracket holds $time_local in both text formats.
_NGINX = re.compile(r"(?P<client>\S+) .*?\[(?P<time>[^\]]*)\]")
_COMBINED = re.compile(r"(?P<addr>\S+) (?P<port>\S+) .*?\[(?P<time>[^\]]*)\]")


class LineParser(Protocol):
    """A parser compiled from an operator's own log format (:mod:`vpnfleet.core.logformat`)."""

    @property
    def is_json(self) -> bool:
        """Lines are JSON objects: annotate adds a key instead of a text suffix."""
        ...

    def parse(self, content: str) -> LogHit:
        """One line without its ending; ValueError with one sentence if it can't be read."""
        ...


Format = LogFormat | LineParser


@dataclass(frozen=True)
class LogHit:
    """What one line says: the client's address and port, and when."""

    addr: str
    port: int
    at: dt.datetime
    whole_seconds: bool  # the time has 1 s resolution: the request was within [at, at + 1 s]

    @property
    def window(self) -> float:
        """Seconds after ``at`` the request may have happened."""
        return 1.0 if self.whole_seconds else 0.0

    @property
    def is_ipv4(self) -> bool:
        """Only IPv4 clients can be pods (pods NAT to IPv4)."""
        return ":" not in self.addr


def parse_time_local(text: str) -> dt.datetime:
    """nginx ``$time_local``: ``26/Nov/2026:15:04:05 +0000``."""
    m = _TIME_LOCAL.fullmatch(text.strip())
    if m is None and _NO_ZONE.fullmatch(text.strip()):
        raise ValueError(f"time {text!r} has no time zone (like 26/Nov/2026:15:04:05 +0000)")
    if m is None or m.group(2) not in _MONTHS:
        raise ValueError(f"time {text!r} is not like 26/Nov/2026:15:04:05 +0000")
    day, month, year, hh, mm, ss = (int(m.group(1)), _MONTHS[m.group(2)], int(m.group(3)),
                                    int(m.group(4)), int(m.group(5)), int(m.group(6)))  # fmt: skip
    offset = dt.timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
    try:
        zone = dt.timezone(-offset if m.group(7) == "-" else offset)
        return dt.datetime(year, month, day, hh, mm, ss, tzinfo=zone)
    except ValueError:
        raise ValueError(f"time {text!r} is not a valid date and time") from None


def parse_instant(text: str) -> tuple[dt.datetime, bool]:
    """An ISO 8601 time with a zone, a ``$time_local``, or epoch seconds (``$msec``).

    Returns the aware time and whether it has whole-second resolution. A time without a zone
    is an error: guessing one would silently blame the wrong person.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("the time is empty")
    if _EPOCH.fullmatch(raw):
        return epoch_time(float(raw)), "." not in raw
    if "/" in raw:
        return parse_time_local(raw), True
    # A "+" in a URL query turns into a space when not encoded: put it back.
    iso = re.sub(r"(T?\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?) (\d{2}:?\d{2})$", r"\1+\2", raw)
    try:
        value = dt.datetime.fromisoformat(iso.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"time {text!r} is not ISO 8601 (like 2026-11-26T15:04:05Z) or $time_local"
        ) from None
    if value.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone; add Z or +HH:MM")
    try:
        value.astimezone(dt.UTC)  # databases compare in UTC; year 1 at +14:00 has none
    except OverflowError:
        raise ValueError(f"time {text!r} is out of range once converted to UTC") from None
    return value, _FRACTION.search(raw) is None


def epoch_time(seconds: float) -> dt.datetime:
    """Epoch seconds (nginx ``$msec``) as an aware UTC time."""
    if not 0 < seconds < 4_102_444_800:  # also rejects NaN
        raise ValueError(f"time {seconds!r} is not epoch seconds between 1970 and 2100")
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def parse_port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"client port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"client port {port} is out of range 1-65535")
    return port


def parse_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ValueError(f"client address {text!r} is not an IP address") from None


def _hit(addr: str, port: str, time_text: str, local: bool) -> LogHit:
    address = parse_address(addr)
    number = parse_port(port)
    if local:
        return LogHit(address, number, parse_time_local(time_text), True)
    at, whole = parse_instant(time_text)
    return LogHit(address, number, at, whole)


def _parse_json(content: str) -> LogHit:
    try:
        obj: Any = json.loads(content)
    except ValueError:
        raise ValueError("the line is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("the line is not a JSON object")
    for key in ("remote_addr", "remote_port", "time"):
        if obj.get(key) in (None, ""):
            raise ValueError(f"the object has no {key}")
    port = obj["remote_port"]
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise ValueError(f"client port {port!r} is not a number")
    when = obj["time"]
    if isinstance(when, bool) or not isinstance(when, int | float | str):
        raise ValueError(f"time {when!r} is not a time")
    if isinstance(when, int | float):
        at = epoch_time(float(when))
        addr = parse_address(str(obj["remote_addr"]))
        return LogHit(addr, parse_port(str(port)), at, at.microsecond == 0)
    return _hit(str(obj["remote_addr"]), str(port), when, local=False)


def parse_line(fmt: Format, line: str) -> LogHit:
    """Read one log line (without its line ending); ValueError with one sentence if it can't."""
    content = line.rstrip("\r\n")
    if not isinstance(fmt, str):
        return fmt.parse(content)
    if fmt == "json":
        return _parse_json(content)
    if fmt == "nginx":
        m = _NGINX.match(content)
        if m is None:
            raise ValueError("the line is not in the vpnfleet log_format (ADDR:PORT - USER [TIME])")
        addr, sep, port = m.group("client").rpartition(":")
        if not sep or not addr:
            raise ValueError(
                f"{m.group('client')!r} has no client port; log $remote_addr:$remote_port"
            )
        return _hit(addr, port, m.group("time"), local=True)
    m = _COMBINED.match(content)
    if m is None:
        raise ValueError("the line is not combined-with-port (ADDR PORT - USER [TIME])")
    return _hit(m.group("addr"), m.group("port"), m.group("time"), local=True)


def _split_ending(line: str) -> tuple[str, str]:
    if line.endswith("\r\n"):
        return line[:-2], "\r\n"
    if line.endswith("\n"):
        return line[:-1], "\n"
    return line, ""


def annotate_line(fmt: Format, line: str, name: str) -> str:
    """The line with its user appended, keeping its line ending (and JSON lines JSON)."""
    content, ending = _split_ending(line)
    if fmt == "json" or (not isinstance(fmt, str) and fmt.is_json):
        body = content.rstrip()
        try:
            is_object = body.endswith("}") and isinstance(json.loads(body), dict)
        except ValueError:
            is_object = False
        if is_object:
            inner = body[:-1].rstrip()
            sep = "" if inner.endswith("{") else ", "
            return f"{inner}{sep}{json.dumps(JSON_KEY)}: {json.dumps(name)}}}{ending}"
    return f"{content} user={name}{ending}"


Resolver = Callable[[list[LogHit]], list[str]]
Warn = Callable[[int, str], None]


def annotate(
    lines: Iterable[str],
    fmt: Format,
    resolve: Resolver,
    warn: Warn,
    *,
    chunk: int = CHUNK,
) -> Iterator[str]:
    """Annotate ``lines`` (each with its ending, as read from a file), one output per input.

    ``resolve`` gets the distinct IPv4 hits of up to ``chunk`` lines at a time (one request)
    and returns a user field for each (``"alice"``, ``"-"``, ``"alice,bob"``). ``warn`` gets
    the 1-based line number and the reason of every line that could not be read.
    """
    batch: list[str] = []
    first = 1
    for line in lines:
        batch.append(line)
        if len(batch) >= chunk:
            yield from _annotate_chunk(batch, first, fmt, resolve, warn)
            first += len(batch)
            batch = []
    if batch:
        yield from _annotate_chunk(batch, first, fmt, resolve, warn)


def _annotate_chunk(
    lines: list[str], first: int, fmt: Format, resolve: Resolver, warn: Warn
) -> list[str]:
    hits: list[LogHit | None] = []
    for n, line in enumerate(lines, first):
        try:
            hits.append(parse_line(fmt, line))
        except ValueError as exc:
            warn(n, str(exc))
            hits.append(None)
    wanted = list(dict.fromkeys(h for h in hits if h is not None and h.is_ipv4))
    names = dict(zip(wanted, resolve(wanted) if wanted else [], strict=True))
    out = []
    for line, hit in zip(lines, hits, strict=True):
        name = UNREADABLE if hit is None else names.get(hit, UNKNOWN)
        out.append(annotate_line(fmt, line, name))
    return out
