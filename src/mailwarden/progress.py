"""Telling the MTA the milter is alive while a reply takes long (SMFIR_PROGRESS).

Sendmail waits 10 s for a milter's reply by default (`T=R:10s`), Postfix 30 s per command; a
check may legitimately run longer (the SPF budget is 20 s, a slow DNS server's answers add up).
While a reply is outstanding past `interval` seconds, a progress message goes to the MTA every
`interval` seconds, which restarts its timer; the transaction ends with our verdict, not with
the MTA's timeout.

One thread per process serves every connection: a transaction pays a heap push and a pop, not a
thread. `begin()` registers how to send a progress message on one connection and `end()`
withdraws it; once `end()` has returned no progress message is sent for it, so the reply that
follows never interleaves with one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("mailwarden.progress")


class _Entry:
    __slots__ = ("interval", "live", "lock", "send")

    def __init__(self, send: Callable[[], None], interval: float) -> None:
        self.send, self.interval = send, interval
        self.lock = threading.Lock()  # held while a progress message is on the wire
        self.live = True


class ProgressTicker:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._due: list[tuple[float, int]] = []
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def begin(self, send: Callable[[], None], interval: float) -> int:
        token = next(self._ids)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress",
                                                daemon=True)
                self._thread.start()
            self._entries[token] = _Entry(send, interval)
            heapq.heappush(self._due, (time.monotonic() + interval, token))
            self._lock.notify()
        return token

    def end(self, token: int) -> None:
        with self._lock:
            entry = self._entries.pop(token, None)
        if entry is not None:
            with entry.lock:  # a progress message being sent finishes first
                entry.live = False

    @contextmanager
    def alive(self, send: Callable[[], None], interval: float) -> Iterator[None]:
        """Progress messages through `send` while the block runs longer than `interval`."""
        token = self.begin(send, interval)
        try:
            yield
        finally:
            self.end(token)

    def _next(self) -> tuple[int, _Entry]:
        """The next entry due, once it is due."""
        with self._lock:
            while True:
                while self._due and self._due[0][1] not in self._entries:
                    heapq.heappop(self._due)  # ended meanwhile
                if not self._due:
                    self._lock.wait()
                    continue
                deadline, token = self._due[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._lock.wait(wait)
                    continue
                heapq.heappop(self._due)
                return token, self._entries[token]

    def _run(self) -> None:
        while True:
            token, entry = self._next()
            with entry.lock:
                if not entry.live:
                    continue
                try:
                    entry.send()
                except Exception as exc:  # the connection is going away: its reply fails too
                    log.debug("progress message not sent: %s", exc)
                    continue
            with self._lock:
                if token in self._entries:
                    heapq.heappush(self._due, (time.monotonic() + entry.interval, token))


TICKER = ProgressTicker()
