"""Helpers shared by the benchmarks: databases, the test broker, processes, tables.

Every benchmark creates its own PostgreSQL databases and its own broker and
removes them when it ends, also when it fails.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from projections.migrate import upgrade
from projections.sql import make_engine

logger = logging.getLogger("bench")

SCALES = ("tiny", "small", "full")
ADMIN_URL_ENV = "LICENSE_REPORT_BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE_PREFIX = "lrbench"
# prctl option from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def parser(description: str) -> argparse.ArgumentParser:
    """Return an argument parser with the options every benchmark has."""
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument(
        "--scale",
        choices=SCALES,
        default="small",
        help="data size: tiny (seconds, for tests), small, or full (the targets)",
    )
    arguments.add_argument(
        "--postgres-url",
        default=os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL),
        help="administrative PostgreSQL URL; the benchmark creates and drops its "
        f"own databases through it [env: {ADMIN_URL_ENV}]",
    )
    arguments.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="directory for generated files and logs (default: a temporary one, "
        "removed at the end)",
    )
    arguments.add_argument("--seed", type=int, default=1, help="history seed")
    arguments.add_argument(
        "--verbose", action="store_true", help="log debug messages too"
    )
    return arguments


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # kafka-python logs every connection at INFO.
    logging.getLogger("kafka").setLevel(logging.WARNING)


@contextmanager
def work_directory(path: Path | None) -> Iterator[Path]:
    """Yield ``path`` (created if missing), or a temporary directory removed after."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="license-report-bench-") as name:
        yield Path(name)


@contextmanager
def temporary_database(admin_url: str, label: str) -> Iterator[str]:
    """Create a migrated PostgreSQL database, yield its URL, then drop it."""
    name = f"{DATABASE_PREFIX}_{label}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    logger.info("database created name=%s", name)
    try:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        logger.info("database dropped name=%s", name)


@contextmanager
def kafka_broker(work_dir: Path) -> Iterator[Any]:
    """Start a Kafka-protocol test broker on a free loopback port; stop it after."""
    from tests.kafka_broker import KafkaBroker

    broker = KafkaBroker.start(work_dir / "broker.log")
    try:
        yield broker
    finally:
        broker.stop()


def create_topic(bootstrap_servers: str, topic: str, partitions: int) -> None:
    """Create ``topic`` and wait until every partition has a leader."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            described = admin.describe_topics([topic])
            found = described[0]["partitions"] if described else []
            if len(found) == partitions and all(p["leader_id"] >= 0 for p in found):
                return
            time.sleep(0.1)
        raise TimeoutError(f"topic {topic} has no partition leaders after 10 s")
    finally:
        admin.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Return the peak resident set size (VmHWM) of a running process, in MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def cli_command() -> list[str]:
    """Return the command that runs this interpreter's ``license-report``."""
    script = Path(sys.executable).with_name("license-report")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "license_report.cli"]


def cli_environment(database_url: str, **settings: str) -> dict[str, str]:
    """Return this process's environment with the given LICENSE_REPORT_ settings.

    Inherited LICENSE_REPORT_ variables are dropped, so the caller's shell
    cannot point a benchmark at another database or broker.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("LICENSE_REPORT_")
    }
    environment["LICENSE_REPORT_DATABASE_URL"] = database_url
    environment["LICENSE_REPORT_METRICS_PORT"] = "0"
    environment["PYTHONUNBUFFERED"] = "1"
    for name, value in settings.items():
        environment[f"LICENSE_REPORT_{name.upper()}"] = value
    return environment


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the child when the benchmark process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def start_process(
    command: Sequence[str], log_path: Path, environment: dict[str, str]
) -> subprocess.Popen:
    """Start a child process that writes its output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            preexec_fn=_die_with_parent,
        )


@dataclass(frozen=True)
class ProcessRun:
    """A child process that ran to its end."""

    seconds: float
    exit_code: int
    peak_rss_mb: float


def run_process(
    command: Sequence[str],
    log_path: Path,
    environment: dict[str, str],
    timeout_s: float = 900,
) -> ProcessRun:
    """Run a command to its end; return its wall time and peak RSS (from wait4)."""
    started = time.monotonic()
    process = start_process(command, log_path, environment)
    deadline = started + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"{command[-1]} did not finish in {timeout_s:.0f} s")
        time.sleep(0.02)
    seconds = time.monotonic() - started
    # The process is reaped already; tell Popen so it does not wait again.
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {process.returncode}; "
            f"last lines of {log_path}:\n{tail(log_path)}"
        )
    # Linux reports ru_maxrss in KiB.
    return ProcessRun(seconds, process.returncode, usage.ru_maxrss / 1024)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> int:
    """Send SIGTERM, wait for the exit, and SIGKILL after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("process ignored SIGTERM, killing it pid=%d", process.pid)
        process.kill()
        return process.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def _call_and_measure(function: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    result = function(*args)
    return result, peak_rss_mb() or 0.0


def run_in_child(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Call ``function(*args)`` in a fresh interpreter; return its result and peak RSS.

    The function and its arguments must be picklable. The peak RSS in MiB is the
    child's, so this process's own memory does not count.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_call_and_measure, (function, args))


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    describe: Callable[[], str],
    interval_s: float = 0.2,
) -> None:
    """Poll ``condition`` until it is true; raise TimeoutError with ``describe()``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s: {describe()}")
        time.sleep(interval_s)


def scalar(engine: Engine, sql: str, **parameters: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), parameters).scalar()


@dataclass
class ResultTable:
    """A small table of benchmark figures, printed at the end of a run."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: object) -> None:
        self.rows.append([_cell(value) for value in values])

    def render(self) -> str:
        widths = [
            max(len(column), *(len(row[index]) for row in self.rows))
            if self.rows
            else len(column)
            for index, column in enumerate(self.columns)
        ]
        lines = [self.title, "", _line(self.columns, widths)]
        lines.append("-|-".join("-" * width for width in widths))
        for row in self.rows:
            lines.append(_line(row, widths))
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines)


def _line(values: list[str], widths: list[int]) -> str:
    padded = (value.ljust(width) for value, width in zip(values, widths, strict=True))
    return " | ".join(padded).rstrip()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def target(met: bool) -> str:
    return "met" if met else "NOT met"
