"""pod credentials: tokens bound to a pod name; pods revoked and lease-expired

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import vpnfleet.controlplane.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pod_name", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_admin_tokens_pod_name", ["pod_name"], unique=False)
    with op.batch_alter_table("pods", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("revoked_at", vpnfleet.controlplane.models.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("lease_expired_at", vpnfleet.controlplane.models.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("pods", schema=None) as batch_op:
        batch_op.drop_column("lease_expired_at")
        batch_op.drop_column("revoked_at")
    with op.batch_alter_table("admin_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_admin_tokens_pod_name")
        batch_op.drop_column("pod_name")
