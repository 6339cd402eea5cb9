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
