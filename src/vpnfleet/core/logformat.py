"""Compile an operator's own nginx ``log_format`` or Apache ``LogFormat`` string into a parser
that finds the client address, client port and time on each line of that log.

A text format becomes one regular expression: each literal piece of the format is matched as
written, each variable by a pattern chosen for it (an address, a port, one of the time
formats, a number, a quoted field that may contain escaped quotes, or a generic run of
characters bounded by what follows it in the format). Only the address, port and time are
captured; everything else is matched and skipped, and a line must match the whole format.

A JSON format (nginx ``escape=json`` writing ``{"key":"$var",...}``) is read as JSON: the
format says under which key (at any depth) each variable is, and each such value is matched
against its piece of the format (``"client":"$remote_addr:$remote_port"`` works too).

Rules, documented in docs/audit.md:

- the format must name a client address, a client port and a time; when it has several
  candidates for one, the most exact wins (nginx ``$realip_remote_addr`` over ``$remote_addr``,
  ``$msec`` over ``$time_iso8601`` over ``$time_local``; Apache ``%{c}a`` over ``%a`` over ``%h``);
- an nginx variable this module does not know (``$host``, ``$http_x_forwarded_for``,
  ``$upstream_response_time``...) is a generic field: nginx has an open set of variables
  (headers, cookies, arguments, modules), so refusing them would refuse real formats;
- an Apache directive that does not exist (``%Z``) is refused: Apache's set is closed and
  a typo there is more likely than a new directive;
- the client address, port or time may not touch another variable with nothing between them
  (``$remote_addr$remote_port``): where one ends and the next begins cannot be told.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vpnfleet.core.accesslog import (
    LogHit,
    epoch_time,
    parse_address,
    parse_instant,
    parse_port,
    parse_time_local,
)

Dialect = Literal["nginx", "apache"]
Role = Literal["addr", "port", "time"]
TimeParser = Callable[[str], tuple[dt.datetime, bool]]

# Patterns of the values the parser reads. Each is wide enough to let the value's own check
# give a clear message ("client port '-' is not a number") instead of "does not match".
_ADDR = r"[^\s\"]+"  # greedy: backtracks to the last ":" before a port
_PORT = r"\d+|-"
_NUMBER = r"\d+|-"
_DECIMAL = r"\d+(?:\.\d+)?|-"
_TIME_LOCAL = r"\d{1,2}/[A-Za-z]{3}/\d{4}:\d{2}:\d{2}:\d{2}(?: [+-]\d{4})?"
_ISO8601 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
_EPOCH_FRACTION = r"\d+(?:\.\d+)?"
# Inside double quotes: anything but a quote, or a backslash escape (Apache writes \" and
# \\; nginx writes \x22, which this also reads). Written as runs of plain characters between
# escapes: the same language as (?:[^"\\]|\\.)*, three times faster in Python's re.
_QUOTED = r"[^\"\\]*(?:\\.[^\"\\]*)*"
_QUOTED_LAZY = r"(?:[^\"\\]|\\.)*?"

_ROLE_NAMES = {
    "addr": "client address",
    "port": "client port",
    "time": "time",
}


def _time_local(text: str) -> tuple[dt.datetime, bool]:
    return parse_time_local(text), True


def _epoch_seconds(text: str) -> tuple[dt.datetime, bool]:
    """nginx ``$msec``: seconds with milliseconds, ``1795705445.123``."""
    return epoch_time(float(text)), "." not in text


def _epoch_unit(divisor: int) -> TimeParser:
    """Apache ``%{sec}t``, ``%{msec}t``, ``%{usec}t``: whole seconds, ms or µs since 1970."""

    def parse(text: str) -> tuple[dt.datetime, bool]:
        return epoch_time(int(text) / divisor), divisor == 1

    return parse


@dataclass(frozen=True)
class _Var:
    """One variable of the format as the parser treats it."""

    text: str  # as written in the format: "$remote_addr", "%{remote}p"
    role: Role | None = None
    rank: int = 0  # among variables of one role, the lowest rank wins
    pattern: str | None = None  # None: generic, chosen from the context
    parse_time: TimeParser | None = None


@dataclass(frozen=True)
class _Lit:
    text: str


_Token = _Var | _Lit

# nginx variables with a known shape. Anything else is a generic field.
_NGINX: dict[str, tuple[Role | None, int, str | None, TimeParser | None]] = {
    "realip_remote_addr": ("addr", 0, _ADDR, None),
    "remote_addr": ("addr", 1, _ADDR, None),
    "realip_remote_port": ("port", 0, _PORT, None),
    "remote_port": ("port", 1, _PORT, None),
    "msec": ("time", 0, _EPOCH_FRACTION, _epoch_seconds),
    "time_iso8601": ("time", 1, _ISO8601, lambda t: parse_instant(t)),
    "time_local": ("time", 2, _TIME_LOCAL, _time_local),
    "status": (None, 0, _NUMBER, None),
    "body_bytes_sent": (None, 0, _NUMBER, None),
    "bytes_sent": (None, 0, _NUMBER, None),
    "request_length": (None, 0, _NUMBER, None),
    "connection": (None, 0, _NUMBER, None),
    "connection_requests": (None, 0, _NUMBER, None),
    "server_port": (None, 0, _NUMBER, None),
    "pid": (None, 0, _NUMBER, None),
    "request_time": (None, 0, _DECIMAL, None),
}
_NGINX_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")

# Apache mod_log_config directives (letter -> whether it takes {arg}). Shapes below.
_APACHE_LETTERS = set("aABbCDefhHiklLmnopPqrRstTuUvVxXIOS")
_APACHE_NEEDS_ARG = set("Ceinox")  # %{Name}i and the like
# %[<>][!]status,status{argument}[<>]letter; group 3 the argument, 5 the letter.
_APACHE_DIRECTIVE = re.compile(
    r"%([<>]?)((?:!?\d{3}(?:,\d{3})*)?)(?:\{([^}]*)\})?([<>]?)(\^t[io]|.)"
)
_STRFTIME = re.compile(r"%(.)")
# strftime conversions of Apache %{...}t this parser reads: regex, and how strptime reads it.
_STRFTIME_PARTS: dict[str, tuple[str, str]] = {
    "Y": (r"\d{4}", "%Y"),
    "y": (r"\d{2}", "%y"),
    "m": (r"\d{2}", "%m"),
    "d": (r"\d{2}", "%d"),
    "e": (r"[ \d]\d", "%d"),
    "H": (r"\d{2}", "%H"),
    "M": (r"\d{2}", "%M"),
    "S": (r"\d{2}", "%S"),
    "j": (r"\d{3}", "%j"),
    "b": (r"[A-Za-z]{3}", "%b"),
    "h": (r"[A-Za-z]{3}", "%b"),
    "B": (r"[A-Za-z]+", "%B"),
    "a": (r"[A-Za-z]{3}", "%a"),
    "A": (r"[A-Za-z]+", "%A"),
    "z": (r"Z|[+-]\d{2}:?\d{2}", "%z"),
    "T": (r"\d{2}:\d{2}:\d{2}", "%H:%M:%S"),
    "F": (r"\d{4}-\d{2}-\d{2}", "%Y-%m-%d"),
    "%": ("%", "%%"),
}


class LogFormatError(ValueError):
    """The format string cannot be used; the message says why in one sentence."""


def _apache_var(arg: str | None, letter: str, written: str) -> _Var:
    if letter == "^ti" or letter == "^to":
        if arg is None:
            raise LogFormatError(f"{written} needs a header name: %{{Name}}{letter}")
        return _Var(written)
    if letter not in _APACHE_LETTERS:
        raise LogFormatError(
            f"{written} is not an Apache LogFormat directive (mod_log_config has no %{letter})"
        )
    if letter in _APACHE_NEEDS_ARG and arg is None:
        raise LogFormatError(f"{written} needs a name: %{{Name}}{letter}")
    if letter == "a":
        if arg in (None, ""):
            return _Var(written, "addr", 1, _ADDR)
        if arg == "c":
            return _Var(written, "addr", 0, _ADDR)
        raise LogFormatError(f"{written}: %a takes only {{c}} (the peer of the connection)")
    if letter == "h":
        return _Var(written, "addr", 2, _ADDR)
    if letter == "p":
        if arg == "remote":
            return _Var(written, "port", 0, _PORT)
        if arg in (None, "", "canonical", "local"):
            return _Var(written, None, 0, _NUMBER)
        raise LogFormatError(f"{written}: %p takes {{canonical}}, {{local}} or {{remote}}")
    if letter == "t":
        return _apache_time(arg, written)
    if letter in "sBDkPIOS" or (letter == "T" and arg in (None, "", "s", "ms", "us")):
        return _Var(written, None, 0, _NUMBER)
    if letter == "b":
        return _Var(written, None, 0, _NUMBER)
    return _Var(written)


def _apache_time(arg: str | None, written: str) -> _Var:
    """%t and %{format}t: the time the request was received (or ended, with end:)."""
    if arg is None or arg in ("", "begin:", "end:"):
        return _Var(written, "time", 1, rf"\[{_TIME_LOCAL}\]", lambda t: _time_local(t[1:-1]))
    spec = arg.removeprefix("begin:").removeprefix("end:")
    units = {"sec": 1, "msec": 1000, "usec": 1_000_000}
    if spec in units:
        return _Var(written, "time", 0, r"\d+", _epoch_unit(units[spec]))
    if spec in ("msec_frac", "usec_frac"):
        return _Var(written, None, 0, r"\d+")  # a fraction alone is no time; see the docs
    pattern, strp = [], []
    pos = 0
    for m in _STRFTIME.finditer(spec):
        pattern.append(re.escape(spec[pos : m.start()]))
        strp.append(spec[pos : m.start()].replace("%", "%%"))
        part = _STRFTIME_PARTS.get(m.group(1))
        if part is None:
            raise LogFormatError(
                f"{written}: the strftime conversion %{m.group(1)} is not supported "
                f"(supported: {' '.join('%' + c for c in _STRFTIME_PARTS)})"
            )
        pattern.append(f"(?:{part[0]})")
        strp.append(part[1])
        pos = m.end()
    pattern.append(re.escape(spec[pos:]))
    strp.append(spec[pos:])
    if "%z" not in strp:
        raise LogFormatError(
            f"{written} has no time zone (%z): a time without one is refused rather than "
            "guessed; add %z"
        )
    strptime_format = "".join(strp)

    def parse(text: str) -> tuple[dt.datetime, bool]:
        try:
            return dt.datetime.strptime(text, strptime_format), True
        except ValueError:
            raise ValueError(f"time {text!r} is not like {spec!r}") from None

    return _Var(written, "time", 1, "".join(pattern), parse)


def _tokens_nginx(template: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    for m in _NGINX_VAR.finditer(template):
        if m.start() > pos:
            out.append(_Lit(template[pos : m.start()]))
        name = m.group(1) or m.group(2)
        role, rank, pattern, parse_time = _NGINX.get(name, (None, 0, None, None))
        out.append(_Var(m.group(0), role, rank, pattern, parse_time))
        pos = m.end()
    if pos < len(template):
        out.append(_Lit(template[pos:]))
    for t in out:
        if isinstance(t, _Lit) and "$" in t.text:
            raise LogFormatError(
                f"'$' in {t.text!r} is not followed by a variable name (like $remote_addr)"
            )
    return _merge(out)


def _tokens_apache(template: str) -> list[_Token]:
    out: list[_Token] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "\\" and i + 1 < len(template):  # Apache reads \n, \t and \<char> in formats
            nxt = template[i + 1]
            literal.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        if c != "%":
            literal.append(c)
            i += 1
            continue
        m = _APACHE_DIRECTIVE.match(template, i)
        if m is None:
            raise LogFormatError(f"a '%' at the end of {template!r} is not a directive")
        if m.group(5) == "%":
            literal.append("%")
            i = m.end()
            continue
        if literal:
            out.append(_Lit("".join(literal)))
            literal = []
        out.append(_apache_var(m.group(3), m.group(5), m.group(0)))
        i = m.end()
    if literal:
        out.append(_Lit("".join(literal)))
    return _merge(out)


def _merge(tokens: list[_Token]) -> list[_Token]:
    out: list[_Token] = []
    for t in tokens:
        if isinstance(t, _Lit) and out and isinstance(out[-1], _Lit):
            out[-1] = _Lit(out[-1].text + t.text)
        elif not (isinstance(t, _Lit) and not t.text):
            out.append(t)
    return out


def _generic(inside_quotes: bool, following: _Token | None) -> str:
    """A variable with no known shape: it runs until what follows it in the format."""
    if inside_quotes:
        if following is None or isinstance(following, _Var):
            return _QUOTED_LAZY
        stop = following.text[0]
        if stop == '"':
            return _QUOTED
        plain = rf"[^\"\\{re.escape(stop)}]*"
        return rf"{plain}(?:\\.{plain})*"
    if following is None:
        return r"\S*"
    if isinstance(following, _Var):
        return r"\S*?"
    stop = following.text[0]
    if stop.isspace():
        return r"\S*"
    return rf"[^\s{re.escape(stop)}]*"


def _quote_count(text: str) -> int:
    """Unescaped double quotes in a literal (a \\" inside a literal is not a delimiter)."""
    return len(re.findall(r'(?<!\\)"', text))


@dataclass(frozen=True)
class _Pattern:
    """A text template compiled to a regex that captures the chosen address, port and time."""

    regex: re.Pattern[str]
    tokens: tuple[_Token, ...]
    parts: tuple[str, ...]  # the regex piece of each token, for the "stops matching at" hint
    chosen: dict[Role, _Var]


def _choose(tokens: Sequence[_Token]) -> dict[Role, _Var]:
    chosen: dict[Role, _Var] = {}
    for t in tokens:
        if isinstance(t, _Var) and t.role is not None:
            best = chosen.get(t.role)
            if best is None or t.rank < best.rank:
                chosen[t.role] = t
    return chosen


def _join_runs(tokens: Sequence[_Token]) -> list[_Token]:
    """Variables written back to back (``$host$request_uri``) become one generic field.

    Nothing is captured from them, and two unbounded patterns side by side would make a
    line that does not match cost time quadratic in its length (a 100 kB line: a minute).
    """
    out: list[_Token] = []
    for t in tokens:
        last = out[-1] if out else None
        if isinstance(t, _Var) and t.role is None and isinstance(last, _Var) and last.role is None:
            out[-1] = _Var(last.text + t.text)
        else:
            out.append(t)
    return out


def _compile(tokens: Sequence[_Token], chosen: dict[Role, _Var]) -> _Pattern:
    tokens = _join_runs(tokens)
    parts: list[str] = []
    quoted = False
    for i, t in enumerate(tokens):
        if isinstance(t, _Lit):
            parts.append(re.escape(t.text))
            quoted = quoted ^ (_quote_count(t.text) % 2 == 1)
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        previous = tokens[i - 1] if i > 0 else None
        if t.role is not None:
            for other in (previous, following):
                if isinstance(other, _Var):
                    first, second = (other, t) if other is previous else (t, other)
                    raise LogFormatError(
                        f"{first.text} and {second.text} have nothing between them: where one "
                        "ends and the next begins cannot be told; put a separator between them"
                    )
        pattern = t.pattern if t.pattern is not None else _generic(quoted, following)
        role = next((r for r, v in chosen.items() if v is t), None)
        parts.append(f"(?P<{role}>{pattern})" if role else f"(?:{pattern})")
    return _Pattern(re.compile("".join(parts) + r"[ \t]*"), tuple(tokens), tuple(parts), chosen)


def _require(chosen: dict[Role, _Var], dialect: Dialect) -> None:
    hints = {
        "nginx": {
            "addr": "$remote_addr",
            "port": "$remote_port",
            "time": "$time_local, $time_iso8601 or $msec",
        },
        "apache": {
            "addr": "%a, %{c}a or %h",
            "port": "%{remote}p",
            "time": "%t or %{...%z}t",
        },
    }[dialect]
    missing = [f"{_ROLE_NAMES[r]} ({hints[r]})" for r in ("addr", "port", "time")
               if r not in chosen]  # fmt: skip
    if missing:
        lacks = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        why = (
            " (behind NAT the address names a pod, not a person: the port does)"
            if "port" not in chosen
            else ""
        )
        raise LogFormatError(f"the log format has no {lacks}{why}")


def unwrap_nginx(text: str) -> tuple[str, bool]:
    """The format string of an nginx ``log_format`` as written in nginx.conf, or as is.

    Accepts ``log_format NAME [escape=...] 'part' 'part';`` pasted from nginx.conf, or
    ``escape=json '...'``, or the bare string. Returns the joined string and whether
    ``escape=json`` was given.
    """
    rest = text.strip()
    directive = rest.startswith("log_format") and rest[10:11].isspace()
    if directive:
        rest = rest[10:].strip()
        parts = rest.split(None, 1)
        name, rest = (parts[0], parts[1]) if len(parts) == 2 else (rest, "")
        if not name or not rest.strip():
            raise LogFormatError("'log_format NAME STRING;' needs a name and a format string")
        rest = rest.strip()
    escape_json = False
    m = re.match(r"escape=(\w+)\s+", rest)
    if m:
        if m.group(1) not in ("default", "json", "none"):
            raise LogFormatError(f"escape={m.group(1)} is not default, json or none")
        escape_json = m.group(1) == "json"
        rest = rest[m.end() :]
    rest = rest.removesuffix(";").rstrip() if directive or m else rest
    if rest[:1] in ("'", '"'):
        try:
            return _join_quoted(rest), escape_json
        except LogFormatError:
            if directive or m:
                raise
            # A bare format that happens to start with a quote ('"$request" $remote_addr...').
    return rest, escape_json


def _join_quoted(text: str) -> str:
    """nginx's concatenation of quoted strings: ``'a' "b"`` is ``ab``."""
    pieces: list[str] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        quote = text[i]
        if quote not in ("'", '"'):
            raise LogFormatError(f"unexpected {text[i : i + 20]!r} between the quoted parts")
        i += 1
        piece: list[str] = []
        while i < len(text) and text[i] != quote:
            if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in (quote, "\\"):
                i += 1
            piece.append(text[i])
            i += 1
        if i >= len(text):
            raise LogFormatError(f"a quote {quote} is not closed in the format")
        pieces.append("".join(piece))
        i += 1
    return "".join(pieces)


def unwrap_apache(text: str) -> str:
    """The format string of an Apache ``LogFormat "..." nickname`` line, or the text as is."""
    rest = text.strip()
    if rest.startswith("LogFormat") and rest[9:10].isspace():
        rest = rest[9:].strip()
        if not rest.startswith('"'):
            return rest.split()[0] if rest else ""
        m = re.match(r'"((?:[^"\\]|\\.)*)"', rest)
        if m is None:
            raise LogFormatError('the LogFormat string has no closing "')
        return m.group(1)
    return rest


@dataclass(frozen=True)
class _JsonField:
    path: tuple[str, ...]
    pattern: _Pattern


@dataclass(frozen=True)
class CompiledFormat:
    """A parser for one operator-given log format: ``parse(line) -> LogHit``."""

    dialect: Dialect
    source: str
    is_json: bool
    text: _Pattern | None = None
    json_fields: tuple[_JsonField, ...] = ()
    _hints: dict[int, re.Pattern[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def describes(self) -> str:
        """Which variables are read, for messages: ``$remote_addr, $remote_port, $msec``."""
        if self.text is not None:
            chosen = self.text.chosen
        else:
            chosen = {r: v for f in self.json_fields for r, v in f.pattern.chosen.items()}
        return ", ".join(chosen[r].text for r in ("addr", "port", "time"))

    def parse(self, content: str) -> LogHit:
        """One line without its ending; ValueError with one sentence if it can't be read."""
        if self.text is not None:
            m = self.text.regex.fullmatch(content)
            if m is None:
                raise ValueError(self._mismatch(content))
            return _hit(self.text.chosen, m.group("addr"), m.group("port"), m.group("time"))
        return self._parse_json(content)

    def _parse_json(self, content: str) -> LogHit:
        try:
            obj: Any = json.loads(content)
        except ValueError:
            raise ValueError("the line is not JSON") from None
        if not isinstance(obj, dict):
            raise ValueError("the line is not a JSON object")
        found: dict[str, str] = {}
        chosen: dict[Role, _Var] = {}
        for f in self.json_fields:
            value: Any = obj
            for key in f.path:
                if not isinstance(value, dict) or key not in value:
                    raise ValueError(f"the object has no {'.'.join(f.path)}")
                value = value[key]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"{'.'.join(f.path)} is {json.dumps(value)}, not a value")
            text = value if isinstance(value, str) else json.dumps(value)
            m = f.pattern.regex.fullmatch(text)
            if m is None:
                want = "".join(t.text for t in f.pattern.tokens)
                raise ValueError(f"{'.'.join(f.path)} is {text!r}, not like {want!r}")
            for role, var in f.pattern.chosen.items():
                found[role] = m.group(role)
                chosen[role] = var
        return _hit(chosen, found["addr"], found["port"], found["time"])

    def _mismatch(self, content: str) -> str:
        """Where the line stops following the format (only for lines that fail)."""
        assert self.text is not None
        pattern = self.text
        good, reached = 0, 0
        for k in range(1, len(pattern.tokens) + 1):
            regex = self._hints.get(k)
            if regex is None:
                regex = self._hints[k] = re.compile("".join(pattern.parts[:k]))
            m = regex.match(content)
            if m is None:
                break
            good, reached = k, m.end()
        if good == 0:
            return "the line does not match the log format from its start"
        if good >= len(pattern.tokens):
            return "the line has more text than the log format"
        token = pattern.tokens[good]
        rest = content[reached:]
        if not rest or (isinstance(token, _Lit) and token.text.startswith(rest)):
            wanted = next((t for t in pattern.tokens[good:] if isinstance(t, _Var)), None)
            where = wanted.text if wanted is not None else repr(pattern.tokens[good].text)
            return f"the line ends before the log format's {where}"
        where = token.text if isinstance(token, _Var) else repr(token.text)
        return f"the line does not match the log format at {where}"


def _hit(chosen: dict[Role, _Var], addr: str, port: str, time_text: str) -> LogHit:
    parse_time = chosen["time"].parse_time
    assert parse_time is not None
    at, whole = parse_time(time_text)
    return LogHit(parse_address(addr), parse_port(port), at, whole)


def _tokens(dialect: Dialect, template: str) -> list[_Token]:
    return _tokens_nginx(template) if dialect == "nginx" else _tokens_apache(template)


def _compile_json(dialect: Dialect, template: str, source: str) -> CompiledFormat:
    """Where each variable sits in the JSON the format writes."""
    tokens = _tokens(dialect, template)
    placeholders: dict[str, _Var] = {}
    text: list[str] = []
    inside = False
    for t in tokens:
        if isinstance(t, _Lit):
            text.append(t.text)
            inside = _json_inside_string(t.text, inside)
            continue
        mark = f"\u0000{len(placeholders)}\u0000"
        placeholders[mark] = t
        text.append(json.dumps(mark)[1:-1] if inside else json.dumps(mark))
    try:
        tree = json.loads("".join(text))
    except ValueError as exc:
        raise LogFormatError(f"the JSON log format is not valid JSON: {exc}") from None
    if not isinstance(tree, dict):
        raise LogFormatError("the JSON log format does not write a JSON object")
    fields: list[_JsonField] = []
    every: list[_Var] = []
    templates: list[tuple[tuple[str, ...], list[_Token]]] = []
    for path, value in _json_leaves(tree, ()):
        if isinstance(value, str) and "\u0000" in value:
            parts = re.split("(\u0000\\d+\u0000)", value)
            value_tokens = _merge([placeholders.get(p) or _Lit(p) for p in parts])
            every.extend(v for v in value_tokens if isinstance(v, _Var))
            templates.append((path, value_tokens))
    chosen = _choose(every)
    _require(chosen, dialect)
    for path, value_tokens in templates:
        mine = {r: v for r, v in chosen.items() if any(v is t for t in value_tokens)}
        if mine:
            fields.append(_JsonField(path, _compile(value_tokens, mine)))
    return CompiledFormat(dialect, source, True, json_fields=tuple(fields))


def _json_inside_string(literal: str, inside: bool) -> bool:
    i = 0
    while i < len(literal):
        c = literal[i]
        if inside and c == "\\":
            i += 2
            continue
        if c == '"':
            inside = not inside
        i += 1
    return inside


def _json_leaves(node: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        out: list[tuple[tuple[str, ...], Any]] = []
        for key, value in node.items():
            out.extend(_json_leaves(value, (*path, key)))
        return out
    return [(path, node)]


def compile_format(dialect: Dialect, text: str) -> CompiledFormat:
    """Compile an nginx ``log_format`` or Apache ``LogFormat`` string into a line parser.

    ``text`` is the format string itself, or the whole directive as in nginx.conf or
    httpd.conf. A format writing JSON (starting with ``{``) is read as JSON.
    Raises :class:`LogFormatError` with one sentence when the format cannot be used.
    """
    if dialect == "nginx":
        template, escape_json = unwrap_nginx(text)
    else:
        template, escape_json = unwrap_apache(text), False
    if not template.strip():
        raise LogFormatError("the log format is empty")
    if escape_json or template.lstrip().startswith("{"):
        return _compile_json(dialect, template, text)
    tokens = _tokens(dialect, template)
    chosen = _choose(tokens)
    _require(chosen, dialect)
    return CompiledFormat(dialect, text, False, text=_compile(tokens, chosen))
