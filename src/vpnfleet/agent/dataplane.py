"""The pod's dataplane runner: the only code that runs iptables, ipset, conntrack and sysctl.

It applies states rendered by :mod:`vpnfleet.core.fwrender` and changes computed by
:mod:`vpnfleet.core.fwdiff`, reads the kernel back (:mod:`vpnfleet.core.fwkernel`), reports
drift and deletes conntrack entries of revoked flows (:mod:`vpnfleet.core.revocation`). Every
command runs through ``asyncio.create_subprocess_exec`` (no shell); restore text goes to stdin.

Failure model (why a failed apply never leaves the pod open):

* A full apply is three steps: ``ipset restore`` (sets created or swapped in, stale sets
  flushed), ``iptables-restore --noflush`` (our chains replaced and jumps fixed in one
  transaction), then destroying stale sets. Sets are only ever added in step 1, so whichever
  step fails, every rule in the kernel still references an existing set.
* Step 1 failing midway leaves some sets with new and some with old content under the old
  rules; step 2 failing leaves new set content under the old rules. Removed groups are already
  disabled (their sets were flushed in step 1); a brand-new group just has no rule yet.
  Either way :class:`DataplaneError` is raised and :attr:`Dataplane.applied` is cleared, so
  the next :meth:`Dataplane.apply` does a full resync.
* Step 3 failing only leaves unreferenced empty sets behind; it is retried on the next apply
  and reported by :meth:`Dataplane.check_drift`.
* An incremental apply is one ``ipset restore`` whose operations :func:`fwdiff.diff` ordered
  safely; if it fails (a set went missing, a hash filled up), a full resync follows.
* Conntrack entries are deleted only after the new policy is in place, so the next packet of
  a revoked flow is judged as NEW by the new policy (:meth:`Dataplane.apply` changes sets and
  rules only; :meth:`Dataplane.cut_revoked` follows it). A full apply without an old state
  (agent restart, or after a failed apply) cannot know what was revoked: the agent follows it
  with :meth:`Dataplane.cut_disallowed`, over its flow index when it has one.
  Each ``conntrack`` run walks the kernel's whole table (milliseconds, even when nothing
  matches), so one apply lists once for all lost grants and runs independent deletions side by
  side (at most ``_CONNTRACK_PARALLEL`` processes).
* A caller that already knows the exact entries (the flow tracker's index) deletes them with
  :meth:`Dataplane.delete_flows_exact`: TCP and UDP entries by tuple over ctnetlink, one hash
  lookup each in the kernel and many per system call, no table walk.
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
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from vpnfleet.core import ctnetlink, fwdiff, fwkernel, fwrender, revocation
from vpnfleet.core.fwdiff import StateDiff
from vpnfleet.core.fwkernel import KernelState, parse_conntrack
from vpnfleet.core.fwnames import validate_prefix
from vpnfleet.core.fwstate import DesiredState, is_allowed
from vpnfleet.core.grants import Grant
from vpnfleet.core.revocation import Flow

log = logging.getLogger(__name__)

SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.ip_forward", "1"),
    # Flow records need byte counters and start/stop timestamps on every conntrack entry.
    ("net.netfilter.nf_conntrack_acct", "1"),
    ("net.netfilter.nf_conntrack_timestamp", "1"),
)

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
# Destroying a set right after the last rule referencing it went away can briefly fail with
# "in use" while the kernel releases the reference; retry a few times.
_DESTROY_ATTEMPTS = 5


class DataplaneError(RuntimeError):
    """A dataplane command failed; carries the command name and its stderr."""

    def __init__(self, command: str, returncode: int | None, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr.strip()
        how = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{command} {how}: {self.stderr or 'no error output'}")


@dataclass
class DataplaneStats:
    """Counters for metrics; read them, do not write them."""

    full_applies: int = 0
    diff_applies: int = 0
    fallbacks: int = 0
    failures: int = 0
    flows_killed: int = 0
    last_apply_seconds: float = 0.0
    last_apply_kind: str = ""
    last_error: str = ""


class Dataplane:
    """Applies desired states for one prefix, optionally inside a named network namespace."""

    def __init__(
        self,
        prefix: str,
        *,
        netns: str | None = None,
        iptables: str = "iptables",
        timeout: float = 30.0,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.netns = netns
        self.timeout = timeout
        self._iptables = iptables
        self._lock = asyncio.Lock()
        self._conntrack_slots = asyncio.Semaphore(_CONNTRACK_PARALLEL)
        self._netlink_seq = int(time.time()) & 0xFFFF
        self.stats = DataplaneStats()
        # The state last applied in full success; None forces the next apply() to resync.
        self.applied: DesiredState | None = None

    # --- commands -------------------------------------------------------------------------

    async def _run(
        self, *argv: str, stdin: str | None = None, ok: Sequence[int] = (0,)
    ) -> tuple[int, str, str]:
        cmd = [*(("ip", "netns", "exec", self.netns) if self.netns else ()), *argv]
        name = argv[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise DataplaneError(name, -1, str(exc)) from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout
            )
        except BaseException as exc:
            # Timed out or cancelled: never leave a half-done restore running behind the next
            # apply.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, TimeoutError):
                raise DataplaneError(name, None, f"no answer within {self.timeout:.0f}s") from None
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if rc not in ok:
            raise DataplaneError(name, rc, stderr)
        return rc, stdout, stderr

    async def _ipset_restore(self, text: str) -> None:
        if text.strip():
            await self._run("ipset", "-exist", "restore", stdin=text)

    async def _iptables_restore(self, text: str) -> None:
        if text.strip():
            await self._run(f"{self._iptables}-restore", "-w", "--noflush", stdin=text)

    async def _destroy_sets(self, names: Sequence[str]) -> None:
        remaining = list(names)
        for attempt in range(_DESTROY_ATTEMPTS):
            if not remaining:
                return
            try:
                await self._ipset_restore("".join(f"destroy {n}\n" for n in remaining))
                return
            except DataplaneError:
                if attempt == _DESTROY_ATTEMPTS - 1:
                    raise
                # restore stops at the first failure: see what is still there and retry.
                await asyncio.sleep(0.05 * 2**attempt)
                _, out, _ = await self._run("ipset", "list", "-n")
                present = set(out.split())
                remaining = [n for n in remaining if n in present]

    # --- reading --------------------------------------------------------------------------

    async def read_kernel(self) -> KernelState:
        """Snapshot our sets, chains and jumps from the kernel."""
        _, sets_text, _ = await self._run("ipset", "save")
        _, filter_text, _ = await self._run(self._iptables, "-w", "-t", "filter", "-S")
        _, nat_text, _ = await self._run(self._iptables, "-w", "-t", "nat", "-S")
        fc, fj = fwkernel.parse_iptables_s(filter_text, "filter", self.prefix)
        nc, nj = fwkernel.parse_iptables_s(nat_text, "nat", self.prefix)
        return KernelState(
            prefix=self.prefix,
            sets=fwkernel.parse_ipset_save(sets_text, self.prefix),
            chains={**fc, **nc},
            jumps={**fj, **nj},
        )

    async def check_drift(self, state: DesiredState) -> list[str]:
        """Describe every difference between the kernel and ``state`` (empty when in sync)."""
        self._check_prefix(state)
        return fwkernel.drift(state, await self.read_kernel())

    # --- applying -------------------------------------------------------------------------

    def _check_prefix(self, state: DesiredState) -> None:
        if state.prefix != self.prefix:
            raise ValueError(f"state prefix {state.prefix!r} != dataplane prefix {self.prefix!r}")

    async def apply(self, state: DesiredState) -> StateDiff | None:
        """Move sets and rules to ``state``: incrementally from the last applied state (the
        diff is returned), else a full resync (None). Open connections are left alone: cut the
        diff's revoked flows with :meth:`cut_revoked` once this returns."""
        if self.applied is None:
            await self.apply_full(state)
            return None
        return await self._apply_sets(self.applied, state)

    async def apply_full(self, state: DesiredState) -> None:
        """Complete, atomic-per-step resync of sets, chains and jumps; removes stale sets."""
        self._check_prefix(state)
        async with self._lock:
            started = time.monotonic()
            self.applied = None
            try:
                await self._apply_full_locked(state)
            except Exception as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                raise
            self.applied = state
            self.stats.full_applies += 1
            self._finish("full", started)

    async def _apply_full_locked(self, state: DesiredState) -> None:
        kernel = await self.read_kernel()
        wrong = fwrender.mismatched_sets(state, kernel)
        if wrong:
            # A set of the wrong type cannot be swapped: drop every set reference with a
            # fail-closed chain, recreate those sets, then continue as usual.
            log.warning("recreating ipsets with the wrong type: %s", ", ".join(wrong))
            await self._iptables_restore(
                fwrender.render_lockdown(self.prefix, state.tunnel_networks, kernel)
            )
            await self._destroy_sets(wrong)
            kernel = await self.read_kernel()
        ipset_text, iptables_text = fwrender.render_full(state, kernel)
        await self._ipset_restore(ipset_text)
        await self._iptables_restore(iptables_text)
        stale = fwrender.stale_sets(state, kernel)
        if stale:
            try:
                await self._destroy_sets(stale)
            except DataplaneError as exc:
                # Harmless leftovers (empty, unreferenced by our rules); drift reports them.
                log.warning("could not destroy stale ipsets: %s", exc)

    async def apply_diff(self, old: DesiredState, new: DesiredState) -> StateDiff:
        """Apply the element changes from ``old`` to ``new`` (full resync when rules change),
        then delete conntrack entries of flows that lost access."""
        d = await self._apply_sets(old, new)
        await self.cut_revoked(d, new)
        return d

    async def _apply_sets(self, old: DesiredState, new: DesiredState) -> StateDiff:
        self._check_prefix(new)
        d = fwdiff.diff(old, new)
        if d.needs_full:
            await self.apply_full(new)
        else:
            async with self._lock:
                started = time.monotonic()
                self.applied = None
                try:
                    await self._ipset_restore(fwdiff.render_ops(d.ops))
                except DataplaneError as exc:
                    log.warning("incremental apply failed, resyncing: %s", exc)
                    self.stats.fallbacks += 1
                    ok = False
                else:
                    ok = True
                    self.applied = new
                    self.stats.diff_applies += 1
                    self._finish("diff", started)
            if not ok:
                await self.apply_full(new)
        return d

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

    def _finish(self, kind: str, started: float) -> None:
        self.stats.last_apply_seconds = time.monotonic() - started
        self.stats.last_apply_kind = kind

    async def remove_all(self) -> None:
        """Remove our jumps, chains and sets (agent shutdown, lab down). Idempotent."""
        async with self._lock:
            self.applied = None
            kernel = await self.read_kernel()
            iptables_text, _ = fwrender.render_teardown(kernel)
            await self._iptables_restore(iptables_text)
            if kernel.sets:
                await self._destroy_sets(sorted(kernel.sets))

    # --- conntrack ------------------------------------------------------------------------

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
        self._check_prefix(state)
        return await self.delete_flows_exact(revocation.flows_to_cut(state, open_flows))

    async def reconcile_flows(self, state: DesiredState) -> int:
        """Delete every open flow ``state`` would not let start now; returns how many.

        For the first apply after an agent restart (no old state to diff against) and for
        periodic reconciles: a revoke or disconnect missed while the agent was down must not
        leave connections running.
        """
        self._check_prefix(state)
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
        if exact and self.netns is None:
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
            async with asyncio.timeout(self.timeout):
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
                "ctnetlink", None, f"{len(pending)} deletions unanswered after {self.timeout:.0f}s"
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
            return await self._run("conntrack", *args, ok=(0, 1))

    # --- routes ---------------------------------------------------------------------------

    async def route_into(self, network: IPv4Network, dev: str, attempts: int = 50) -> None:
        """Route ``network`` into the tunnel device ``dev`` (the gateway pool is another subnet
        than the tunnel's own); retried while the device is still being created."""
        err: DataplaneError | None = None
        for _ in range(attempts):
            try:
                await self._run("ip", "route", "replace", str(network), "dev", dev)
                return
            except DataplaneError as exc:
                err = exc
                await asyncio.sleep(0.1)  # tun0 appears a moment after hold release
        assert err is not None
        raise err

    # --- sysctls --------------------------------------------------------------------------

    async def ensure_sysctls(self) -> None:
        """Enable forwarding and conntrack accounting/timestamps in this namespace."""
        await self._run("sysctl", "-q", "-w", *(f"{k}={v}" for k, v in SYSCTLS))


def _dst_filter(network: IPv4Network) -> list[str]:
    if network.prefixlen == 0:
        return []
    if network.prefixlen == 32:
        return ["-d", str(network.network_address)]
    return ["-d", str(network.network_address), "--mask-dst", str(network.netmask)]
