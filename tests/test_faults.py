"""Exactly-once effects of ``license-report consume`` under faults.

Every test fills its own topic with a generated history, runs the consumer as
real subprocesses against the test broker and a fresh database, injects a fault
(SIGKILL, group membership changes, a paused broker, terminated PostgreSQL
backends, a frozen consumer that must be fenced, SIGTERM during a large batch or
while the broker is paused) and then checks the database against the
history: each event stored and projected once, each report equal to the oracle,
each malformed value a dead letter once.

``LICENSE_REPORT_SOAK=1`` scales the histories and the fault counts up.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from kafka import TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.pool import NullPool

from consumer import loop as consumer_loop
from license_report.settings import Settings
from projections.migrate import upgrade
from projections.sql import make_engine
from tests.consumer_process import (
    BackgroundProducer,
    ConsumerPool,
    ConsumerProcess,
    ExpectedReports,
    Progress,
    check_exactly_once,
    commit_kafka_offsets,
    expected_reports_later,
    produce,
    read_progress,
    wait_until,
)
from tests.history import History, generate_history_of_size

SEED = 20241204
SOAK = os.environ.get("LICENSE_REPORT_SOAK") == "1"

# Group timings for most tests here, shorter than the shared ones. A member that
# was killed, or could not leave, stays in the group until its session times out,
# and the broker delays each rebalance by up to the rebalance timeout (the max
# poll interval). On Tansu 0.6.0 with kafka-python 3.0.12, a consumer started
# right after a kill got its partitions after about 11 s with a 6 s session and a
# 10 s max poll interval, and after about 4 s with these values. A batch must
# then take less than 3 s, so tests with these timings keep batches small.
FAST_GROUP_TIMINGS = {
    "LICENSE_REPORT_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "LICENSE_REPORT_KAFKA_HEARTBEAT_INTERVAL_MS": "400",
    "LICENSE_REPORT_KAFKA_MAX_POLL_INTERVAL_MS": "3000",
}
# Small batches make a test's faults land at many points of the stream.
SMALL_BATCHES = {"LICENSE_REPORT_BATCH_MAX_RECORDS": "500"}
FAST = {**FAST_GROUP_TIMINGS, **SMALL_BATCHES}
# Seconds to wait for a consumer to commit its first batch after it starts.
FIRST_BATCH_TIMEOUT_S = 60.0
# Seconds to wait for the consumers to reach the end of the topic.
DONE_TIMEOUT_S = 240.0 if SOAK else 120.0


@dataclass
class Ingestion:
    """A topic filled with a history, a fresh database and the consumers on them.

    With a producer, the history is still being produced while the test runs.
    """

    history: History
    topic: str
    group_id: str
    engine: Engine
    pool: ConsumerPool
    expected: Future[ExpectedReports]
    produced: dict[int, int] | None = None
    producer: BackgroundProducer | None = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        """Record a fault or a step, with the seconds since the test's start."""
        self.notes.append(f"{time.monotonic() - self.started:.1f} s: {text}")

    @property
    def last_offsets(self) -> dict[int, int] | None:
        """Return the last offset of each partition, or None while producing."""
        if self.produced is None and self.producer and not self.producer.running:
            self.produced = self.producer.wait(0)
        return self.produced

    def progress(self) -> Progress:
        return read_progress(self.engine, self.group_id, self.topic)

    def produce_rest(self, messages: list, kafka_broker) -> None:
        """Produce more records once the background producer is done."""
        if self.producer is not None:
            self.produced = self.producer.wait(DONE_TIMEOUT_S)
            self.producer = None
        last = produce(kafka_broker.bootstrap_servers, self.topic, messages)
        merged = dict(self.produced or {})
        for partition, offset in last.items():
            merged[partition] = max(merged.get(partition, -1), offset)
        self.produced = merged

    def finished(self, progress: Progress) -> bool:
        """Tell whether the consumers stored offsets past every produced record."""
        last = self.last_offsets
        return last is not None and progress.done(last)

    def describe(self) -> str:
        """Explain how far the consumers got, with the faults and their logs."""
        progress = self.progress()
        last = self.last_offsets
        position = (
            "still producing; " + repr(progress)
            if last is None
            else progress.describe(last)
        )
        return "\n".join(
            [
                position,
                f"history: {len(self.history.logical)} events, "
                f"{len(self.history.malformed)} malformed values",
                "faults: " + ("; ".join(self.notes[-10:]) or "none"),
                self.pool.logs(),
            ]
        )

    def check_running(self) -> None:
        """Fail at once if a consumer exited that the test did not stop."""
        exited = self.pool.exited()
        assert not exited, (
            f"{exited[0].name} exited with code {exited[0].process.returncode}, "
            f"but a consumer must recover by itself\n{self.pool.logs(exited)}"
        )

    def wait_for_commit(self, after: Progress, timeout_s: float) -> Progress:
        """Wait until the stored offsets move past ``after`` or the topic is done."""

        def moved() -> bool:
            self.check_running()
            progress = self.progress()
            return progress.offsets != after.offsets or self.finished(progress)

        wait_until(moved, timeout_s, lambda: "no batch committed; " + self.describe())
        return self.progress()

    def wait_done(self, timeout_s: float = DONE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        if self.producer is not None:
            self.produced = self.producer.wait(timeout_s)

        def done() -> bool:
            self.check_running()
            return self.finished(self.progress())

        remaining = max(1.0, deadline - time.monotonic())
        wait_until(done, remaining, self.describe, interval_s=0.5)

    def check_exactly_once(self, extra_dead_letters: Sequence[bytes] = ()) -> None:
        """Check the database; ``extra_dead_letters`` were added to the history."""
        check_exactly_once(
            self.engine,
            self.history,
            self.topic,
            expected=self.expected,
            extra_dead_letters=extra_dead_letters,
        )

    def stop(self, consumer: ConsumerProcess) -> None:
        """SIGTERM a consumer and assert that it exits 0 in time.

        Waits first until the consumer has installed its signal handlers, which
        it logs as "consumer starting": SIGTERM before that ends the process
        with the default action.
        """
        wait_until(
            lambda: consumer.log_count("consumer starting") > 0 or not consumer.alive,
            FIRST_BATCH_TIMEOUT_S,
            lambda: f"{consumer.name} did not start\n{consumer.log_tail()}",
        )
        consumer.terminate()
        code = consumer.wait_exit()
        assert code == 0, (
            f"{consumer.name} exited with {code} after SIGTERM (None: still running "
            f"after the time-out)\n{consumer.log_tail()}"
        )


@contextmanager
def ingestion(
    kafka_broker,
    database_url: str,
    log_dir: Path,
    history: History,
    partitions: int,
    rate_per_s: float | None = None,
    messages: list[tuple[bytes | None, bytes | None]] | None = None,
) -> Iterator[Ingestion]:
    """Produce a history to a new topic; kill the test's consumers on exit.

    Without ``rate_per_s`` every record is produced before this returns;
    with it, records are produced at that rate while the test runs.
    ``messages`` replaces the history's own messages.
    """
    if messages is None:
        messages = history.messages
    name = uuid.uuid4().hex[:10]
    topic = f"faults-{name}"
    group_id = f"faults-{name}"
    kafka_broker.create_topic(topic, partitions=partitions)
    engine = make_engine(database_url)
    pool = ConsumerPool(
        log_dir,
        database_url=database_url,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topic=topic,
        group_id=group_id,
    )
    expected = expected_reports_later(history)
    run = Ingestion(history, topic, group_id, engine, pool, expected)
    if rate_per_s is None:
        run.produced = produce(kafka_broker.bootstrap_servers, topic, messages)
        assert len(run.produced) == partitions, (
            f"the history reached partitions {sorted(run.produced)} of {partitions}"
        )
    else:
        run.producer = BackgroundProducer(
            kafka_broker.bootstrap_servers, topic, messages, rate_per_s
        )
    try:
        yield run
    finally:
        pool.stop_all()
        if run.producer is not None:
            run.producer.join(60.0)
        engine.dispose()


@pytest.fixture(scope="module")
def large_history() -> History:
    """At least 50,000 messages, or about three times as many in a soak run."""
    history = generate_history_of_size(SEED, 200_000 if SOAK else 62_000)
    assert len(history.messages) >= 50_000, f"only {len(history.messages)} messages"
    return history


@pytest.fixture(scope="module")
def small_history() -> History:
    return generate_history_of_size(SEED + 2, 80_000 if SOAK else 40_000)


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def _kill_repeatedly(
    run: Ingestion, kills: int, rng: random.Random, postgres: bool = False
) -> tuple[int, int]:
    """SIGKILL a fresh consumer ``kills`` times at random points.

    Most kills come at a random moment after the consumer committed a batch, so
    they hit a transaction in flight. Every fourth one comes at a random moment
    after the start: during start-up, the group join or the first batch. Returns
    the number of kills and, on PostgreSQL, how many of them found a
    transaction open just before.
    """
    done = in_transaction = 0
    while done < kills:
        before = run.progress()
        if run.finished(before):
            break
        consumer = run.pool.start(FAST)
        if done % 4 == 3:
            delay = rng.uniform(0.0, 4.0)
            time.sleep(delay)
            point = f"{delay:.2f} s after start"
        else:
            run.wait_for_commit(before, FIRST_BATCH_TIMEOUT_S)
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)
            point = f"{delay:.2f} s after a commit"
        if postgres and _open_transactions(run.engine) > 0:
            in_transaction += 1
            point += ", in a transaction"
        consumer.kill()
        done += 1
        run.note(f"kill {done} of {consumer.name} {point}")
    return done, in_transaction


