"""The pod's dataplane runner: iptables, ipset, conntrack, routes and sysctls, nothing else does.

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
  a revoked flow is judged as NEW by the new policy: :meth:`Dataplane.apply` changes sets and
  rules only, and :meth:`Dataplane.cut_revoked` follows it. A full apply without an old state
  (agent restart, or after a failed apply) cannot know what was revoked: the agent follows it
  with :meth:`Dataplane.cut_disallowed`, over its flow index when it has one. The cutting
  itself is :mod:`vpnfleet.agent.flowcuts`; every command goes through
  :mod:`vpnfleet.agent.netcommands`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from ipaddress import IPv4Network

from vpnfleet.agent import sysctls
from vpnfleet.agent.flowcuts import FlowCutter
from vpnfleet.agent.netcommands import CommandRunner, DataplaneError, DataplaneStats
from vpnfleet.core import fwdiff, fwkernel, fwrender
from vpnfleet.core.fwdiff import StateDiff
from vpnfleet.core.fwkernel import KernelState
from vpnfleet.core.fwnames import validate_prefix
from vpnfleet.core.fwstate import DesiredState
from vpnfleet.core.revocation import Flow

log = logging.getLogger(__name__)

# Our mark on the host routes of gateway users on the TCP server (`ip route ... proto N`; the
# number is unassigned in iproute2's rt_protos and differs from gateway-routes' 241).
HOST_ROUTE_PROTO = "242"

# Destroying a set right after the last rule referencing it went away can briefly fail with
# "in use" while the kernel releases the reference; retry a few times.
_DESTROY_ATTEMPTS = 5


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
        self._commands = CommandRunner(netns, timeout)
        self.stats = DataplaneStats()
        self.flows = FlowCutter(self._commands, self.stats)
        # The state last applied in full success; None forces the next apply() to resync.
        self.applied: DesiredState | None = None

    # --- commands -------------------------------------------------------------------------

    async def _run(
        self, *argv: str, stdin: str | None = None, ok: Sequence[int] = (0,)
    ) -> tuple[int, str, str]:
        return await self._commands.run(*argv, stdin=stdin, ok=ok)

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
        """Delete conntrack entries of the flows ``d`` revoked, unless ``keep`` allows them."""
        self._check_prefix(keep)
        return await self.flows.cut_revoked(d, keep)

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

    # --- conntrack (the cutting is flowcuts.py; ``self.flows``) ----------------------------

    async def cut_disallowed(self, state: DesiredState, open_flows: Sequence[Flow] | None) -> int:
        """Delete every open flow ``state`` would not let start now (over ``open_flows``, the
        flow index, when given; else by listing the table)."""
        self._check_prefix(state)
        return await self.flows.cut_disallowed(state, open_flows)

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

    async def host_routes(self) -> dict[str, str]:
        """The host routes the agent owns (its ``proto`` mark): address -> device."""
        _, out, _ = await self._run("ip", "-j", "route", "show", "proto", HOST_ROUTE_PROTO)
        try:
            rows = json.loads(out or "[]")
        except ValueError as exc:
            raise DataplaneError("ip route show", 0, f"unreadable listing: {exc}") from None
        return {str(r["dst"]).split("/")[0]: str(r.get("dev", "")) for r in rows if "dst" in r}

    async def set_host_route(self, address: str, dev: str) -> None:
        """Route ``address``/32 into ``dev``, more specific than the gateway pool's route."""
        await self._run(
            "ip", "route", "replace", f"{address}/32", "dev", dev, "proto", HOST_ROUTE_PROTO
        )

    async def del_host_route(self, address: str) -> None:
        """Remove the host route of ``address`` (gone already, with its device: fine)."""
        await self._run("ip", "route", "del", f"{address}/32", "proto", HOST_ROUTE_PROTO, ok=(0, 2))

    # --- sysctls --------------------------------------------------------------------------

    async def ensure_sysctls(self) -> None:
        """Check forwarding and conntrack accounting/timestamps in this namespace and write
        only what differs (:mod:`vpnfleet.agent.sysctls`); raises
        :class:`~vpnfleet.agent.sysctls.SysctlsMissing` naming every setting still wrong."""
        if self.netns is None:
            written = sysctls.ensure()
        else:
            written = await self._ensure_sysctls_in_netns()
        if written:
            log.info("set %s", ", ".join(f"{k}={dict(sysctls.SYSCTLS)[k]}" for k in written))

    async def _read_sysctls_in_netns(self) -> dict[str, str | None]:
        current: dict[str, str | None] = {}
        for key, _ in sysctls.SYSCTLS:
            path = sysctls.path_of(key)
            rc, out, _ = await self._run("cat", str(path), ok=(0, 1))
            current[key] = " ".join(out.split()) if rc == 0 else None
        return current

    async def _ensure_sysctls_in_netns(self) -> list[str]:
        written: list[str] = []
        reasons: list[str] = []
        for s in sysctls.shortfalls(await self._read_sysctls_in_netns()):
            if s.have is None:
                continue
            try:
                await self._run("sysctl", "-q", "-w", f"{s.key}={s.want}")
            except DataplaneError as exc:
                reasons.append(str(exc))
                continue
            written.append(s.key)
        left = sysctls.shortfalls(await self._read_sysctls_in_netns())
        if left:
            raise sysctls.SysctlsMissing(left, "; ".join(reasons[:1]))
        return written
