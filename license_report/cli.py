"""The ``license-report`` command line."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from license_report.errors import LicenseReportError
from license_report.logs import configure_logging
from license_report.settings import Settings

# projections.rebuild.DEFAULT_BATCH_SIZE, repeated so that the CLI module does
# not import the projection code for every command.
REBUILD_BATCH_SIZE = 50_000

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Event-sourced IOMAD user license allocations report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy database URL [env: LICENSE_REPORT_DATABASE_URL]"),
]
SAMPLE_HISTORY = Path(__file__).parent / "data" / "sample-history.jsonl"


def _settings(**overrides: object) -> Settings:
    """Read settings from the environment; command-line values take precedence."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"LICENSE_REPORT_{'_'.join(map(str, item['loc'])).upper()}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        _fail(f"invalid settings: {problems}")
    configure_logging(settings.log_level)
    return settings


def _engine(settings: Settings, check_schema: bool = True, any_layout: bool = False):
    """Open the database; with ``check_schema``, refuse an outdated one.

    ``any_layout`` accepts a live projection of an older layout, which only a
    rebuild from the event store replaces.
    """
    from projections.migrate import check_current
    from projections.sql import make_engine

    engine = make_engine(settings.database_url)
    if check_schema:
        try:
            check_current(engine, any_layout=any_layout)
        except LicenseReportError as error:
            _fail(str(error))
    return engine


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema to this version."""
    from projections.migrate import upgrade

    settings = _settings(database_url=database_url)
    upgrade(_engine(settings, check_schema=False))
    typer.echo("schema is up to date")


@app.command()
def consume(
    database_url: DatabaseUrl = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated Kafka brokers "
            "[env: LICENSE_REPORT_KAFKA_BOOTSTRAP_SERVERS]"
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(help="Topic to consume [env: LICENSE_REPORT_KAFKA_TOPIC]"),
    ] = None,
    group_id: Annotated[
        str | None,
        typer.Option(help="Kafka consumer group [env: LICENSE_REPORT_KAFKA_GROUP_ID]"),
    ] = None,
) -> None:
    """Consume license events from Kafka into the projection until SIGTERM/SIGINT."""
    from consumer.loop import LicenseEventConsumer

    settings = _settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        kafka_topic=topic,
        kafka_group_id=group_id,
    )
    consumer = LicenseEventConsumer(settings, _engine(settings))
    consumer.install_signal_handlers()
    consumer.run()


@app.command()
def replay(
    files: Annotated[list[str], typer.Argument(help="JSON-lines files; - for stdin")],
    database_url: DatabaseUrl = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Events per transaction")
    ] = 5000,
) -> None:
    """Apply JSON-lines files of events through the same code as the consumer."""
    from consumer.replay import replay_files

    settings = _settings(database_url=database_url)
    for path in files:
        if path != "-" and not Path(path).is_file():
            _fail(f"file not found: {path}")
    result = replay_files(_engine(settings), files, batch_size=batch_size)
    typer.echo(
        f"lines={result.lines} applied={result.applied} "
        f"duplicates={result.duplicates} dead_letters={result.dead_letters}"
    )


@app.command()
def serve(
    database_url: DatabaseUrl = None,
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on [env: LICENSE_REPORT_API_HOST]"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on [env: LICENSE_REPORT_API_PORT]"),
    ] = None,
) -> None:
    """Serve the report API with uvicorn."""
    settings = _settings(database_url=database_url, api_host=host, api_port=port)
    # The app's lifespan (api.app) warns at start-up when no request can
    # authenticate, after it has counted the unrevoked stored keys.
    _serve(settings, _engine(settings))


def _serve(settings: Settings, engine) -> None:
    import uvicorn

    from api.app import create_app

    application = create_app(settings, engine)
    uvicorn.run(
        application,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )


@app.command()
def demo(
    database_url: DatabaseUrl = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    serve_api: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve the API after loading")
    ] = True,
) -> None:
    """Load the bundled sample history into a database and serve the API on it."""
    from consumer.replay import replay_files
    from projections.migrate import upgrade

    key = secrets.token_urlsafe(24)
    settings = _settings(
        database_url=database_url,
        api_host=host,
        api_port=port,
        api_keys=f'{{"{key}": "*"}}',
    )
    engine = _engine(settings, check_schema=False)
    upgrade(engine)
    result = replay_files(engine, [str(SAMPLE_HISTORY)])
    typer.echo(
        f"loaded the sample history into {settings.database_url}: "
        f"{result.applied} events applied, {result.duplicates} duplicates, "
        f"{result.dead_letters} dead letters"
    )
    companies = _company_ids(engine)
    base = f"http://{host}:{port}"
    typer.echo(f"companies: {', '.join(map(str, companies))}")
    typer.echo(f"API key: {key}")
    typer.echo(
        f'try: curl -H "Authorization: Bearer {key}" '
        f"{base}/v1/companies/{companies[0] if companies else 1}/license-allocations"
    )
    if serve_api:
        _serve(settings, engine)


def _company_ids(engine) -> list[int]:
    from sqlalchemy import select

    from projections.registry import live_projection

    with engine.connect() as conn:
        companies = live_projection(conn).companies
        query = select(companies.c.company_id).order_by(companies.c.company_id)
        return list(conn.execute(query).scalars())


@app.command()
def rebuild(
    sources: Annotated[
        list[str],
        typer.Option(
            "--from",
            help="store, kafka, or a JSON-lines file (repeat --from for several files)",
        ),
    ],
    database_url: DatabaseUrl = None,
    discard: Annotated[
        bool, typer.Option(help="Drop an interrupted rebuild instead of resuming it")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Events per transaction")
    ] = REBUILD_BATCH_SIZE,
) -> None:
    """Build a new projection beside the live one, then switch readers to it.

    With kafka or files, their events are first added to the event store (and to
    the live projection, as a replay does); the new projection is then built from
    the event store.
    """
    from consumer.replay import replay_files, replay_values
    from consumer.topic_reader import read_topic
    from license_report.progress import progress
    from projections.rebuild import rebuild_from_store

    settings = _settings(database_url=database_url)
    if (
        "store" in sources
        and len(sources) > 1
        or "kafka" in sources
        and len(sources) > 1
    ):
        _fail("--from store and --from kafka cannot be combined with other sources")
    files = [source for source in sources if source not in ("store", "kafka")]
    for path in files:
        if path != "-" and not Path(path).is_file():
            _fail(f"--from {path}: file not found; use store, kafka or a file path")
    engine = _engine(settings, any_layout=sources == ["store"])
    if sources == ["kafka"]:
        replay_values(engine, read_topic(settings))
    elif files:
        replay_files(engine, files)
    with progress("rebuild") as report:
        result = rebuild_from_store(
            engine,
            batch_size=batch_size,
            discard=discard,
            progress=report,
            source=",".join(sources),
        )
    rate = result.events / max(result.seconds, 1e-9)
    typer.echo(
        f"projection {result.version} is live (was {result.previous_version}): "
        f"{result.events} events in {result.seconds:.1f} s, {rate:.0f} events/s"
    )


@app.command()
def verify(
    database_url: DatabaseUrl = None,
    max_differences: Annotated[
        int, typer.Option(min=1, help="Differences to show per table and side")
    ] = 20,
) -> None:
    """Recompute the projection from the event store and compare it row by row.

    Exits with status 1 when the live projection differs.
    """
    from projections.verify import verify as verify_projection

    settings = _settings(database_url=database_url)
    result = verify_projection(_engine(settings), max_differences=max_differences)
    for difference in result.differences:
        typer.echo(f"only in {difference.side}: {difference.table} {difference.row}")
    if result.differences:
        typer.echo(
            f"projection {result.live_version} differs from the event store "
            f"({len(result.differences)} rows shown)",
            err=True,
        )
        raise typer.Exit(code=1)
    typer.echo(
        f"projection {result.live_version} matches the {result.events} events "
        "in the event store"
    )


dead_letters_app = typer.Typer(
    help="List rejected events, or re-drive them after a fix.",
    invoke_without_command=True,
)
app.add_typer(dead_letters_app, name="dead-letters")


@dead_letters_app.callback()
def dead_letters(
    context: typer.Context,
    database_url: DatabaseUrl = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show, newest first")] = 50,
) -> None:
    """List rejected events with the reason each was rejected."""
    if context.invoked_subcommand is not None:
        context.obj = database_url
        return
    from sqlalchemy import select

    from consumer.timestamps import format_us
    from projections import schema

    settings = _settings(database_url=database_url)
    table = schema.dead_letters
    query = select(table).order_by(table.c.id.desc()).limit(limit)
    with _engine(settings).connect() as conn:
        for row in conn.execute(query):
            where = f"{row.origin} partition={row.partition} offset={row.offset}"
            state = f"redriven as {row.redriven_event_id}" if row.redriven_at_us else ""
            typer.echo(
                f"{row.id}\t{format_us(row.received_at_us)}\t{where}\t{row.reason}"
                + (f"\t{state}" if state else "")
            )


@dead_letters_app.command("redrive")
def redrive_dead_letters(
    context: typer.Context,
    ids: Annotated[
        list[int] | None, typer.Argument(help="Dead letter ids; all when omitted")
    ] = None,
) -> None:
    """Decode dead letters again and apply the ones that are now accepted."""
    from consumer.redrive import redrive

    settings = _settings(database_url=context.obj)
    result = redrive(_engine(settings), ids or ())
    for letter_id, reason in result.still_rejected:
        typer.echo(f"{letter_id}\tstill rejected\t{reason}")
    typer.echo(
        f"accepted={result.accepted} applied={result.applied} "
        f"still_rejected={len(result.still_rejected)}"
    )


@app.command("import-moodle-log")
def import_moodle_log(
    files: Annotated[
        list[str],
        typer.Argument(
            help="Exports of logstore_standard_log: CSV with a header row, or JSON "
            "lines"
        ),
    ],
    database_url: DatabaseUrl = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per transaction")] = 5000,
) -> None:
    """Import IOMAD's license events from exports of Moodle's standard log."""
    from consumer.moodle_import import MoodleImportError
    from consumer.moodle_log import import_log_files

    settings = _settings(database_url=database_url)
    for path in files:
        if not Path(path).is_file():
            _fail(f"file not found: {path}")
    try:
        result = import_log_files(_engine(settings), files, batch_size=batch_size)
    except MoodleImportError as error:
        _fail(str(error))
    typer.echo(
        f"rows={result.rows} skipped={result.skipped} applied={result.applied} "
        f"duplicates={result.duplicates} dead_letters={result.dead_letters}"
    )


@app.command("import-moodle-reference")
def import_moodle_reference(
    users: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's user table, CSV or JSON lines"),
    ] = None,
    company_users: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's company_users table, CSV or JSON lines"),
    ] = None,
    departments: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's department table, CSV or JSON lines"),
    ] = None,
    licenses: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's companylicense table, CSV or JSON lines"),
    ] = None,
    courses: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's course table, CSV or JSON lines"),
    ] = None,
    companies: Annotated[
        str | None,
        typer.Option(help="Export of Moodle's company table, CSV or JSON lines"),
    ] = None,
    exported_at: Annotated[
        str | None,
        typer.Option(
            help="RFC 3339 time of the export, used as the event time of rows "
            "without a timemodified (default: the time the import starts)"
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per transaction")] = 5000,
) -> None:
    """Import users, departments, licenses, courses and companies from Moodle."""
    from consumer.moodle_import import MoodleImportError
    from consumer.moodle_reference import import_reference_files
    from consumer.timestamps import parse_rfc3339

    settings = _settings(database_url=database_url)
    exports = {
        "user": users,
        "company_users": company_users,
        "department": departments,
        "companylicense": licenses,
        "course": courses,
        "company": companies,
    }
    files = {table: path for table, path in exports.items() if path is not None}
    if not files:
        _fail(
            "no export given; pass at least one of --users, --company-users, "
            "--departments, --licenses, --courses, --companies"
        )
    for path in files.values():
        if not Path(path).is_file():
            _fail(f"file not found: {path}")
    default_time_us = None
    if exported_at is not None:
        try:
            default_time_us = parse_rfc3339(exported_at)
        except ValueError as error:
            _fail(f"invalid --exported-at: {error}")
    try:
        result = import_reference_files(
            _engine(settings),
            files,
            batch_size=batch_size,
            default_time_us=default_time_us,
        )
    except MoodleImportError as error:
        _fail(str(error))
    typer.echo(
        f"rows={result.rows} applied={result.applied} "
        f"duplicates={result.duplicates} dead_letters={result.dead_letters}"
    )


from license_report.keys_cli import commands as keys_commands  # noqa: E402

app.add_typer(keys_commands)  # keys create|list|revoke and purge-user

if __name__ == "__main__":
    app()
