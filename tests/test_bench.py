"""Run every benchmark once at its tiny scale, so the scripts keep working.

Nothing here checks a timing: the machine is shared, and the figures belong in
docs/benchmarks.md. A benchmark fails when it exits with an error, for example
when a rebuilt projection differs from the first one.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from bench.generate import generate_chunks, plan_chunks
from consumer.decoding import decode
from license_report.errors import RejectedEvent
from tests.conftest import POSTGRES_ADMIN_URL

ROOT = Path(__file__).resolve().parents[1]
# The report benchmark runs in its own test, which also checks its plans file.
BENCHMARKS = ["ingest", "rebuild", "download", "scale_out"]


def _run(name: str, tmp_path: Path, *extra: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"bench.{name}",
            "--scale",
            "tiny",
            "--postgres-url",
            POSTGRES_ADMIN_URL,
            "--work-dir",
            str(tmp_path),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_at_tiny_scale(name, tmp_path):
    output = _run(name, tmp_path)
    assert " | " in output, output
    assert "target" in output or "cores" in output, output


@pytest.mark.timeout(300)
def test_report_benchmark_writes_plans(tmp_path):
    plans = tmp_path / "plans.txt"
    output = _run("report", tmp_path, "--explain", str(plans))
    assert "target" in output, output
    text = plans.read_text()
    assert "Execution Time" in text
    assert "===" in text


def test_generated_chunks_share_no_event_id():
    specs = plan_chunks(4_000, seed=5, chunk_events=2_000)
    chunks = list(generate_chunks(specs, workers=1))
    ids = []
    for chunk in chunks:
        for _, value in chunk.messages:
            with contextlib.suppress(RejectedEvent):
                ids.append(decode(value).event_id)
    assert len(chunks) == 2
    assert len(set(ids)) == sum(chunk.events for chunk in chunks)


def test_generation_is_deterministic():
    specs = plan_chunks(2_000, seed=9)
    first = next(generate_chunks(specs, workers=1))
    second = next(generate_chunks(specs, workers=1))
    assert first.messages == second.messages


def test_plan_spreads_companies_over_chunks():
    specs = plan_chunks(300_000, companies=10, chunk_events=100_000)
    assert [spec.companies for spec in specs] == [4, 3, 3]
    assert sum(spec.events for spec in specs) == 300_000
    assert len({spec.id_offset for spec in specs}) == 3
