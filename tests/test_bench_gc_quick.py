"""The collector benchmark's quick mode runs end to end, so it cannot rot.

`python -m bench.gc --quick` populates a few hundred unlinked blobs, marks and sweeps them on
SQLite and PostgreSQL, and pushes to two `linkedblob up` (one with its collector looping); this
test checks its tables have every row with a value, and that nothing it started is left running.
It never asserts a speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from bench import gc

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^\d+(\.\d+)?$")


def tables(stdout: str) -> dict[str, dict[str, str]]:
    """Every printed Markdown table's rows: measure -> column name -> cell."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("|-"):
            continue
        if not line.startswith("| "):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not header:
            header = cells
        else:
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_quick_run_prints_every_row_and_stops_everything() -> None:
    pg = os.environ.get("LINKEDBLOB_TEST_PG")
    cmd = [sys.executable, "-m", "bench.gc", "--quick", *(["--pg", pg] if pg else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "population bypassed the API" in done.stdout
    rows = tables(done.stdout)

    for measure in gc.ROWS:
        assert NUMBER.match(rows[measure]["SQLite"]), (measure, rows.get(measure))
        if pg:
            assert NUMBER.match(rows[measure]["PostgreSQL"]), (measure, rows[measure])
    for measure in gc.PUSH_ROWS[:2]:
        assert NUMBER.match(rows[measure]["linkedblob up"]), (measure, rows.get(measure))
    assert re.fullmatch(r"\d+\.\d\dx", rows[gc.PUSH_ROWS[2]]["linkedblob up"]), rows
    assert re.fullmatch(r"\d+ / \d+", rows[gc.PUSH_ROWS[3]]["linkedblob up"]), rows

    # Every service it started (their data directories are gc-bench-*) was stopped.
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        with_data = any("gc-bench-" in arg for arg in proc.info["cmdline"] or [])
        if with_data and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            left.append(proc.info["cmdline"])
    assert not left, left
