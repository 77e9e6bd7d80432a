"""The SQL backends of the DMARC report store: SQLite (WAL, synchronous=NORMAL) and PostgreSQL
(psycopg 3, imported only for such a URL), the schema and its migrations, the report-run lock;
the errors the store raises."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol


class StoreError(Exception):
    """The store could not do what was asked (the cause is chained)."""


class SchemaError(StoreError):
    """The store's schema is newer than this code, or otherwise unusable."""


class LockBusy(StoreError):
    """Another report run holds the report lock of this store."""



# --------------------------------------------------------------------------- schema

SCHEMA_VERSION = 3

def _v1(**types: str) -> tuple[str, ...]:
    """Schema version 1, one text for both databases (only the column types differ)."""
    return tuple(statement.format(**types) for statement in (
            "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE evaluations (
                id {id},
                time {real} NOT NULL,
                source_ip TEXT NOT NULL,
                header_from TEXT NOT NULL,
                envelope_from TEXT NOT NULL,
                envelope_to TEXT NOT NULL,
                policy_domain TEXT NOT NULL,
                p TEXT NOT NULL, sp TEXT NOT NULL, np TEXT NOT NULL,
                adkim TEXT NOT NULL, aspf TEXT NOT NULL,
                testing {flag} NOT NULL, psd TEXT NOT NULL,
                disposition TEXT NOT NULL,
                dkim_aligned TEXT NOT NULL, spf_aligned TEXT NOT NULL,
                dkim TEXT NOT NULL, spf TEXT NOT NULL, overrides TEXT NOT NULL,
                rua TEXT NOT NULL)""",
            "CREATE INDEX evaluations_domain_time ON evaluations (policy_domain, time)",
            "CREATE INDEX evaluations_time ON evaluations (time)",
            """CREATE TABLE report_ledger (
                report_id TEXT NOT NULL,
                destination TEXT NOT NULL,
                state TEXT NOT NULL,
                policy_domain TEXT NOT NULL,
                message_id TEXT NOT NULL,
                detail TEXT NOT NULL,
                updated {real} NOT NULL,
                PRIMARY KEY (report_id, destination))""",
    ))


def _v2(**types: str) -> tuple[str, ...]:
    """Schema version 2: the aggregate reports others send about our domains."""
    return tuple(statement.format(**types) for statement in (
            """CREATE TABLE received_reports (
                id {id},
                reporter TEXT NOT NULL,
                reporter_email TEXT NOT NULL,
                report_id TEXT NOT NULL,
                policy_domain TEXT NOT NULL,
                period_begin {real} NOT NULL,
                period_end {real} NOT NULL,
                policy TEXT NOT NULL,
                version TEXT NOT NULL,
                received {real} NOT NULL,
                source TEXT NOT NULL,
                UNIQUE (reporter, reporter_email, report_id))""",
            """CREATE TABLE received_records (
                report BIGINT NOT NULL REFERENCES received_reports (id) ON DELETE CASCADE,
                source_ip TEXT NOT NULL,
                count BIGINT NOT NULL,
                disposition TEXT NOT NULL,
                dkim_eval TEXT NOT NULL, spf_eval TEXT NOT NULL,
                header_from TEXT NOT NULL, envelope_from TEXT NOT NULL,
                dkim TEXT NOT NULL, spf TEXT NOT NULL, reasons TEXT NOT NULL)""",
            "CREATE INDEX received_reports_domain ON received_reports (policy_domain, "
            "period_end)",
            "CREATE INDEX received_records_report ON received_records (report)",
    ))


def _v3(**types: str) -> tuple[str, ...]:
    """Schema version 3: failure reports (RFC 9991) waiting to be sent, one row per report
    and destination (the report ledger says which were sent), and the policy tag of each
    evaluation."""
    return tuple(statement.format(**types) for statement in (
            """CREATE TABLE failure_reports (
                report_id TEXT NOT NULL,
                destination TEXT NOT NULL,
                created {real} NOT NULL,
                policy_domain TEXT NOT NULL,
                content TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'queued',
                PRIMARY KEY (report_id, destination))""",
            "CREATE INDEX failure_reports_state ON failure_reports (state)",
            # which of p, sp and np applied: what the policy asked (RFC 9990 policy_evaluated)
            "ALTER TABLE evaluations ADD COLUMN policy_tag TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX failure_reports_destination ON failure_reports (destination, created)",
    ))


_SQLITE = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "flag": "INTEGER"}
_PG = {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION",
       "flag": "SMALLINT"}
# version -> statements, per dialect; "?" is the parameter placeholder in every statement.
MIGRATIONS: dict[str, list[tuple[int, tuple[str, ...]]]] = {
    "sqlite": [(1, _v1(**_SQLITE)), (2, _v2(**_SQLITE)), (3, _v3(**_SQLITE))],
    "postgresql": [(1, _v1(**_PG)), (2, _v2(**_PG)), (3, _v3(**_PG))],
}

_PG_SCHEMA_LOCK = 0x6D61_696C_646D_6172 & 0x7FFF_FFFF_FFFF_FFFF
_PG_REPORT_LOCK = _PG_SCHEMA_LOCK ^ 1


# --------------------------------------------------------------------------- backends


class _Cursor(Protocol):
    def fetchall(self) -> list[Any]: ...


class _Backend(Protocol):
    """One connection (not thread-safe: `Store` serialises every call with its lock)."""

    dialect: str

    def begin(self, durable: bool = False) -> None: ...
    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...
    def lock_report_runs(self) -> contextlib.AbstractContextManager[None]: ...


CONNECT_TIMEOUT = 5  # seconds to reach a PostgreSQL server

class _SQLite:
    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        parent = Path(path).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE takes the write
        # lock at once, so a transaction never has to be retried half way).
        self.conn = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 60000")
        for _ in range(600):  # switching to WAL needs a moment without other writers
            try:
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.1)
        else:
            raise StoreError(f"{path}: could not switch the database to WAL mode")
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: the database refuses WAL mode (journal_mode={mode})")
        # NORMAL in WAL mode: a commit survives a crash of the process (it is in the WAL file)
        # and the database never corrupts; only a power loss or kernel crash may lose the last
        # commits before the next checkpoint. For aggregate-report statistics that trade is
        # right: FULL's fsync per commit was a third of the inbound CPU per message.
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def begin(self, durable: bool = False) -> None:
        """`durable`: this transaction is fsynced at commit (the report ledger: a lost entry
        would send a report twice)."""
        if durable:
            self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("BEGIN IMMEDIATE")

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, [tuple(row) for row in rows])

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def lock_report_runs(self) -> Iterator[None]:
        fd = os.open(self.path + ".report-lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusy(f"another report run holds {self.path}.report-lock") from None
            yield
        finally:
            os.close(fd)  # releases the lock


class _Postgres:
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            self._psycopg: Any = importlib.import_module("psycopg")
        except ImportError as exc:
            raise StoreError(
                "a postgresql:// store needs psycopg 3: pip install 'psycopg[binary]'"
            ) from exc
        self.url = url
        self.conn: Any = None
        self._connect()

    def _open(self, autocommit: bool) -> Any:
        # a server that does not answer (a dropped SYN) costs at most CONNECT_TIMEOUT, not
        # the kernel's two minutes of TCP retries; a connect_timeout in the URL wins
        params = self._psycopg.conninfo.conninfo_to_dict(self.url)
        timeout = {} if "connect_timeout" in params else {"connect_timeout": CONNECT_TIMEOUT}
        return self._psycopg.connect(self.url, autocommit=autocommit, **timeout)

    def _connect(self) -> None:
        self.conn = self._open(autocommit=False)

    def _live(self) -> Any:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self._connect()
        return self.conn

    def begin(self, durable: bool = False) -> None:
        self._live()  # psycopg opens the transaction with the first statement

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        cursor = self._live().execute(sql.replace("?", "%s"), tuple(params))
        return list(cursor.fetchall()) if cursor.description is not None else []

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self._live().cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), [tuple(row) for row in rows])

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        if self.conn is not None and not self.conn.closed:
            with contextlib.suppress(Exception):
                self.conn.rollback()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    @contextlib.contextmanager
    def lock_report_runs(self) -> Iterator[None]:
        # A connection of its own: the session lock lives exactly as long as it does, and the
        # server drops it when this process dies.
        conn = self._open(autocommit=True)
        held = False
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_PG_REPORT_LOCK,)).fetchone()
            if not got or not got[0]:
                raise LockBusy("another report run holds the store's report lock")
            held = True
            yield
        finally:
            # Unlock explicitly: the server drops a closed session's locks only when its
            # backend has finished exiting, which can be after close() returns.
            if held:
                with contextlib.suppress(Exception):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_REPORT_LOCK,))
            conn.close()


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite store URL (`sqlite://PATH` or a plain path); None for PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    return url.removeprefix("sqlite://")


def _backend_for(url: str) -> _Backend:
    path = sqlite_path(url)
    if path is None:
        return _Postgres(url)
    if url.startswith("sqlite://"):
        if not path or path.startswith("/:memory:") or path == ":memory:":
            raise ValueError(f"store URL {url!r}: a file path is required")
        return _SQLite(path)
    if "://" in url:
        raise ValueError(f"store URL {url!r}: unsupported scheme (sqlite:// or postgresql://)")
    if not url:
        raise ValueError("empty store URL")
    return _SQLite(url)


def _migrate(db: _Backend) -> None:
    migrations = MIGRATIONS[db.dialect]
    latest = max(version for version, _ in migrations)
    db.begin()
    try:
        if db.dialect == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                   "version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
        current = db.execute("SELECT max(version) FROM schema_version")[0][0] or 0
        if current > latest:
            raise SchemaError(f"the store has schema version {current}; this mailwarden knows "
                              f"up to {latest}: upgrade mailwarden")
        for version, statements in sorted(migrations):
            if version <= current:
                continue
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                       (version, time.time()))
        db.execute("INSERT INTO store_meta (key, value) VALUES ('instance_id', ?) "
                   "ON CONFLICT (key) DO NOTHING", (secrets.token_hex(16),))
        db.commit()
    except BaseException:
        db.rollback()
        raise


