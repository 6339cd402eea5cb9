"""Watch fan-out: one reader of the change log per control-plane process feeds every stream.

The change log lives in the database, so replicas that share one PostgreSQL see the same
revisions. Each process tails the log (cheap: an indexed `id > last` query, every poll interval
or at once after a local commit) and keeps the newest changes in memory, a *ring* of
:data:`RING` to ``2 * RING`` entries, each already serialized as its stream line. Streams are
served from the ring; no stream reads the database for a change the ring holds, however many
streams there are or however far back (within the ring) they start.

Catch-up must not starve the rest of the API (200 streams starting at revision 0 once made
``/healthz`` take 18.6 s: every stream read the log through the worker threads all sync
routes share). So:

- the hub's own database work (the tail, reads older than the ring) runs on worker threads
  under its own :class:`anyio.CapacityLimiter` (:data:`DB_THREADS`), never under the
  request threadpool's limiter;
- a read older than the ring is *coalesced*: streams asking for the changes after the same
  revision wait on one read, and full batches stay cached (:data:`OLD_BATCHES`), so 1,000
  streams starting at 0 cost one pass over the old rows, not 1,000;
- a stream sends its backlog in chunks of :data:`CHUNK_BYTES`, and all streams together
  start at most :data:`PACE_CHUNKS` such chunks per :data:`PACE_SECONDS` (up to 512 MB/s).
  Unpaced, the event loop's thread spends all its time writing backlogs and holds the GIL:
  every worker thread (the token check, every sync route) then waits for the GIL at each
  step, and the 1,000-stream benchmark measured streams waiting 47 s to start and a user
  write's p99 at 1.4 s. A slot is given back by a timer, whether or not the chunk's write
  completed, so a client that does not read cannot hold up the others. Live changes (runs
  smaller than a chunk) are not paced;
- new streams are authenticated under a second small limiter (``admission``), so a storm of
  reconnecting agents queues there and not in front of user requests;
- at most ``max_subscribers`` streams at once (``VPNFLEET_WATCH_MAX_SUBSCRIBERS``): past it a
  new stream is refused (the route answers 503 with Retry-After) and counted.

A stream outlives nothing its token is: about once a second (:data:`REVALIDATE_SECONDS`) the
hub checks, in one query for all of them, that the tokens of its open streams are still valid,
and ends the streams of a revoked one (a revoked pod, a revoked operator or auditor token).
Their next request is then refused like any other.

A subscriber whose `since` is older than the log's oldest kept row (as of the hub's last poll)
is told to resync, as is one ahead of the head. A subscriber that has caught up with the head
is told so at once by a heartbeat (then one per heartbeat interval while idle): a follower
knows its view is current without waiting for the next change.

When the process stops, :meth:`ChangeHub.close_streams` ends every stream cleanly (the HTTP
body ends; no change is cut in half): followers see the end, not a reset, and reconnect at once
to another replica; the server does not wait out its shutdown grace on streams that would
never end by themselves (docs/operations.md, "Rolling upgrades and failover").

Rows are served as typed messages (vpnfleet.wire). A row that does not read as a change event
(written by an older version before an upgrade, or by hand) is not skipped, which would leave
subscribers silently wrong, and not fatal: a subscriber that reaches it is told to resync, and
the snapshot it fetches then holds the state that row described.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.controlplane.changelog import event_from_row
from vpnfleet.controlplane.models import AdminToken, Change
from vpnfleet.wire import ChangeEvent, WatchHeartbeat, WatchMessage, WatchResync

log = logging.getLogger("vpnfleet.watch")

RING = 10_000  # newest changes kept in memory (RING..2*RING entries)
BATCH = 1_000  # rows per read of the log
OLD_BATCHES = 32  # full batches older than the ring kept for the next stream that needs them
CHUNK_BYTES = 128 << 10  # one write of a stream's backlog
PACE_CHUNKS = 8  # backlog chunks all streams together start per PACE_SECONDS
PACE_SECONDS = 0.002
DB_THREADS = 2  # the hub's own worker threads (tail and old reads)
ADMISSION_THREADS = 8  # authentication of new streams
RETRY_AFTER = 10  # seconds a refused stream is told to wait
REVALIDATE_SECONDS = 1.0  # how often the tokens of open streams are checked for revocation

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stored:
    """A change-log row read as a change event, with its stream line (serialized once)."""

    revision: int
    event: ChangeEvent
    line: bytes


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A change-log row that is not a valid change event: subscribers resync past it."""

    revision: int
    problem: str


