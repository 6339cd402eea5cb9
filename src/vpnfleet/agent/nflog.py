"""Listener for the firewall's NFLOG group: the packets the pod dropped, as they happen.

The forward chain logs denied packets with ``-j NFLOG --nflog-group N`` (rate-limited by the
rule itself, see :mod:`vpnfleet.core.fwrender`). This module owns the netlink side: a raw
``AF_NETLINK``/``NETLINK_NETFILTER`` socket bound to that group in the network namespace of
the calling process, read without blocking through ``loop.add_reader``. Decoding and
aggregation are pure and live in :mod:`vpnfleet.core.denied`.

Lifecycle::

    listener = NflogListener(group=state.nflog_group, prefix=f"{prefix}-deny")
    listener.open()                # binds the group; raises NflogError with a clear sentence
    agg = DeniedAggregator(sessions.by_tunnel_ip)
    task = asyncio.create_task(pump_denied(listener, agg, emit))
    ...
    listener.close()               # unbinds; pump_denied drains the aggregator and returns

Only one socket per namespace can hold a group: a second ``open()`` of the same group fails
(the kernel answers EPERM) until the first socket is closed. The kernel also drops the binding
by itself when the owning socket goes away, so a crashed agent does not leave the group taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from vpnfleet.core.denied import (
    NFGENMSG,
    NFNL_SUBSYS_ULOG,
    NFULNL_MSG_CONFIG,
    NFULNL_PACKET_TYPE,
    NLATTR,
    NLMSG_ERROR,
    NLMSG_OVERRUN,
    NLMSGHDR,
    DeniedAggregator,
    DeniedEvent,
    DeniedPacket,
    iter_netlink,
    nl_align,
    parse_nflog_packet,
)

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNETLINK_V0 = 0

# nfnetlink_log configuration (linux/netfilter/nfnetlink_log.h).
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_CFG_CMD_PF_UNBIND = 4
NFULNL_COPY_PACKET = 2
_CFG_MODE = struct.Struct("!IBx")  # copy_range, copy_mode, pad (packed: 6 bytes)

# IPv4 header with options (60) + the transport fields we read: 128 leaves room to spare
# while keeping each logged packet small.
DEFAULT_COPY_RANGE = 128
DEFAULT_RCVBUF = 1 << 20
# The kernel batches several packets into one datagram of at most its buffer size (a page or
# two by default); this is comfortably more.
RECV_BUFSIZE = 1 << 17
# Datagrams read per wake-up before giving the event loop back.
READ_BATCH = 64
ACK_TIMEOUT = 2.0


class NflogError(RuntimeError):
    """The NFLOG group could not be bound or read; the message says why in one sentence."""


@dataclass
class NflogCounters:
    """What the listener has seen since it was opened (export these as metrics)."""

    datagrams: int = 0
    packets: int = 0
    overruns: int = 0
    foreign_prefix: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def decode_errors(self) -> int:
        """Messages that could not be decoded, all reasons together."""
        return sum(self.reasons.values())


def encode_config(seq: int, family: int, group: int, *attrs: tuple[int, bytes]) -> bytes:
    """An ``NFULNL_MSG_CONFIG`` request (with ACK) carrying ``attrs`` as (type, value)."""
    body = NFGENMSG.pack(family, NFNETLINK_V0, group)
    for atype, value in attrs:
        attr = NLATTR.pack(NLATTR.size + len(value), atype) + value
        body += attr + b"\0" * (nl_align(len(attr)) - len(attr))
    mtype = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _cmd(command: int) -> tuple[int, bytes]:
    return (NFULA_CFG_CMD, bytes([command]))


class NflogListener:
    """Async iterator of :class:`DeniedPacket` from one NFLOG group of this network namespace.

    ``prefix`` (e.g. ``vpnf-deny``) keeps only packets logged with that prefix; others sharing
    the group are counted as ``foreign_prefix``. Iterate with ``async for``; iteration ends
    after :meth:`close`. One consumer at a time.
    """

    def __init__(
        self,
        group: int,
        *,
        prefix: str | None = None,
        copy_range: int = DEFAULT_COPY_RANGE,
        rcvbuf: int = DEFAULT_RCVBUF,
        bind_pf: bool = True,
    ) -> None:
        if not 0 <= group <= 65535:
            raise ValueError(f"NFLOG group must be in 0..65535, not {group}")
        if not 20 <= copy_range <= 65535:
            raise ValueError(f"copy_range must be in 20..65535, not {copy_range}")
        self.group = group
        self.prefix = prefix
        self.copy_range = copy_range
        self.rcvbuf = rcvbuf
        self.bind_pf = bind_pf
        self.counters = NflogCounters()
        self._sock: socket.socket | None = None
        self._pending: deque[DeniedPacket] = deque()
        self._seq = itertools.count(1)
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._privileged = False

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._sock is not None

    def open(self) -> None:
        """Create the socket and bind the group (copy mode packet, ``copy_range`` bytes).

        Raises :class:`NflogError` when the kernel refuses (no CAP_NET_ADMIN, group taken,
        nfnetlink_log unavailable).
        """
        if self._sock is not None:
            return
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
            )
        except OSError as exc:
            raise NflogError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
        try:
            sock.bind((0, 0))
            self._set_rcvbuf(sock)
            # Requests are acknowledged synchronously by the kernel; the timeout only guards
            # against a kernel that never answers.
            sock.settimeout(ACK_TIMEOUT)
            self._sock = sock
            if self.bind_pf:
                # What libnetfilter_log and ulogd do: make nfnetlink_log the namespace's default
                # IPv4 logger. `-j NFLOG` does not need it on current kernels (it names its
                # logger), so failure here is not fatal.
                # Their success also proves CAP_NET_ADMIN, which tells the two causes of a
                # later EPERM apart.
                try:
                    for command in (NFULNL_CFG_CMD_PF_UNBIND, NFULNL_CFG_CMD_PF_BIND):
                        self._request(socket.AF_INET, 0, _cmd(command))
                    self._privileged = True
                except NflogError as exc:
                    log.debug("nflog: PF (un)bind refused: %s", exc)
            # Bind and set the copy mode in one message, so no packet arrives in between with
            # the default mode (whole packets).
            mode = _CFG_MODE.pack(self.copy_range, NFULNL_COPY_PACKET)
            self._request(
                socket.AF_UNSPEC, self.group, _cmd(NFULNL_CFG_CMD_BIND), (NFULA_CFG_MODE, mode)
            )
            sock.setblocking(False)
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def _set_rcvbuf(self, sock: socket.socket) -> None:
        # SO_RCVBUFFORCE (root/CAP_NET_ADMIN) may exceed net.core.rmem_max; fall back if refused.
        force = getattr(socket, "SO_RCVBUFFORCE", 33)
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, self.rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)

    def _request(self, family: int, group: int, *attrs: tuple[int, bytes]) -> None:
        """Send one config request and wait for its ACK (packets read meanwhile are kept)."""
        sock = self._sock
        assert sock is not None
        seq = next(self._seq)
        sock.sendto(encode_config(seq, family, group, *attrs), (0, 0))
        deadline = time.monotonic() + ACK_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = sock.recv(RECV_BUFSIZE)
            except TimeoutError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.counters.overruns += 1
                    continue
                raise NflogError(f"reading the NFLOG socket failed: {exc.strerror}") from exc
            error = self._consume(data, ack_seq=seq)
            if error is None:
                continue
            if error == 0:
                return
            raise NflogError(self._explain(-error))
        raise NflogError(f"the kernel did not answer the NFLOG request for group {group}")

    def _explain(self, err: int) -> str:
        if err == errno.EPERM and self._privileged:
            # The kernel answers EPERM, not EBUSY, when another socket owns the group.
            return (
                f"NFLOG group {self.group} is already bound by another process in this network "
                "namespace"
            )
        if err == errno.EPERM:
            return (
                f"NFLOG group {self.group} cannot be bound: it is bound by another process in "
                "this network namespace, or this process lacks CAP_NET_ADMIN there"
            )
        if err in (errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
            return "the kernel has no nfnetlink_log support (load the nfnetlink_log module)"
        name = errno.errorcode.get(err, str(err))
        return f"the kernel refused the NFLOG request for group {self.group}: {name}"

    def _consume(self, data: bytes, ack_seq: int | None = None) -> int | None:
        """Decode one datagram into the pending queue; returns the ACK error for ``ack_seq``."""
        self.counters.datagrams += 1
        now = time.time()
        ack: int | None = None
        for msg in iter_netlink(data, self.counters.reasons):
            if msg.type == NFULNL_PACKET_TYPE:
                pkt = parse_nflog_packet(msg.body, now, self.counters.reasons)
                if pkt is None:
                    continue
                if self.prefix is not None and pkt.prefix != self.prefix:
                    self.counters.foreign_prefix += 1
                    continue
                self.counters.packets += 1
                self._pending.append(pkt)
            elif msg.type == NLMSG_ERROR and len(msg.body) >= 4:
                code = int(struct.unpack_from("=i", msg.body)[0])
                if ack_seq is not None and msg.seq == ack_seq:
                    ack = code
                elif code:
                    log.debug("nflog: late netlink error %d for request %d", code, msg.seq)
            elif msg.type == NLMSG_OVERRUN:
                self.counters.overruns += 1
        return ack

    def _read_available(self) -> None:
        """Read up to :data:`READ_BATCH` datagrams without blocking."""
        sock = self._sock
        if sock is None:
            return
        for _ in range(READ_BATCH):
            try:
                data = sock.recv(RECV_BUFSIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                # ENOBUFS: the receive buffer overflowed and the kernel dropped messages. The
                # socket stays usable; what was lost is only counted.
                if exc.errno == errno.ENOBUFS:
                    self.counters.overruns += 1
                    continue
                raise NflogError(f"reading the NFLOG socket failed: {exc.strerror}") from exc
            self._consume(data)

    async def _wait_readable(self) -> None:
        sock = self._sock
        assert sock is not None
        if self._waiter is not None:
            raise RuntimeError("NflogListener is already being read by another task")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._loop, self._waiter = loop, fut
        fd = sock.fileno()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            self._waiter = None
            # close() already removed the reader when it closed the socket.
            if self._sock is not None:
                loop.remove_reader(fd)

    def __aiter__(self) -> NflogListener:
        return self

    async def __anext__(self) -> DeniedPacket:
        """The next denied packet; waits for the socket to become readable."""
        while not self._pending:
            if self._sock is None:
                raise StopAsyncIteration
            # Waiting first, even when data may already be queued, is what yields to the event
            # loop between batches under a sustained flood.
            await self._wait_readable()
            self._read_available()
        return self._pending.popleft()

    def close(self) -> None:
        """Unbind the group and close the socket; a pending ``async for`` ends. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._waiter is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            _wake(self._waiter)
        # Best effort: the kernel also releases the group when the socket closes.
        with contextlib.suppress(OSError):
            msg = encode_config(
                next(self._seq), socket.AF_UNSPEC, self.group, _cmd(NFULNL_CFG_CMD_UNBIND)
            )
            sock.sendto(msg, (0, 0))
        sock.close()

    async def __aenter__(self) -> NflogListener:
        self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def pump_denied(
    listener: NflogListener,
    aggregator: DeniedAggregator,
    emit: Callable[[DeniedEvent], None],
    *,
    tick: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Feed the listener's packets into ``aggregator`` and ``emit`` every finished event.

    Closed windows are flushed at least every ``tick`` seconds even when no packet arrives.
    Returns when the listener is closed; on return or cancellation the open window is drained,
    so no counted attempt is lost on shutdown.
    """
    it = aiter(listener)
    try:
        while True:
            try:
                async with asyncio.timeout(tick):
                    pkt = await anext(it)
            except TimeoutError:
                pass
            except StopAsyncIteration:
                break
            else:
                for event in aggregator.add(pkt):
                    emit(event)
            for event in aggregator.flush(clock()):
                emit(event)
    finally:
        for event in aggregator.drain():
            emit(event)
