"""the fleet's auth-token key (single sign-on sessions that survive a reconnect)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pki_state", sa.Column("auth_token_sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pki_state") as batch:
        batch.drop_column("auth_token_sealed")
