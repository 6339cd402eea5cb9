"""Cutting open connections: the conntrack entries of flows a policy no longer allows.

Called by the firewall sync once a new state is in place, so the next packet of a cut flow is
judged as NEW by the new policy. Three ways, from the broadest to the most exact:

* by client and grant (:meth:`FlowCutter.cut_revoked`, :meth:`FlowCutter.kill_flows`): what a
  diff revoked. Each ``conntrack`` run walks the kernel's whole table (milliseconds, even when
  nothing matches), so one cut lists once for all lost grants and runs independent deletions
  side by side (at most ``_CONNTRACK_PARALLEL`` processes);
* by listing the whole table (:meth:`FlowCutter.reconcile_flows`): when nothing says what was
  revoked and no flow index is at hand;
* by exact tuple (:meth:`FlowCutter.delete_flows_exact`): when the flow index (the conntrack
  listener's table) says which entries are open: TCP and UDP entries deleted over ctnetlink,
  one hash lookup each in the kernel and many per system call, no table walk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from vpnfleet.agent.netcommands import CommandRunner, DataplaneError, DataplaneStats
from vpnfleet.core import ctnetlink, revocation
from vpnfleet.core.fwdiff import StateDiff
from vpnfleet.core.fwkernel import parse_conntrack
from vpnfleet.core.fwstate import DesiredState, is_allowed
from vpnfleet.core.grants import Grant
from vpnfleet.core.revocation import Flow

log = logging.getLogger(__name__)

_DELETED_RE = re.compile(r"(\d+) flow entries have been deleted")
# conntrack processes running at once. Every -L/-D walks the kernel's whole conntrack hash
# table (about 6 ms at 262144 buckets, however few entries match), so independent ones run
# side by side; a mass disconnect must not fork hundreds at once.
_CONNTRACK_PARALLEL = 4
# Exact deletions sent per system call. The kernel handles a whole batch inside the call and
# queues one acknowledgement per message (a few hundred bytes of socket buffer each, more for
# an error, which echoes the request): a bounded batch keeps them all within the buffer.
_CT_DELETE_BATCH = 128
_CT_ACK_RCVBUF = 1 << 20


class FlowCutter:
    """Deletes conntrack entries; counts them in the dataplane's ``stats``."""

    def __init__(self, commands: CommandRunner, stats: DataplaneStats) -> None:
        self._commands = commands
        self.stats = stats
        self._conntrack_slots = asyncio.Semaphore(_CONNTRACK_PARALLEL)
        self._netlink_seq = int(time.time()) & 0xFFFF

    async def cut_revoked(self, d: StateDiff, keep: DesiredState) -> int:
        """Delete conntrack entries of the flows ``d`` revoked, unless ``keep`` allows them.

        Disconnected clients: delete by address (two conntrack runs each, in parallel). Lost
        grants: one listing for all of them, then delete what matches. Returns how many.
        """
        gone = [rf.client for rf in d.revoked_flows if rf.grant is None]
        lost: dict[IPv4Address, list[Grant]] = {}
        for rf in d.revoked_flows:
            if rf.grant is not None:
                lost.setdefault(rf.client, []).append(rf.grant)
        jobs = [self.kill_flows(client, None, keep=keep) for client in gone]
        if lost:
            jobs.append(self._kill_lost_grants(lost, keep))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.stats.last_error = str(errors[0])
            raise errors[0]
        return sum(r for r in results if isinstance(r, int))

    async def _kill_lost_grants(
        self, lost: dict[IPv4Address, list[Grant]], keep: DesiredState
    ) -> int:
        """Delete flows of clients matching grants they lost, unless ``keep`` allows them.

        One ``conntrack -L`` serves every (client, grant) pair: every listing costs a walk
        of the kernel table, so it is narrowed by the client or the grant when there is only
        one of them, and filtered here otherwise.
        """
        grants = {g for gs in lost.values() for g in gs}
        args: list[str] = []
        if len(lost) == 1:
            args += ["-s", str(next(iter(lost)))]
        if len(grants) == 1:
            (grant,) = grants
            args += _dst_filter(grant.network)
            if grant.proto != "any":
                args += ["-p", grant.proto]
        _, out, _ = await self._conntrack("-L", *args)
        victims = [
            f
            for f in parse_conntrack(out)
            if (held := lost.get(f.src)) is not None
            and any(g.matches(f.proto, f.dst, f.dport) for g in held)
            and not is_allowed(keep, f.src, f.proto, f.dst, f.dport)
        ]
        return await self._delete_flows(victims)

    async def kill_flows(
        self,
        client_ip: IPv4Address,
        grant: Grant | None = None,
        *,
        keep: DesiredState | None = None,
    ) -> int:
        """Delete conntrack entries of ``client_ip``; returns how many were deleted.

        ``grant=None`` means every flow the client opened, and, unless ``keep`` still has the
        client connected, flows opened towards it (gateway mode) too. With ``grant`` only
        flows the client opened that match it go. With ``keep``, flows that state still
        allows are spared, so a grant revoked in one group but held through another does not
        cut connections.
        """
        still_connected = keep is not None and client_ip in keep.all_clients
        if grant is None and not still_connected:
            n = await self._conntrack_deletes([("-s", str(client_ip)), ("-d", str(client_ip))])
            self.stats.flows_killed += n
            return n
        args = ["-s", str(client_ip)]
        if grant is not None:
            args += _dst_filter(grant.network)
            if grant.proto != "any":
                args += ["-p", grant.proto]
        _, out, _ = await self._conntrack("-L", *args)
        victims = [
            f
            for f in parse_conntrack(out)
            if f.src == client_ip
            and (grant is None or grant.matches(f.proto, f.dst, f.dport))
            and not (keep and is_allowed(keep, f.src, f.proto, f.dst, f.dport))
        ]
        return await self._delete_flows(victims)

    async def cut_disallowed(self, state: DesiredState, open_flows: Sequence[Flow] | None) -> int:
        """Delete every open flow ``state`` would not let start now; returns how many.

        With ``open_flows`` (the flow index: what the conntrack listener knows is open) only
        those are judged, and the disallowed ones deleted by their exact tuples; without it the
        kernel's whole table is listed (:meth:`reconcile_flows`).
        """
        if open_flows is None:
            return await self.reconcile_flows(state)
        return await self.delete_flows_exact(revocation.flows_to_cut(state, open_flows))

    async def reconcile_flows(self, state: DesiredState) -> int:
        """Delete every open flow ``state`` would not let start now; returns how many.

        For the first apply after an agent restart (no old state to diff against) and for
        periodic reconciles: a revoke or disconnect missed while the agent was down must not
        leave connections running.
        """
        _, out, _ = await self._conntrack("-L")
        return await self._delete_flows(revocation.flows_to_cut(state, parse_conntrack(out)))

    async def _delete_flows(self, flows: Sequence[Flow]) -> int:
        # Allowance depends only on (client, proto, dst, dport), so one delete per such key
        # removes every flow there, all equally disallowed.
        keys = {
            (f.src, f.protonum, f.dst, f.dport if f.proto in ("tcp", "udp") else None)
            for f in flows
        }
        filters: list[tuple[str, ...]] = []
        for src, protonum, dst, dport in sorted(keys, key=str):
            cmd = ["-s", str(src), "-d", str(dst), "-p", str(protonum)]
            if dport is not None:
                cmd += ["--dport", str(dport)]
            filters.append(tuple(cmd))
        n = await self._conntrack_deletes(filters)
        self.stats.flows_killed += n
        return n

    async def delete_flows_exact(self, flows: Sequence[Flow]) -> int:
        """Delete exactly these conntrack entries (original-direction tuples); returns how
        many were deleted. An entry already gone counts 0; any other refusal raises
        :class:`DataplaneError` after every deletion was tried (what was deleted is counted
        in the stats either way).

        TCP and UDP entries are deleted by tuple over ctnetlink from this process, which must
        then run in the namespace whose table it means. With :attr:`netns` set it cannot (a
        netlink socket belongs to the namespace of the process that opens it), so each goes
        through ``conntrack -D`` with its full tuple instead. Other protocols (ICMP is keyed by
        type, code and id, which a :class:`Flow` does not keep) go through ``conntrack -D``
        by source, destination and protocol, which takes their siblings between the same two
        addresses too.
        """
        exact: list[Flow] = []
        other: list[Flow] = []
        for f in dict.fromkeys(flows):  # each tuple once
            tcp_udp = f.protonum in (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
            (exact if tcp_udp and f.sport is not None and f.dport is not None else other).append(f)
        jobs = [self._delete_flows(other)] if other else []
        if exact and self._commands.netns is None:
            jobs.append(self._delete_by_netlink(exact))
        elif exact:
            jobs.append(self._delete_by_tuple(exact))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.stats.last_error = str(errors[0])
            raise errors[0]
        return sum(r for r in results if isinstance(r, int))

    async def _delete_by_tuple(self, flows: Sequence[Flow]) -> int:
        """``conntrack -D`` per entry, with its full tuple (for another namespace)."""
        filters = [
            ("-s", str(f.src), "-d", str(f.dst), "-p", f.proto,
             "--sport", str(f.sport), "--dport", str(f.dport))
            for f in flows
        ]  # fmt: skip
        n = await self._conntrack_deletes(filters)
        self.stats.flows_killed += n
        return n

    async def _delete_by_netlink(self, flows: Sequence[Flow]) -> int:
        """ctnetlink deletions by tuple, in batches; each batch's acks are read (bounded by
        :attr:`timeout`) before the next is sent."""
        loop = asyncio.get_running_loop()
        deleted = 0
        refused: list[tuple[Flow, int]] = []
        pending: dict[int, Flow] = {}
        try:
            kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
            sock = socket.socket(socket.AF_NETLINK, kind, ctnetlink.NETLINK_NETFILTER)
        except OSError as exc:
            raise DataplaneError("ctnetlink", -1, f"cannot open a netlink socket: {exc}") from exc
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # the default buffer also holds a batch
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CT_ACK_RCVBUF)
            sock.bind((0, 0))
            async with asyncio.timeout(self._commands.timeout):
                for start in range(0, len(flows), _CT_DELETE_BATCH):
                    messages = []
                    for f in flows[start : start + _CT_DELETE_BATCH]:
                        self._netlink_seq = seq = (self._netlink_seq + 1) & 0xFFFFFFFF
                        assert f.sport is not None and f.dport is not None
                        messages.append(
                            ctnetlink.encode_ct_delete(
                                seq, f.protonum, str(f.src), str(f.dst), f.sport, f.dport
                            )
                        )
                        pending[seq] = f
                    await loop.sock_sendall(sock, b"".join(messages))
                    while pending:
                        data = await loop.sock_recv(sock, 1 << 16)
                        for seq, code in ctnetlink.parse_acks(data):
                            sent = pending.pop(seq, None)  # None: not ours (cannot happen)
                            if sent is None or code == errno.ENOENT:
                                continue  # ENOENT: already gone, nothing to count
                            if code == 0:
                                deleted += 1
                            else:
                                refused.append((sent, code))
        except TimeoutError:
            raise DataplaneError(
                "ctnetlink",
                None,
                f"{len(pending)} deletions unanswered after {self._commands.timeout:.0f}s",
            ) from None
        except (OSError, ctnetlink.MalformedMessage) as exc:
            raise DataplaneError("ctnetlink", -1, f"conntrack deletion failed: {exc}") from exc
        finally:
            sock.close()
            self.stats.flows_killed += deleted
        if refused:
            f, code = refused[0]
            raise DataplaneError(
                "ctnetlink",
                -1,
                f"{len(refused)} of {len(flows)} deletions refused: {os.strerror(code)} "
                f"(first: {f.proto} {f.src}:{f.sport} -> {f.dst}:{f.dport})",
            )
        return deleted

    async def _conntrack_deletes(self, filters: Sequence[Sequence[str]]) -> int:
        """Run one ``conntrack -D`` per filter (side by side); total entries deleted.

        All of them run even when one fails; the first failure is raised afterwards, with
        what the others deleted already counted in the stats.
        """
        results = await asyncio.gather(
            *(self._conntrack_delete(*f) for f in filters), return_exceptions=True
        )
        counts = [r for r in results if isinstance(r, int)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.stats.flows_killed += sum(counts)
            raise errors[0]
        return sum(counts)

    async def _conntrack_delete(self, *args: str) -> int:
        # conntrack exits 1 when nothing matched; that is success here.
        rc, _, err = await self._conntrack("-D", *args)
        m = _DELETED_RE.search(err)
        if rc == 1 and m is None:
            raise DataplaneError("conntrack", rc, err)
        return int(m.group(1)) if m else 0

    async def _conntrack(self, *args: str) -> tuple[int, str, str]:
        # Exit status 1 means "nothing matched" for -L and -D; callers tell it from errors.
        async with self._conntrack_slots:
            return await self._commands.run("conntrack", *args, ok=(0, 1))


def _dst_filter(network: IPv4Network) -> list[str]:
    if network.prefixlen == 0:
        return []
    if network.prefixlen == 32:
        return ["-d", str(network.network_address)]
    return ["-d", str(network.network_address), "--mask-dst", str(network.netmask)]
