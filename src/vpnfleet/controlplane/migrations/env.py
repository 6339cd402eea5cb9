"""Alembic environment: the engine is handed over by vpnfleet.controlplane.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from vpnfleet.controlplane.models import Base

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("run migrations through 'vpnfleet db upgrade', not the alembic CLI")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
