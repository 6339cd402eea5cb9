"""pki_state: the signed CRL, kept so every replica serves the same one until it changes

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import vpnfleet.controlplane.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Empty after the upgrade: the first CRL request signs one and stores it.
    with op.batch_alter_table("pki_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crl_pem", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("crl_revoked_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("crl_next_update", vpnfleet.controlplane.models.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("pki_state", schema=None) as batch_op:
        batch_op.drop_column("crl_next_update")
        batch_op.drop_column("crl_revoked_digest")
        batch_op.drop_column("crl_pem")
