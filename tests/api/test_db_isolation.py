"""A replica's PostgreSQL transactions are READ COMMITTED, whatever the database's default.

The change log depends on it (controlplane/changelog.py): a writer that waited for the log's
lock must then see what the writer before it committed, so each statement needs a fresh
snapshot. Under REPEATABLE READ or SERIALIZABLE (a DBA's `default_transaction_isolation`)
the snapshot is the transaction's first statement's: a writer would number its change from
a revision it cannot see past, and concurrent updates of one row would fail with
serialization errors instead of waiting."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import fresh_database
from vpnfleet.controlplane import changelog
from vpnfleet.controlplane import db as dbmod
from vpnfleet.wire import CrlUpdate


@pytest.mark.postgres
@pytest.mark.parametrize("default", ["repeatable read", "serializable"])
def test_a_read_after_the_change_log_lock_sees_the_commit_before_it(
    tmp_path: Path, default: str
) -> None:
    with fresh_database("postgresql", tmp_path) as url:
        owner = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with owner.connect() as conn:
                name = conn.execute(text("SELECT current_database()")).scalar_one()
                conn.execute(
                    text(
                        f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{default}'"
                    )
                )
        finally:
            owner.dispose()
        engine = dbmod.make_engine(url, pool_size=5)
        try:
            dbmod.upgrade(engine)
            factory = dbmod.session_factory(engine)
            with factory() as first, factory() as second:
                level = first.execute(text("SHOW transaction_isolation")).scalar_one()
                assert level == "read committed"
                before = changelog.current_revision(first)
                with second.begin():
                    written = changelog.append(second, [changelog.Upsert(CrlUpdate(revoked=["1"]))])
                assert written > before
                changelog.lock(first)
                assert changelog.current_revision(first) == written
                first.rollback()
        finally:
            engine.dispose()


@pytest.mark.postgres
def test_a_sql_ascii_database_serves_text_as_text(tmp_path: Path) -> None:
    """A database made by an initdb without a locale (Debian's, in a container) is SQL_ASCII.
    psycopg then returns text columns as bytes unless the client asks for UTF-8, and the
    control plane stopped at start with "cannot use a string pattern on a bytes-like object"
    (found by tests/e2e/test_kube_play_ha.py). It starts, and names outside ASCII come back."""
    with fresh_database("postgresql", tmp_path, encoding="SQL_ASCII") as url:
        engine = dbmod.make_engine(url, pool_size=2)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SHOW server_encoding")).scalar_one() == "SQL_ASCII"
            dbmod.upgrade(engine)
            with engine.begin() as conn:
                conn.execute(text("CREATE TEMP TABLE t (name text)"))
                conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": "zoë 李"})
                assert conn.execute(text("SELECT name FROM t")).scalar_one() == "zoë 李"
        finally:
            engine.dispose()
