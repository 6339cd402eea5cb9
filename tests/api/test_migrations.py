"""The schema comes only from migrations, and they match the models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from vpnfleet.controlplane import db
from vpnfleet.controlplane.models import Base

HEAD = "0010"


def test_migrations_from_empty_match_models(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert db.current_revision(engine) == HEAD
        db.upgrade(engine)  # idempotent
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_0002_keeps_sessions_and_adds_kill_state(database_url: str) -> None:
    """An upgrade from 0001 keeps live sessions (not killed) and old change-log rows (their
    ids are the revisions agents resume from); a downgrade drops only the kill columns."""
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sessions (uid, user_name, pod_name, mode, tunnel_ip, started_at,"
                    " bytes_in, bytes_out) VALUES ('pod1-aaaaaaaa', 'alice', 'pod1', 'nat',"
                    " '10.200.0.2', '2026-01-31 12:00:00', 0, 0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO changes (at, kind, op, object_id, data) VALUES"
                    " ('2026-01-31 12:00:00', 'kill', 'upsert', 1, '{\"user\": \"alice\"}')"
                )
            )
        db.upgrade(engine)
        assert db.current_revision(engine) == HEAD
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT uid, ended_at, kill_reason, kill_requested_at FROM sessions")
            ).one()
            assert tuple(row) == ("pod1-aaaaaaaa", None, None, None)
            assert conn.execute(text("SELECT max(id) FROM changes")).scalar_one() == 1
        command.downgrade(db.alembic_config(engine), "0001")
        assert db.current_revision(engine) == "0001"
        columns = {c["name"] for c in inspect(engine).get_columns("sessions")}
        assert "uid" in columns and not {"kill_reason", "kill_requested_at"} & columns
    finally:
        engine.dispose()


def test_0004_keeps_the_pki_and_adds_an_empty_crl_cache(database_url: str) -> None:
    """The CA survives the upgrade; the stored CRL starts empty (the first request signs it);
    a downgrade drops only the CRL columns."""
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine, "0003")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO pki_state (id, ca_cert_pem, ca_key_sealed, tls_crypt_sealed,"
                    " created_at) VALUES (1, 'CA', 'sealed', 'sealed', '2026-01-31 12:00:00')"
                )
            )
        db.upgrade(engine)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT ca_cert_pem, crl_pem, crl_revoked_digest, crl_next_update"
                     " FROM pki_state")
            ).one()  # fmt: skip
            assert tuple(row) == ("CA", None, None, None)
        command.downgrade(db.alembic_config(engine), "0003")
        columns = {c["name"] for c in inspect(engine).get_columns("pki_state")}
        assert "ca_cert_pem" in columns and not {"crl_pem", "crl_next_update"} & columns
    finally:
        engine.dispose()
