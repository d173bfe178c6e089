"""Alembic migrations: the schema they build and the revisions that undo them."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from projections import migrate, schema


def include_shared_tables(name: str | None, type_: str, parent_names: dict) -> bool:
    """Skip the projection tables, which registry.ensure_live creates, not Alembic."""
    return type_ != "table" or name in schema.metadata.tables


def reflect_event_store_indexes(engine: Engine) -> dict[str, dict]:
    indexes = inspect(engine).get_indexes("event_store")
    return {index["name"]: index for index in indexes}


def get_predicate(index: dict) -> str | None:
    """Return the WHERE clause of a reflected partial index as text."""
    options = index["dialect_options"]
    where = options.get("postgresql_where", options.get("sqlite_where"))
    return None if where is None else str(where)


def downgrade(engine: Engine, revision: str) -> None:
    config = migrate._config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def test_migrations_match_metadata(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_name": include_shared_tables}
        )
        differences = compare_metadata(context, schema.metadata)

    assert differences == []


def test_deletion_index_downgrade_and_upgrade(engine):
    downgrade(engine, "0003")
    after_downgrade = reflect_event_store_indexes(engine)
    migrate.upgrade(engine)
    after_upgrade = reflect_event_store_indexes(engine)

    plain = after_upgrade["ix_event_store_subject_user_id"]
    deletions = after_upgrade["ix_event_store_user_deleted"]
    assert "ix_event_store_user_deleted" not in after_downgrade
    assert "ix_event_store_subject_user_id" in after_downgrade
    assert plain["column_names"] == ["subject_user_id"]
    assert get_predicate(plain) is None
    assert deletions["column_names"] == ["subject_user_id"]
    assert "'user.deleted'" in get_predicate(deletions)
