"""The DMARC report store: every evaluation the milter makes, and the ledger of sent reports.

One `Store` per process, shared by every thread. `Store.open(url)` takes

* ``sqlite:///var/lib/mailwarden/dmarc.db`` or a plain path: SQLite in WAL mode with
  ``synchronous=FULL`` (a commit is on disk before it returns), for one host; several processes
  may write to the same file;
* ``postgresql://user@host/db`` (any libpq URI; ``postgres://`` too): PostgreSQL through
  psycopg 3, for several MTAs writing into one store. psycopg is imported only for such a URL.

The schema is created and migrated by `open()` itself: the ``schema_version`` table holds one row
per applied migration, and migrations run inside one write transaction under a lock (SQLite's
``BEGIN IMMEDIATE``; a PostgreSQL transaction-scoped advisory lock), so any number of processes
may open a new store at the same moment and exactly one of them creates it. A store whose
schema is newer than this code is refused rather than misread.

`record()` returns once the evaluation is committed. Concurrent callers are group-committed:
while one thread writes a transaction, the evaluations other threads hand in meanwhile are
queued and go into the next transaction together, each caller returning when the transaction
holding its evaluation has committed (or raising `StoreError` when it failed).

The milter records through a `Recorder`, which never raises: a store that cannot be opened or
written (a read-only or full file system, a database server that is down) costs the report
rows of the meantime, never a verdict; the failure is logged once with its cause, and the
recovery once with the number of evaluations that were not recorded.

The ledger (``report_ledger``) is keyed by (report_id, destination) and is used by
`mailwarden.dmarc.report.send_reports` for exactly-once delivery; `report_lock()` keeps two
report runs on the same store from overlapping (a lock file next to the SQLite database; a
PostgreSQL session advisory lock), and is released by the kernel or the server when the process
holding it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mailwarden.outage import Outage

__all__ = [
    "LEDGER_STATES",
    "SCHEMA_VERSION",
    "Evaluation",
    "LedgerEntry",
    "LockBusy",
    "Recorder",
    "SchemaError",
    "Store",
    "StoreError",
    "unavailable_for_now",
]

log = logging.getLogger("mailwarden.dmarc")


class StoreError(Exception):
    """The store could not do what was asked (the cause is chained)."""


class SchemaError(StoreError):
    """The store's schema is newer than this code, or otherwise unusable."""


class LockBusy(StoreError):
    """Another report run holds the report lock of this store."""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One DMARC evaluation of one message (see the module docstring of report.py for how
    each field ends up in an aggregate report)."""

    time: float  # unix time
    source_ip: str
    header_from: str  # the author (RFC5322.From) domain
    envelope_from: str  # RFC5321.MailFrom domain ("" for the null path)
    envelope_to: str  # a recipient domain (the first)
    policy_domain: str  # where the record was found
    p: str
    sp: str
    np: str
    adkim: str
    aspf: str
    testing: bool
    psd: str  # the policy published ("" when absent)
    disposition: str  # none | quarantine | reject
    dkim_aligned: str  # pass | fail   (policy_evaluated dkim)
    spf_aligned: str  # pass | fail   (policy_evaluated spf)
    dkim: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, result) per signature
    spf: tuple[tuple[str, str, str], ...] = ()  # (domain, scope "mfrom"|"helo", result)
    overrides: tuple[tuple[str, str], ...] = ()  # (type, comment)
    rua: tuple[str, ...] = ()  # reporting URIs of the record (mailto:...)


LEDGER_STATES = ("committing", "sent", "failed")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What is known about sending one report to one destination.

    state: ``committing`` -- the whole message was handed to the SMTP server and only the final
    "." (the commit point of SMTP) was still to be sent when this was written: if nothing
    follows, whether the server accepted the message is unknown; ``sent`` -- the server accepted
    it (250 after the final "."), or the file was written; ``failed`` -- the server refused it or
    the connection failed before the commit point (safe to try again).
    """

    report_id: str
    destination: str
    state: str
    policy_domain: str = ""
    message_id: str = ""
    detail: str = ""
    updated: float = 0.0


