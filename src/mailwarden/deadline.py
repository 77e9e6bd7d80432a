"""The one deadline every wait of a message's processing honours.

A `Deadline` is a point on the monotonic clock. A stage of the SMTP transaction gets one (the
milter's own budget, `stage_budget`, below the MTA's command timeout); a check with a budget of
its own (SPF: RFC 7208 §4.6.4's 20 s) takes the earlier of the two; the DNS layer turns what is
left into the timeout of each socket operation (UDP receive, TCP connect, every TCP read), so a
server that answers slowly, a byte at a time, or never, costs at most what is left, never more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Deadline:
    at: float  # a time.monotonic() value (or of the clock given)
    clock: Clock = time.monotonic

    @classmethod
    def within(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at

    def earlier(self, other: Deadline | None) -> Deadline:
        """The sooner of the two (`None`: no other deadline)."""
        if other is None or self.at <= other.at:
            return self
        return other
