"""Snapshot builds coalesced: requests during a build share the next one, never an older one."""

from __future__ import annotations

import asyncio

from vpnfleet.controlplane.snapshotcache import SnapshotCache


class Builder:
    """Builds numbered bodies; each build waits until its gate opens (or fails if told to)."""

    def __init__(self) -> None:
        self.started = 0
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.started += 1
        number = self.started
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        return f"build {number}"

    async def finish(self, number: int) -> None:
        while len(self.gates) < number:
            await asyncio.sleep(0)
        self.gates[number - 1].set()


async def ask(cache: SnapshotCache[str], count: int) -> list[asyncio.Task[str]]:
    """`count` requests, each under way (waiting for its build) when this returns."""
    asking = [asyncio.create_task(cache.get()) for _ in range(count)]
    await asyncio.sleep(0)
    return asking


def test_requests_during_a_build_share_the_next_one() -> None:
    async def run() -> None:
        build = Builder()
        cache = SnapshotCache(build)
        (first,) = await ask(cache, 1)
        # Asked while build 1 runs: it may predate what they know, so they wait for build 2.
        during = await ask(cache, 50)
        await build.finish(1)
        assert await first == "build 1"
        # Build 2 started as build 1 ended; these come while it runs: build 3.
        later = await ask(cache, 50)
        await build.finish(2)
        assert set(await asyncio.gather(*during)) == {"build 2"}
        await build.finish(3)
        assert set(await asyncio.gather(*later)) == {"build 3"}
        assert (build.started, cache.builds, cache.shared) == (3, 3, 98)
        # Quiet again: the next request builds at once, for itself.
        nxt = asyncio.create_task(cache.get())
        await build.finish(4)
        assert await nxt == "build 4"

    asyncio.run(run())


def test_a_failed_build_fails_its_waiters_and_the_next_request_builds_again() -> None:
    async def run() -> None:
        build = Builder()
        build.fail = RuntimeError("database away")
        cache = SnapshotCache(build)
        (first,) = await ask(cache, 1)
        during = await ask(cache, 3)
        await build.finish(1)
        await build.finish(2)
        results = await asyncio.gather(first, *during, return_exceptions=True)
        assert [str(r) for r in results] == ["database away"] * 4
        build.fail = None
        again = asyncio.create_task(cache.get())
        await build.finish(3)
        assert await again == "build 3"

    asyncio.run(run())


def test_a_request_that_gives_up_does_not_cancel_the_shared_build() -> None:
    async def run() -> None:
        build = Builder()
        cache = SnapshotCache(build)
        (first,) = await ask(cache, 1)
        impatient, patient = await ask(cache, 2)
        impatient.cancel()
        await build.finish(1)
        await build.finish(2)
        assert await first == "build 1"
        assert await patient == "build 2"
        assert build.started == 2

    asyncio.run(run())
