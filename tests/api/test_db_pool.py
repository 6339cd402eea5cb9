"""A replica's PostgreSQL connections: a fixed pool, kept open under load.

Connections made past the pool's size used to be closed as soon as they were given back, so
a replica under load (the fleet simulator's session churn) opened and closed connections all
the time: about a tenth of its time, and a new backend process each on PostgreSQL's side."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import RunningServer, fresh_database
from vpnfleet.controlplane.settings import ServerSettings

ROUNDS = 4
CONCURRENT = 40  # more requests at once than the pool has connections


def backends(url: str) -> dict[int, str]:
    """The server's connections to its database, as PostgreSQL lists them: pid → start."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid, backend_start::text FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"  # not autovacuum's workers
                )
            ).all()
        return {int(pid): str(start) for pid, start in rows}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_replica_keeps_its_pool_size_of_connections_open_under_load(tmp_path: Path) -> None:
    pool = 8
    with fresh_database("postgresql", tmp_path) as url:
        running = RunningServer(url, tmp_path / "data", database_pool_size=pool)
        try:
            token = running.server.admin_token
            failures: list[str] = []

            def burst() -> None:
                with httpx.Client(
                    base_url=running.server.url,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                ) as c:
                    r = c.get("/api/v1/users")
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")

            seen: list[dict[int, str]] = []
            for _ in range(ROUNDS):
                threads = [threading.Thread(target=burst) for _ in range(CONCURRENT)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                seen.append(backends(url))
            assert failures == []
            # Never more connections than the pool, and every one still open later: none
            # closed and made again (the pool may still grow towards its size).
            assert all(0 < len(b) <= pool for b in seen), seen
            for earlier, later in itertools.pairwise(seen):
                assert earlier.items() <= later.items(), seen
        finally:
            running.stop()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("twenty", "VPNFLEET_DATABASE_POOL_SIZE 'twenty' is not a whole number of connections"),
        ("4", "VPNFLEET_DATABASE_POOL_SIZE must be between 5 and 1,000 connections"),
        ("5000", "VPNFLEET_DATABASE_POOL_SIZE must be between 5 and 1,000 connections"),
    ],
)
def test_a_bad_pool_size_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, raw: str, error: str
) -> None:
    monkeypatch.setenv("VPNFLEET_DATABASE_POOL_SIZE", raw)
    with pytest.raises(ValueError, match=error):
        ServerSettings.from_env()


def test_the_pool_size_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings.from_env().database_pool_size == 20
    monkeypatch.setenv("VPNFLEET_DATABASE_POOL_SIZE", "50")
    assert ServerSettings.from_env().database_pool_size == 50
