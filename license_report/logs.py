"""Logging set-up for the entry points; library modules only get loggers."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log records to standard error, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kafka-python logs every connection step and Alembic every plugin at INFO.
    for name in ("kafka", "alembic"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