@pytest.mark.timeout(420 if not SOAK else 3600)
def test_consume_sigkill_postgres(kafka_broker, postgres_url, tmp_path, large_history):
    kills = 100 if SOAK else 20
    with ingestion(kafka_broker, postgres_url, tmp_path, large_history, 3) as run:
        done, in_transaction = _kill_repeatedly(
            run, kills, random.Random(SEED), postgres=True
        )
        assert done == kills, (
            f"the topic was consumed after {done} of {kills} kills; make the "
            f"history larger\n{run.describe()}"
        )
        assert in_transaction >= kills // 5, (
            f"only {in_transaction} of {kills} kills came during a transaction\n"
            + run.describe()
        )
        last = run.pool.start(FAST)
        run.wait_done()
        run.stop(last)
        run.check_exactly_once()


@pytest.mark.timeout(240 if not SOAK else 1800)
def test_consume_sigkill_sqlite(kafka_broker, tmp_path, small_history):
    url = f"sqlite:///{tmp_path / 'license-report.db'}"
    _migrate(url)
    kills = 20 if SOAK else 4
    with ingestion(kafka_broker, url, tmp_path, small_history, 2) as run:
        done, _ = _kill_repeatedly(run, kills, random.Random(SEED + 1))
        assert done == kills, (
            f"the topic was consumed after {done} of {kills} kills; make the "
            f"history larger\n{run.describe()}"
        )
        last = run.pool.start(FAST)
        run.wait_done()
        run.stop(last)
        run.check_exactly_once()


