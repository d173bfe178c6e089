"""Store hashed API keys; record the user of each stored user.* event.

Adds the ``api_keys`` table and the indexed ``event_store.subject_user_id``
column, fills that column for the user.* events already stored, and blanks the
names and email in stored user.upserted events that a stored user.deleted
event supersedes, as the consumer does from this revision on.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# projections.ordering.NO_SEQUENCE: the sequence of an event without one.
_NO_SEQUENCE = -(2**62)

_SUBJECT_SQLITE = "json_extract(payload, '$.data.user_id')"
_SUBJECT_POSTGRESQL = "CAST(CAST(payload AS jsonb) -> 'data' ->> 'user_id' AS BIGINT)"

_SCRUBBED_SQLITE = (
    "json_set(payload, '$.data.firstname', '', '$.data.lastname', '', "
    "'$.data.email', '')"
)
_SCRUBBED_POSTGRESQL = (
    "CAST(jsonb_set(jsonb_set(jsonb_set(CAST(payload AS jsonb), "
    "'{data,firstname}', '\"\"'), '{data,lastname}', '\"\"'), "
    "'{data,email}', '\"\"') AS TEXT)"
)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("company_id", sa.BigInteger(), nullable=True),
        sa.Column("department_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_us", sa.BigInteger(), nullable=True),
        sa.Column("last_used_at_us", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(scope = 'all' AND company_id IS NULL AND department_id IS NULL)"
            " OR (scope = 'company' AND company_id IS NOT NULL"
            " AND department_id IS NULL)"
            " OR (scope = 'department' AND company_id IS NOT NULL"
            " AND department_id IS NOT NULL)",
            name="ck_api_keys_scope",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_prefix"), "api_keys", ["prefix"])

    with op.batch_alter_table("event_store") as batch:
        batch.add_column(sa.Column("subject_user_id", sa.BigInteger(), nullable=True))
        batch.create_index(op.f("ix_event_store_subject_user_id"), ["subject_user_id"])

    postgresql = op.get_bind().dialect.name == "postgresql"
    subject = _SUBJECT_POSTGRESQL if postgresql else _SUBJECT_SQLITE
    scrubbed = _SCRUBBED_POSTGRESQL if postgresql else _SCRUBBED_SQLITE
    op.execute(
        f"UPDATE event_store SET subject_user_id = {subject} WHERE type LIKE 'user.%'"
    )
    # The same rule as projections.privacy.scrub_deleted_users, written out
    # here so that this revision keeps working when that module changes.
    op.execute(
        f"UPDATE event_store SET payload = {scrubbed} "
        "WHERE type = 'user.upserted' AND subject_user_id IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM event_store AS deletion "
        "WHERE deletion.type = 'user.deleted' "
        "AND deletion.subject_user_id = event_store.subject_user_id "
        f"AND (deletion.time_us, COALESCE(deletion.sequence, {_NO_SEQUENCE}), "
        "deletion.position) > (event_store.time_us, "
        f"COALESCE(event_store.sequence, {_NO_SEQUENCE}), event_store.position))"
    )


def downgrade() -> None:
    # The blanked names and email cannot be restored.
    with op.batch_alter_table("event_store") as batch:
        batch.drop_index(op.f("ix_event_store_subject_user_id"))
        batch.drop_column("subject_user_id")
    op.drop_index(op.f("ix_api_keys_prefix"), table_name="api_keys")
    op.drop_table("api_keys")
