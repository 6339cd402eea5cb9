"""Conntrack event listener: NEW and DESTROY events of this network namespace, as FlowEvents.

A raw ``AF_NETLINK``/``NETLINK_NETFILTER`` socket joined to the ctnetlink multicast groups
NEW and DESTROY, read from the asyncio loop (``add_reader``; no thread). The socket sees the
namespace the process runs in, so the agent, which lives in the pod's namespace, just opens it.
The kernel side is enabled by ``nf_conntrack_acct``/``nf_conntrack_timestamp`` (set by
``Dataplane.ensure_sysctls``) and by any rule that loads conntrack (the NAT rule does).

Losing events is never silent. When the socket buffer overflows the kernel drops events and
the next read fails with ENOBUFS: that is counted in ``counters.overruns``, logged, and a
resync is scheduled: a ctnetlink dump of the current table on a second socket, streamed as
:class:`~vpnfleet.core.flowevents.Resync` ``begin``, the open flows as ``from_dump`` NEW events,
then ``end`` once the events queued behind the dump have been read. Flows whose NEW was lost
are re-learned; flows whose DESTROY was lost show up as missing (the tracker closes them).
The kernel stays silent about further drops until the backlog has been read empty, so a
dump that began before that gets a follow-up. Decoding errors are counted and skipped.

Debug tool: ``python -m vpnfleet.agent.conntrack`` prints what the agent would see, one JSON
line per event (run it inside the pod: ``ip netns exec POD ...`` or ``kubectl exec``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

from vpnfleet.core.ctnetlink import (
    IPCTNL_MSG_CT_GET,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    NLM_F_REQUEST,
    CtnetlinkDecoder,
)
from vpnfleet.core.flowevents import FlowEvent, FlowItem, Resync

log = logging.getLogger("vpnfleet.agent.conntrack")

# Multicast group bitmask for bind(): bit (group - 1). NFNLGRP_CONNTRACK_NEW = 1,
# NFNLGRP_CONNTRACK_DESTROY = 3. UPDATE (2) is left out: we do not need per-state changes.
GROUPS_NEW_DESTROY = (1 << 0) | (1 << 2)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
_NLMSG = struct.Struct("=IHHII")
_RECV_SIZE = 1 << 16  # events are a few hundred bytes; dump datagrams up to ~32 KiB

# Each event takes ~1.3 KB of buffer (skb truesize), and the kernel doubles the request:
# 64 MiB asked = 128 MiB = ~100k events, a garbage-collector sweep of a large table.
DEFAULT_RCVBUF = 64 << 20


class ConntrackError(RuntimeError):
    """The listener cannot work (no permission, no conntrack in this kernel, ...)."""


@dataclass
class ListenerCounters:
    """Exposed as metrics; ``overruns`` > 0 means events were lost (and a resync followed)."""

    events: int = 0  # live events delivered
    dumped: int = 0  # entries delivered from resync dumps
    decode_errors: int = 0
    # ENOBUFS reads: the kernel dropped events for us. One per congestion episode, not per
    # event lost: the kernel reports again only after the queue has been read empty.
    overruns: int = 0
    resyncs: int = 0  # completed dumps
    resync_failures: int = 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise ConntrackError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc


class ConntrackListener:
    """Streams conntrack NEW/DESTROY events of the current network namespace.

    ``rcvbuf``: socket buffer asked for (SO_RCVBUFFORCE as root, else capped by
    ``net.core.rmem_max``); the kernel doubles it. It absorbs bursts while Python is busy;
    sized generously because an overrun costs a full table dump. ``initial_dump``: start with
    a resync so flows opened before the listener (agent restart) are known.
    ``min_resync_interval``: overruns in a storm are coalesced into at most one dump per
    interval; while overruns keep coming right after dumps the interval doubles (up to
    ``max_resync_interval``), because a dump of a big table costs as much CPU as that many
    events and back-to-back dumps would deepen the overload they are meant to repair.
    ``batch``: datagrams read per wakeup before yielding to other tasks (under load one
    wakeup reads hundreds of events, so the per-wakeup cost vanishes). ``dump_timeout`` and
    ``drain_timeout`` bound a resync (the dump, then reading the events queued behind it).
    """

    def __init__(
        self,
        *,
        rcvbuf: int = DEFAULT_RCVBUF,
        initial_dump: bool = True,
        min_resync_interval: float = 1.0,
        max_resync_interval: float = 30.0,
        batch: int = 256,
        dump_timeout: float = 60.0,
        drain_timeout: float = 10.0,
    ) -> None:
        self.rcvbuf = rcvbuf
        self.initial_dump = initial_dump
        self.min_resync_interval = min_resync_interval
        self.max_resync_interval = max_resync_interval
        self._resync_interval = min_resync_interval
        self.batch = batch
        self.dump_timeout = dump_timeout
        self.drain_timeout = drain_timeout
        self.counters = ListenerCounters()
        self.rcvbuf_effective = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray(_RECV_SIZE)
        # One decoder for the listener's life: it learns the kernel's message layouts once.
        self._decoder = CtnetlinkDecoder()
        self._callback: Callable[[FlowItem], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the reader is registered with the loop
        self._held = False  # paused by a full consumer queue (events())
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever a read finds the event socket empty
        # After reporting ENOBUFS the kernel reports no further drops until our receive queue
        # has been read empty: until then losses are silent, so a dump taken in that window
        # needs a follow-up one.
        self._congested = False
        self._failure: BaseException | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_again = False
        self._last_resync = -1e9
        self._last_overrun_log = -1e9
        self._seq = int(time.time()) & 0xFFFF

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Create and bind the event socket (idempotent). Raises ConntrackError."""
        if self._sock is not None:
            return
        sock = _socket()
        try:
            try:
                # FORCE ignores rmem_max (needs CAP_NET_ADMIN, which the agent has).
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            self.rcvbuf_effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            sock.bind((0, GROUPS_NEW_DESTROY))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConntrackError(
                f"cannot subscribe to conntrack events: {exc.strerror or exc} "
                "(needs CAP_NET_ADMIN and the nf_conntrack_netlink module)"
            ) from exc
        self._sock = sock

    def close(self) -> None:
        """Stop reading and release the sockets; ``run()`` returns."""
        self._pause()
        if self._resync_task is not None:
            self._resync_task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._closed.set()

    async def run(self, callback: Callable[[FlowItem], None]) -> None:
        """Call ``callback`` for every event and resync marker until :meth:`close`.

        The callback runs synchronously inside the socket reader and must be quick (it is
        the per-event fast path). If it raises, the listener closes and ``run`` re-raises.
        """
        self.open()
        self._loop = asyncio.get_running_loop()
        self._callback = callback
        self._failure = None
        self._closed.clear()
        self._resume()
        if self.initial_dump:
            self.request_resync()
        try:
            await self._closed.wait()
        finally:
            self._pause()
            if self._resync_task is not None:
                self._resync_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._resync_task
        if self._failure is not None:
            raise self._failure

    async def events(self, queue_limit: int = 65_536) -> AsyncIterator[FlowItem]:
        """The same stream as :meth:`run`, as an async iterator.

        At most ``queue_limit`` items wait for the consumer; beyond that reading pauses and
        the kernel buffer takes the backlog (if it overflows: overrun, counted, resync), so a
        slow consumer costs completeness of the stream, never unbounded memory.
        """
        queue: deque[FlowItem] = deque()
        wake = asyncio.Event()

        def push(item: FlowItem) -> None:
            queue.append(item)
            wake.set()
            if len(queue) >= queue_limit:
                self._held = True
                self._pause()

        task = asyncio.create_task(self.run(push))
        task.add_done_callback(lambda _: wake.set())
        try:
            while True:
                while queue:
                    item = queue.popleft()
                    if self._held and len(queue) < queue_limit // 2:
                        self._held = False
                        self._resume()
                    yield item
                if task.done():
                    task.result()
                    return
                wake.clear()
                await wake.wait()
        finally:
            if not task.done():
                self.close()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # --- event socket -----------------------------------------------------------------------

    def _resume(self) -> None:
        if self._reading or self._held:
            return
        if self._sock is None or self._loop is None or self._closed.is_set():
            return
        self._loop.add_reader(self._sock.fileno(), self._drain)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    def _drain(self) -> None:
        """Read up to ``batch`` datagrams; the selector calls again while more are queued."""
        sock, callback, buf = self._sock, self._callback, self._buf
        decode = self._decoder.decode
        if sock is None or callback is None:
            return
        at = _now()  # one clock read per wakeup: events of a batch arrived together
        events = errors = 0  # counted locally, stored once per wakeup
        try:
            for _ in range(self.batch):
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    self._drained.set()
                    self._congested = False
                    return
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self._overrun()
                        continue  # the socket keeps working after reporting the loss
                    raise
                decoded = decode(buf, n, at)
                errors += decoded.errors
                for event in decoded.events:
                    events += 1
                    callback(event)
                if not self._reading:
                    return  # paused by a full consumer queue
        except BaseException as exc:  # handed to run(), which re-raises it
            self._failure = exc
            self.close()
        finally:
            self.counters.events += events
            self.counters.decode_errors += errors

    def _overrun(self) -> None:
        self.counters.overruns += 1
        self._congested = True
        now = time.monotonic()
        # One line per few seconds in a storm, with the running total: loud, not a flood.
        if now - self._last_overrun_log >= 5.0:
            self._last_overrun_log = now
            log.warning(
                "conntrack events lost: socket buffer overrun (%d so far, rcvbuf %d bytes); "
                "resyncing from a table dump",
                self.counters.overruns,
                self.rcvbuf_effective,
            )
        self.request_resync()

    # --- resync -----------------------------------------------------------------------------

    def request_resync(self) -> None:
        """Schedule a table dump; coalesced with one running or pending."""
        if self._loop is None or self._closed.is_set():
            return
        if self._resync_task is not None and not self._resync_task.done():
            self._resync_again = True
            return
        self._resync_task = self._loop.create_task(self._resync_loop())

    async def _resync_loop(self) -> None:
        try:
            while True:
                self._resync_again = False
                now = time.monotonic()
                since = now - self._last_resync
                if since < 2 * self._resync_interval:  # overloaded again soon after a dump
                    self._resync_interval = min(2 * self._resync_interval,
                                                self.max_resync_interval)  # fmt: skip
                elif since > 4 * self._resync_interval:
                    self._resync_interval = self.min_resync_interval
                wait = self._last_resync + self._resync_interval - now
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last_resync = time.monotonic()
                await self._resync_once()
                if not self._resync_again or self._closed.is_set():
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the callback failed: run() re-raises it
            self._failure = exc
            self.close()

    async def _resync_once(self) -> None:
        callback = self._callback
        if callback is None:
            return
        callback(Resync("begin", _now()))
        congested = self._congested
        try:
            entries = await asyncio.wait_for(self._dump(callback), self.dump_timeout)
        except asyncio.CancelledError:
            callback(Resync("abort", _now()))
            raise
        except (OSError, ConntrackError, TimeoutError) as exc:
            self.counters.resync_failures += 1
            log.error("conntrack resync failed: %s; flows may be missing until the next one", exc)
            callback(Resync("abort", _now()))
            return
        self.counters.resyncs += 1
        log.info("conntrack resync: %d open flows listed", entries)
        # The dump shows the table as it is now, but the event socket may still hold DESTROY
        # events of flows that are already gone from it. Read those first, or the tracker
        # would take those flows for lost ones (end inferred) just before their real end.
        await self._wait_drained()
        callback(Resync("end", _now()))
        if congested:
            self._resync_again = True  # events dropped during the catch-up went unreported

    async def _wait_drained(self) -> None:
        """Return once the event socket has been read empty (bounded by ``drain_timeout``)."""
        sock = self._sock
        if sock is None:
            return
        self._drained.clear()
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # nothing queued
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # reported once: this read consumed it
                self._overrun()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.drain_timeout)

    async def _dump(self, callback: Callable[[FlowItem], None]) -> int:
        """Dump the conntrack table on a separate socket; returns the entries delivered.

        A separate socket because the dump must not queue behind (or be lost with) events,
        and because a dump is paced by our reads, so it cannot overrun.
        """
        loop = asyncio.get_running_loop()
        sock = _socket()
        try:
            sock.setblocking(False)
            sock.bind((0, 0))
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            # nfgenmsg family AF_INET: vpnfleet's tunnels and NAT are IPv4 only.
            payload = struct.pack("=BBH", socket.AF_INET, 0, 0)
            header = _NLMSG.pack(
                16 + len(payload),
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                NLM_F_REQUEST | _NLM_F_DUMP,
                self._seq,
                0,
            )
            await loop.sock_sendall(sock, header + payload)
            entries = 0
            while True:
                data = await loop.sock_recv(sock, _RECV_SIZE)
                decoded = self._decoder.decode(data, len(data), _now(), from_dump=True)
                self.counters.decode_errors += decoded.errors
                for event in decoded.events:
                    callback(event)
                entries += len(decoded.events)
                self.counters.dumped += len(decoded.events)
                if decoded.error_code < 0:
                    raise ConntrackError(f"dump refused: {os.strerror(-decoded.error_code)}")
                if decoded.done:
                    return entries
                if not data:
                    raise ConntrackError("dump socket closed early")
        finally:
            sock.close()


