"""Shared fixtures: PostgreSQL databases for tests, and the service launcher (tests/services.py).

PostgreSQL: tests read the server DSN from LINKEDBLOB_TEST_PG (an SQLAlchemy URL such as
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``). Each test run creates databases of
its own and drops them afterwards. Without the variable the PostgreSQL half of the tests is
skipped, and the run says so; under CI (CI=true) a missing or unreachable server fails the run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from bench.linkedblob_side import admin_execute

PG_ENV = "LINKEDBLOB_TEST_PG"

_pg_skipped: list[str] = []


def pg_server_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url and os.environ.get("CI"):
        pytest.fail(f"CI requires PostgreSQL: set {PG_ENV}", pytrace=False)
    return url


def pg_database_name() -> str:
    """A new database's name: random, and under pytest-xdist with the worker's id in it, so
    workers (and runs side by side) never share a database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return f"linkedblob_test_{worker + '_' if worker else ''}{secrets.token_hex(6)}"


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    import sqlalchemy as sa

    server = pg_server_url()
    if not server:
        _pg_skipped.append("pg")
        pytest.skip(f"PostgreSQL not configured ({PG_ENV} unset)")
    name = pg_database_name()
    try:
        admin_execute(server, f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot reach PostgreSQL at {server}: {exc}", pytrace=False)
        _pg_skipped.append("pg")
        pytest.skip(f"PostgreSQL unreachable at {server}")
    url = sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh, empty database of each kind: an SQLite file, and a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'link.db'}"
    return str(request.getfixturevalue("pg_database_url"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Counted from the skip reports (not _pg_skipped): under pytest-xdist the tests run in
    # worker processes, and only their reports reach this one.
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and PG_ENV in str(report.longrepr[2])
    ]
    if skipped or _pg_skipped:
        terminalreporter.write_line(
            f"NOTE: {max(len(skipped), len(_pg_skipped))} PostgreSQL test(s) were SKIPPED: "
            f"set {PG_ENV} (see README) to run them.",
            yellow=True,
            bold=True,
        )


# The files that take longest (measured: ~25-70 s each, the rest mostly under 15 s). Under
# pytest-xdist (make test: --dist loadfile) they are handed out first, so that the short files
# fill in at the end instead of one worker running a long file alone while the other idles.
LONGEST_FIRST = (
    "test_lifecycle_kill.py",
    "test_lifecycle_model.py",
    "test_lifecycle_interleavings.py",
    "test_client_lifecycle.py",
    "test_limits.py",
    "test_linksvc_service_ops.py",
    "test_collector_e2e.py",
    "test_collector_soak.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order makes no difference to the time

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the others, pytest's order


@pytest.fixture(autouse=True)
def _no_caller_leaks_between_tests() -> Iterator[None]:
    """A test that authenticates in its own thread (a unit test of the gateway's access) sets
    linkedblob.caller there; asyncio.run copies that context into the next in-process server's
    calls. Each test starts with no caller."""
    from linkedblob.caller import CALLER

    token = CALLER.set("")
    yield
    CALLER.reset(token)