Entry = Stored | Unreadable


@dataclass(frozen=True)
class Batch:
    """Rows after some revision, and the oldest revision the log held when they were read."""

    entries: list[Entry]
    oldest: int


def ndjson(message: WatchMessage) -> bytes:
    """One line of the watch stream."""
    return (message.model_dump_json() + "\n").encode()


def read_row(row: Change) -> Entry:
    try:
        event = event_from_row(row)
    except ValueError as exc:
        log.warning(
            "change-log row %d (%s/%s) is unreadable; watchers past it resync: %s",
            row.id,
            row.kind,
            row.op,
            exc,
        )
        return Unreadable(row.id, str(exc))
    return Stored(row.id, event, ndjson(event))


def _revision(entry: Entry) -> int:
    return entry.revision


class ChangeHub:
    """Tails the change log and fans events out to subscribers."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        poll_interval: float = 0.2,
        keep: int = 100_000,
        max_subscribers: int = 2_000,
        ring: int = RING,
    ) -> None:
        self._factory = factory
        self._poll = poll_interval
        self._keep = keep
        self._ring_size = ring
        self.max_subscribers = max_subscribers
        self.subscribers = 0
        self.refused = 0  # streams refused at the cap since start
        self.old_reads = 0  # reads of the log older than the ring since start
        # Open streams per token id, and the ids found revoked while streams still used them.
        self._tokens: Counter[int] = Counter()
        self._cut: set[int] = set()
        # Newest entries, ascending by revision: every revision in (_floor, _head] the log
        # holds. Trimmed to `ring` entries when it passes twice that.
        self._ring: list[Entry] = []
        self._floor = 0
        self._head = 0  # highest revision seen
        self._oldest = 0  # oldest revision the log held at the last poll (0: empty)
        # Reads older than the ring: in flight (coalesced) and recent full batches (cached).
        self._reads: dict[int, asyncio.Task[Batch]] = {}
        self._old: OrderedDict[int, Batch] = OrderedDict()
        # Set (and replaced by a fresh one) whenever the head moves. An Event, not a
        # Condition: a subscriber cancelled while waiting (its client went away) must not be
        # able to leave a lock behind. With Python 3.11's wait_for around Condition.wait, a
        # cancelled waiter could re-acquire the lock after its caller had left, and the
        # tailing task then blocked on it forever: no change reached any agent again.
        self._moved = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False  # close_streams() was called: every stream ends
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Created in start(): they belong to the serving event loop.
        self._db: CapacityLimiter | None = None
        self._admission: CapacityLimiter | None = None
        self._turns: asyncio.Semaphore | None = None

    @property
    def head(self) -> int:
        return self._head

    @property
    def admission(self) -> CapacityLimiter:
        """The limiter new streams are authenticated under (not the request threadpool's)."""
        if self._admission is None:
            raise RuntimeError("the change hub is not started")
        return self._admission

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._db = CapacityLimiter(DB_THREADS)
        self._admission = CapacityLimiter(ADMISSION_THREADS)
        self._turns = asyncio.Semaphore(PACE_CHUNKS)
        entries, oldest, head = await self._in_thread(self._prime)
        self._ring = entries
        self._oldest = oldest
        self._head = head
        # A full ring starts just below its first row; a short one holds every row there is.
        self._floor = entries[0].revision - 1 if len(entries) >= self._ring_size else 0
        self._task = asyncio.create_task(self._run(), name="change-hub")

    def close_streams(self) -> None:
        """End every stream (and every stream that starts from now on) cleanly: the process is
        stopping. Called on the event loop."""
        if self._closing:
            return
        self._closing = True
        log.info("ending %d watch stream(s): this replica is stopping", self.subscribers)
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def stop(self) -> None:
        self.close_streams()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._reads.values()):
            task.cancel()

    def poke(self) -> None:
        """Called from any thread after a local commit: poll now instead of at the next tick."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    # ------------------------------------------------------------------ admission

    def admit(self, token_id: int | None = None) -> bool:
        """Take a stream slot for a stream authenticated by `token_id`; False (and counted)
        when all `max_subscribers` are taken. Called on the event loop only, so no lock."""
        if self.subscribers >= self.max_subscribers:
            self.refused += 1
            return False
        self.subscribers += 1
        if token_id is not None:
            self._tokens[token_id] += 1
        return True

    def release(self, token_id: int | None = None) -> None:
        self.subscribers -= 1
        if token_id is not None:
            self._tokens[token_id] -= 1
            if self._tokens[token_id] <= 0:
                del self._tokens[token_id]
                self._cut.discard(token_id)

    def is_cut(self, token_id: int | None) -> bool:
        """Whether the streams of `token_id` must end: the token was revoked."""
        return token_id is not None and token_id in self._cut

    # ------------------------------------------------------------------ database side

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        assert self._db is not None
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._db)

    def _prime(self) -> tuple[list[Entry], int, int]:
        """The newest `ring` rows, the oldest revision and the head."""
        with self._factory() as db:
            rows = db.scalars(select(Change).order_by(Change.id.desc()).limit(self._ring_size))
            entries = [read_row(r) for r in rows][::-1]
            oldest = int(db.scalar(select(func.coalesce(func.min(Change.id), 0))) or 0)
            head = int(db.scalar(select(func.coalesce(func.max(Change.id), 0))) or 0)
        return entries, oldest, max(head, entries[-1].revision if entries else 0)

    def _fetch(self, after: int) -> Batch:
        with self._factory() as db:
            rows = db.scalars(
                select(Change).where(Change.id > after).order_by(Change.id).limit(BATCH)
            ).all()
            oldest = int(db.scalar(select(func.coalesce(func.min(Change.id), 0))) or 0)
            return Batch([read_row(r) for r in rows], oldest)

    def _valid_tokens(self, ids: list[int]) -> set[int]:
        """Which of `ids` are still unrevoked tokens."""
        with self._factory() as db:
            return set(
                db.scalars(
                    select(AdminToken.id).where(
                        AdminToken.id.in_(ids), AdminToken.revoked_at.is_(None)
                    )
                )
            )

    async def _revalidate(self) -> None:
        """End the streams whose token has been revoked since they started."""
        ids = [t for t in self._tokens if t not in self._cut]
        if not ids:
            return
        valid = await self._in_thread(self._valid_tokens, ids)
        revoked = {t for t in ids if t not in valid and t in self._tokens}
        if revoked:
            self._cut |= revoked
            log.info(
                "ending %d watch stream(s) of %d revoked token(s)",
                sum(self._tokens[t] for t in revoked),
                len(revoked),
            )
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()  # waiting streams wake up and see they are cut

    def _prune(self) -> int:
        with self._factory() as db, db.begin():
            cutoff = self._head - self._keep
            if cutoff <= 0:
                return 0
            result = db.execute(delete(Change).where(Change.id <= cutoff))
            return int(getattr(result, "rowcount", 0) or 0)

    async def _run(self) -> None:
        ticks = 0
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            try:
                if loop.time() - checked >= REVALIDATE_SECONDS:
                    checked = loop.time()
                    await self._revalidate()
                batch = await self._in_thread(self._fetch, self._head)
                self._oldest = batch.oldest
                if batch.entries:
                    self._ring.extend(batch.entries)
                    if len(self._ring) > 2 * self._ring_size:
                        del self._ring[: -self._ring_size]
                        self._floor = self._ring[0].revision - 1
                    self._head = batch.entries[-1].revision
                    moved, self._moved = self._moved, asyncio.Event()
                    moved.set()
                    if len(batch.entries) == BATCH:
                        continue
                ticks += 1
                if ticks % 3000 == 0:  # about every 10 minutes at the default interval
                    pruned = await self._in_thread(self._prune)
                    if pruned:
                        log.info("pruned %d old change-log rows", pruned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be briefly away; keep tailing
                log.warning("change log poll failed: %s", type(exc).__name__)
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            self._wake.clear()

    async def _older(self, after: int) -> Batch:
        """The rows after `after` (older than the ring): one read however many ask at once."""
        cached = self._old.get(after)
        if cached is not None:
            self._old.move_to_end(after)
            return cached
        task = self._reads.get(after)
        if task is None:
            task = asyncio.create_task(self._read_older(after), name=f"watch-read-{after}")
            self._reads[after] = task
        # shield: a subscriber that goes away abandons its wait, not the read others share.
        return await asyncio.shield(task)

    async def _read_older(self, after: int) -> Batch:
        try:
            self.old_reads += 1
            batch = await self._in_thread(self._fetch, after)
        finally:
            self._reads.pop(after, None)
        if len(batch.entries) == BATCH:  # a short batch may grow: only full ones are kept
            self._old[after] = batch
            while len(self._old) > OLD_BATCHES:
                self._old.popitem(last=False)
        return batch

    # ------------------------------------------------------------------ subscribers

    async def _follow(
        self, since: int, heartbeat: float, token_id: int | None = None
    ) -> AsyncIterator[list[Stored] | WatchResync | WatchHeartbeat]:
        """Runs of changes after `since` (each at most CHUNK_BYTES of lines), resyncs and
        heartbeats, until the hub closes its streams or `token_id` is revoked."""
        if since > self._head:
            yield WatchResync(revision=self._head)
            since = self._head
        caught_up = False  # told the subscriber it is at the head
        while not self._closing and not self.is_cut(token_id):
            if since < min(self._oldest, self._head + 1) - 1:
                # Older than anything the log still has: the changes in between are gone.
                yield WatchResync(revision=self._head)
                since = self._head
                continue
            if since >= self._floor:
                start = bisect.bisect_right(self._ring, since, key=_revision)
                pending = self._ring[start : start + BATCH]
                if not pending:
                    if not caught_up:
                        caught_up = True
                        yield WatchHeartbeat(revision=self._head)
                        continue
                    if not await self._wait_past(since, heartbeat, token_id) and not self._closing:
                        yield WatchHeartbeat(revision=self._head)
                    continue
            else:
                batch = await self._older(since)
                if since < batch.oldest - 1 or not batch.entries:
                    yield WatchResync(revision=self._head)
                    since = self._head
                    continue
                pending = batch.entries
            run: list[Stored] = []
            size = 0
            for entry in pending:
                if entry.revision <= since:
                    continue
                if isinstance(entry, Unreadable):
                    if run:
                        yield run
                    run, size = [], 0
                    yield WatchResync(revision=self._head)
                    since = max(self._head, entry.revision)
                    break
                run.append(entry)
                size += len(entry.line)
                since = entry.revision
                if size >= CHUNK_BYTES:
                    await self._turn()
                    yield run
                    run, size = [], 0
            if run:
                yield run
            await asyncio.sleep(0)

    async def _turn(self) -> None:
        """Wait for one of the PACE_CHUNKS slots; a timer gives it back after PACE_SECONDS,
        whatever becomes of the write."""
        assert self._turns is not None
        await self._turns.acquire()
        asyncio.get_running_loop().call_later(PACE_SECONDS, self._turns.release)

    async def subscribe(
        self, since: int, heartbeat: float, token_id: int | None = None
    ) -> AsyncIterator[WatchMessage]:
        """Events after revision `since` until the hub closes its streams or `token_id` is
        revoked; a resync if `since` is no longer served or an unreadable row lies ahead (the
        stream then goes on from the head)."""
        async for item in self._follow(since, heartbeat, token_id):
            if isinstance(item, list):
                for stored in item:
                    yield stored.event
            else:
                yield item

    async def lines(
        self, since: int, heartbeat: float, token_id: int | None = None
    ) -> AsyncIterator[bytes]:
        """The same as :meth:`subscribe`, as stream lines joined into chunks."""
        async for item in self._follow(since, heartbeat, token_id):
            if isinstance(item, list):
                yield b"".join(stored.line for stored in item)
            else:
                yield ndjson(item)

    async def _wait_past(self, revision: int, patience: float, token_id: int | None = None) -> bool:
        """Wait until the head moves past `revision`, the hub closes its streams or `token_id`
        is cut; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while self._head <= revision and not self._closing and not self.is_cut(token_id):
            left = deadline - loop.time()
            if left <= 0:
                return False
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # coincides with the wait ending, and a subscriber must stop when its client goes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._moved.wait()
        return True
