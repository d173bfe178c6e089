"""Run ``license-report consume`` as real subprocesses and watch what they store.

Fault tests start consumers with settings in their environment, kill or stop them
with signals, and read the database to see how far they got. Every consumer writes
its log to its own file, so a failing test can show the tail of each log.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import DBAPIError

from consumer.batch import MAX_DEAD_LETTER_BYTES
from projections import schema
from projections.registry import live_projection
from tests.history import History
from tests.oracle import expected_report, format_instant

# Consumer group timings for the subprocesses, in milliseconds. With
# kafka-python 3.0.12 and Tansu 0.6.0, a new group got its first records after
# about 23 s with kafka-python's defaults. With these, it took about 3 s.
GROUP_TIMING_ENV = {
    "LICENSE_REPORT_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "LICENSE_REPORT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "LICENSE_REPORT_KAFKA_MAX_POLL_INTERVAL_MS": "10000",
}
# Seconds to wait for a signalled consumer to exit before the test fails.
EXIT_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 30
# Seconds to wait for the oracle's reports of a history.
ORACLE_TIMEOUT_S = 120.0
# Seconds to retry a progress query whose database connection failed.
READ_RETRY_S = 10.0
# prctl option from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def _command() -> list[str]:
    """Return the command that runs the CLI of the interpreter running the tests."""
    script = Path(sys.executable).with_name("license-report")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from license_report.cli import app; app()"]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the consumer when the test process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class ConsumerProcess:
    """One ``license-report consume`` subprocess and its log file."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path):
        self.name = name
        self.process = process
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        name: str,
        log_dir: Path,
        *,
        database_url: str,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        settings: Mapping[str, str] | None = None,
    ) -> ConsumerProcess:
        """Start a consumer; ``settings`` adds or overrides LICENSE_REPORT_* values."""
        env = dict(os.environ)
        env.update(GROUP_TIMING_ENV)
        env.update(
            {
                "LICENSE_REPORT_DATABASE_URL": database_url,
                "LICENSE_REPORT_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
                "LICENSE_REPORT_KAFKA_TOPIC": topic,
                "LICENSE_REPORT_KAFKA_GROUP_ID": group_id,
                "LICENSE_REPORT_METRICS_PORT": "0",
                "LICENSE_REPORT_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(settings or {})
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [*_command(), "consume"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        return cls(name, process, log_path)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Send SIGKILL and reap the process."""
        if self.alive:
            self.process.kill()
        self.process.wait(timeout=EXIT_TIMEOUT_S)

    def terminate(self) -> None:
        """Send SIGTERM without waiting."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)

    def freeze(self) -> None:
        """Suspend the process with SIGSTOP, as a long pause of its host would."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Continue a suspended process with SIGCONT."""
        self.process.send_signal(signal.SIGCONT)

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int | None:
        """Wait for the process to exit; return its exit code, or None on time-out."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def log_count(self, text: str) -> int:
        """Count the log lines that contain ``text``."""
        return sum(1 for line in self.log_text().splitlines() if text in line)


class ConsumerPool:
    """The consumers one test started, so it can stop them all and show their logs."""

    def __init__(self, log_dir: Path, **start_options: object) -> None:
        self.log_dir = log_dir
        self.start_options = start_options
        self.started: list[ConsumerProcess] = []

    def start(self, settings: Mapping[str, str] | None = None) -> ConsumerProcess:
        name = f"consumer-{len(self.started) + 1:02d}"
        consumer = ConsumerProcess.start(
            name, self.log_dir, settings=settings, **self.start_options
        )
        self.started.append(consumer)
        return consumer

    @property
    def running(self) -> list[ConsumerProcess]:
        return [consumer for consumer in self.started if consumer.alive]

    def exited(self) -> list[ConsumerProcess]:
        """Return consumers that exited without being signalled by the test."""
        return [
            consumer
            for consumer in self.started
            if not consumer.alive and consumer.process.returncode not in (0, -9)
        ]

    def stop_all(self) -> None:
        """SIGKILL every consumer still running; used on test teardown."""
        for consumer in self.started:
            if consumer.alive:
                # A suspended process must run again to be reaped promptly.
                consumer.thaw()
                consumer.kill()

    def logs(self, consumers: Iterable[ConsumerProcess] | None = None) -> str:
        chosen = self.started if consumers is None else list(consumers)
        if not chosen:
            return "(no consumer was started)"
        return "\n".join(consumer.log_tail() for consumer in chosen[-3:])


def produce(
    bootstrap_servers: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    linger_ms: int = 20,
    rate_per_s: float | None = None,
) -> dict[int, int]:
    """Send records and return the offset of the last record of each partition.

    The offsets come from the broker's acknowledgements, so a test can compare them
    with the offsets the consumer stores. One request per connection is in flight,
    so records with the same key keep their order. With ``rate_per_s`` the sends
    are paced to about that many records per second.
    """
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=linger_ms,
        max_in_flight_requests_per_connection=1,
        max_request_size=8 * 1024 * 1024,
    )
    try:
        started = time.monotonic()
        futures = []
        for index, (key, value) in enumerate(messages):
            if rate_per_s and index % 100 == 0:
                ahead = started + index / rate_per_s - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            futures.append(producer.send(topic, key=key, value=value))
        producer.flush()
        last: dict[int, int] = {}
        for future in futures:
            metadata = future.get(timeout=30)
            last[metadata.partition] = max(
                last.get(metadata.partition, -1), metadata.offset
            )
    finally:
        producer.close()
    return last


class BackgroundProducer:
    """Produces records at a fixed rate in a thread, as a live stream does.

    Consumers then work at the head of the topic while a test changes the group
    or breaks the database, however fast the machine is.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        messages: list[tuple[bytes | None, bytes | None]],
        rate_per_s: float,
    ) -> None:
        self.last_offsets: dict[int, int] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(bootstrap_servers, topic, messages, rate_per_s),
            name=f"produce-{topic}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, bootstrap_servers, topic, messages, rate_per_s) -> None:
        try:
            self.last_offsets = produce(
                bootstrap_servers, topic, messages, rate_per_s=rate_per_s
            )
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self.error = error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to end, without checking how producing went."""
        self._thread.join(timeout_s)

    def wait(self, timeout_s: float) -> dict[int, int]:
        """Wait for the last acknowledgement; return the last offset per partition."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), (
            f"producing did not finish within {timeout_s:.0f} s"
        )
        if self.error is not None:
            raise AssertionError(f"producing failed: {self.error!r}") from self.error
        assert self.last_offsets is not None
        return self.last_offsets


def commit_kafka_offsets(
    bootstrap_servers: str, group_id: str, topic: str, offsets: Mapping[int, int]
) -> None:
    """Commit offsets to Kafka for a group that has no members at the moment.

    Tests use it to put Kafka's committed offsets behind the database's, as
    lost commits would, and check that consumers resume from the database.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
    )
    try:
        partitions = {TopicPartition(topic, partition) for partition in offsets}
        consumer.assign(list(partitions))
        consumer.commit(
            {
                TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                for partition, offset in offsets.items()
            }
        )
    finally:
        consumer.close(autocommit=False)


@dataclass(frozen=True)
class Progress:
    """What the consumers have committed to the database so far."""

    events: int
    dead_letters: int
    offsets: dict[int, int]

    def done(self, last_offsets: Mapping[int, int]) -> bool:
        """Tell whether every partition's stored offset is past its last record."""
        return all(
            self.offsets.get(partition) == offset + 1
            for partition, offset in last_offsets.items()
        )

    def describe(self, last_offsets: Mapping[int, int]) -> str:
        expected = {partition: offset + 1 for partition, offset in last_offsets.items()}
        return (
            f"stored next offsets {dict(sorted(self.offsets.items()))}, expected "
            f"{dict(sorted(expected.items()))}; events={self.events} "
            f"dead_letters={self.dead_letters}"
        )


def read_progress(engine: Engine, group_id: str, topic: str) -> Progress:
    """Read the event store and dead-letter counts and the group's stored offsets.

    Retries for a few seconds when the database connection fails, because fault
    tests terminate every backend, the test's own included.
    """
    offsets = schema.consumer_offsets
    deadline = time.monotonic() + READ_RETRY_S
    while True:
        try:
            with engine.connect() as conn:
                events = conn.execute(
                    select(func.count()).select_from(schema.event_store)
                ).scalar_one()
                letters = conn.execute(
                    select(func.count()).select_from(schema.dead_letters)
                ).scalar_one()
                rows = conn.execute(
                    select(offsets.c.partition, offsets.c.next_offset).where(
                        offsets.c.group_id == group_id, offsets.c.topic == topic
                    )
                ).all()
            return Progress(events, letters, dict(rows))
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    describe: Callable[[], str],
    interval_s: float = 0.2,
) -> None:
    """Poll ``condition`` until it holds, or fail with ``describe()`` on time-out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    if condition():
        return
    raise AssertionError(f"timed out after {timeout_s:.0f} s: {describe()}")


# Checks of the final database against a generated history


class ProjectionSnapshot:
    """The live projection's tables, read once, to build report rows from.

    The rows have the shape of ``tests.oracle.expected_report`` and follow the
    visibility rules that its docstring states, so the two can be compared
    without the API.
    """

    def __init__(self, conn: Connection) -> None:
        p = live_projection(conn)
        self.users = {row.user_id: row for row in conn.execute(select(p.users))}
        self.licenses = {
            row.license_id: row for row in conn.execute(select(p.licenses))
        }
        self.courses = {row.course_id: row for row in conn.execute(select(p.courses))}
        self.department_names = {
            row.department_id: row.name
            for row in conn.execute(select(p.departments))
            if not row.deleted
        }

        # Departments each (user, company) is assigned to now.
        self.memberships: dict[tuple[int, int], list[int]] = {}
        for row in conn.execute(select(p.memberships).where(p.memberships.c.assigned)):
            key = (row.user_id, row.company_id)
            self.memberships.setdefault(key, []).append(row.department_id)

        self.allocations = sorted(
            conn.execute(select(p.license_allocations)).all(),
            key=lambda row: (row.user_id, row.license_id, row.course_id),
        )
        # Allocation and unallocation instants of every report row.
        instants: dict[tuple, tuple[list[int], list[int]]] = {}
        for row in conn.execute(select(p.license_events)):
            key = (row.user_id, row.license_id, row.course_id)
            allocated, unallocated = instants.setdefault(key, ([], []))
            (allocated if row.action == 1 else unallocated).append(row.at_us)
        self.dates = {
            key: (
                [format_instant(value) for value in sorted(allocated)],
                [format_instant(value) for value in sorted(unallocated)],
            )
            for key, (allocated, unallocated) in instants.items()
        }

    def report(
        self, company_id: int, include_suspended: bool = False
    ) -> list[dict[str, Any]]:
        """Build one company's report rows, sorted by user, license and course."""
        rows = []
        for row in self.allocations:
            license_ = self.licenses.get(row.license_id)
            if license_ is None or license_.deleted:
                continue
            if license_.company_id != company_id:
                continue
            user = self.users.get(row.user_id)
            if user is None or user.deleted:
                continue
            if user.suspended and not include_suspended:
                continue
            department_ids = self.memberships.get((row.user_id, company_id))
            if not department_ids:
                continue
            course = self.courses.get(row.course_id)
            key = (row.user_id, row.license_id, row.course_id)
            allocated, unallocated = self.dates.get(key, ([], []))
            names = [
                self.department_names[department_id]
                for department_id in department_ids
                if department_id in self.department_names
            ]
            rows.append(
                {
                    "user_id": row.user_id,
                    "firstname": user.firstname,
                    "lastname": user.lastname,
                    "email": user.email,
                    "departments": sorted(names),
                    "license_id": row.license_id,
                    "license_name": license_.name,
                    "reusable": license_.reusable,
                    "course_id": row.course_id,
                    "course_name": None if course is None else course.name,
                    "allocated": row.allocated,
                    "dates_allocated": allocated,
                    "dates_unallocated": unallocated,
                    "allocations": row.allocations,
                    "unallocations": row.unallocations,
                }
            )
        return rows


