"""Commands for API keys (``keys create|list|revoke``) and for ``purge-user``.

``commands`` has no name of its own: license_report.cli adds its commands to the
top level. The functions without the command-line layer are used by tests.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy import Connection, Engine, false, func, select, update

from consumer.events import Event, UserDeleted
from consumer.timestamps import format_us, now_us
from projections import schema
from projections.apply import IncomingEvent, apply_batch
from projections.registry import live_projection

if TYPE_CHECKING:
    from api.auth import ScopeKind

commands = typer.Typer()
keys_app = typer.Typer(
    help="Create, list and revoke API keys; only a hash of each key is stored.",
    no_args_is_help=True,
)
commands.add_typer(keys_app, name="keys")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy database URL [env: LICENSE_REPORT_DATABASE_URL]"),
]
PREFIX_LENGTH = 8
# The largest id a command accepts: PostgreSQL's bigint maximum, the same bound
# as api.auth.MAX_ID. It is repeated here because importing api.auth loads
# FastAPI, which every command, ``consume`` included, would then carry.
MAX_ID = 2**63 - 1
# Random bytes per key: 256 bits, written as 43 URL-safe base64 characters.
KEY_BYTES = 32
PURGE_SOURCE = "/license-report/purge-user"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A row of ``api_keys``, without the hash."""

    id: int
    prefix: str
    name: str
    scope: ScopeKind
    company_id: int | None
    department_id: int | None
    created_at_us: int
    revoked_at_us: int | None
    last_used_at_us: int | None

    def describe_scope(self) -> str:
        """Return the scope as all, company=C or company=C;department=D."""
        if self.scope == "all":
            return "all"
        if self.scope == "company":
            return f"company={self.company_id}"
        return f"company={self.company_id};department={self.department_id}"


def create_key(
    engine: Engine,
    name: str,
    scope: ScopeKind,
    company_id: int | None = None,
    department_id: int | None = None,
) -> tuple[str, StoredKey]:
    """Store a new random key's hash; return the key, which exists nowhere else."""
    from api.auth import SCOPE_KINDS, hash_key

    if scope not in SCOPE_KINDS:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPE_KINDS}")
    key = secrets.token_urlsafe(KEY_BYTES)
    while key.startswith("-"):
        # A prefix that starts with "-" would read as an option in `keys revoke`.
        key = secrets.token_urlsafe(KEY_BYTES)
    table = schema.api_keys
    values = {
        "prefix": key[:PREFIX_LENGTH],
        "key_hash": hash_key(key),
        "name": name,
        "scope": scope,
        "company_id": company_id,
        "department_id": department_id,
        "created_at_us": now_us(),
    }
    with engine.begin() as conn:
        key_id = conn.execute(
            table.insert().values(values).returning(table.c.id)
        ).scalar_one()
        stored = _stored_keys(conn, table.c.id == key_id)[0]
    return key, stored


def list_keys(engine: Engine) -> list[StoredKey]:
    """Return every stored key, revoked ones included, oldest first."""
    with engine.connect() as conn:
        return _stored_keys(conn)


def find_keys(engine: Engine, reference: str) -> list[StoredKey]:
    """Return the keys whose id or prefix is ``reference``."""
    table = schema.api_keys
    condition = table.c.prefix == reference
    if reference.isdigit() and int(reference) <= MAX_ID:
        condition = condition | (table.c.id == int(reference))
    with engine.connect() as conn:
        return _stored_keys(conn, condition)


def revoke_key(engine: Engine, key_id: int) -> bool:
    """Revoke a key; return False when it was revoked already."""
    table = schema.api_keys
    with engine.begin() as conn:
        result = conn.execute(
            update(table)
            .where(table.c.id == key_id, table.c.revoked_at_us.is_(None))
            .values(revoked_at_us=now_us())
        )
    return result.rowcount == 1


def _stored_keys(conn: Connection, *conditions) -> list[StoredKey]:
    table = schema.api_keys
    columns = [column for column in table.c if column.name != "key_hash"]
    query = select(*columns).where(*conditions).order_by(table.c.id)
    return [StoredKey(**row) for row in conn.execute(query).mappings()]


def _department_problem(
    engine: Engine, company_id: int, department_id: int | None
) -> str | None:
    """Say why the live projection does not show the scope's company or department."""
    with engine.connect() as conn:
        tables = live_projection(conn)
        companies = tables.companies
        known = conn.execute(
            select(func.count()).where(companies.c.company_id == company_id)
        ).scalar_one()
        if not known:
            return f"company {company_id} is not known yet"
        if department_id is None:
            return None
        departments = tables.departments
        found = conn.execute(
            select(func.count()).where(
                departments.c.department_id == department_id,
                departments.c.company_id == company_id,
                departments.c.deleted == false(),
            )
        ).scalar_one()
    if not found:
        return (
            f"department {department_id} is not a live department of company "
            f"{company_id}"
        )
    return None


def _cli_engine(database_url: str | None) -> Engine:
    # The command line's own helpers report bad settings and an old schema the
    # same way for every command. Imported here, because license_report.cli
    # imports this module.
    from license_report.cli import _engine, _settings

    return _engine(_settings(database_url=database_url))


