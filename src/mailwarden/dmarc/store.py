"""The DMARC report store: every evaluation the milter makes, and the ledger of sent reports.

One `Store` per process, shared by every thread. `Store.open(url)` takes

* ``sqlite:///var/lib/mailwarden/dmarc.db`` or a plain path: SQLite in WAL mode with
  ``synchronous=NORMAL`` (a commit survives a crash of the daemon; a power loss may take the
  last moments' evaluations, never the database), for one host; several processes
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

The milter records through `dmarc.recorder.Recorder`, which never raises; the SQL backends
and the schema are in `dmarc.backends`.

The ledger (``report_ledger``) is keyed by (report_id, destination) and is used by
`mailwarden.dmarc.sending.send_reports` for exactly-once delivery; `report_lock()` keeps two
report runs on the same store from overlapping (a lock file next to the SQLite database; a
PostgreSQL session advisory lock), and is released by the kernel or the server when the process
holding it dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mailwarden.dmarc.backends import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LockBusy,
    SchemaError,
    StoreError,
    _Backend,
    _backend_for,
    _migrate,
    sqlite_path,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Evaluation",
    "LockBusy",
    "SchemaError",
    "Store",
    "StoreError",
    "redact",
    "sqlite_path",
]

log = logging.getLogger("mailwarden.dmarc")

T = TypeVar("T")


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
    policy_tag: str = ""  # which applied: p, sp or np ("" in rows older than schema 3)


_COLUMNS = ("time", "source_ip", "header_from", "envelope_from", "envelope_to", "policy_domain",
            "p", "sp", "np", "adkim", "aspf", "testing", "psd", "disposition", "dkim_aligned",
            "spf_aligned", "dkim", "spf", "overrides", "rua", "policy_tag")
_INSERT = (f"INSERT INTO evaluations ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_SELECT = f"SELECT id, {', '.join(_COLUMNS)} FROM evaluations"
# A 64-bit key for PostgreSQL advisory locks ("mailwarden dmarc"): schema and report runs.
_CHUNK = 5000


def _to_row(ev: Evaluation) -> tuple[object, ...]:
    return (
        float(ev.time), ev.source_ip, ev.header_from, ev.envelope_from, ev.envelope_to,
        ev.policy_domain, ev.p, ev.sp, ev.np, ev.adkim, ev.aspf, 1 if ev.testing else 0, ev.psd,
        ev.disposition, ev.dkim_aligned, ev.spf_aligned,
        json.dumps([list(item) for item in ev.dkim]), json.dumps([list(item) for item in ev.spf]),
        json.dumps([list(item) for item in ev.overrides]), json.dumps(list(ev.rua)),
        ev.policy_tag,
    )


def _triples(text: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(a), str(b), str(c)) for a, b, c in json.loads(text))


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(b)) for a, b in json.loads(text))


def _from_row(row: Sequence[Any]) -> Evaluation:
    (_id, time_, source_ip, header_from, envelope_from, envelope_to, policy_domain, p, sp, np,
     adkim, aspf, testing, psd, disposition, dkim_aligned, spf_aligned, dkim, spf, overrides,
     rua, policy_tag) = row
    return Evaluation(
        time=float(time_), source_ip=source_ip, header_from=header_from,
        envelope_from=envelope_from, envelope_to=envelope_to, policy_domain=policy_domain,
        p=p, sp=sp, np=np, adkim=adkim, aspf=aspf, testing=bool(testing), psd=psd,
        disposition=disposition, dkim_aligned=dkim_aligned, spf_aligned=spf_aligned,
        dkim=_triples(dkim), spf=_triples(spf), overrides=_pairs(overrides),
        rua=tuple(str(uri) for uri in json.loads(rua)), policy_tag=policy_tag,
    )



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
            raise StoreError(f"cannot open the DMARC store {redact(url)}: {exc}") from exc

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
                raise StoreError(f"{redact(url)} is not a mailwarden DMARC store (no schema)")
            if current != SCHEMA_VERSION:
                _migrate(db)  # refuses a newer schema; brings an older one up to date
            return cls(db, url)
        except StoreError:
            db.close()
            raise
        except Exception as exc:
            db.close()
            raise StoreError(f"cannot open the DMARC store {redact(url)}: {exc}") from exc

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
        """Store one evaluation; it is committed when this returns."""
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

    def record_many(self, evaluations: Sequence[Evaluation]) -> None:
        """Store these evaluations in one transaction (the milter's writer thread)."""
        self._write(evaluations)

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

    def transaction(self, work: Callable[[_Backend], T], *, durable: bool = False) -> T:
        """`work` on the connection in one committed transaction (other modules' tables,
        such as the received reports of `dmarc.received_store`); `durable`: on disk when
        this returns (the report ledger)."""
        with self._lock:
            self._db.begin(durable=durable)
            try:
                result = work(self._db)
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
        return result

    # -- reading ----------------------------------------------------------------------
    def read(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """Rows of a query on the store's tables (`?` placeholders in both dialects)."""
        with self._lock:
            try:
                return self._db.execute(sql, params)
            finally:
                self._db.rollback()  # end PostgreSQL's implicit read transaction

    def count(self) -> int:
        """How many evaluations the store holds."""
        return int(self.read("SELECT count(*) FROM evaluations")[0][0])

    def policy_domains(self, start: float, end: float) -> list[str]:
        """The policy domains with evaluations in [start, end), sorted."""
        rows = self.read("SELECT DISTINCT policy_domain FROM evaluations "
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
            rows = self.read(f"{_SELECT} WHERE {where} ORDER BY id LIMIT {_CHUNK}", params)
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
        rows = self.read(
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

    # -- report runs ------------------------------------------------------------------
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


def redact(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, hostpart = rest.partition("@")
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


