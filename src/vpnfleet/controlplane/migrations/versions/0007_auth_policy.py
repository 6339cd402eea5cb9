"""auth policy (cert, cert+sso) on users and groups

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("auth_policy", sa.String(length=16), nullable=True))
    op.add_column("groups", sa.Column("auth_policy", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("auth_policy")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("auth_policy")