def _wait_for_assignment(consumer: ConsumerProcess, run: Ingestion) -> None:
    """Wait until ``consumer`` logs that it got at least one partition."""

    def assigned() -> bool:
        run.check_running()
        lines = [
            line
            for line in consumer.log_text().splitlines()
            if "partitions assigned partitions=" in line
            and not line.endswith("partitions=")
        ]
        return bool(lines)

    wait_until(
        assigned,
        FIRST_BATCH_TIMEOUT_S,
        lambda: f"{consumer.name} got no partitions; " + run.describe(),
    )


@pytest.mark.timeout(300 if not SOAK else 1800)
def test_consume_group_members_change(kafka_broker, postgres_url, tmp_path):
    history = generate_history_of_size(SEED + 3, 100_000 if SOAK else 22_000)
    # Most of the history streams in at a fixed rate while the members change,
    # and the rest only after the last change, so that some records are always
    # left for the final group, however slow the rebalances are.
    split = len(history.messages) * 4 // 5
    stream, rest = history.messages[:split], history.messages[split:]
    rate = 1_500.0
    with ingestion(
        kafka_broker, postgres_url, tmp_path, history, 6, rate, messages=stream
    ) as run:
        pool = run.pool
        first, second = pool.start(FAST), pool.start(FAST)
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
        run.note("two members")

        third = pool.start(FAST)
        _wait_for_assignment(third, run)
        run.note("third member joined")
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)

        # Each leaver hands its partitions to the others mid-stream.
        for leaver in (first, second):
            run.stop(leaver)
            run.note(f"{leaver.name} left")
            joiner = pool.start(FAST)
            _wait_for_assignment(joiner, run)
            run.note(f"{joiner.name} joined")

        run.produce_rest(rest, kafka_broker)
        run.wait_done()
        for consumer in pool.running:
            run.stop(consumer)

        appliers = [c.name for c in pool.started if c.log_count("batch applied")]
        assert len(appliers) >= 4, (
            f"only {appliers} applied batches; the group did not share the work"
        )
        run.check_exactly_once()


