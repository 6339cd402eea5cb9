"""The firewall sync: keeps the pod's kernel state equal to the newest desired state.

One task owns the firewall runner, so applies, drift checks and conntrack cuts never overlap.
Whoever changes something the firewall depends on (the fleet view, the session book) calls
:meth:`FirewallSync.poke`; the loop coalesces pokes and asks ``source`` for the newest
``(revision, desired state)`` pair only when it is about to apply, so one apply catches up
with any number of changes.

What it reports is what the kernel holds: :attr:`applied_revision` is the revision of the view
the *applied* state was built from, recorded together with that state after the apply
succeeded (never the view's revision while an apply is pending or running). A change that
does not concern the firewall (:meth:`note_revision`) advances it only when nothing is pending,
because then the kernel's state is also the state of that revision.

Revocations are never lost. Incremental applies cut the flows their diff revoked. Whenever
the sync cannot know what was revoked (the first apply after a (re)start, an apply or a cut
that failed, a drift repair), the next successful apply is followed by a cut of every open
flow the applied state disallows, over the flow index when the conntrack listener has a
complete one, else by listing the kernel's table. Drift is judged against the state last
applied, and only while no apply is pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.netcommands import DataplaneError
from vpnfleet.agent.runners import FirewallRunner
from vpnfleet.core import fwstate, revocation

log = logging.getLogger("vpnfleet.agent.firewall")

RETRY_DELAY = 0.5  # after a failed apply; doubles up to MAX_RETRY_DELAY
MAX_RETRY_DELAY = 10.0

StateSource = Callable[[], tuple[int, fwstate.DesiredState]]
FlowIndex = Callable[[], Sequence[revocation.Flow] | None]


class FirewallSync:
    """Applies the newest desired state; records what the kernel enforces."""

    def __init__(
        self,
        runner: FirewallRunner,
        source: StateSource,
        *,
        open_flows: FlowIndex | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.runner = runner
        self._source = source
        self._open_flows = open_flows
        self._metrics = metrics
        self._dirty = asyncio.Event()
        self._drift_due = False
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._first = asyncio.Event()
        self._busy = False
        # (revision, state) the kernel holds; revision advanced by note_revision when idle.
        self._state: fwstate.DesiredState | None = None
        self._revision = 0
        self._latest = 0  # newest revision the view reached
        # Set at start and whenever revocations may have been missed; cleared by a cut.
        self._flows_unreconciled = True
        self.drift_repairs = 0
        self.failures = 0

    # ------------------------------------------------------------------ what others read

    @property
    def applied_revision(self) -> int:
        """Revision of the fleet view whose firewall state is in the kernel."""
        return self._revision

    @property
    def applied_state(self) -> fwstate.DesiredState | None:
        """The state in the kernel (None before the first apply)."""
        return self._state

    @property
    def ready(self) -> bool:
        """True once a first state is in the kernel."""
        return self._first.is_set()

    async def wait_ready(self) -> None:
        """Return once a first state is in the kernel."""
        await self._first.wait()

    # ------------------------------------------------------------------ what others say

    def start(self) -> None:
        """Allow applying: the session book is complete (fresh start, or clients adopted).

        Until then pokes only accumulate, so a restarted agent never applies a state that
        lacks the clients it has not adopted yet (and then cuts their flows)."""
        self._started.set()
        self.poke()  # the first apply is due whatever changed meanwhile

    def poke(self) -> None:
        """Something the desired state depends on changed."""
        self._dirty.set()
        self._wake.set()

    def note_revision(self, revision: int) -> None:
        """The fleet view reached ``revision``; call after :meth:`poke` if the change mattered."""
        self._latest = max(self._latest, revision)
        if self._state is not None and not self._busy and not self._dirty.is_set():
            self._revision = max(self._revision, self._latest)

    def check_drift_soon(self) -> None:
        """Compare the kernel with the applied state at the next quiet moment."""
        self._drift_due = True
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Apply, cut and check drift, one thing at a time, until cancelled."""
        await self._started.wait()
        delay = RETRY_DELAY
        while True:
            if not self._dirty.is_set() and not self._drift_due:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._dirty.is_set():
                if not await self._apply_newest():
                    self._dirty.set()  # still pending: nothing new is reported meanwhile
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                    continue
                delay = RETRY_DELAY
            else:
                self._drift_due = False
                await self._check_drift()

    async def _apply_newest(self, full: bool = False) -> bool:
        self._dirty.clear()
        self._busy = True
        started = time.perf_counter()
        try:
            revision, state = self._source()
            if full:
                await self.runner.apply_full(state)
                diff = None
            else:
                diff = await self.runner.apply(state)
        except (DataplaneError, ValueError) as exc:
            # The kernel may hold anything between the old and the new state now, and the
            # diff's revocations were not carried out: the next success cuts by listing.
            self.failures += 1
            self._flows_unreconciled = True
            if self._metrics is not None:
                self._metrics.dataplane_errors.inc()
            log.error("firewall update failed: %s", exc)
            return False
        finally:
            self._busy = False
            if self._metrics is not None:
                self._metrics.dataplane_seconds.observe(time.perf_counter() - started)
        self._state = state
        self._revision = revision if self._dirty.is_set() else max(revision, self._latest)
        self._first.set()
        if diff is None:
            self._flows_unreconciled = True  # a full apply says nothing about revocations
        else:
            if diff.revoked_flows:
                await self._cut(partial(self.runner.cut_revoked, diff, state), "revoked")
        if self._flows_unreconciled:
            self._flows_unreconciled = False
            await self._cut(partial(self._cut_disallowed, state), "disallowed")
        return True

    async def _cut_disallowed(self, state: fwstate.DesiredState) -> int:
        index = self._open_flows() if self._open_flows is not None else None
        return await self.runner.cut_disallowed(state, index)

    async def _cut(self, job: Callable[[], Awaitable[int]], what: str) -> None:
        try:
            n = await job()
        except (DataplaneError, ValueError, OSError) as exc:
            self._flows_unreconciled = True
            log.error("could not cut %s connections: %s; retrying", what, exc)
            # Retry soon even if nothing else changes.
            asyncio.get_running_loop().call_later(RETRY_DELAY, self.poke)
            return
        if n:
            log.info("cut %d %s connection(s)", n, what, extra={"event": "flows_cut"})

    async def _check_drift(self) -> None:
        state = self._state
        if state is None:
            return
        self._busy = True
        try:
            drift = await self.runner.check_drift(state)
        except DataplaneError as exc:
            drift = [f"cannot read kernel state: {exc}"]
        finally:
            self._busy = False
        if self._dirty.is_set():
            return  # something changed while reading: the apply that follows repairs it too
        for line in drift:
            log.warning("firewall drift repaired: %s", line, extra={"event": "drift"})
        if not drift:
            return
        self.drift_repairs += len(drift)
        if self._metrics is not None:
            self._metrics.drift_repairs.inc(len(drift))
        # Flows may have been opened while the kernel allowed too much: cut after repairing.
        self._flows_unreconciled = True
        self._dirty.set()
        if not await self._apply_newest(full=True):
            self.poke()  # the loop retries with backoff

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending (tests, drain); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._dirty.is_set() or self._busy or self._drift_due:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True
