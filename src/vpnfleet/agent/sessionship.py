"""The session shipper: session and denied-attempt records, spooled on disk, delivered in order.

Records are written to the spool first (so an agent crash or a control-plane outage loses
nothing) and sent by one task, oldest first. The control plane's answer to a session record
may be "this session may not stay" (a fleet-wide session limit another pod filled meanwhile):
the shipper hands that to ``on_refused``, which disconnects the client. Delivery is idempotent
by session uid, so a record sent twice (after a crash between sending and committing) is
harmless.

Consecutive open and close records go in one request (``POST /agent/sessions/batch``, up to
:data:`BATCH` records): the control plane applies them in order in one transaction and
answers each record as its own endpoint would. A control plane without that endpoint (older
than this agent: 404/405) gets one request per record, as before, and is asked again after
:data:`BATCH_RETRY` seconds; a batch refused whole (it should not be: 4xx) is sent again one
record at a time, so that only the record at fault is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from vpnfleet.agent.cpclient import ControlPlane, ControlPlaneError
from vpnfleet.agent.metrics import AgentMetrics
from vpnfleet.agent.spool import Spool
from vpnfleet.core.sessionbook import Client
from vpnfleet.wire import DeniedBatch, DeniedRecord, SessionClose, SessionOpen, SessionReport

log = logging.getLogger("vpnfleet.agent.sessions")

BATCH = 100  # records per delivery round and per batch request (wire.MAX_SESSION_BATCH)
BATCH_RETRY = 600.0  # seconds before asking a control plane without batches again
# A batch answered 500 (a server fault, not an outage: those are 502-504 or no answer) this
# many times in a row is sent one record per request instead: one record the server cannot
# apply then holds up only itself and what follows it, not the records before it.
BATCH_FAULT_LIMIT = 3
Refused = Callable[[str, str], Awaitable[None]]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _session_run(batch: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The open/close records from ``batch[start]`` on, up to the first other or malformed
    record (which goes on its own: a malformed one is dropped there, by name)."""
    run: list[dict[str, Any]] = []
    for record in batch[start:]:
        kind = record.get("kind")
        model = SessionOpen if kind == "open" else SessionClose if kind == "close" else None
        if model is None:
            break
        try:
            model.model_validate(record.get("body"))
        except ValueError:
            break
        run.append(record)
    return run


