"""directory sync: the LDAP/AD settings, lease and last outcome; the users it manages

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import vpnfleet.controlplane.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    utc = vpnfleet.controlplane.models.UTCDateTime
    op.create_table(
        "directory_config",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("bind_password_sealed", sa.Text(), nullable=False),
        sa.Column("updated_at", utc(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.Column("lease_holder", sa.String(length=64), nullable=True),
        sa.Column("lease_until", utc(), nullable=True),
        sa.Column("last_attempt_at", utc(), nullable=True),
        sa.Column("last_success_at", utc(), nullable=True),
        sa.Column("last_status", sa.String(length=16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_actor", sa.String(length=64), nullable=True),
        sa.Column("last_counts", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_directory_config")),
    )
    op.create_table(
        "directory_users",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("dn", sa.String(length=1000), nullable=False),
        sa.Column("disabled_by_sync", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_directory_users_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_directory_users")),
    )


def downgrade() -> None:
    op.drop_table("directory_users")
    op.drop_table("directory_config")
