"""The link database: one engine per process, tuned for the database in use, and where its SQL
runs: on the event loop (SQLite's short calls) or in a pool of SQL threads.

Where (``Database.run_hot`` for the short calls, ``Database.run`` for the rest):

- SQLite answers a short call in tens of microseconds (plus the commit's fsync), less than the
  hop to a thread and back; and it takes one writer at a time whatever the threads. So its short
  calls run on the event loop, on a connection of the loop's own that never waits for the lock:
  a call that finds another process (or a SQL thread) holding it goes to the SQL threads, which
  wait for it (busy_timeout). ``--sqlite-threads-only`` turns this off.
- PostgreSQL is a round trip away: its calls always run in the SQL threads.

How, all on the connection the calling thread holds:

- :meth:`Database.connect`: every statement commits on its own (the driver is in autocommit
  mode). Most calls are one statement, and this makes them one round trip: no BEGIN, no COMMIT.
- :meth:`Database.transaction`: several statements in one transaction (link, mount), opened
  with an explicit BEGIN. On SQLite that is BEGIN IMMEDIATE, so a writer waits for the write
  lock (busy_timeout) up front instead of failing when it upgrades a read snapshot that another
  writer made stale.
- :meth:`Database.fetch_one` and :meth:`Database.execute`: the lean path of the hot calls,
  straight on the driver's cursor (see ``linksvc.queries.DriverQuery``).

Database errors that a caller can retry (connection refused or lost, SQLite busy/locked,
serialization failures and deadlocks) leave here as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from time import perf_counter
from typing import Any, ParamSpec, TypeVar

import grpc
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from linkedblob import metrics
from linkedblob.errors import LinkedBlobError, Reason, unavailable
from linksvc.queries import DriverQuery, DriverResult

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# PostgreSQL error classes a retry can cure: connection exception, transaction rollback
# (serialization failure, deadlock), insufficient resources (too many connections), operator
# intervention (server shutting down, statement cancelled), system error.
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_SQLITE_TRANSIENT_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return sa.make_url(url).render_as_string(hide_password=True)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is one the caller should simply retry."""
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _SQLITE_TRANSIENT_CODES
    # psycopg is imported only where PostgreSQL is in use; where it is not, orig is not its.
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        sqlstate = getattr(orig, "sqlstate", None)
        # No SQLSTATE: the failure is the connection itself (refused, lost, closed).
        return sqlstate is None or sqlstate.startswith(_PG_TRANSIENT_CLASSES)
    return False


class DatabaseBusy(LinkedBlobError):
    """SQLite's lock was taken when a call ran on the event loop, which never waits for it:
    the call goes to the SQL threads instead (see Database.run_hot)."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, Reason.UNAVAILABLE, "database busy")


_on_event_loop = threading.local()
_COMMIT = DriverQuery("COMMIT", None)


def map_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turns a transient database error into UNAVAILABLE; other errors pass unchanged (the
    servicer's error mapping logs them and answers INTERNAL). Times the operation and counts
    its database errors (linkedblob_sql_operation_seconds, linkedblob_sql_errors_total, by the
    function's name as ``op``)."""
    op = fn.__name__
    seconds = metrics.SQL_SECONDS.labels(op)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        started = perf_counter()
        try:
            return fn(*args, **kwargs)
        except LinkedBlobError:
            raise
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            if getattr(_on_event_loop, "active", False) and _is_sqlite_busy(exc):
                metrics.SQL_ERRORS.labels(op, "busy").inc()
                raise DatabaseBusy() from exc
            if is_transient(exc):
                metrics.SQL_ERRORS.labels(op, "transient").inc()
                log.warning("transient database error: %s", exc.__class__.__name__, exc_info=exc)
                raise unavailable(f"database unavailable, retry: {_first_line(exc)}") from exc
            metrics.SQL_ERRORS.labels(op, "error").inc()
            raise
        finally:
            seconds.observe(perf_counter() - started)

    return wrapper


def _is_sqlite_busy(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _SQLITE_TRANSIENT_CODES


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]


