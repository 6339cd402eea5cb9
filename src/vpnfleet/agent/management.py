"""asyncio client for OpenVPN's management interface on a unix socket.

One `ManagementClient` is one management session. Commands are serialised (exactly one in
flight, so a reply always belongs to the command that is waiting) and real-time events
(`>CLIENT:...`, `>HOLD:`, `>LOG:` ...) are queued for `events()` / `next_event()`.

What the caller must know about OpenVPN 2.6 (checked against 2.6.14):

* The session ends when openvpn exits or restarts (EOF). The client then becomes `closed`:
  the command in flight and every later command raise `ManagementClosed`, and `events()`
  ends after the events received before EOF. Reconnect with `ManagementClient.connect()`.
* Client ids (CID) restart from 0 in every new openvpn process: after a restart, a CID
  names a different client, so drop all per-CID state when the session closes and rebuild
  it from `status()` and new events.
* Notifications are not buffered while no management client is attached: a `>CLIENT:CONNECT`
  emitted then is lost and that client waits unanswered (it shows in `status()` with no
  virtual address) until its handshake window expires. Start openvpn with
  `management-hold`, attach, then `hold_release()`; after a reconnect to a running openvpn,
  `client_kill()` clients that have no virtual address so they reconnect and ask again.
* `client_kill()` lets OpenVPN send the message, drop the instance a moment later and emit
  `>CLIENT:DISCONNECT` for it; a killed client may reconnect (with a new CID) first.
* A command that gets no reply within its timeout leaves the stream out of step, so the
  session is closed (`CommandTimeout`); the caller reconnects.
* Only one management client can be attached to openvpn at a time.

Nothing logged here contains a password or token: every protocol line passes `redact()`.
"""

# The `timeout` parameters are deliberate (ASYNC109): a command that outlives its timeout
# must close the session, because its late reply would be taken for the next command's.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Literal, overload

from vpnfleet.core import mgmt_protocol as proto
from vpnfleet.core.mgmt_protocol import (
    Event,
    Info,
    MultiLine,
    Notification,
    Reply,
    StatusClient,
    Unknown,
    VersionInfo,
    redact,
)

__all__ = [
    "CommandError",
    "CommandTimeout",
    "ManagementClient",
    "ManagementClosed",
    "ManagementError",
]

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT = 10.0
_READ_CHUNK = 64 * 1024


class ManagementError(Exception):
    """The management interface could not be used as asked."""


class ManagementClosed(ManagementError):
    """The management session is over (openvpn exited or restarted, or close() was called)."""


class CommandTimeout(ManagementError):
    """No reply arrived in time; the session was closed because it is out of step."""


class CommandError(ManagementError):
    """OpenVPN answered `ERROR: ...`; `text` is its message."""

    def __init__(self, command: str, text: str) -> None:
        super().__init__(f"openvpn rejected {command!r}: {text}")
        self.command = command
        self.text = text


def _first_line(payload: str) -> str:
    return redact(payload.split("\n", 1)[0])


