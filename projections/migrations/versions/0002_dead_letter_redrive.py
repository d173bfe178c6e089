"""Record which dead letters a re-drive accepted.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("redriven_at_us", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("redriven_event_id", sa.String(length=255), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("redriven_event_id")
        batch.drop_column("redriven_at_us")