class Database:
    """The engine, and a thread pool of the same size as its connection pool that runs the SQL.

    Each SQL thread (and the event loop, see run_hot) keeps one connection for as long as it is
    healthy, so a call pays neither a pool checkout nor a ping. A connection is handed back and
    checked out afresh (with the pool's pre-ping) after it idled for IDLE_PING_SECONDS, after it
    failed, or after another thread saw the database connection drop (the server restarted:
    every thread reconnects).
    Any other thread (start-up, tests) borrows a pooled connection for the length of a call;
    run the store in the SQL threads (``run``, ``call``) so that one is free.
    """

    IDLE_PING_SECONDS = 10.0

    def __init__(
        self, url: str, pool_size: int = 8, busy_timeout: float = 5.0, sqlite_on_loop: bool = True
    ) -> None:
        self.url = sa.make_url(url)
        self.dialect = self.url.get_backend_name()
        self.pool_size = pool_size
        if self.dialect == "sqlite":
            # One connection more than SQL threads: the event loop's (see run_hot).
            self.engine = _sqlite_engine(self.url, pool_size + 1, busy_timeout)
            # The driver runs in autocommit mode (see _sqlite_engine); IMMEDIATE takes the
            # write lock up front, waiting up to busy_timeout for it.
            self._begin = "BEGIN IMMEDIATE"
        elif self.dialect == "postgresql":
            self.engine = _postgresql_engine(self.url, pool_size)
            self._begin = "BEGIN ISOLATION LEVEL READ COMMITTED"
        else:
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite or postgresql")
        self._begin_query = DriverQuery(self._begin, None)
        pool: Any = self.engine.pool
        metrics.SQL_POOL_IN_USE.set_function(lambda: pool.checkedout())  # read when scraped
        # SQLite's short calls run on the event loop (see run_hot).
        self.inline = self.dialect == "sqlite" and sqlite_on_loop
        self._local = threading.local()
        self.executor = ThreadPoolExecutor(
            max_workers=pool_size, thread_name_prefix="sql", initializer=self._sql_thread_started
        )
        self._held: set[sa.Connection] = set()
        self._held_lock = threading.Lock()
        self._generation = 0

    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A connection whose statements each commit on their own (one round trip each)."""
        with self._connection() as conn:
            try:
                yield conn
                conn.commit()  # nothing to commit; ends SQLAlchemy's bookkeeping of the autobegin
            except BaseException as exc:
                self._abandon(conn, exc)
                raise

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A connection in one transaction: committed on success, rolled back on any error.

        Statements may go through SQLAlchemy (``conn.execute``) or the driver
        (:meth:`execute`); BEGIN and COMMIT go straight to the driver.
        """
        with self._connection() as conn:
            try:
                self.execute(conn, self._begin_query, {})
                yield conn
                if conn.in_transaction():
                    conn.commit()  # the driver's COMMIT, and the end of SQLAlchemy's bookkeeping
                else:
                    self.execute(conn, _COMMIT, {})
            except BaseException as exc:
                self._abandon(conn, exc)
                raise

    def execute(
        self, conn: sa.Connection, query: DriverQuery, values: Mapping[str, Any]
    ) -> DriverResult:
        """Runs a DriverQuery on the driver's cursor of ``conn`` (one of :meth:`connect` or
        :meth:`transaction`); returns its rows and its row count.

        Driver errors leave as SQLAlchemy's DBAPIError (flagged when the connection is gone),
        exactly as from ``Connection.execute``, so map_errors treats both paths alike.
        """
        dbapi_connection = self._driver_connection(conn)
        driver_error = conn.dialect.loaded_dbapi.Error
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(query.sql, query.parameters(values))
                rows = cursor.fetchall() if cursor.description is not None else []
                return DriverResult([tuple(r) for r in rows], cursor.rowcount)
            finally:
                cursor.close()
        except driver_error as exc:
            gone = conn.dialect.is_disconnect(exc, dbapi_connection, None)
            if gone:
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                query.sql, None, exc, driver_error, connection_invalidated=gone
            ) from exc

    def fetch_one(self, query: DriverQuery, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """One row of a DriverQuery, run on the driver's cursor in autocommit mode."""
        with self._connection() as conn:
            try:
                rows = self.execute(conn, query, values).rows
            except sa.exc.DBAPIError as exc:
                self._abandon(conn, exc)
                raise
            return rows[0] if rows else None

    @staticmethod
    def _driver_connection(conn: sa.Connection) -> Any:
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        return dbapi_connection

    async def run_hot(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a short call (resolve, link, mount) on the event loop itself where that is
        cheaper than the hop to a SQL thread (SQLite: the statements take microseconds, the
        hop tens of them), else in the SQL thread pool. On the loop SQLite never waits for its
        lock: a call that finds it taken goes to the pool, where it waits (busy_timeout)."""
        if self.inline:
            _on_event_loop.active = True
            try:
                return self._call_on_loop(fn, *args)
            except DatabaseBusy:
                pass
            finally:
                _on_event_loop.active = False
        return await self.run(fn, *args)

    def _call_on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        local = self._local
        if not getattr(local, "holds", False):
            local.holds, local.conn, local.on_loop = True, None, True
        return fn(*args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking database work in the SQL thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs database work in the SQL thread pool and waits for it (for sync callers: only
        the pool's threads hold connections)."""
        return self.executor.submit(fn, *args).result()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        with self._held_lock:
            held, self._held = self._held, set()
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()
        self.engine.dispose()

    # --- the connection each SQL thread holds --------------------------------------------

    def _sql_thread_started(self) -> None:
        self._local.holds = True
        self._local.conn = None

    @contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        """The SQL thread's own connection; any other thread borrows one for the call."""
        if getattr(self._local, "holds", False):
            yield self._acquire()
        else:
            with self.engine.connect() as conn:
                yield conn

    def _acquire(self) -> sa.Connection:
        local = self._local
        conn: sa.Connection | None = local.conn
        now = time.monotonic()
        if conn is not None and (
            conn.invalidated
            or local.generation != self._generation
            or now - local.used > self.IDLE_PING_SECONDS
        ):
            self._release(conn)
            conn = None
        if conn is None:
            conn = self.engine.connect()  # pool checkout, with pre-ping where configured
            if getattr(local, "on_loop", False):
                # The event loop's own connection: out of the pool (which stays the SQL threads'),
                # and never waiting for SQLite's lock.
                conn.detach()
                conn.exec_driver_sql("PRAGMA busy_timeout=0")
                conn.commit()
            with self._held_lock:
                self._held.add(conn)
            local.conn, local.generation = conn, self._generation
        local.used = now
        return conn

    def _release(self, conn: sa.Connection) -> None:
        self._local.conn = None
        with self._held_lock:
            self._held.discard(conn)
        with contextlib.suppress(Exception):
            conn.close()

    def _abandon(self, conn: sa.Connection, exc: BaseException) -> None:
        """Rolls back after a failure; a held connection that cannot even do that is dropped."""
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            self._generation += 1  # the server went away: every thread reconnects
        try:
            if conn.in_transaction():
                conn.rollback()
            elif not conn.invalidated:
                # A transaction begun on the driver (see transaction()): SQLAlchemy knows nothing
                # of it, so its rollback would not reach the driver.
                self._driver_connection(conn).rollback()
        except Exception:
            if conn is getattr(self._local, "conn", None):
                self._release(conn)
            return
        if conn.invalidated and conn is getattr(self._local, "conn", None):
            self._release(conn)


def _sqlite_engine(url: sa.URL, pool_size: int, busy_timeout: float) -> Engine:
    engine = sa.create_engine(
        url,
        poolclass=sa.pool.QueuePool,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # The driver issues no BEGIN of its own: statements autocommit unless we BEGIN.
        # (An engine-level "begin" event would do it too, but any engine event listener puts
        # SQLAlchemy on its slower, event-dispatching execute path for every statement.)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine


def _postgresql_engine(url: sa.URL, pool_size: int) -> Engine:
    if url.drivername != "postgresql+psycopg":
        raise ValueError(f"use the psycopg 3 driver: postgresql+psycopg://, not {url.drivername}")
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        # Detect connections the server dropped (restart, failover) before using them.
        # Checked whenever a thread (re)acquires a connection (see Database._acquire).
        pool_pre_ping=True,
        pool_recycle=3600,
        # Statements commit on their own; Database.transaction() sends BEGIN when it needs one.
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5, "application_name": "linksvc"},
    )
