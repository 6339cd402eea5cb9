"""OpenVPN management interface line protocol: a pure parser and command formatters.

No I/O happens here. `ManagementParser` turns what the management socket sends into typed
events; the `client_auth`/`client_deny`/`client_kill` helpers build command text that is safe
to write to the socket; `parse_status` reads `status 3` output; `redact` makes any protocol
line safe to log.

The parser never raises on socket input: a line it cannot make sense of becomes an `Unknown`
event so the caller can log it and carry on.

Facts about OpenVPN 2.6 this module relies on (see OpenVPN's doc/management-notes.txt):

* Replies to a command are one `SUCCESS: ...` / `ERROR: ...` line, or, for commands that print
  a listing (`status`, `version`, `help`, `state all`, ...), lines terminated by `END`. The
  wire does not say which kind is coming, so the caller announces a listing with
  `ManagementParser.expect_multiline()` before sending the command.
* Real-time notifications start with `>` and may arrive at any time, also in the middle of a
  listing; they never belong to the listing.
* A `>CLIENT:CONNECT|REAUTH|ESTABLISHED|DISCONNECT|CR_RESPONSE` header is followed by
  `>CLIENT:ENV,name=value` lines and `>CLIENT:ENV,END`, written atomically by OpenVPN.
* OpenVPN reads commands into a 1024-byte buffer and silently drops bytes that are not
  printable ASCII, so every command line here is limited to printable ASCII and
  `MAX_COMMAND_LINE` characters: better a clear ValueError than a mangled command.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "MAX_COMMAND_LINE",
    "ClientAddress",
    "ClientEvent",
    "ClientEventKind",
    "Event",
    "Hold",
    "Info",
    "ManagementParser",
    "MultiLine",
    "Notification",
    "Reply",
    "StatusClient",
    "StatusParseError",
    "Unknown",
    "VersionInfo",
    "client_auth",
    "client_deny",
    "client_kill",
    "client_pending_auth",
    "expects_listing",
    "format_command",
    "parse_status",
    "parse_version",
    "quote_arg",
    "redact",
    "redact_env",
]

# OpenVPN's command accumulator is 1024 bytes including the newline; stay clearly below it.
MAX_COMMAND_LINE = 1000
# Bounds that keep a misbehaving peer from growing our memory without limit.
MAX_LINE_BYTES = 64 * 1024
MAX_ENV_VARS = 4096

REDACTED = "<redacted>"


# --------------------------------------------------------------------------------------------
# Events


class ClientEventKind(StrEnum):
    """The `>CLIENT:` notifications that carry an ENV block."""

    CONNECT = "CONNECT"
    REAUTH = "REAUTH"
    ESTABLISHED = "ESTABLISHED"
    DISCONNECT = "DISCONNECT"
    CR_RESPONSE = "CR_RESPONSE"


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """A client notification with its complete ENV block.

    `kid` is set for CONNECT, REAUTH and CR_RESPONSE (the commands that answer them need it).
    `cr_response` holds the base64 response of a CR_RESPONSE. `env` may hold secrets (a
    `password` when clients send one): log `safe_env()` or the repr, never `env` itself.
    """

    kind: ClientEventKind
    cid: int
    kid: int | None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    cr_response: str | None = field(default=None, repr=False)

    @property
    def common_name(self) -> str | None:
        """The verified certificate CN OpenVPN reports, if any."""
        return self.env.get("common_name")

    def safe_env(self) -> dict[str, str]:
        """`env` with secret values replaced, for logs."""
        return redact_env(self.env)

    def __repr__(self) -> str:
        return (
            f"ClientEvent(kind={self.kind.value}, cid={self.cid}, kid={self.kid}, "
            f"common_name={self.common_name!r})"
        )


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """`>CLIENT:ADDRESS`: a virtual address (or iroute subnet) now belongs to a client."""

    cid: int
    addr: str
    primary: bool


@dataclass(frozen=True, slots=True)
class Info:
    """`>INFO:` — e.g. the greeting OpenVPN sends to every new management connection."""

    text: str


@dataclass(frozen=True, slots=True)
class Hold:
    """`>HOLD:` — OpenVPN waits for `hold release` before it starts the tunnel."""

    text: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A one-line command reply: `SUCCESS: text` (ok) or `ERROR: text`."""

    ok: bool
    text: str


