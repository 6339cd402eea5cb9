"""pending VPN single sign-on logins

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import vpnfleet.controlplane.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    utc = vpnfleet.controlplane.models.UTCDateTime
    op.create_table(
        "sso_logins",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("pod", sa.String(length=64), nullable=False),
        sa.Column("server", sa.String(length=64), nullable=False),
        sa.Column("cid", sa.BigInteger(), nullable=False),
        sa.Column("kid", sa.BigInteger(), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("real_ip", sa.String(length=64), nullable=True),
        sa.Column("created_at", utc(), nullable=False),
        sa.Column("expires_at", utc(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=True),
        sa.Column("nonce", sa.String(length=100), nullable=True),
        sa.Column("verifier", sa.String(length=100), nullable=True),
        sa.Column("reason", sa.String(length=300), nullable=True),
        sa.Column("decided_at", utc(), nullable=True),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sso_logins")),
        sa.UniqueConstraint("state_hash", name=op.f("uq_sso_logins_state_hash")),
    )
    op.create_index(op.f("ix_sso_logins_pod"), "sso_logins", ["pod"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_sso_logins_pod"), table_name="sso_logins")
    op.drop_table("sso_logins")
