"""The snapshot cache: agents asking at once share a build; nobody gets an older one than asked."""

from __future__ import annotations

import asyncio

import pytest

from vpnfleet.controlplane.snapshotcache import SnapshotCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Builder:
    """Builds numbered bodies; each build waits until released (or fails if told to)."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> bytes:
        self.started += 1
        number = self.started
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return f'{{"build": {number}}}'.encode()


def test_agents_asking_at_once_share_one_build() -> None:
    async def run() -> None:
        clock, build = Clock(), Builder()
        cache = SnapshotCache(build, clock=clock)
        waiting = [asyncio.create_task(cache.get(2.0)) for _ in range(50)]
        await asyncio.sleep(0)
        clock.now += 1.5  # still within max_age of the build's start when they ask
        waiting += [asyncio.create_task(cache.get(2.0)) for _ in range(50)]
        await asyncio.sleep(0)
        build.release.set()
        bodies = await asyncio.gather(*waiting)
        assert set(bodies) == {b'{"build": 1}'} and build.started == 1
        assert (cache.builds, cache.shared) == (1, 99)
        # Done: later requests within max_age of that build's start get it too ...
        assert await cache.get(2.0) == b'{"build": 1}'
        # ... and none older than they accept: 2.5 s after it started, a new build.
        clock.now += 1.0
        assert await cache.get(2.0) == b'{"build": 2}'
        assert await cache.get(5.0) == b'{"build": 2}'

    asyncio.run(run())


def test_without_max_age_each_request_gets_a_build_that_started_after_it() -> None:
    async def run() -> None:
        clock, build = Clock(), Builder()
        build.release.set()
        cache = SnapshotCache(build, clock=clock)
        assert await cache.get() == b'{"build": 1}'
        assert await cache.get() == b'{"build": 2}'  # same instant, still a new one
        first = asyncio.create_task(cache.get())
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.get())
        assert await asyncio.gather(first, second) == [b'{"build": 3}', b'{"build": 4}']
        assert cache.shared == 0

    asyncio.run(run())


def test_a_failed_build_fails_its_waiters_and_is_not_kept() -> None:
    async def run() -> None:
        clock, build = Clock(), Builder()
        build.fail = RuntimeError("database away")
        cache = SnapshotCache(build, clock=clock)
        waiting = [asyncio.create_task(cache.get(2.0)) for _ in range(3)]
        await asyncio.sleep(0)
        build.release.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert [str(r) for r in results] == ["database away"] * 3
        build.fail = None
        assert await cache.get(2.0) == b'{"build": 2}'  # tried again, not the failure kept

    asyncio.run(run())


def test_a_request_that_gives_up_does_not_cancel_the_shared_build() -> None:
    async def run() -> None:
        clock, build = Clock(), Builder()
        cache = SnapshotCache(build, clock=clock)
        impatient = asyncio.create_task(cache.get(2.0))
        patient = asyncio.create_task(cache.get(2.0))
        await asyncio.sleep(0)
        impatient.cancel()
        build.release.set()
        assert await patient == b'{"build": 1}'
        assert build.started == 1

    asyncio.run(run())


@pytest.mark.parametrize("max_age", [-0.1, 10.5])
def test_max_age_out_of_range_is_refused(max_age: float) -> None:
    async def run() -> None:
        cache = SnapshotCache(Builder(), clock=Clock())
        with pytest.raises(ValueError, match="max_age must be between 0 and 10 seconds"):
            await cache.get(max_age)

    asyncio.run(run())