class ManagementClient:
    """One session on OpenVPN's management socket. Create it with `connect()`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.path = path
        self.greeting = ""
        self._parser = proto.ManagementParser()
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[Reply | MultiLine] | None = None
        self._greeted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Unbounded on purpose: dropping a CONNECT would leave a user hanging. The agent
        # consumes continuously; LOG/BYTECOUNT notifications are off unless asked for.
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed = asyncio.Event()
        self._close_reason = ""
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"mgmt-read {path}")

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> ManagementClient:
        """Connect to the unix socket at `path` and wait for OpenVPN's greeting.

        Raises ManagementError when the socket cannot be reached (openvpn not running yet,
        or another management client is attached) or nothing greets within `timeout`.
        """
        spath = os.fspath(path)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(spath)
        except (OSError, TimeoutError) as exc:
            raise ManagementError(
                f"cannot connect to openvpn management socket {spath}: {exc or 'timeout'}"
            ) from None
        client = cls(reader, writer, spath)
        try:
            async with asyncio.timeout(timeout):
                client.greeting = await asyncio.shield(client._greeted)
        except (TimeoutError, ManagementClosed) as exc:
            await client.close()
            raise ManagementError(
                f"no OpenVPN greeting on {spath} within {timeout}s: {exc or 'timeout'}"
            ) from None
        log.info("management session open on %s: %s", spath, client.greeting)
        return client

    @property
    def closed(self) -> bool:
        """True once the session is over; every command then raises ManagementClosed."""
        return self._closed.is_set()

    @property
    def close_reason(self) -> str:
        """Why the session ended ('' while open)."""
        return self._close_reason

    async def wait_closed(self) -> None:
        """Return when the session has ended (EOF, error or close())."""
        await self._closed.wait()

    async def close(self) -> None:
        """End the session (idempotent). openvpn keeps running and accepts a new session."""
        self._shutdown("closed by the agent")
        if self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ManagementClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _shutdown(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        for event in self._parser.close():
            self._dispatch(event)
        error = ManagementClosed(f"management session on {self.path} ended: {reason}")
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(error)
        if not self._greeted.done():
            self._greeted.set_exception(error)
            self._greeted.exception()  # connect() reports it; avoid "never retrieved" noise
        self._events.put_nowait(None)
        self._writer.close()
        log.info("management session on %s ended: %s", self.path, reason)

    async def _read_loop(self) -> None:
        reason = "openvpn closed the management connection (exited or restarted)"
        try:
            while chunk := await self._reader.read(_READ_CHUNK):
                for event in self._parser.feed(chunk):
                    self._dispatch(event)
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"management connection failed: {exc}"
        except Exception as exc:  # a bug here must not leave commands waiting forever
            log.exception("management reader failed")
            reason = f"management reader failed: {type(exc).__name__}"
        self._shutdown(reason)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Reply | MultiLine):
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(event)
                return
            log.warning("management reply with no command in flight: %r", event)
        elif isinstance(event, Info) and not self._greeted.done():
            self._greeted.set_result(event.text)
            return
        elif isinstance(event, Unknown):
            log.warning("unparsed management line (%s): %s", event.reason, redact(event.line))
        elif isinstance(event, Notification):
            log.debug("management notification: %s", redact(f">{event.kind}:{event.text}"))
        else:
            log.debug("management event: %r", event)
        self._events.put_nowait(event)

    # ---------------------------------------------------------------- events

    async def events(self) -> AsyncIterator[Event]:
        """Yield real-time events in arrival order; ends when the session closes.

        ClientEvent.env may hold secrets: log `event.safe_env()` or `repr(event)` only.
        """
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later readers must see the end too
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next real-time event; TimeoutError after `timeout`, ManagementClosed at the end."""
        async with asyncio.timeout(timeout):
            event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)
            raise ManagementClosed(f"management session on {self.path} ended: {self._close_reason}")
        return event

    # ---------------------------------------------------------------- commands

    async def _roundtrip(self, payload: str, multiline: bool, timeout: float) -> Reply | MultiLine:
        async with self._lock:
            if self.closed:
                raise ManagementClosed(
                    f"management session on {self.path} ended: {self._close_reason}"
                )
            future: asyncio.Future[Reply | MultiLine] = asyncio.get_running_loop().create_future()
            self._pending = future
            if multiline:
                self._parser.expect_multiline()
            log.debug("management command: %s", redact(payload.rstrip("\n")))
            try:
                async with asyncio.timeout(timeout):
                    self._writer.write(payload.encode("ascii"))
                    await self._writer.drain()
                    return await future
            except TimeoutError:
                self._shutdown(f"no reply to {_first_line(payload)!r} within {timeout}s")
                raise CommandTimeout(
                    f"openvpn did not answer {_first_line(payload)!r} within {timeout}s; "
                    "the management session was closed"
                ) from None
            except (OSError, RuntimeError) as exc:  # write to a socket the peer closed
                self._shutdown(f"write failed: {exc}")
                raise ManagementClosed(f"management session on {self.path} ended: {exc}") from exc
            except asyncio.CancelledError:
                # Same hazard as a timeout: the reply may still come and be mis-correlated.
                if future.cancelled() or not future.done():
                    self._shutdown(f"command {_first_line(payload)!r} was cancelled")
                raise
            finally:
                self._pending = None
                self._parser.cancel_multiline()

    @overload
    async def command(
        self, cmd: str, multiline: Literal[False] = False, timeout: float = ...
    ) -> str: ...

    @overload
    async def command(
        self, cmd: str, multiline: Literal[True], timeout: float = ...
    ) -> list[str]: ...

    async def command(
        self, cmd: str, multiline: bool = False, timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> str | list[str]:
        """Send one command and return the text after `SUCCESS:`, or the listing's lines.

        Pass `multiline=True` for commands answered by an END-terminated listing
        (`status 3`, `version`, `state all`, ...). Raises CommandError on `ERROR:`,
        CommandTimeout, ManagementClosed, and ValueError for commands whose reply could not
        be matched (see `mgmt_protocol.expects_listing`) or that contradict `multiline`.
        """
        payload = proto.format_command(cmd)
        listing = proto.expects_listing(cmd)
        if listing is not None and listing != multiline:
            kind = "an END-terminated listing" if listing else "a single line"
            raise ValueError(f"openvpn answers {cmd.split()[0]!r} with {kind}; fix `multiline`")
        reply = await self._roundtrip(payload, multiline, timeout)
        return self._unwrap(cmd, reply, multiline)

    @staticmethod
    def _unwrap(cmd: str, reply: Reply | MultiLine, multiline: bool) -> str | list[str]:
        if isinstance(reply, MultiLine):
            return list(reply.lines)
        if not reply.ok:
            raise CommandError(redact(cmd), reply.text)
        if multiline:
            raise ManagementError(f"expected a listing for {redact(cmd)!r}, got: {reply.text}")
        return reply.text

    async def _simple(self, payload: str, timeout: float) -> str:
        reply = await self._roundtrip(payload, False, timeout)
        return str(self._unwrap(payload.split("\n", 1)[0], reply, False))

    async def client_auth(
        self,
        cid: int,
        kid: int,
        config_lines: Iterable[str] = (),
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        """Accept a CONNECT/REAUTH with client-connect directives (e.g. `ifconfig-push`).

        CommandError means OpenVPN no longer knows that CID/KID (the client went away).
        """
        await self._simple(proto.client_auth(cid, kid, config_lines), timeout)

    async def client_deny(
        self,
        cid: int,
        kid: int,
        reason: str,
        client_reason: str | None = None,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        """Refuse a CONNECT/REAUTH; the client shows `AUTH_FAILED,<client_reason>` and exits."""
        await self._simple(proto.client_deny(cid, kid, reason, client_reason), timeout)

    async def client_pending_auth(
        self,
        cid: int,
        kid: int,
        extra: str,
        pending_timeout: int,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        """Keep a CONNECT pending (e.g. a web login, `extra` = `WEB_AUTH::<url>`) for up to
        `pending_timeout` seconds; answer it later with client_auth or client_deny."""
        await self._simple(proto.client_pending_auth(cid, kid, extra, pending_timeout), timeout)

    async def client_kill(
        self, cid: int, message: str = "RESTART", timeout: float = DEFAULT_COMMAND_TIMEOUT
    ) -> None:
        """Disconnect a client: `RESTART` makes it reconnect, `HALT` makes it exit."""
        await self._simple(proto.client_kill(cid, message), timeout)

    async def status(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> list[StatusClient]:
        """The connected clients (`status 3`), including ones still waiting for client-auth
        (those have no virtual address). Raises CommandError while openvpn is on hold."""
        return proto.parse_status(await self.command("status 3", True, timeout))

    async def hold_release(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        """Let an openvpn started with `management-hold` go ahead."""
        await self.command("hold release", False, timeout)

    async def version(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> VersionInfo:
        """OpenVPN's and the management interface's versions."""
        return proto.parse_version(await self.command("version", True, timeout))

    async def pid(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> int:
        """The openvpn process id."""
        text = await self.command("pid", False, timeout)
        _, _, value = text.partition("pid=")
        if not value.strip().isdigit():
            raise ManagementError(f"unexpected reply to 'pid': {text!r}")
        return int(value)