# --- debug tool -----------------------------------------------------------------------------


def _print_item(item: FlowItem, listener: ConntrackListener) -> None:
    if isinstance(item, FlowEvent):
        line = {"type": "event", **item.as_dict()}
    else:
        line = {"type": "resync", "phase": item.phase, "counters": asdict(listener.counters)}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def _watch(rcvbuf: int, initial_dump: bool) -> ListenerCounters:
    listener = ConntrackListener(rcvbuf=rcvbuf, initial_dump=initial_dump)
    listener.open()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, listener.close)
    sys.stdout.write(json.dumps({"type": "ready", "rcvbuf": listener.rcvbuf_effective}) + "\n")
    sys.stdout.flush()
    async for item in listener.events():
        _print_item(item, listener)
    return listener.counters


def main(argv: list[str] | None = None) -> int:
    """Print conntrack events of the current namespace as JSON lines until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m vpnfleet.agent.conntrack", description=main.__doc__
    )
    parser.add_argument("--rcvbuf", type=int, default=DEFAULT_RCVBUF, help="socket buffer bytes")
    parser.add_argument("--no-initial-dump", action="store_true", help="skip the startup dump")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        counters = asyncio.run(_watch(args.rcvbuf, not args.no_initial_dump))
    except ConntrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps({"type": "counters", **asdict(counters)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