@keys_app.command("create")
def create_command(
    name: Annotated[str, typer.Option(help="What the key is for, shown in lists")],
    all_companies: Annotated[
        bool, typer.Option("--all", help="The key may read every company")
    ] = False,
    company: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_ID, help="The one company the key may read"),
    ] = None,
    department: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_ID,
            help="Limit the key to this department of --company and those below it",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    if all_companies == (company is not None):
        _fail("give either --all or --company C (with --department D if wanted)")
    if department is not None and company is None:
        _fail("--department needs --company, the department's company")
    if not name.strip():
        _fail("--name must not be empty")
    engine = _cli_engine(database_url)
    if all_companies:
        scope: ScopeKind = "all"
    else:
        scope = "company" if department is None else "department"
        problem = _department_problem(engine, company, department)
        if problem:
            typer.echo(
                f"warning: {problem}; the key shows no rows until its events arrive",
                err=True,
            )
    key, stored = create_key(engine, name.strip(), scope, company, department)
    typer.echo(
        f"created API key id={stored.id} prefix={stored.prefix} "
        f"scope={stored.describe_scope()}; it is shown only now, so store it",
        err=True,
    )
    typer.echo(key)


@keys_app.command("list")
def list_command(database_url: DatabaseUrl = None) -> None:
    """List the stored keys: id, prefix, name, scope, created, last used, revoked."""
    keys = list_keys(_cli_engine(database_url))
    typer.echo("id\tprefix\tname\tscope\tcreated\tlast_used\trevoked")
    for stored in keys:
        typer.echo(
            "\t".join(
                [
                    str(stored.id),
                    stored.prefix,
                    stored.name,
                    stored.describe_scope(),
                    format_us(stored.created_at_us),
                    _optional_time(stored.last_used_at_us),
                    _optional_time(stored.revoked_at_us),
                ]
            )
        )


@keys_app.command("revoke")
def revoke_command(
    reference: Annotated[str, typer.Argument(help="The key's id or its prefix")],
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a key by id or prefix; requests with it get 401 from then on."""
    engine = _cli_engine(database_url)
    found = find_keys(engine, reference)
    if not found:
        _fail(f"no API key has the id or prefix {reference}; see `keys list`")
    if len(found) > 1:
        ids = ", ".join(str(stored.id) for stored in found)
        _fail(f"{reference} matches the keys {ids}; revoke one by its id")
    stored = found[0]
    if revoke_key(engine, stored.id):
        typer.echo(f"revoked API key id={stored.id} prefix={stored.prefix}")
    else:
        typer.echo(f"API key id={stored.id} prefix={stored.prefix} was revoked already")


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """The outcome of ``purge_user``."""

    event_id: str
    time_us: int
    # Stored user.upserted events of the user that the deletion supersedes.
    superseded_upserts: int


def purge_user(engine: Engine, user_id: int) -> PurgeResult:
    """Delete a user through a new user.deleted event, as a producer would.

    The event goes through apply_batch, which tombstones the user in the
    projection and blanks the personal data in the user's stored upserts, so
    replays and rebuilds give the same result. Its time is now, or just after
    the user's newest stored user.* event if that lies in the future, so the
    deletion supersedes every upsert stored so far.
    """
    store = schema.event_store
    with engine.begin() as conn:
        newest = conn.execute(
            select(func.max(store.c.time_us)).where(store.c.subject_user_id == user_id)
        ).scalar()
        time_us = now_us() if newest is None else max(now_us(), newest + 1)
        event = Event(
            event_id=f"purge-user-{user_id}-{uuid.uuid4().hex}",
            type="user.deleted",
            source=PURGE_SOURCE,
            time_us=time_us,
            sequence=None,
            data=UserDeleted(user_id=user_id),
        )
        apply_batch(conn, [IncomingEvent(event, origin="purge-user")])
        superseded = conn.execute(
            select(func.count()).where(
                store.c.subject_user_id == user_id,
                store.c.type == "user.upserted",
            )
        ).scalar_one()
    return PurgeResult(event.event_id, time_us, superseded)


@commands.command("purge-user")
def purge_user_command(
    user_id: Annotated[
        int, typer.Argument(min=1, max=MAX_ID, help="The Moodle user id")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask to confirm")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Delete a user and blank their names and email in the event store.

    Appends a user.deleted event, so the user leaves every report. This cannot
    be undone: docs/privacy.md lists what is removed and what is kept.
    """
    engine = _cli_engine(database_url)
    if not yes:
        typer.confirm(
            f"Delete user {user_id} and blank their stored names and email?",
            abort=True,
        )
    result = purge_user(engine, user_id)
    typer.echo(
        f"user {user_id} purged: appended user.deleted event {result.event_id} at "
        f"{format_us(result.time_us)}; {result.superseded_upserts} stored "
        "user.upserted events are blanked"
    )


def _optional_time(micros: int | None) -> str:
    return "-" if micros is None else format_us(micros)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)
