"""A failure that may last (a full disk, a store that cannot be opened): logged once when it
begins and once when it ends, with how many things it cost meanwhile, rather than a line per
message into a log that may sit on the same full disk."""

from __future__ import annotations

import threading


class Outage:
    """Thread-safe begin / miss / end bookkeeping; the caller writes the log lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failing = False
        self.missed = 0  # things not done since the outage began

    def begin(self) -> bool:
        """A failure: True when it starts an outage (the one to log)."""
        with self._lock:
            first, self.failing = not self.failing, True
            return first

    def miss(self) -> None:
        """One thing not done (a body kept in memory, an evaluation not recorded)."""
        with self._lock:
            self.missed += 1

    def end(self) -> int | None:
        """A success: the number of misses when it ends an outage (to log), else None."""
        if not self.failing:  # the usual case, without taking the lock
            return None
        with self._lock:
            was, missed = self.failing, self.missed
            self.failing, self.missed = False, 0
        return missed if was else None