# --------------------------------------------------------------------------- schema

SCHEMA_VERSION = 1

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


# version -> statements, per dialect; "?" is the parameter placeholder in every statement.
MIGRATIONS: dict[str, list[tuple[int, tuple[str, ...]]]] = {
    "sqlite": [(1, _v1(id="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL", flag="INTEGER"))],
    "postgresql": [(1, _v1(id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                           real="DOUBLE PRECISION", flag="SMALLINT"))],
}

_COLUMNS = ("time", "source_ip", "header_from", "envelope_from", "envelope_to", "policy_domain",
            "p", "sp", "np", "adkim", "aspf", "testing", "psd", "disposition", "dkim_aligned",
            "spf_aligned", "dkim", "spf", "overrides", "rua")
_INSERT = (f"INSERT INTO evaluations ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_SELECT = f"SELECT id, {', '.join(_COLUMNS)} FROM evaluations"
_LEDGER_COLUMNS = ("report_id", "destination", "state", "policy_domain", "message_id", "detail",
                   "updated")
# A 64-bit key for PostgreSQL advisory locks ("mailwarden dmarc"): schema and report runs.
_PG_SCHEMA_LOCK = 0x6D61_696C_646D_6172 & 0x7FFF_FFFF_FFFF_FFFF
_PG_REPORT_LOCK = _PG_SCHEMA_LOCK ^ 1
_CHUNK = 5000


def _to_row(ev: Evaluation) -> tuple[object, ...]:
    return (
        float(ev.time), ev.source_ip, ev.header_from, ev.envelope_from, ev.envelope_to,
        ev.policy_domain, ev.p, ev.sp, ev.np, ev.adkim, ev.aspf, 1 if ev.testing else 0, ev.psd,
        ev.disposition, ev.dkim_aligned, ev.spf_aligned,
        json.dumps([list(item) for item in ev.dkim]), json.dumps([list(item) for item in ev.spf]),
        json.dumps([list(item) for item in ev.overrides]), json.dumps(list(ev.rua)),
    )


def _triples(text: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(a), str(b), str(c)) for a, b, c in json.loads(text))


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(b)) for a, b in json.loads(text))


def _from_row(row: Sequence[Any]) -> Evaluation:
    (_id, time_, source_ip, header_from, envelope_from, envelope_to, policy_domain, p, sp, np,
     adkim, aspf, testing, psd, disposition, dkim_aligned, spf_aligned, dkim, spf, overrides,
     rua) = row
    return Evaluation(
        time=float(time_), source_ip=source_ip, header_from=header_from,
        envelope_from=envelope_from, envelope_to=envelope_to, policy_domain=policy_domain,
        p=p, sp=sp, np=np, adkim=adkim, aspf=aspf, testing=bool(testing), psd=psd,
        disposition=disposition, dkim_aligned=dkim_aligned, spf_aligned=spf_aligned,
        dkim=_triples(dkim), spf=_triples(spf), overrides=_pairs(overrides),
        rua=tuple(str(uri) for uri in json.loads(rua)),
    )


# --------------------------------------------------------------------------- backends


class _Cursor(Protocol):
    def fetchall(self) -> list[Any]: ...


class _Backend(Protocol):
    """One connection (not thread-safe: `Store` serialises every call with its lock)."""

    dialect: str

    def begin(self) -> None: ...
    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...
    def lock_report_runs(self) -> contextlib.AbstractContextManager[None]: ...


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
        self.conn.execute("PRAGMA synchronous = FULL")

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, [tuple(row) for row in rows])

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

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

    def _connect(self) -> None:
        self.conn = self._psycopg.connect(self.url, autocommit=False)

    def _live(self) -> Any:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self._connect()
        return self.conn

    def begin(self) -> None:
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
        conn = self._psycopg.connect(self.url, autocommit=True)
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


# --------------------------------------------------------------------------- the store