# Expected report rows by (company id, include_suspended).
ExpectedReports = dict[tuple[int, bool], list[dict[str, Any]]]


def expected_reports(history: History) -> ExpectedReports:
    """Compute the oracle's report of every company, with and without suspended."""
    return {
        (company_id, include_suspended): expected_report(
            history.logical, company_id, include_suspended
        )
        for company_id in history.company_ids
        for include_suspended in (False, True)
    }


def expected_reports_later(history: History) -> Future[ExpectedReports]:
    """Start computing the oracle's reports in a thread, while a test waits.

    The oracle takes seconds on large histories, and fault tests spend most of
    their time waiting for consumers, so the work overlaps.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oracle")
    future = executor.submit(expected_reports, history)
    executor.shutdown(wait=False)
    return future


def report_differences(engine: Engine, expected: ExpectedReports) -> list[str]:
    """Compare the projection's reports with the expected ones.

    Returns one line per company and mode whose rows differ, naming the first
    differing row; an empty list means the reports are equal.
    """
    with engine.connect() as conn:
        snapshot = ProjectionSnapshot(conn)
    differences = []
    for (company_id, include_suspended), rows in sorted(expected.items()):
        actual = snapshot.report(company_id, include_suspended)
        if actual == rows:
            continue
        first = next(
            (
                (want, got)
                for want, got in zip(rows, actual, strict=False)
                if want != got
            ),
            (None, None),
        )
        differences.append(
            f"company {company_id} include_suspended={include_suspended}: "
            f"{len(actual)} rows, expected {len(rows)}; first difference: "
            f"expected {first[0]}, got {first[1]}"
        )
    return differences


@dataclass(frozen=True)
class StoredState:
    """What the database contains after a run, for exactly-once checks."""

    event_ids: list[str]
    events_applied: int
    license_events: int
    allocation_totals: dict[tuple[int, int, int], tuple[int, int]]
    dead_letters: list[tuple[str, int | None, int | None, bytes, str]]


def read_stored_state(engine: Engine) -> StoredState:
    """Read the event store, the projection's counters and the dead letters."""
    with engine.connect() as conn:
        p = live_projection(conn)
        event_ids = list(conn.execute(select(schema.event_store.c.event_id)).scalars())
        applied = conn.execute(select(p.state.c.events_applied)).scalar_one_or_none()
        license_events = conn.execute(
            select(func.count()).select_from(p.license_events)
        ).scalar_one()
        totals = {
            (row.user_id, row.license_id, row.course_id): (
                row.allocations,
                row.unallocations,
            )
            for row in conn.execute(select(p.license_allocations))
        }
        letters = schema.dead_letters
        dead_letters = [
            (row.origin, row.partition, row.offset, bytes(row.raw), row.reason)
            for row in conn.execute(
                select(
                    letters.c.origin,
                    letters.c.partition,
                    letters.c.offset,
                    letters.c.raw,
                    letters.c.reason,
                )
            )
        ]
    return StoredState(event_ids, applied or 0, license_events, totals, dead_letters)


