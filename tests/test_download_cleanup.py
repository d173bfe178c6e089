"""Downloads release their reader thread and connection however they end.

After a client disconnect, Starlette 1.10 stops iterating a download but does
not close its generator, so the response closes it. A generator that is
finalized by a garbage collection instead may be closed from its own reader
thread, which allocates the most while it fetches rows. The server test runs
uvicorn on 127.0.0.1 over a database of 100,000 report rows.
"""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from sqlalchemy import Engine

from api.app import create_app
from api.downloads import fetch_ahead
from tests.api_data import load_history
from tests.test_downloads import KEY, REPORT, _settings, bulk_history


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "download-reader"]


@pytest.fixture
def server(engine: Engine) -> Iterator[tuple[int, Engine]]:
    load_history(engine, bulk_history(100_000))
    app = create_app(_settings(), engine)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(
        target=uvicorn_server.run, kwargs={"sockets": [listener]}, daemon=True
    )
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.05)
    yield port, engine
    uvicorn_server.should_exit = True
    thread.join(10)


def start_download(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = (
        f"GET {REPORT.format(company=1)}?format=csv HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    )
    client.sendall(request.encode())
    received = client.recv(4096)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return client


@pytest.mark.timeout(120)
def test_disconnect_releases_reader(server):
    port, engine = server
    before = engine.pool.checkedout()
    client = start_download(port)
    time.sleep(0.5)
    assert readers(), "the download started no reader thread"
    client.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (readers() or engine.pool.checkedout()):
        time.sleep(0.1)
    assert readers() == []
    assert engine.pool.checkedout() == before


def test_collection_in_reader_closes_cleanly():
    raised: list[BaseException] = []
    previous_hook = sys.unraisablehook
    collected = threading.Event()
    dropped = threading.Event()

    def chunks():
        yield [1]
        dropped.wait(5)
        # The caller has dropped the rows in a reference cycle by now, so
        # this collection in the reader thread finalizes the generator here.
        gc.collect()
        collected.set()
        yield [2]

    sys.unraisablehook = lambda unraisable: raised.append(unraisable.exc_value)
    try:
        gc.disable()
        rows = fetch_ahead(chunks())
        assert next(rows) == 1
        cycle: list = [rows]
        cycle.append(cycle)
        del rows, cycle
        # Collections stay off in this thread, so only the reader's runs.
        dropped.set()
        assert collected.wait(5)
        time.sleep(0.5)
    finally:
        gc.enable()
        sys.unraisablehook = previous_hook
    errors = [repr(error) for error in raised]
    assert errors == []
    assert readers() == []
