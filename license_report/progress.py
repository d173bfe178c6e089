"""Progress reporting: a bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Seconds between progress log lines when standard error is not a terminal.
LOG_INTERVAL = 10.0


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback taking (done, total) events."""
    if sys.stderr.isatty():
        bar = tqdm(
            desc=description, unit=" events", unit_scale=True, dynamic_ncols=True
        )

        def update_bar(done: int, total: int) -> None:
            bar.total = max(total, done)
            bar.update(done - bar.n)

        try:
            yield update_bar
        finally:
            bar.close()
        return

    started = time.monotonic()
    last = {"time": started, "done": -1}

    def log_line(done: int, total: int) -> None:
        now = time.monotonic()
        finished = done >= total
        if done == last["done"] or (now - last["time"] < LOG_INTERVAL and not finished):
            return
        last.update(time=now, done=done)
        rate = done / max(now - started, 1e-9)
        remaining = (total - done) / rate if rate > 0 else float("nan")
        logger.info(
            "%s progress done=%d total=%d events_per_second=%.0f eta_seconds=%.0f",
            description,
            done,
            total,
            rate,
            remaining,
        )

    yield log_line