@pytest.mark.timeout(240)
def test_consume_broker_paused(kafka_broker, postgres_url, tmp_path):
    # Longer than the 6 s session timeout, so the broker may expel the member:
    # Tansu 0.6.0 did so in some runs, and in others took the heartbeats that
    # arrived on resume.
    pause_s = 8.0
    history = generate_history_of_size(SEED + 4, 60_000 if SOAK else 10_000)
    with ingestion(kafka_broker, postgres_url, tmp_path, history, 3) as run:
        consumer = run.pool.start(SMALL_BATCHES)
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
        kafka_broker.pause()
        try:
            time.sleep(pause_s)
            run.note(f"broker paused for {pause_s:.0f} s")
        finally:
            kafka_broker.resume()
        paused_at = run.progress()
        assert consumer.alive, (
            f"the consumer exited while the broker was paused\n{consumer.log_tail()}"
        )
        assert not run.finished(paused_at), (
            "the topic was consumed before the broker was paused; make the "
            f"history larger\n{run.describe()}"
        )

        run.wait_for_commit(paused_at, FIRST_BATCH_TIMEOUT_S)
        run.wait_done()
        run.stop(consumer)
        run.check_exactly_once()


def _terminate_backends(engine: Engine) -> int:
    """Terminate every other connection to the test database; return how many."""
    with engine.connect() as conn:
        terminated = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).all()
        conn.commit()
    return len(terminated)


@pytest.mark.timeout(240)
def test_consume_postgres_backends_terminated(kafka_broker, postgres_url, tmp_path):
    max_terminations = 30 if SOAK else 8
    required_failures = 10 if SOAK else 2
    rng = random.Random(SEED + 5)
    history = generate_history_of_size(SEED + 5, 60_000 if SOAK else 30_000)
    with ingestion(kafka_broker, postgres_url, tmp_path, history, 3) as run:
        consumer = run.pool.start(FAST)
        admin = make_engine(postgres_url, poolclass=NullPool)
        try:
            progress = run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
            terminations = 0
            # A termination between two batches only makes the consumer reconnect,
            # so go on until some hit a batch in flight.
            while (
                consumer.log_count("batch failed, retrying") < required_failures
                and terminations < max_terminations
                and not run.finished(progress)
            ):
                time.sleep(rng.uniform(0.1, 0.8))
                count = _terminate_backends(admin)
                terminations += 1
                run.note(f"termination {terminations}: {count} backends")
                progress = run.wait_for_commit(progress, FIRST_BATCH_TIMEOUT_S)
        finally:
            admin.dispose()
        failures = consumer.log_count("batch failed, retrying")
        assert failures >= required_failures, (
            f"{terminations} terminations made {failures} batches fail, expected "
            f"{required_failures}; make the history larger\n{run.describe()}"
        )

        run.wait_done()
        run.stop(consumer)
        run.check_exactly_once()


def _open_transactions(engine: Engine) -> int:
    """Count other sessions of the test database that are inside a transaction."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid() AND xact_start "
                "IS NOT NULL"
            )
        ).scalar_one()


def _lock_waits(engine: Engine) -> int:
    """Count sessions of the test database that wait for a lock."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()


_RESUMING = re.compile(r"resuming topic=(\S+) partition=(\d+) offset=(\d+)")