@dataclass(frozen=True, slots=True)
class MultiLine:
    """A multi-line command reply, without its terminating `END` line."""

    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Notification:
    """Any other real-time message (`>LOG:`, `>STATE:`, `>BYTECOUNT_CLI:`, `>FATAL:`, ...)."""

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A line the parser could not place; `reason` says why. Log it with `redact()`."""

    line: str
    reason: str = ""


Event = ClientEvent | ClientAddress | Info | Hold | Reply | MultiLine | Notification | Unknown

_UINT_RE = re.compile(r"[0-9]{1,20}")
_KIND_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_ENV_PREFIX = ">CLIENT:ENV,"


def _uint(text: str) -> int | None:
    text = text.strip()
    return int(text) if _UINT_RE.fullmatch(text) else None


@dataclass(slots=True)
class _PendingClient:
    header: str
    kind: ClientEventKind
    cid: int
    kid: int | None
    cr_response: str | None
    env: dict[str, str] = field(default_factory=dict)
    overflow: bool = False


class ManagementParser:
    """Incremental parser of the management interface's output.

    Feed it raw bytes with `feed()` (any chunking) or whole lines with `feed_line()`; both
    return the events completed so far. Before sending a command whose reply is a listing
    terminated by `END`, call `expect_multiline()`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False  # inside the tail of an over-long line
        self._client: _PendingClient | None = None
        self._multiline: list[str] | None = None

    def _reset(self) -> None:
        self._buf.clear()
        self._discarding = False
        self._client = None
        self._multiline = None

    @property
    def multiline_pending(self) -> bool:
        """True while a multi-line reply is expected or being collected."""
        return self._multiline is not None

    def expect_multiline(self) -> None:
        """Announce that the next reply is a listing terminated by `END`."""
        self._multiline = []

    def cancel_multiline(self) -> None:
        """Forget an announced listing (e.g. the command could not be sent)."""
        self._multiline = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse a chunk of bytes from the socket; partial lines are kept for the next call."""
        events: list[Event] = []
        self._buf += data
        while (idx := self._buf.find(b"\n")) >= 0:
            raw = bytes(self._buf[:idx])
            del self._buf[: idx + 1]
            if self._discarding:
                self._discarding = False
                continue
            events.extend(self.feed_line(raw.decode("utf-8", errors="replace")))
        if len(self._buf) > MAX_LINE_BYTES:
            if not self._discarding:
                preview = bytes(self._buf[:200]).decode("utf-8", errors="replace")
                events.append(Unknown(preview, f"line longer than {MAX_LINE_BYTES} bytes dropped"))
            self._discarding = True
            self._buf.clear()
        return events

    def close(self) -> list[Event]:
        """End of stream: report whatever was left incomplete, then reset."""
        events: list[Event] = []
        if self._buf and not self._discarding:
            events.append(
                Unknown(self._buf.decode("utf-8", errors="replace"), "incomplete last line")
            )
        if self._client is not None:
            events.append(Unknown(self._client.header, "stream ended inside a CLIENT block"))
        if self._multiline is not None:
            events.append(Unknown("", "stream ended before the multi-line reply's END"))
        self._reset()
        return events

    def feed_line(self, line: str) -> list[Event]:
        """Parse one line (without or with its trailing CR/LF)."""
        line = line.rstrip("\r\n")
        events: list[Event] = []
        if self._client is not None:
            if line.startswith(_ENV_PREFIX):
                done = self._env_line(line[len(_ENV_PREFIX) :])
                return [done] if done is not None else []
            # OpenVPN writes a CLIENT block atomically, so this should not happen; give the
            # broken block back to the caller rather than dropping it silently.
            events.append(
                Unknown(self._client.header, "CLIENT notification ended without >CLIENT:ENV,END")
            )
            self._client = None
        if line.startswith(">"):
            events.extend(self._realtime(line))
        elif self._multiline is not None:
            events.extend(self._listing_line(line))
        elif line.startswith("SUCCESS:"):
            events.append(Reply(True, line[len("SUCCESS:") :].strip()))
        elif line.startswith("ERROR:"):
            events.append(Reply(False, line[len("ERROR:") :].strip()))
        elif line.strip():
            events.append(Unknown(line, "unexpected line outside a command reply"))
        return events

    def _listing_line(self, line: str) -> list[Event]:
        assert self._multiline is not None
        if not self._multiline and (line.startswith("SUCCESS:") or line.startswith("ERROR:")):
            # The command answered with one line after all (e.g. an error); the listing is off.
            self._multiline = None
            ok = line.startswith("SUCCESS:")
            return [Reply(ok, line.split(":", 1)[1].strip())]
        if line == "END":
            lines, self._multiline = self._multiline, None
            return [MultiLine(tuple(lines))]
        self._multiline.append(line)
        return []

    def _env_line(self, body: str) -> ClientEvent | None:
        pending = self._client
        assert pending is not None
        if body == "END":
            self._client = None
            return ClientEvent(
                pending.kind, pending.cid, pending.kid, pending.env, pending.cr_response
            )
        name, _, value = body.partition("=")
        if len(pending.env) < MAX_ENV_VARS:
            pending.env[name] = value
        else:
            pending.overflow = True
        return None

    def _realtime(self, line: str) -> list[Event]:
        kind, sep, text = line[1:].partition(":")
        if not sep or not _KIND_RE.fullmatch(kind):
            return [Unknown(line, "malformed real-time message")]
        if kind == "CLIENT":
            return self._client_line(line, text)
        if kind == "INFO":
            return [Info(text)]
        if kind == "HOLD":
            return [Hold(text)]
        return [Notification(kind, text)]

    def _client_line(self, line: str, text: str) -> list[Event]:
        sub, _, rest = text.partition(",")
        args = rest.split(",")
        if sub in ("CONNECT", "REAUTH", "CR_RESPONSE"):
            cid = _uint(args[0])
            kid = _uint(args[1]) if len(args) > 1 else None
            if cid is None or kid is None:
                return [Unknown(line, f"CLIENT:{sub} without numeric CID and KID")]
            response = None
            if sub == "CR_RESPONSE":
                response = ",".join(args[2:]) if len(args) > 2 else ""
            self._client = _PendingClient(line, ClientEventKind(sub), cid, kid, response)
            return []
        if sub in ("ESTABLISHED", "DISCONNECT"):
            cid = _uint(args[0])
            if cid is None:
                return [Unknown(line, f"CLIENT:{sub} without numeric CID")]
            self._client = _PendingClient(line, ClientEventKind(sub), cid, None, None)
            return []
        if sub == "ADDRESS":
            cid = _uint(args[0])
            if cid is None or len(args) < 3 or not args[1]:
                return [Unknown(line, "malformed CLIENT:ADDRESS")]
            return [ClientAddress(cid, args[1], args[2].strip() == "1")]
        if sub == "ENV":
            return [Unknown(line, "CLIENT:ENV outside a CLIENT block")]
        # A CLIENT notification type newer than this parser: pass it on untouched.
        return [Notification("CLIENT", text)]


# --------------------------------------------------------------------------------------------
# Commands

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII_RE = re.compile(r"[^\x20-\x7e]")


def _check_id(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"{what} must be an integer between 0 and 2^32-1, got {value!r}")
    return value


def _check_line(line: str, what: str) -> str:
    if not isinstance(line, str):
        raise ValueError(f"{what} must be a string, got {type(line).__name__}")
    if _CONTROL_RE.search(line):
        raise ValueError(f"{what} contains a control character (newline, NUL, ...): {line!r}")
    if _NON_ASCII_RE.search(line):
        raise ValueError(f"{what} contains non-ASCII characters, which OpenVPN would drop")
    if len(line) > MAX_COMMAND_LINE:
        raise ValueError(f"{what} is longer than {MAX_COMMAND_LINE} characters")
    return line


def quote_arg(text: str) -> str:
    """Quote one argument for OpenVPN's command/config lexer (double quotes, backslash escapes).

    Raises ValueError on control characters; non-ASCII characters become '?' because OpenVPN
    would drop their bytes anyway.
    """
    if _CONTROL_RE.search(text):
        raise ValueError(f"argument contains a control character (newline, NUL, ...): {text!r}")
    text = _NON_ASCII_RE.sub("?", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_command(cmd: str) -> str:
    """A one-line command, validated (printable ASCII, length) and newline-terminated."""
    _check_line(cmd, "command")
    if not cmd.strip():
        raise ValueError("command is empty")
    return cmd + "\n"


def expects_listing(cmd: str) -> bool | None:
    """Whether OpenVPN 2.6 answers `cmd` with an END-terminated listing (True), one
    SUCCESS/ERROR line (False), or, for commands not known here, None.

    Raises ValueError for commands whose reply cannot be matched to the command:
    `test N` (listing without END), `version N` (no reply at all in 2.6), `X on all`
    (a SUCCESS line and a listing), `exit`/`quit` (no reply, closes the session), and
    block commands such as `client-auth` (use `client_auth()`).
    """
    words = cmd.split()
    if not words:
        raise ValueError("command is empty")
    name, args = words[0], words[1:]
    if name in ("exit", "quit"):
        raise ValueError(f"{name!r} closes the session without a reply; close the client instead")
    if name in ("client-auth", "client-pf", "rsa-sig", "pk-sig", "certificate"):
        raise ValueError(f"{name!r} is followed by a block of lines; use its own formatter")
    if name == "test":
        raise ValueError("'test' output has no END line, so its reply cannot be delimited")
    if name == "version":
        if args:
            raise ValueError("OpenVPN 2.6 sends no reply to 'version N'")
        return True
    if name in ("log", "state", "echo"):
        if len(args) > 1:
            raise ValueError(
                f"'{cmd}' sends two replies; send '{name} {args[0]}' and '{name} {args[1]}' apart"
            )
        return not (args and args[0] in ("on", "off"))
    if name in ("status", "help"):
        return True
    if name in (
        "client-auth-nt", "client-deny", "client-kill", "client-pending-auth", "hold", "pid",
        "signal", "kill", "load-stats", "bytecount", "verb", "mute", "env-filter",
        "auth-retry", "forget-passwords", "needok", "needstr", "password", "username",
    ):  # fmt: skip
        return False
    return None


def client_auth(cid: int, kid: int, config_lines: Iterable[str] = ()) -> str:
    """The `client-auth` command block (with trailing newline) for a CONNECT/REAUTH.

    `config_lines` are client-connect directives (`ifconfig-push 10.8.0.5 255.255.255.0`,
    `push "route 10.0.0.0 255.0.0.0"`, ...). A line with a newline, NUL or other control
    character, non-ASCII text, or a line reading `END` is rejected: it would end the block
    early and let the rest be read as management commands.
    """
    _check_id(cid, "cid")
    _check_id(kid, "kid")
    lines = [f"client-auth {cid} {kid}"]
    for n, line in enumerate(config_lines):
        _check_line(line, f"client-auth line {n + 1}")
        if line.strip() == "END":
            raise ValueError(f"client-auth line {n + 1} is 'END', which would end the block")
        lines.append(line)
    lines.append("END")
    return "\n".join(lines) + "\n"


def client_deny(cid: int, kid: int, reason: str, client_reason: str | None = None) -> str:
    """The `client-deny` command line (with trailing newline).

    `reason` goes to the server log; `client_reason` is sent to the client, which shows it
    as `AUTH_FAILED,<client_reason>`.
    """
    _check_id(cid, "cid")
    _check_id(kid, "kid")
    cmd = f"client-deny {cid} {kid} {quote_arg(reason)}"
    if client_reason is not None:
        cmd += f" {quote_arg(client_reason)}"
    return _check_line(cmd, "client-deny command") + "\n"


def client_pending_auth(cid: int, kid: int, extra: str, timeout: int) -> str:
    """The `client-pending-auth` command line (with trailing newline), OpenVPN 2.5+.

    OpenVPN sends `AUTH_PENDING` and `INFO_PRE,<extra>` to the client (for a web login,
    `extra` is core.webauth.web_auth_extra's) and keeps the client waiting up to `timeout`
    seconds (capped by the server's hand-window) for a `client-auth` or `client-deny`.
    """
    _check_id(cid, "cid")
    _check_id(kid, "kid")
    if not 1 <= timeout <= 86400:
        raise ValueError(f"pending-auth timeout must be 1..86400 seconds, not {timeout}")
    cmd = f"client-pending-auth {cid} {kid} {quote_arg(extra)} {timeout}"
    return _check_line(cmd, "client-pending-auth command") + "\n"


_KILL_RE = re.compile(r"(RESTART|HALT)(,[\x20-\x7e]*)?")


def client_kill(cid: int, message: str = "RESTART") -> str:
    """The `client-kill` command line (with trailing newline).

    OpenVPN sends `message` to the client as a control message and then drops the instance.
    `RESTART` makes the client reconnect (`RESTART,[N]` lets it move to its next `remote`),
    `HALT` makes it exit; text after a comma is shown to the user. Anything else would leave
    the client waiting for its ping timeout, so it is rejected.
    """
    _check_id(cid, "cid")
    if not isinstance(message, str) or not _KILL_RE.fullmatch(message):
        raise ValueError(
            f"client-kill message must be RESTART or HALT, optionally followed by ',text'; "
            f"got {message!r}"
        )
    return _check_line(f"client-kill {cid} {quote_arg(message)}", "client-kill command") + "\n"


# --------------------------------------------------------------------------------------------
# Status and version


class StatusParseError(ValueError):
    """`status 3` output was not in the expected shape (never mistaken for 'no clients')."""


@dataclass(frozen=True, slots=True)
class StatusClient:
    """One `CLIENT_LIST` row of `status 3`."""

    common_name: str
    real_address: str
    virtual_address: str | None
    virtual_ipv6_address: str | None
    bytes_received: int
    bytes_sent: int
    connected_since: dt.datetime | None
    username: str | None
    client_id: int | None
    peer_id: int | None
    data_channel_cipher: str | None

    @property
    def real_ip(self) -> str:
        """The client's public address without the port."""
        return _split_hostport(self.real_address)[0]

    @property
    def real_port(self) -> int | None:
        """The client's public source port, if the address carries one."""
        return _split_hostport(self.real_address)[1]


def _split_hostport(addr: str) -> tuple[str, int | None]:
    if addr.startswith("["):  # [v6]:port
        host, _, rest = addr[1:].partition("]")
        return host, _uint(rest.lstrip(":")) if rest else None
    host, sep, port = addr.rpartition(":")
    if not sep or (":" in host and addr.count(":") < 2):
        return addr, None
    return host, _uint(port)


_REQUIRED_COLUMNS = ("Common Name", "Real Address", "Bytes Received", "Bytes Sent")


def parse_status(lines: Sequence[str]) -> list[StatusClient]:
    """Parse the lines of `status 3` (tab separated, `END` already removed) into client rows.

    Columns are located by the `HEADER\\tCLIENT_LIST` line, not by position, so columns that
    newer OpenVPN versions add do not break parsing. Raises StatusParseError when there is no
    CLIENT_LIST header or a row is malformed: an empty list always means "no clients".
    """
    columns: dict[str, int] | None = None
    clients: list[StatusClient] = []
    for n, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if fields[0] == "HEADER" and len(fields) > 1 and fields[1] == "CLIENT_LIST":
            columns = {name: i for i, name in enumerate(fields[2:], start=1)}
            missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise StatusParseError(f"status header lacks columns {missing}")
        elif fields[0] == "CLIENT_LIST":
            if columns is None:
                raise StatusParseError(f"status line {n}: CLIENT_LIST row before its HEADER")
            clients.append(_status_row(fields, columns, n))
    if columns is None:
        raise StatusParseError("no 'HEADER CLIENT_LIST' line: is this `status 3` output?")
    return clients


def _status_row(fields: list[str], columns: Mapping[str, int], n: int) -> StatusClient:
    def text(name: str) -> str | None:
        i = columns.get(name)
        if i is None or i >= len(fields):
            return None
        return fields[i]

    def optional(name: str, *, undef: bool = False) -> str | None:
        value = text(name)
        if value is None or value == "" or (undef and value == "UNDEF"):
            return None
        return value

    def number(name: str, *, required: bool) -> int | None:
        value = text(name)
        if value is None or value == "":
            if required:
                raise StatusParseError(f"status line {n}: no {name!r} value")
            return None
        parsed = _uint(value)
        if parsed is None:
            raise StatusParseError(f"status line {n}: {name!r} is not a number: {value!r}")
        return parsed

    common_name = text("Common Name")
    real_address = text("Real Address")
    if common_name is None or real_address is None:
        raise StatusParseError(f"status line {n}: row has fewer fields than the header")
    since_t = number("Connected Since (time_t)", required=False)
    return StatusClient(
        common_name=common_name,
        real_address=real_address,
        virtual_address=optional("Virtual Address"),
        virtual_ipv6_address=optional("Virtual IPv6 Address"),
        bytes_received=number("Bytes Received", required=True) or 0,
        bytes_sent=number("Bytes Sent", required=True) or 0,
        connected_since=(
            dt.datetime.fromtimestamp(since_t, dt.UTC) if since_t is not None else None
        ),
        username=optional("Username", undef=True),
        client_id=number("Client ID", required=False),
        peer_id=number("Peer ID", required=False),
        data_channel_cipher=optional("Data Channel Cipher"),
    )


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What `version` reports."""

    openvpn: str
    management: int | None


def parse_version(lines: Sequence[str]) -> VersionInfo:
    """Parse the `version` listing (`OpenVPN Version: ...`, `Management Version: 5`)."""
    openvpn = ""
    management: int | None = None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "OpenVPN Version":
            openvpn = value.strip()
        elif key.strip() == "Management Version":
            management = _uint(value)
    return VersionInfo(openvpn, management)


# --------------------------------------------------------------------------------------------
# Redaction

_SECRET_KEY_RE = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)
_PASSWORD_CMD_RE = re.compile(r"^(\s*password\s+(?:\"(?:[^\"\\]|\\.)*\"|'[^']*'|\S+)\s+).*$")
_AUTH_TOKEN_RE = re.compile(r"(auth-token\S*\s+).*$")
_SAFE_PASSWORD_NOTICE = ("Need '", "Verification Failed")


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """Copy of an ENV mapping with the values of secret-looking names replaced."""
    return {k: (REDACTED if _SECRET_KEY_RE.search(k) else v) for k, v in env.items()}


def _redact_line(line: str) -> str:
    if line.startswith(_ENV_PREFIX):
        name, sep, _ = line[len(_ENV_PREFIX) :].partition("=")
        if sep and _SECRET_KEY_RE.search(name):
            return f"{_ENV_PREFIX}{name}={REDACTED}"
        return line
    if line.startswith(">CLIENT:CR_RESPONSE,"):
        # The response is the user's answer to a challenge (an OTP, say).
        head = line.split(",", 3)
        return ",".join([*head[:3], REDACTED]) if len(head) == 4 else line
    if line.startswith(">PASSWORD:"):
        text = line[len(">PASSWORD:") :]
        if text.startswith(_SAFE_PASSWORD_NOTICE):
            return line
        # e.g. ">PASSWORD:Auth-Token:<token>": keep only the label.
        label = text.split(":", 1)[0] if ":" in text else ""
        return f">PASSWORD:{label}:{REDACTED}" if label else f">PASSWORD:{REDACTED}"
    if (m := _PASSWORD_CMD_RE.match(line)) is not None:
        return m.group(1) + REDACTED
    if (m := _AUTH_TOKEN_RE.search(line)) is not None:
        return line[: m.start()] + m.group(1) + REDACTED
    return line


def redact(text: str) -> str:
    """Make protocol text (one line or several) safe to log.

    Removes the values of secret ENV variables (`password=...`), tokens in `>PASSWORD:`
    notifications, the secret of a `password "Auth" ...` command and `auth-token` values in
    client-auth blocks.
    """
    if "\n" not in text:
        return _redact_line(text)
    return "\n".join(_redact_line(line) for line in text.split("\n"))
