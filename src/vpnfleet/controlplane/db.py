"""Database engine, sessions and schema migrations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.privatefiles import private_opener, tighten

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_sqlite_file(url: str) -> None:
    """Make the SQLite database of ``url`` (and its WAL/shm/journal files) 0600.

    SQLite creates the file with the process umask (0644 usually), and gives its WAL and shm
    files the database file's mode: creating it 0600 first keeps all three private, and an
    existing one (made by an older version, or copied in) is tightened at every start. The
    database holds token hashes, sealed keys and everyone's sessions and flows.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.exists() and path.parent.is_dir():
        os.close(private_opener(path, os.O_WRONLY | os.O_CREAT))
    for p in (path, *(path.with_name(path.name + suffix) for suffix in SQLITE_COMPANIONS)):
        tighten(p)


# Execution option of sessions that never write (state.get_read_db): a deferred BEGIN on SQLite.
READ_ONLY = "vpnfleet_read_only"


# PostgreSQL connections a replica may open past its pool for a burst of its own background
# work (watch streams' token checks, the intake's token lookups, /readyz): closed after use.
BURST_CONNECTIONS = 10


def make_engine(url: str, pool_size: int = 20) -> Engine:
    """An engine for `url` with the settings vpnfleet relies on (FKs and WAL on SQLite).

    PostgreSQL: `pool_size` connections, kept open. Requests take at most that many less a
    reserve (state.request_sessions), so under load they do not open connections past the
    pool: those are closed when given back, and with the pool of 10 that requests used to
    outgrow, every few requests paid for a new connection (and PostgreSQL for a new backend
    process), about a tenth of a replica's time in the fleet simulator (docs/performance.md).
    `BURST_CONNECTIONS` more are there for background work that comes all at once."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock at BEGIN so read-then-write transactions serialize instead
            # of failing with "database is locked" on upgrade. A session made read-only
            # (READ_ONLY, the console's page views) begins deferred: WAL readers take no
            # lock, so page views do not queue behind each other and every write.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        # Let SQLAlchemy emit our BEGIN instead of pysqlite's implicit one.
        @event.listens_for(engine, "connect")
        def _no_implicit_begin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    # READ COMMITTED whatever the database's default_transaction_isolation: the change log's
    # writers read after waiting for its lock and must see the commit before theirs, and the
    # session services read rows they have just locked (tests/api/test_db_isolation.py).
    # UTF-8 on the wire whatever the database's encoding: from a SQL_ASCII database (an initdb
    # without a locale) psycopg would otherwise return text as bytes, and the server failed to
    # start on its first query.
    return create_engine(
        url,
        connect_args={"client_encoding": "utf8"},
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=BURST_CONNECTIONS,
        isolation_level="READ COMMITTED",
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        except Exception:  # the table does not exist before the first migration
            return None
    return None if row is None else str(row[0])


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