def expected_allocation_totals(
    history: History,
) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Count the distinct allocations and unallocations of every report row."""
    totals: dict[tuple[int, int, int], list[int]] = {}
    for event in history.logical:
        if event.type not in ("license.allocated", "license.unallocated"):
            continue
        data = event.data
        key = (data["user_id"], data["license_id"], data["course_id"])
        counts = totals.setdefault(key, [0, 0])
        counts[0 if event.type == "license.allocated" else 1] += 1
    return {key: (counts[0], counts[1]) for key, counts in totals.items()}


def check_exactly_once(
    engine: Engine,
    history: History,
    topic: str,
    *,
    expected: ExpectedReports | Future[ExpectedReports] | None = None,
    extra_event_ids: Collection[str] = (),
    extra_dead_letters: Iterable[bytes | None] = (),
) -> None:
    """Assert that the database holds every event and dead letter exactly once.

    Checks the event store against the history's distinct events, the
    projection's counters against its license events, every company's report
    against the oracle, and the dead letters against its malformed values.
    ``expected`` holds the oracle's reports if a test computed them already.
    ``extra_event_ids`` and ``extra_dead_letters`` name what a test sent besides
    the history; the extra events must not touch the history's report rows.
    """
    state = read_stored_state(engine)
    stored = Counter(state.event_ids)
    repeated = sorted(event_id for event_id, count in stored.items() if count > 1)
    assert not repeated, f"event ids stored more than once: {repeated[:5]}"
    distinct = len(history.logical) + len(extra_event_ids)
    assert len(stored) == distinct, (
        f"the event store holds {len(stored)} events, expected {distinct} "
        f"distinct events"
    )
    # Moodle events without a log id get a content hash as id, which the
    # history does not know, so only the other ids are compared by name.
    named = {
        event.event_id
        for event in history.logical
        if not event.event_id.startswith("moodle-content:")
    }
    missing = sorted((named | set(extra_event_ids)) - stored.keys())
    assert not missing, f"events missing from the event store: {missing[:5]}"
    assert state.events_applied == distinct, (
        f"the projection counted {state.events_applied} applied events, expected "
        f"{distinct}: an event was projected twice or not at all"
    )

    license_events = sum(
        1
        for event in history.logical
        if event.type in ("license.allocated", "license.unallocated")
    )
    assert state.license_events == license_events, (
        f"the projection holds {state.license_events} license events, expected "
        f"{license_events}"
    )
    expected_totals = expected_allocation_totals(history)
    wrong_totals = sorted(
        (key, state.allocation_totals.get(key), counts)
        for key, counts in expected_totals.items()
        if state.allocation_totals.get(key) != counts
    )
    assert not wrong_totals, (
        f"{len(wrong_totals)} report rows have wrong (allocations, unallocations); "
        f"first (row, stored, expected): {wrong_totals[:3]}"
    )
    extra_rows = sorted(state.allocation_totals.keys() - expected_totals.keys())
    assert not extra_rows, f"report rows that no event created: {extra_rows[:5]}"
    if expected is None:
        expected = expected_reports(history)
    elif isinstance(expected, Future):
        expected = expected.result(timeout=ORACLE_TIMEOUT_S)
    differences = report_differences(engine, expected)
    assert not differences, "reports differ from the oracle:\n" + "\n".join(differences)

    rejected = [item.value for item in history.malformed] + list(extra_dead_letters)
    check_dead_letters(state, rejected, topic)


def check_dead_letters(
    state: StoredState, expected_values: Iterable[bytes | None], topic: str
) -> None:
    """Assert that each rejected value is a dead letter exactly once, with a reason.

    A null value is stored as empty bytes, and a long one cut to the dead-letter
    limit.
    """
    expected = Counter(
        (value or b"")[:MAX_DEAD_LETTER_BYTES] for value in expected_values
    )
    stored = Counter(raw for _, _, _, raw, _ in state.dead_letters)
    extra = stored - expected
    missing = expected - stored
    assert not extra, (
        f"{sum(extra.values())} dead letters more than rejected values, first: "
        f"{[value[:80] for value in list(extra)[:3]]}"
    )
    assert not missing, (
        f"{sum(missing.values())} rejected values are not dead letters, first: "
        f"{[value[:80] for value in list(missing)[:3]]}"
    )
    coordinates = Counter(
        (origin, partition, offset)
        for origin, partition, offset, _, _ in state.dead_letters
    )
    repeated = [key for key, count in coordinates.items() if count > 1]
    assert not repeated, f"Kafka records stored as dead letters twice: {repeated[:5]}"
    origins = {origin for origin, _, _, _, _ in state.dead_letters}
    assert origins <= {topic}, f"dead letters from {origins}, expected only {topic}"
    no_reason = [raw[:80] for _, _, _, raw, reason in state.dead_letters if not reason]
    assert not no_reason, f"dead letters without a reason: {no_reason[:3]}"
