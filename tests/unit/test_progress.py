"""The progress ticker (`mailwarden.progress`): one thread for every connection; progress
messages while a reply is outstanding past the interval, none once it has ended."""

from __future__ import annotations

import threading
import time

from mailwarden.progress import ProgressTicker


def test_progress_messages_come_every_interval_and_stop_at_the_end() -> None:
    ticker = ProgressTicker()
    sent: list[float] = []
    started = time.monotonic()
    with ticker.alive(lambda: sent.append(time.monotonic() - started), 0.05):
        time.sleep(0.32)
    count = len(sent)
    assert 4 <= count <= 7, sent
    assert sent[0] >= 0.045  # none before the interval
    time.sleep(0.15)
    assert len(sent) == count  # none after the end


def test_a_quick_reply_sends_nothing() -> None:
    ticker = ProgressTicker()
    sent: list[int] = []
    for _ in range(100):
        with ticker.alive(lambda: sent.append(1), 0.2):
            pass
    time.sleep(0.3)
    assert sent == []


def test_end_waits_for_a_message_on_the_wire() -> None:
    """The reply that follows `end()` can never interleave with a progress message."""
    ticker = ProgressTicker()
    sending = threading.Event()
    order: list[str] = []

    def slow_send() -> None:
        sending.set()
        time.sleep(0.2)
        order.append("progress")

    token = ticker.begin(slow_send, 0.01)
    assert sending.wait(2)
    ticker.end(token)
    order.append("reply")
    assert order == ["progress", "reply"]


def test_a_failing_send_stops_that_connection_only() -> None:
    ticker = ProgressTicker()
    good: list[int] = []

    def broken() -> None:
        raise OSError("connection reset")

    with ticker.alive(broken, 0.02), ticker.alive(lambda: good.append(1), 0.02):
        time.sleep(0.15)
    assert len(good) >= 3
