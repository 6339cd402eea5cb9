"""The control plane's change hub: subscribers that go away never stall the others.

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
from sqlalchemy.orm import sessionmaker

from vpnfleet.controlplane.models import Base, Change
from vpnfleet.controlplane.watch import ChangeHub


def test_cancelled_subscribers_never_stall_the_hub(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)

    def commit(n: int) -> None:
        with factory() as db, db.begin():
            db.add_all(Change(kind="group", op="update", object_id=i, data={}) for i in range(n))

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
                    if ev["type"] == "change":
                        got.append(ev["revision"])
                        if len(got) == 3:
                            return

            follower = asyncio.create_task(follow())
            await asyncio.to_thread(commit, 3)
            await asyncio.wait_for(follower, timeout=5)
            return [r - since for r in got]
        finally:
            await hub.stop()

    assert asyncio.run(scenario()) == [1, 2, 3]
