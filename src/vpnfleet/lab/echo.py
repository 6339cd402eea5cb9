"""A small backend service for the lab: it tells callers which address they came from.

Run inside the lab's service namespace::

    python -m vpnfleet.lab.echo --listen 0.0.0.0:8080 [--udp-listen 0.0.0.0:8081]

HTTP (one request per connection, ``Connection: close``):

* ``GET /`` answers ``{"remote_addr": ..., "remote_port": ..., "time": ...}``: the source
  address and port as this service saw them (a pod address for NAT-mode users, the tunnel
  address for gateway-mode users), and its own clock in UTC.
* ``GET /connect-back?port=P`` opens a TCP connection back to the caller's address on port
  ``P``, sends ``hello from backend\\n`` and reports ``{"ok": ..., "target": ..., "error": ...}``
  (200 when it worked, 502 when not): can the service reach the user?

UDP: every datagram is answered with ``"<addr>:<port>"`` of its sender.

Every request is logged as one JSON line on stdout, like a backend's access log (with the
client port, so NAT attribution can be traced from it). A JSON ``listening`` line announces
the bound addresses. SIGTERM or SIGINT stops it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

HELLO = b"hello from backend\n"
HEAD_TIMEOUT = 5.0  # to receive the request line and headers
CONNECT_TIMEOUT = 5.0  # for the connect-back connection (connect, then send)
WRITE_TIMEOUT = 5.0
MAX_LINE = 8192
MAX_HEADERS = 100

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    502: "Bad Gateway",
}


class BadRequest(Exception):
    """The request could not be parsed; the message says why."""


@dataclass(frozen=True)
class Request:
    """The parts of an HTTP request this service looks at."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        # readline() reports an over-long line as ValueError.
        raise BadRequest(f"line longer than {MAX_LINE} bytes") from None


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read a request line and headers (up to the blank line); the body is ignored."""
    line = await _readline(reader)
    if not line.endswith(b"\n"):
        raise BadRequest("connection closed before a complete request line")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _readline(reader)
        if not line.endswith(b"\n"):
            raise BadRequest("connection closed inside the headers")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BadRequest(f"more than {MAX_HEADERS} headers")
    url = urlsplit(target)
    return Request(method, url.path or "/", parse_qs(url.query), headers)


class EchoService:
    """HTTP and UDP handlers; :attr:`tasks` holds the HTTP connections in progress."""

    def __init__(self, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one request on a connection, then close it."""
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        peer = writer.get_extra_info("peername")
        host, port = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        method = path = ""
        try:
            try:
                req = await asyncio.wait_for(read_request(reader), HEAD_TIMEOUT)
                method, path = req.method, req.path
                status, body = await self.respond(req, host, port)
            except BadRequest as exc:
                status, body = 400, {"error": str(exc)}
            except TimeoutError:
                status, body = 408, {"error": f"no complete request within {HEAD_TIMEOUT:g} s"}
            payload = json.dumps(body).encode() + b"\n"
            head = [
                f"HTTP/1.1 {status} {_REASONS[status]}",
                "Content-Type: application/json",
                f"Content-Length: {len(payload)}",
                *(["Allow: GET"] if status == 405 else []),
                "Connection: close",
            ]
            writer.write("\r\n".join([*head, "", ""]).encode("latin-1") + payload)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            _log(
                event="http",
                remote_addr=host,
                remote_port=port,
                method=method,
                path=path,
                status=status,
            )
        except (OSError, TimeoutError):
            pass  # the caller went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)
            if task is not None:
                self.tasks.discard(task)

    async def respond(self, req: Request, host: str, port: int) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for a parsed request from ``host``:``port``."""
        if req.method != "GET":
            return 405, {"error": f"method {req.method} not allowed"}
        if req.path == "/":
            return 200, {"remote_addr": host, "remote_port": port, "time": _now()}
        if req.path == "/connect-back":
            values = req.query.get("port", [])
            if len(values) != 1 or not values[0].isdigit() or not 1 <= int(values[0]) <= 65535:
                return 400, {"error": "connect-back needs one port=P with 1 <= P <= 65535"}
            return await self.connect_back(host, int(values[0]))
        return 404, {"error": f"no such path {req.path}"}

    async def connect_back(self, host: str, port: int) -> tuple[int, dict[str, Any]]:
        """Connect to ``host``:``port`` (only ever the caller's address) and say hello."""
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(HELLO)
                    await writer.drain()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            error = f"timed out after {self.connect_timeout:g} s"
        except OSError as exc:
            # asyncio's message repeats the address; the errno text is what matters.
            error = os.strerror(exc.errno) if exc.errno else str(exc)
        else:
            _log(event="connect-back", target=target, ok=True)
            return 200, {"ok": True, "target": target}
        _log(event="connect-back", target=target, ok=False, error=error)
        return 502, {"ok": False, "target": target, "error": error}


class UdpEcho(asyncio.DatagramProtocol):
    """Answers each datagram with its sender's ``addr:port``."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to reply on."""
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        """Reply with the sender's address."""
        if self.transport is not None:
            self.transport.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)


def _log(**fields: Any) -> None:
    print(json.dumps({"time": _now(), **fields}), flush=True)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6) for argparse."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


async def serve(
    listen: tuple[str, int],
    udp_listen: tuple[str, int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then close everything."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = EchoService()
    server = await asyncio.start_server(
        service.handle_http, listen[0], listen[1], limit=MAX_LINE, reuse_address=True
    )
    udp: asyncio.DatagramTransport | None = None
    try:
        bound: dict[str, Any] = {"http": _sockname(server.sockets[0].getsockname())}
        if udp_listen is not None:
            udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=udp_listen)
            bound["udp"] = _sockname(udp.get_extra_info("sockname"))
        _log(event="listening", **bound)
        await stop.wait()
    finally:
        server.close()
        if udp is not None:
            udp.close()
        for task in list(service.tasks):
            task.cancel()
        if service.tasks:
            await asyncio.wait(service.tasks, timeout=WRITE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), WRITE_TIMEOUT)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        _log(event="stopped")


def _sockname(name: Any) -> str:
    host, port = str(name[0]), int(name[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m vpnfleet.lab.echo", description="Lab backend: echoes caller addresses."
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("0.0.0.0", 8080),
        metavar="HOST:PORT",
        help="HTTP address (default 0.0.0.0:8080)",
    )
    parser.add_argument(
        "--udp-listen",
        type=parse_listen,
        default=None,
        metavar="HOST:PORT",
        help="also echo UDP on this address",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, args.udp_listen))
    except OSError as exc:
        print(f"echo: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
