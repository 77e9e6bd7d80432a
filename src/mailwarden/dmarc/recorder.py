"""The milter's path into the DMARC report store: a `Recorder` that never raises. A store that
cannot be opened or written (a read-only or full file system, a database server that is down)
costs the report rows of the meantime, never a verdict; the failure is logged once with its
cause, and the recovery once with the number of evaluations that were not recorded."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailwarden import metrics
from mailwarden.deadline import Deadline
from mailwarden.dmarc.backends import StoreError, sqlite_path
from mailwarden.dmarc.store import Evaluation, Store, redact
from mailwarden.outage import Outage

__all__ = ["Recorder", "shared", "unavailable_for_now"]

log = logging.getLogger("mailwarden.dmarc")


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


# What a PostgreSQL server that answered says when it cannot take a connection just now (its
# other refusals -- a password, a missing database -- are a configuration to fix)
_PG_FOR_NOW = ("the database system is starting up", "the database system is shutting down",
               "the database system is in recovery mode", "too many clients",
               "remaining connection slots are reserved")


def unavailable_for_now(url: str, exc: BaseException) -> str:
    """Why the store at `url` failed if that is a state that may pass -- a SQLite file system
    read-only, full, over quota; a PostgreSQL server that cannot be reached or cannot take a
    connection now -- else "" (a wrong path, a permission, a password, a missing database, a
    schema: a configuration to fix)."""
    file = sqlite_path(url)
    if file is None:
        return _postgres_for_now(exc)
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


def _postgres_for_now(exc: BaseException) -> str:
    for cause in _causes(exc):
        if type(cause).__name__ != "OperationalError":
            continue
        text = str(cause).strip()
        said = next((phrase for phrase in _PG_FOR_NOW if phrase in text), "")
        if said:
            return said
        if "FATAL:" not in text:  # no server answered: refused, no socket, timed out
            return f"the server cannot be reached: {' '.join(text.split()) or repr(cause)}"
    return ""


# Seconds between attempts to open a store that could not be opened. Attempts are made by the
# writer thread, never by a message, so they can be frequent.
RETRY_OPEN = 10.0


class _Ticket:
    __slots__ = ("done", "evaluation", "recorded")

    def __init__(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self.done = threading.Event()
        self.recorded = False


class Recorder:
    """How the milter records evaluations: `record()` never raises, and never waits past the
    deadline it is given.

    One writer thread per process takes the evaluations handed in and commits them, as many
    as have gathered in one transaction. The store is opened on first use (in the worker
    process: never across a fork). When it cannot be opened, another attempt is made
    `retry_open` seconds later at the earliest, and the evaluations in between are not
    recorded; when a write fails, those evaluations are not recorded and the next ones try
    again. The first failure is logged with its cause, and only the first: a full disk must
    not write a line per message into the log on the same disk. The recovery is logged with
    the number of evaluations that were not recorded. A store that hangs (a database server
    that stopped answering) holds the writer, not the mail: past the caller's deadline the
    message goes on, and the evaluation is written when the store answers again (at most
    `queue_limit` wait; beyond, they are not recorded)."""

    def __init__(self, url: str, *, retry_open: float = RETRY_OPEN,
                 clock: Any = time.monotonic, queue_limit: int = 10_000) -> None:
        self.url = url
        self.retry_open = retry_open
        self.clock = clock
        self.queue_limit = queue_limit
        self.outage = Outage()  # its misses: evaluations not recorded
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._next_open = float("-inf")
        self._queue: list[_Ticket] = []
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closing = False

    def store(self) -> Store | None:
        """The open store, opening it if it is time to try; None when it cannot be opened."""
        with self._lock:
            if self._store is None and self.clock() >= self._next_open:
                try:
                    self._store = Store.open(self.url)
                except Exception as exc:
                    self._next_open = self.clock() + self.retry_open
                    self._failed(exc, "cannot be opened")
            metrics.METRICS.dmarc_store(self._store is not None)
            return self._store

    def record(self, evaluation: Evaluation, deadline: Deadline | None = None) -> bool:
        """Hand one evaluation to the writer and wait for its commit until `deadline` (None:
        until it is written or fails). True when it is committed by then."""
        ticket = _Ticket(evaluation)
        with self._wake:
            if self._closing or len(self._queue) >= self.queue_limit:
                self.outage.miss()
                metrics.METRICS.dmarc_recording(False)
                self._failed(StoreError(f"{len(self._queue)} evaluations waiting for the "
                                        "store already"), "is not keeping up")
                return False
            self._queue.append(ticket)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                                name="dmarc-store")
                self._writer.start()
            self._wake.notify()
        ticket.done.wait(None if deadline is None else deadline.remaining())
        return ticket.recorded

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            recorded = self._write(batch)
            for ticket in batch:
                ticket.recorded = recorded
                ticket.done.set()
            for _ in batch:
                metrics.METRICS.dmarc_recording(recorded)

    def _write(self, batch: list[_Ticket]) -> bool:
        store = self.store()
        if store is None:
            for _ in batch:
                self.outage.miss()
            return False
        try:
            store.record_many([ticket.evaluation for ticket in batch])
        except Exception as exc:
            for _ in batch:
                self.outage.miss()
            metrics.METRICS.dmarc_store(False)
            self._failed(exc, "cannot be written")
            return False
        skipped = self.outage.end()
        if skipped is not None:
            log.warning("the DMARC store %s is recording again; %d evaluation(s) were not "
                        "recorded meanwhile", redact(self.url), skipped)
        return True

    def _failed(self, exc: BaseException, what: str) -> None:
        if not self.outage.begin():
            return
        root = next((c for c in _causes(exc) if not isinstance(c, StoreError)), exc)
        why = unavailable_for_now(self.url, exc)
        log.error("the DMARC store %s %s (%s%s): evaluations are not recorded for aggregate "
                  "reports until it works again; mail is judged as usual", redact(self.url),
                  what, root, f"; {why}" if why else "")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then close the store."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join(timeout)
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()


_SHARED: dict[str, Recorder] = {}
_SHARED_LOCK = threading.Lock()


def shared(url: str) -> Recorder:
    """This process's recorder for the store at `url`: one writer thread per store, kept
    across reloads that keep the store; one for another store is closed (in the background,
    after writing what it holds)."""
    with _SHARED_LOCK:
        recorder = _SHARED.get(url)
        if recorder is None:
            for old in _SHARED.values():
                threading.Thread(target=old.close, daemon=True, name="dmarc-store-close").start()
            _SHARED.clear()
            recorder = _SHARED[url] = Recorder(url)
        return recorder
