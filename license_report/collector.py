"""Tuning of Python's cyclic garbage collector for bulk work."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Allocations between two young-generation collections during bulk work;
# CPython's default is 700.
BULK_THRESHOLD = 100_000


@contextmanager
def rare_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often inside the ``with`` block.

    Decoding and projecting events creates a few objects per event, which
    reference counting frees because they form no cycles. With the default
    threshold the collector ran every 700 allocations and took about a fifth
    of the CPU time of a replay and half of the decoding time of a rebuild
    (measured with bench/rebuild.py and a replay of 100,000 events, 2 cores).
    The previous threshold is restored on exit.
    """
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], BULK_THRESHOLD), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
