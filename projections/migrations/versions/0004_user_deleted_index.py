"""Index the stored user.deleted events by user.

Adds a partial index on ``event_store.subject_user_id`` that contains only the
user.deleted events, so the check for deleted users among a batch's users reads
no other event. The plain index from 0003 stays, because a purge and the
scrub of superseded upserts read the other events of a user through it.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_DELETIONS = sa.text("type = 'user.deleted'")


def upgrade() -> None:
    # On PostgreSQL this is a plain CREATE INDEX, because CONCURRENTLY cannot
    # run in the migration's transaction, so writes to the event store wait
    # while the index is built.
    op.create_index(
        op.f("ix_event_store_user_deleted"),
        "event_store",
        ["subject_user_id"],
        postgresql_where=_DELETIONS,
        sqlite_where=_DELETIONS,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_event_store_user_deleted"), table_name="event_store")