@pytest.mark.timeout(240)
def test_consume_sigterm_large_batch(kafka_broker, postgres_url, tmp_path):
    history = generate_history_of_size(SEED + 6, 80_000 if SOAK else 25_000)
    large_batches = {"LICENSE_REPORT_BATCH_MAX_RECORDS": "10000"}
    with ingestion(kafka_broker, postgres_url, tmp_path, history, 2) as run:
        first = run.pool.start(large_batches)
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
        wait_until(
            lambda: _open_transactions(run.engine) > 0,
            FIRST_BATCH_TIMEOUT_S,
            lambda: "the consumer opened no transaction; " + run.describe(),
            interval_s=0.02,
        )
        at_signal = run.progress()
        signalled = time.monotonic()
        first.terminate()
        code = first.wait_exit(30.0)
        seconds = time.monotonic() - signalled
        assert code == 0, (
            f"the consumer exited with {code} after SIGTERM (None: still running "
            f"after 30 s)\n{first.log_tail()}"
        )
        stopped = run.progress()
        assert stopped.offsets != at_signal.offsets, (
            "the batch in flight at SIGTERM was not committed before the exit\n"
            + run.describe()
        )
        assert not run.finished(stopped), (
            f"the topic was consumed by the first consumer; make the history "
            f"larger\n{run.describe()}"
        )
        run.note(f"SIGTERM exit after {seconds:.1f} s")
        # Kafka's committed offsets serve monitoring only: put them back to the
        # start, as lost commits would, and the database must still decide.
        commit_kafka_offsets(
            kafka_broker.bootstrap_servers,
            run.group_id,
            run.topic,
            dict.fromkeys(stopped.offsets, 0),
        )

        second = run.pool.start(large_batches)

        def resumed() -> dict[int, int]:
            return {
                int(partition): int(offset)
                for topic, partition, offset in _RESUMING.findall(second.log_text())
                if topic == run.topic
            }

        wait_until(
            lambda: len(resumed()) == len(stopped.offsets),
            FIRST_BATCH_TIMEOUT_S,
            lambda: (
                "the restarted consumer logged no resume offsets; " + run.describe()
            ),
        )
        assert resumed() == stopped.offsets, (
            f"the restarted consumer resumed at {resumed()}, but the stored offsets "
            f"at exit were {stopped.offsets}\n{second.log_tail()}"
        )
        run.wait_done()
        run.stop(second)
        run.check_exactly_once()


DENSE_REJECT = b"not json %d"


def _with_dense_rejects(history: History, every: int) -> list:
    """Return the history's messages with an invalid value after every ``every``.

    Dead letters are stored only once per record, so they show a batch that two
    consumers both committed; dense ones make every batch carry some.
    """
    messages = []
    for index, (key, value) in enumerate(history.messages):
        messages.append((key, value))
        if index % every == every - 1:
            # The neighbour's key puts it in the same partition.
            messages.append((key or b"reject", DENSE_REJECT % index))
    return messages


def _dense_rejects(messages: list) -> list[bytes]:
    prefix = DENSE_REJECT.split(b"%")[0]
    return [value for _, value in messages if value.startswith(prefix)]


# Seconds a consumer may take to exit after SIGTERM while the broker does not
# respond. Its Kafka calls at exit have time limits, well below the 30 s request
# time-out that each of them would otherwise wait.
PAUSED_EXIT_TIMEOUT_S = 15.0


@pytest.mark.timeout(240)
def test_consume_sigterm_broker_paused(kafka_broker, postgres_url, tmp_path):
    history = generate_history_of_size(SEED + 7, 5_000)
    # The offset commit to Kafka times out while the broker is paused, so Kafka's
    # committed offsets may stay behind the database's (Tansu 0.6.0 still applied
    # the request on resume). Dense dead letters would show a successor that
    # resumed behind the stored offsets.
    messages = _with_dense_rejects(history, 25)
    with ingestion(
        kafka_broker, postgres_url, tmp_path, history, 2, messages=messages
    ) as run:
        # The first consumer cannot leave the group, so short timings let the
        # second one take over sooner.
        first = run.pool.start(FAST)
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
        kafka_broker.pause()
        try:
            time.sleep(1.0)
            signalled = time.monotonic()
            first.terminate()
            code = first.wait_exit(PAUSED_EXIT_TIMEOUT_S)
            seconds = time.monotonic() - signalled
        finally:
            kafka_broker.resume()
        assert code == 0, (
            f"with the broker paused, the consumer exited with {code} after "
            f"SIGTERM (None: still running after {PAUSED_EXIT_TIMEOUT_S:.0f} s)\n"
            + first.log_tail()
        )
        run.note(f"SIGTERM exit after {seconds:.1f} s with the broker paused")

        second = run.pool.start(FAST)
        run.wait_done()
        run.stop(second)
        run.check_exactly_once(_dense_rejects(messages))