@dataclass(eq=False)
class _Batch:
    items: list[Evaluation] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class Store:
    """The report store; thread-safe, one per process (see the module docstring)."""

    def __init__(self, db: _Backend, url: str) -> None:
        self._db = db
        self.url = url
        self._lock = threading.Lock()  # the connection
        self._cv = threading.Condition()  # group commit
        self._current = _Batch()
        self._writing = False
        self._closed = False
        rows = db.execute("SELECT value FROM store_meta WHERE key = 'instance_id'")
        db.rollback()
        self.instance_id: str = rows[0][0]

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (creating or migrating the schema as needed) the store at `url`."""
        db = _backend_for(url)
        try:
            _migrate(db)
            return cls(db, url)
        except SchemaError:
            db.close()
            raise
        except Exception as exc:
            db.close()
            raise StoreError(f"cannot open the DMARC store {_redact(url)}: {exc}") from exc

    @classmethod
    def open_existing(cls, url: str) -> Store:
        """`open` for readers: a store that does not exist yet (a missing SQLite file, a
        database without the schema) raises `StoreError` instead of being created."""
        path = sqlite_path(url)
        if path and not Path(path).is_file():
            raise StoreError(f"no DMARC store at {path} (the file does not exist)")
        db = _backend_for(url)
        try:
            try:
                current = db.execute("SELECT max(version) FROM schema_version")[0][0] or 0
            except Exception:
                current = 0
            db.rollback()
            if not current:
                raise StoreError(f"{_redact(url)} is not a mailwarden DMARC store (no schema)")
            if current != SCHEMA_VERSION:
                _migrate(db)  # refuses a newer schema; brings an older one up to date
            return cls(db, url)
        except StoreError:
            db.close()
            raise
        except Exception as exc:
            db.close()
            raise StoreError(f"cannot open the DMARC store {_redact(url)}: {exc}") from exc

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.dialect

    def schema_version(self) -> int:
        with self._lock:
            rows = self._db.execute("SELECT max(version) FROM schema_version")
            self._db.rollback()
        return int(rows[0][0] or 0)

    # -- writing ----------------------------------------------------------------------
    def record(self, evaluation: Evaluation) -> None:
        """Store one evaluation; it is committed (durable) when this returns."""
        with self._cv:
            if self._closed:
                raise StoreError("the store is closed")
            batch = self._current
            batch.items.append(evaluation)
            while self._writing and not batch.done:
                self._cv.wait()
            if batch.done:
                if batch.error is not None:
                    raise StoreError(f"recording failed: {batch.error}") from batch.error
                return
            # Nobody is writing and our batch is still the open one: write it ourselves.
            self._writing = True
            self._current = _Batch()
        try:
            self._write(batch.items)
        except BaseException as exc:
            batch.error = exc
        with self._cv:
            batch.done = True
            self._writing = False
            self._cv.notify_all()
        if batch.error is not None:
            raise StoreError(f"recording failed: {batch.error}") from batch.error

    def _write(self, items: Sequence[Evaluation]) -> None:
        rows = [_to_row(item) for item in items]
        with self._lock:
            self._db.begin()
            try:
                self._db.executemany(_INSERT, rows)
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    def purge(self, before: float) -> int:
        """Delete the evaluations older than `before`; returns how many."""
        with self._lock:
            self._db.begin()
            try:
                count = self._db.execute("SELECT count(*) FROM evaluations WHERE time < ?",
                                         (before,))[0][0]
                self._db.execute("DELETE FROM evaluations WHERE time < ?", (before,))
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
        return int(count)

    # -- reading ----------------------------------------------------------------------
    def _read(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, params)
            finally:
                self._db.rollback()  # end PostgreSQL's implicit read transaction

    def count(self) -> int:
        """How many evaluations the store holds."""
        return int(self._read("SELECT count(*) FROM evaluations")[0][0])

    def policy_domains(self, start: float, end: float) -> list[str]:
        """The policy domains with evaluations in [start, end), sorted."""
        rows = self._read("SELECT DISTINCT policy_domain FROM evaluations "
                          "WHERE time >= ? AND time < ?", (start, end))
        return sorted(str(row[0]) for row in rows)

    def iter_evaluations(self, start: float, end: float,
                         policy_domain: str | None = None) -> Iterator[Evaluation]:
        """The evaluations with `start <= time < end` (of one policy domain if given), in the
        order they were recorded; read in chunks, so any number of them is fine."""
        last = -1
        where = "time >= ? AND time < ? AND id > ?"
        if policy_domain is not None:
            where += " AND policy_domain = ?"
        while True:
            params: list[object] = [start, end, last]
            if policy_domain is not None:
                params.append(policy_domain)
            rows = self._read(f"{_SELECT} WHERE {where} ORDER BY id LIMIT {_CHUNK}", params)
            for row in rows:
                yield _from_row(row)
            if len(rows) < _CHUNK:
                return
            last = int(rows[-1][0])

    def evaluations(self, start: float = float("-inf"), end: float = float("inf"),
                    policy_domain: str | None = None) -> list[Evaluation]:
        """`iter_evaluations` as a list."""
        return list(self.iter_evaluations(start, end, policy_domain))

    def source_totals(self, start: float,
                      policy_domain: str | None = None) -> list[tuple[Any, ...]]:
        """Per (policy_domain, header_from, source_ip), the evaluations with `time >= start`
        (of one policy domain if given), one GROUP BY on either database; each row is
        (policy_domain, header_from, source_ip, messages, dmarc_pass, dkim_pass, spf_pass,
        none, quarantine, reject, p), where p is that policy domain's latest published p=."""
        where = "e.time >= ?"
        params: list[object] = [start, start]
        if policy_domain is not None:
            where += " AND e.policy_domain = ?"
            params.append(policy_domain)
        rows = self._read(
            "SELECT e.policy_domain, e.header_from, e.source_ip, count(*),"
            " sum(CASE WHEN e.dkim_aligned = 'pass' OR e.spf_aligned = 'pass'"
            " THEN 1 ELSE 0 END),"
            " sum(CASE WHEN e.dkim_aligned = 'pass' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN e.spf_aligned = 'pass' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN e.disposition = 'none' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN e.disposition = 'quarantine' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN e.disposition = 'reject' THEN 1 ELSE 0 END),"
            " (SELECT l.p FROM evaluations l WHERE l.policy_domain = e.policy_domain"
            "  AND l.time >= ? ORDER BY l.time DESC, l.id DESC LIMIT 1)"
            f" FROM evaluations e WHERE {where}"
            " GROUP BY e.policy_domain, e.header_from, e.source_ip", params)
        return [(str(r[0]), str(r[1]), str(r[2]), *(int(n) for n in r[3:10]), str(r[10] or ""))
                for r in rows]

    # -- the report ledger --------------------------------------------------------------
    def ledger_get(self, report_id: str, destination: str) -> LedgerEntry | None:
        rows = self._read(f"SELECT {', '.join(_LEDGER_COLUMNS)} FROM report_ledger "
                          "WHERE report_id = ? AND destination = ?", (report_id, destination))
        return _entry(rows[0]) if rows else None

    def ledger(self, report_id: str | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {', '.join(_LEDGER_COLUMNS)} FROM report_ledger"
        params: tuple[object, ...] = ()
        if report_id is not None:
            sql += " WHERE report_id = ?"
            params = (report_id,)
        return [_entry(row) for row in self._read(sql + " ORDER BY report_id, destination",
                                                  params)]

    def ledger_put(self, entry: LedgerEntry) -> None:
        """Insert or replace the entry of (report_id, destination); committed (durable)."""
        if entry.state not in LEDGER_STATES:
            raise ValueError(f"unknown ledger state {entry.state!r}")
        values = (entry.report_id, entry.destination, entry.state, entry.policy_domain,
                  entry.message_id, entry.detail, entry.updated or time.time())
        sql = (f"INSERT INTO report_ledger ({', '.join(_LEDGER_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in _LEDGER_COLUMNS)}) "
               "ON CONFLICT (report_id, destination) DO UPDATE SET state = excluded.state, "
               "policy_domain = excluded.policy_domain, message_id = excluded.message_id, "
               "detail = excluded.detail, updated = excluded.updated")
        with self._lock:
            self._db.begin()
            try:
                self._db.execute(sql, values)
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    @contextlib.contextmanager
    def report_lock(self) -> Iterator[None]:
        """Held by a report run; raises `LockBusy` at once when another run holds it."""
        with self._db.lock_report_runs():
            yield

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        with self._cv:
            self._closed = True
            while self._writing:
                self._cv.wait()
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(report_id=row[0], destination=row[1], state=row[2],
                       policy_domain=row[3], message_id=row[4], detail=row[5],
                       updated=float(row[6]))


def _redact(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, hostpart = rest.partition("@")
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


# --------------------------------------------------------------------------- the milter's path

_SQLITE_FULL = 13  # sqlite3's result code for "database or disk is full"
_FOR_NOW_ERRNOS = {errno.EROFS: "read-only file system", errno.ENOSPC: "file system full",
                   errno.EDQUOT: "disk quota exceeded"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unavailable_for_now(url: str, exc: BaseException) -> str:
    """Why the SQLite store at `url` failed if that is a state of its file system that may
    pass -- read-only, full, over quota -- else "" (a wrong path, a permission, a schema: a
    configuration to fix). Never "for now" for PostgreSQL."""
    file = sqlite_path(url)
    if file is None:
        return ""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _FOR_NOW_ERRNOS:
            return _FOR_NOW_ERRNOS[cause.errno]
        code = getattr(cause, "sqlite_errorcode", None)
        if isinstance(cause, sqlite3.Error) and code is not None and code & 0xFF == _SQLITE_FULL:
            return "file system full"
    path = Path(file)
    directory = next((d for d in path.parents if d.is_dir()), None)
    if directory is None:
        return ""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return ""
    if fs.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if fs.f_bavail == 0 or fs.f_favail == 0:
        return "file system full"
    return ""


class Recorder:
    """How the milter records evaluations: `record()` never raises.

    The store is opened on first use (in the worker process: never across a fork). When it
    cannot be opened, another attempt is made `retry_open` seconds later at the earliest, and
    the evaluations in between are not recorded; when a write fails, that evaluation is not
    recorded and the next one tries again. The first failure is logged with its cause, and
    only the first: a full disk must not write a line per message into the log on the same
    disk. The recovery is logged with the number of evaluations that were not recorded."""

    def __init__(self, url: str, *, retry_open: float = 30.0,
                 clock: Any = time.monotonic) -> None:
        self.url = url
        self.retry_open = retry_open
        self.clock = clock
        self.outage = Outage()  # its misses: evaluations not recorded
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._next_open = float("-inf")

    def store(self) -> Store | None:
        """The open store, opening it if it is time to try; None when it cannot be opened."""
        with self._lock:
            if self._store is None and self.clock() >= self._next_open:
                try:
                    self._store = Store.open(self.url)
                except Exception as exc:
                    self._next_open = self.clock() + self.retry_open
                    self._failed(exc, "cannot be opened")
            return self._store

    def record(self, evaluation: Evaluation) -> bool:
        """Record one evaluation; False when it was not recorded (and why is logged)."""
        store = self.store()
        if store is None:
            self.outage.miss()
            return False
        try:
            store.record(evaluation)
        except Exception as exc:
            self.outage.miss()
            self._failed(exc, "cannot be written")
            return False
        skipped = self.outage.end()
        if skipped is not None:
            log.warning("the DMARC store %s is recording again; %d evaluation(s) were not "
                        "recorded meanwhile", _redact(self.url), skipped)
        return True

    def _failed(self, exc: BaseException, what: str) -> None:
        if not self.outage.begin():
            return
        root = next((c for c in _causes(exc) if not isinstance(c, StoreError)), exc)
        why = unavailable_for_now(self.url, exc)
        log.error("the DMARC store %s %s (%s%s): evaluations are not recorded for aggregate "
                  "reports until it works again; mail is judged as usual", _redact(self.url),
                  what, root, f"; {why}" if why else "")

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
