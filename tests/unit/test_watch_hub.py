"""The control plane's change hub: subscribers that go away never stall the others, and a
change-log row it cannot read makes its subscribers resync instead of stalling or skipping.

Agents are killed at any moment; each kill cancels its watch subscriber wherever it waits.
A hub that could be stalled by such a cancellation would stop delivering every change to
every agent (permissions would no longer propagate anywhere): found in an e2e run where an
agent was SIGKILLed, and reproduced here without the network.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.models import Base, Change
from vpnfleet.controlplane.watch import ChangeHub
from vpnfleet.wire import GroupState, GroupUpsert, WatchHeartbeat, WatchMessage, WatchResync


def commit_groups(factory: sessionmaker[Session], n: int, first_id: int = 0) -> None:
    with factory() as db, db.begin():
        changelog.append(
            db,
            [
                changelog.Upsert(GroupState(id=first_id + i, name=f"g{first_id + i}"))
                for i in range(n)
            ],
        )


def test_cancelled_subscribers_never_stall_the_hub(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)

    def commit(n: int) -> None:
        commit_groups(factory, n)

    async def scenario() -> list[int]:
        hub = ChangeHub(factory, poll_interval=0.005)
        await hub.start()
        rng = random.Random(7)

        async def subscriber() -> None:
            async for _ in hub.subscribe(hub.head, heartbeat=rng.uniform(0.001, 0.02)):
                pass

        try:
            # 400 subscribers cancelled at random moments around their heartbeat timeouts
            # (the moment the old Condition-based wait was fragile), while changes arrive.
            for round_ in range(40):
                tasks = [asyncio.create_task(subscriber()) for _ in range(10)]
                await asyncio.sleep(rng.uniform(0.0, 0.03))
                if round_ % 4 == 0:
                    await asyncio.to_thread(commit, 1)
                for task in tasks:
                    await asyncio.sleep(rng.uniform(0.0, 0.002))
                    task.cancel()
                await asyncio.wait(tasks, timeout=5)
                assert all(t.done() for t in tasks), "a cancelled subscriber kept running"
            # A new subscriber still gets what is committed now, at once.
            since = hub.head
            got: list[int] = []

            async def follow() -> None:
                async for ev in hub.subscribe(since, heartbeat=0.05):
                    if isinstance(ev, GroupUpsert):
                        got.append(ev.revision)
                        if len(got) == 3:
                            return

            follower = asyncio.create_task(follow())
            await asyncio.to_thread(commit, 3)
            await asyncio.wait_for(follower, timeout=5)
            return [r - since for r in got]
        finally:
            await hub.stop()

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_an_unreadable_row_makes_subscribers_resync(tmp_path: Path) -> None:
    """A row an older version wrote before an upgrade (here: the retired `kill` kind) is
    neither skipped nor fatal: a subscriber reaching it, live or catching up, is told to
    resync (its snapshot then holds that state) and the stream goes on after it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    commit_groups(factory, 2)  # revisions 1, 2

    def old_row() -> None:
        with factory() as db, db.begin():
            db.add(Change(kind="kill", op="upsert", object_id=1, data={"user": "kim"}))

    async def follow(hub: ChangeHub, since: int, until: int) -> list[WatchMessage]:
        got: list[WatchMessage] = []
        async for ev in hub.subscribe(since, heartbeat=0.05):
            if not isinstance(ev, WatchHeartbeat):
                got.append(ev)
            if ev.revision >= until and not isinstance(ev, WatchHeartbeat):
                return got
        return got

    async def scenario() -> tuple[list[WatchMessage], list[WatchMessage], list[WatchMessage]]:
        hub = ChangeHub(factory, poll_interval=0.005)
        await hub.start()
        try:
            live = asyncio.create_task(follow(hub, 2, 5))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(old_row)  # revision 3
            await asyncio.sleep(0.05)
            await asyncio.to_thread(commit_groups, factory, 2, 10)  # revisions 4, 5
            live_got = await asyncio.wait_for(live, timeout=5)
            # A subscriber catching up across the row, and one starting after it.
            behind = await asyncio.wait_for(follow(hub, 0, 5), timeout=5)
            after = await asyncio.wait_for(follow(hub, 3, 5), timeout=5)
            return live_got, behind, after
        finally:
            await hub.stop()

    live_got, behind, after = asyncio.run(scenario())

    def summary(msgs: list[WatchMessage]) -> list[tuple[str, int]]:
        return [(m.type, m.revision) for m in msgs]

    # Live: the resync names a revision at or past the unreadable row (the head, whose
    # snapshot holds the state the row described); the stream resumes after it.
    resync = live_got[0]
    assert isinstance(resync, WatchResync) and resync.revision >= 3
    assert summary(live_got[1:]) == [("change", r) for r in range(resync.revision + 1, 6)]
    # Catching up: the rows before it, then a resync to the head, nothing skipped silently.
    assert summary(behind) == [("change", 1), ("change", 2), ("resync", 5)]
    assert summary(after) == [("change", 4), ("change", 5)]


def test_streams_behind_the_ring_share_reads_and_get_every_change(tmp_path: Path) -> None:
    """A log longer than the in-memory ring: 40 streams from revision 0 at once each get every
    change exactly once, in order, while the log is read about once per batch for all of
    them (not once per stream); a stream older than the log's oldest row is told to resync."""
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    commit_groups(factory, 2_500)  # revisions 1..2500; the ring below keeps 100..200

    async def follow(hub: ChangeHub, since: int, until: int) -> list[int]:
        got: list[int] = []
        async for ev in hub.subscribe(since, heartbeat=0.5):
            if isinstance(ev, WatchResync):
                return [-ev.revision]
            if not isinstance(ev, WatchHeartbeat):
                got.append(ev.revision)
                if ev.revision >= until:
                    return got
        return got

    async def scenario() -> tuple[list[list[int]], int, list[int], list[int]]:
        hub = ChangeHub(factory, poll_interval=0.01, ring=100)
        await hub.start()
        try:
            everyone = await asyncio.wait_for(
                asyncio.gather(*(follow(hub, 0, 2_500) for _ in range(40))), timeout=30
            )
            reads = hub.old_reads
            # Rows 1..1000 pruned (as by another replica): a stream from 10 cannot be served.
            with factory() as db, db.begin():
                db.execute(Change.__table__.delete().where(Change.id <= 1_000))
            await asyncio.to_thread(commit_groups, factory, 1, 5_000)  # the hub polls
            await asyncio.sleep(0.2)
            gone = await asyncio.wait_for(follow(hub, 10, 2_501), timeout=5)
            kept = await asyncio.wait_for(follow(hub, 1_500, 2_501), timeout=5)
            return everyone, reads, gone, kept
        finally:
            await hub.stop()

    everyone, reads, gone, kept = asyncio.run(scenario())
    assert all(got == list(range(1, 2_501)) for got in everyone)
    # Three batches of the log lie behind the ring (1000 rows each); a short last batch may be
    # read again by streams that reach it apart, but nowhere near 40 streams x 3 batches.
    assert 1 <= reads <= 12, reads
    assert gone == [-2_501]  # resync to the head
    assert kept == list(range(1_501, 2_502))
