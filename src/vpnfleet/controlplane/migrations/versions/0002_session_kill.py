"""sessions: kill_reason and kill_requested_at (a kill is state, not an event)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import vpnfleet.controlplane.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Change-log rows written before this version have another shape; they stay (their ids
    # are the revisions), and a watcher that reaches one is told to resync.
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kill_reason", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column(
                "kill_requested_at", vpnfleet.controlplane.models.UTCDateTime(), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("kill_requested_at")
        batch_op.drop_column("kill_reason")
