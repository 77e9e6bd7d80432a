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

from mailwarden.dmarc.backends import StoreError, sqlite_path
from mailwarden.dmarc.store import Evaluation, Store, redact
from mailwarden.outage import Outage

__all__ = ["Recorder", "unavailable_for_now"]

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

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
