"""The benchmark harness's quick mode runs end to end, so it cannot rot.

It starts real services (``linkedblob up``, the registry when installed, linkedblob on
PostgreSQL when configured), runs every figure at small sizes and prints the table. This test
checks the table has every figure with a value, and that everything started was stopped; it
never asserts a speed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from bench import registry

ROOT = Path(__file__).resolve().parent.parent
FIGURES = [
    "1. push",
    "2. resumable push",
    "3. pull",
    "4. stat p50",
    "4. stat p99",
    "5. mount p50",
    "5. mount p99",
    "6. 8 concurrent pushes",
    "7. 50 pushes of 4 KiB",
    "8. peak RSS gateway",
    "8. peak RSS blobsvc",
    "8. peak RSS linksvc",
]
VALUE = re.compile(r"^\d[\d,.]* (MB/s|ms|blobs/s|MiB \([+-]\d+\))$")


def table(stdout: str) -> dict[str, dict[str, str]]:
    """Rows of the printed Markdown table: figure -> column name -> cell."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines, f"no table printed:\n{stdout}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        # Repeated column names (ratio, met) keep their first occurrence: linkedblob's.
        named: dict[str, str] = {}
        for name, cell in zip(header, cells, strict=True):
            named.setdefault(name, cell)
        named["pg"] = cells[header.index("linkedblob/pg")] if "linkedblob/pg" in header else ""
        rows[cells[0]] = named
    return rows


def row(rows: dict[str, dict[str, str]], prefix: str) -> dict[str, str]:
    found = [cells for label, cells in rows.items() if label.startswith(prefix)]
    assert len(found) == 1, f"figure {prefix!r}: {len(found)} rows in {list(rows)}"
    return found[0]


def test_quick_run_prints_every_figure_and_stops_everything() -> None:
    pg = os.environ.get("LINKEDBLOB_TEST_PG")
    cmd = [sys.executable, "-m", "bench", "--quick", *(["--pg", pg] if pg else ["--no-pg"])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rows = table(done.stdout)
    has_registry = registry.find_binary() is not None

    for prefix in FIGURES:
        cells = row(rows, prefix)
        assert VALUE.match(cells["linkedblob"]), (prefix, cells)
        if has_registry:
            assert VALUE.match(cells["registry"]), (prefix, cells)
            assert re.fullmatch(r"\d+\.\d\dx", cells["ratio"]), (prefix, cells)
        else:
            assert cells["registry"] == "skipped", (prefix, cells)
        if pg:
            assert VALUE.match(cells["pg"]), (prefix, cells)
    if not has_registry:
        assert "apt-get install docker-registry" in done.stdout

    # Everything started is stopped: no process still runs from the run's work directory,
    # which is gone, and the PostgreSQL database made for the run is dropped.
    workdir = re.search(r"^workdir: (\S+)$", done.stderr, re.M)
    assert workdir, done.stderr
    assert not Path(workdir.group(1)).exists()
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(workdir.group(1) in arg for arg in proc.info["cmdline"] or []):
            leftovers.append(proc.info["cmdline"])
    assert not leftovers
    if pg:
        database = re.search(r"^linkedblob/pg database: (\S+)$", done.stderr, re.M)
        assert database, done.stderr
        assert not _database_exists(pg, database.group(1))


def _database_exists(server_url: str, name: str) -> bool:
    import sqlalchemy as sa

    engine = sa.create_engine(server_url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
            return conn.execute(query, {"name": name}).first() is not None
    finally:
        engine.dispose()


def test_full_run_without_the_registry_says_how_to_install_it() -> None:
    # A PATH holding only the venv's scripts: no docker-registry on it.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--no-pg"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "apt-get install docker-registry" in done.stderr
    assert "| " not in done.stdout  # nothing was measured