@pytest.mark.timeout(240)
def test_consume_frozen_consumer_fenced(kafka_broker, postgres_url, tmp_path):
    history = generate_history_of_size(SEED + 8, 40_000 if SOAK else 10_000)
    messages = _with_dense_rejects(history, 25)
    rejects = _dense_rejects(messages)
    partitions = 2
    with ingestion(
        kafka_broker, postgres_url, tmp_path, history, partitions, messages=messages
    ) as run:
        zombie = run.pool.start(FAST)
        run.wait_for_commit(run.progress(), FIRST_BATCH_TIMEOUT_S)
        # Freeze the first consumer inside a transaction, so that it resumes
        # with a batch that the second one has taken over meanwhile.
        wait_until(
            lambda: _open_transactions(run.engine) > 0,
            FIRST_BATCH_TIMEOUT_S,
            lambda: "the consumer opened no transaction; " + run.describe(),
            interval_s=0.01,
        )
        zombie.freeze()
        try:
            frozen_at = run.progress()
            run.note(f"{zombie.name} frozen in a transaction")
            successor = run.pool.start(FAST)
            _wait_for_assignment(successor, run)

            # Thaw only once the successor has reached the frozen batch: it
            # waits for the frozen transaction's locks, or it has committed
            # batches of both partitions. One of the two is fenced either way.
            def reached() -> bool:
                if _lock_waits(run.engine) > 0:
                    return True
                offsets = run.progress().offsets
                return all(
                    offsets.get(partition) != frozen_at.offsets.get(partition)
                    for partition in range(partitions)
                )

            wait_until(
                reached,
                FIRST_BATCH_TIMEOUT_S,
                lambda: (
                    "the successor did not reach the frozen batch; " + run.describe()
                ),
            )
        finally:
            zombie.thaw()
        run.note(f"{zombie.name} thawed")

        wait_until(
            lambda: any(c.log_count("batch dropped") for c in run.pool.started),
            FIRST_BATCH_TIMEOUT_S,
            lambda: "no consumer was fenced; " + run.describe(),
        )
        run.wait_done()
        for consumer in run.pool.running:
            run.stop(consumer)
        run.check_exactly_once(rejects)


class _StubKafka:
    """A stand-in for KafkaConsumer that records the requested seeks and commits."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict] = []

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    def commit(self, offsets: dict, timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)


class _Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    value: bytes


def test_process_driver_error_rewinds(engine, monkeypatch):
    """An error that the driver raises unwrapped is retried like any database error.

    Code that writes through the driver connection itself, such as a COPY, gets
    the driver's exceptions rather than SQLAlchemy's.
    """
    driver_error = engine.dialect.loaded_dbapi.OperationalError

    def fail(*_args, **_kwargs):
        raise driver_error("connection lost during COPY")

    monkeypatch.setattr(consumer_loop, "apply_batch", fail)
    settings = Settings(kafka_topic="t", kafka_group_id="g", metrics_port=0)
    consumer = consumer_loop.LicenseEventConsumer(settings, engine)
    # A set stop event makes the back-off return at once.
    consumer.stopping.set()
    kafka = _StubKafka()
    consumer._kafka = kafka
    partition = TopicPartition("t", 0)
    records = [_Record("t", 0, 5, b"{}"), _Record("t", 0, 6, b"{}")]

    consumer._process({partition: records})

    assert kafka.seeks == [(partition, 5)], "the failed batch was not rewound"
    assert not kafka.commits, "offsets of a failed batch were committed to Kafka"
    assert consumer.expected.get(partition) is None, "the stored offset moved"