class SessionShipper:
    """Spools session records and delivers them to the control plane."""

    def __init__(
        self,
        spool: Spool,
        cp: ControlPlane,
        pod: str,
        *,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.spool = spool
        self._cp = cp
        self._pod = pod
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()
        self._on_refused: Refused | None = None
        self._no_batches_until = 0.0  # monotonic time; the control plane had no batch endpoint
        self._batch_faults = 0  # batches answered 500 in a row

    def on_refused(self, handler: Refused) -> None:
        """Who disconnects a session the control plane refuses: ``handler(uid, reason)``."""
        self._on_refused = handler

    # ------------------------------------------------------------------ records

    def opened(self, client: Client) -> None:
        """``client``'s session is live (established, or adopted after a restart)."""
        body = SessionOpen(
            uid=client.uid,
            user=client.user,
            pod=self._pod,
            mode=client.mode,
            tunnel_ip=client.tunnel_ip,
            real_ip=client.real_ip,
            real_port=client.real_port,
            client_id=client.cid,
            started_at=dt.datetime.fromisoformat(client.connected_at),
        )
        self._put({"kind": "open", "body": body.model_dump(mode="json")})

    def closed(self, client: Client, bytes_in: int, bytes_out: int, reason: str) -> None:
        """``client``'s session ended."""
        body = SessionClose(
            uid=client.uid,
            ended_at=self._clock(),
            bytes_in=max(0, bytes_in),
            bytes_out=max(0, bytes_out),
            reason=reason[:200],
        )
        self._put({"kind": "close", "body": body.model_dump(mode="json")})

    def denied(self, record: dict[str, Any]) -> None:
        """Denied attempts of one source to one destination (see core/denied.py)."""
        body = {k: record[k] for k in DeniedRecord.model_fields if k in record}
        self._put({"kind": "denied", "body": body})

    def _put(self, record: dict[str, Any]) -> None:
        self.spool.put(record)
        self._wake.set()

    # ------------------------------------------------------------------ delivery

    async def run(self) -> None:
        """Send spooled records in order; keep them while the control plane is away."""
        delay = 0.5
        while True:
            batch = self.spool.peek(BATCH)
            if not batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                self.spool.flush()
                continue
            try:
                await self._send(batch)
                delay = 0.5
            except ControlPlaneError as exc:
                log.warning("session delivery paused (%s); %d queued", exc, len(self.spool))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        done = 0
        try:
            one_by_one = 0  # records to send one at a time (a batch refused whole)
            while done < len(batch):
                run = _session_run(batch, done)
                if done >= one_by_one and run and time.monotonic() >= self._no_batches_until:
                    sent = await self._deliver_batch(run)
                    if sent:
                        done += sent
                        continue
                    one_by_one = done + len(run)
                await self._deliver(batch[done])
                done += 1
        finally:
            self.spool.commit(done)
            if self._metrics is not None:
                self._metrics.spooled.set(len(self.spool))

    async def _deliver_batch(self, records: list[dict[str, Any]]) -> int:
        """Send `records` (open/close, valid) in one request and act on each answer; returns
        how many were delivered, or 0 when they must go one at a time instead."""
        try:
            sent = [{"kind": r["kind"], "body": r["body"]} for r in records]
            out = await self._cp.session_batch(self._pod, sent)
        except ControlPlaneError as exc:
            if exc.status == 500:
                self._batch_faults += 1
                if self._batch_faults < BATCH_FAULT_LIMIT:
                    raise
                self._batch_faults = 0
                log.warning(
                    "a session batch failed %d times with a server error (%s); sending it "
                    "one record per request",
                    BATCH_FAULT_LIMIT,
                    exc,
                )
                return 0
            if exc.retryable:
                raise
            if exc.status in (404, 405):
                log.info("the control plane takes no session batches; one record per request")
                self._no_batches_until = time.monotonic() + BATCH_RETRY
            else:
                log.warning("a session batch was refused whole (%s); sending it one by one", exc)
            return 0
        self._batch_faults = 0
        if len(out.results) != len(records):
            log.warning(
                "a session batch got %d answers for %d records; sending it one by one",
                len(out.results),
                len(records),
            )
            return 0
        # An open whose session this same batch closes: a refusal of it ("session ended", as
        # a batch sent again after its answer was lost gets) has nothing left to disconnect.
        closed = {r["body"]["uid"] for r in records if r["kind"] == "close"}
        for record, result in zip(records, out.results, strict=True):
            if result.status >= 400:
                log.warning(
                    "dropped a %s record the control plane refused: %s %s",
                    record["kind"],
                    result.status,
                    result.detail,
                )
                continue
            verdict = result.verdict
            refused = verdict is not None and not verdict.allowed and verdict.uid not in closed
            if refused and verdict is not None and self._on_refused is not None:
                await self._on_refused(verdict.uid, verdict.reason or "refused")
        return len(records)

    async def _deliver(self, record: dict[str, Any]) -> None:
        kind, body = record.get("kind"), record.get("body")
        try:
            if kind == "open":
                verdict = await self._cp.session_open(SessionOpen.model_validate(body))
                if not verdict.allowed and self._on_refused is not None:
                    await self._on_refused(verdict.uid, verdict.reason or "refused")
            elif kind == "close":
                await self._cp.session_close(SessionClose.model_validate(body))
            elif kind == "denied":
                denied = DeniedRecord.model_validate(body)
                await self._cp.denied(DeniedBatch(pod=self._pod, events=[denied]))
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except ControlPlaneError as exc:
            if exc.retryable:
                raise
            # A record the control plane will never accept (user deleted meanwhile...):
            # dropping it beats blocking every later record behind it.
            log.warning("dropped a %s record the control plane refused: %s", kind, exc)
        except ValueError as exc:
            log.error("dropped a malformed spool record: %s", exc)

    async def report(self, live: Iterable[str]) -> None:
        """Level-triggered repair: the control plane closes this pod's sessions not in ``live``.

        Skipped while records wait in the spool: a session that just ended has its close
        (with bytes and the real reason) queued, and a report overtaking it would close the
        row first as "not live on pod"."""
        if len(self.spool):
            return
        try:
            closed, ended = await self._cp.session_report(
                SessionReport(pod=self._pod, live=list(live))
            )
        except ControlPlaneError as exc:
            log.info("session report failed: %s", exc)
            return
        if closed:
            log.info("control plane closed %d stale session(s) of this pod", closed)
        # Sessions the control plane ended while this pod still had them (its lease ran out
        # while it was cut off): they no longer count anywhere, so they must not stay up.
        for uid in ended:
            if self._on_refused is not None:
                await self._on_refused(
                    uid, "session ended by the control plane (pod lease expired)"
                )

    async def finish(self, budget: float) -> None:
        """At shutdown: give the records ``budget`` seconds; the spool keeps the rest."""
        deadline = time.monotonic() + budget
        while len(self.spool) and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(
                    self._send(self.spool.peek(BATCH)), deadline - time.monotonic()
                )
            except TimeoutError:
                break
            except ControlPlaneError:
                await asyncio.sleep(0.2)
        if len(self.spool):
            log.info("%d session record(s) stay spooled for the next start", len(self.spool))
