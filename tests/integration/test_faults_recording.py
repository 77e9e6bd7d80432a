"""The pieces behind tests/integration/test_faults.py's file-system faults, at close range: the
body spool falls back to memory without losing a byte, the DMARC recorder never raises, and
each logs a failure once and a recovery once."""

from __future__ import annotations

import errno
import io
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mailwarden.transaction as transaction
from mailwarden.deadline import Deadline
from mailwarden.dmarc.recorder import Recorder, unavailable_for_now
from mailwarden.dmarc.store import Evaluation, Store, StoreError
from mailwarden.transaction import BodySpool, Transaction


@pytest.fixture(autouse=True)
def healthy_spool() -> Iterator[None]:
    transaction.SPOOL_HEALTH.failing = False
    transaction.SPOOL_HEALTH.missed = 0
    yield
    transaction.SPOOL_HEALTH.failing = False


def read_all(spool: BodySpool) -> bytes:
    spool.seek(0)
    return spool.read()


def test_a_body_past_the_threshold_goes_to_a_file_in_the_spool_directory(tmp_path: Path) -> None:
    txn = Transaction(spool_threshold=10, spool_dir=str(tmp_path))
    txn.add_body(b"0123456789")
    assert txn.body is not None and not txn.body.spooled
    txn.add_body(b"x")
    assert txn.body.spooled
    assert b"".join(txn.body_chunks(4)) == b"0123456789x"
    body = txn.body
    txn.new_message()
    assert body.closed


def test_an_unusable_spool_directory_keeps_bodies_in_memory_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "gone")
    with caplog.at_level(logging.WARNING, "mailwarden.spool"):
        for _ in range(3):
            spool = BodySpool(4, missing)
            spool.write(b"abc")
            spool.write(b"defgh")
            assert not spool.spooled and read_all(spool) == b"abcdefgh"
            spool.close()
        assert [r.levelname for r in caplog.records] == ["ERROR"]
        assert "No such file or directory" in caplog.records[0].getMessage()
        os.mkdir(missing)
        spool = BodySpool(4, missing)
        spool.write(b"abcdefgh")
        assert spool.spooled
        spool.close()
    assert "works again (3 bodies were kept in memory meanwhile)" in caplog.records[-1].message


class Filling(io.FileIO):
    """A spool file on a disk that fills up: the `room`-th byte is the last one written."""

    room = 0

    def write(self, data: Any) -> int:
        if Filling.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        size = min(len(data), Filling.room)
        Filling.room -= size
        return super().write(bytes(data)[:size])  # a short write, then ENOSPC


@pytest.mark.parametrize("room", [0, 5, 12, 17, 30])
def test_a_disk_that_fills_mid_body_loses_no_byte(room: int, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def temporary_file(dir: str | None = None, buffering: int = -1) -> io.FileIO:
        fd, path = tempfile.mkstemp(dir=dir)
        os.unlink(path)
        return Filling(fd, "w+b")

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    Filling.room = room
    spool = BodySpool(4, str(tmp_path))
    body = bytes(range(48, 48 + 40))
    for start in range(0, len(body), 7):
        spool.write(body[start:start + 7])
    assert read_all(spool) == body
    assert transaction.SPOOL_HEALTH.failing == (room < len(body))


def evaluation(domain: str = "example.com") -> Evaluation:
    return Evaluation(time=1_777_000_000.0, source_ip="192.0.2.1", header_from=domain,
                      envelope_from=domain, envelope_to="receiver.example",
                      policy_domain=domain, p="reject", sp="", np="", adkim="r", aspf="r",
                      testing=False, psd="", disposition="none", dkim_aligned="pass",
                      spf_aligned="fail")


def test_the_recorder_never_raises_logs_once_and_retries_the_open_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    now = [0.0]
    recorder = Recorder(str(blocker / "dmarc.db"), retry_open=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "mailwarden.dmarc"):
        assert not recorder.record(evaluation())
        now[0] = 10.0
        assert not recorder.record(evaluation())  # not tried again yet
        blocker.unlink()
        blocker.mkdir()
        assert not recorder.record(evaluation())
        now[0] = 31.0
        assert recorder.record(evaluation())  # opened now
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "cannot be opened" in messages[0]
    assert "recording again; 3 evaluation(s) were not recorded" in messages[1]
    recorder.close()
    with Store.open(str(blocker / "dmarc.db")) as store:
        assert store.count() == 1


def test_a_failing_write_is_skipped_and_logged_once(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(str(tmp_path / "dmarc.db"))
    assert recorder.record(evaluation("a.example"))
    store = recorder.store()
    assert store is not None

    def full(evaluations: list[Evaluation]) -> None:
        cause = sqlite3.OperationalError("database or disk is full")
        cause.sqlite_errorcode = 13
        raise StoreError(f"recording failed: {cause}") from cause

    with caplog.at_level(logging.WARNING, "mailwarden.dmarc"):
        with monkeypatch.context() as patch:
            patch.setattr(store, "record_many", full)
            assert not any(recorder.record(evaluation()) for _ in range(5))
        assert recorder.record(evaluation("b.example"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "cannot be written (database or disk is full; file system full)" in messages[0]
    assert "5 evaluation(s) were not recorded" in messages[1]
    assert sorted(e.header_from for e in store.evaluations()) == ["a.example", "b.example"]
    recorder.close()


def test_a_hanging_store_holds_the_writer_not_the_message(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that stops answering (a database server that hangs): `record()` returns by the
    caller's deadline (the stage's), and the evaluation is written once the store answers."""
    recorder = Recorder(str(tmp_path / "dmarc.db"))
    store = recorder.store()
    assert store is not None
    answering = threading.Event()
    write = store.record_many

    def hanging(evaluations: list[Evaluation]) -> None:
        answering.wait(30)
        write(evaluations)

    monkeypatch.setattr(store, "record_many", hanging)
    started = time.monotonic()
    assert not recorder.record(evaluation("slow.example"), Deadline.within(0.3))
    assert time.monotonic() - started < 0.5
    assert store.count() == 0
    answering.set()
    assert recorder.record(evaluation("after.example"), Deadline.within(5))
    assert sorted(e.header_from for e in store.evaluations()) == ["after.example",
                                                                 "slow.example"]
    recorder.close()


def test_which_store_failures_may_pass(tmp_path: Path) -> None:
    url = "/var/lib/mailwarden/dmarc.db"
    for code, why in ((errno.EROFS, "read-only file system"), (errno.ENOSPC, "file system full"),
                      (errno.EDQUOT, "disk quota exceeded")):
        try:
            try:
                raise OSError(code, os.strerror(code))
            except OSError as inner:
                raise StoreError("cannot open") from inner
        except StoreError as exc:
            assert unavailable_for_now(url, exc) == why
            assert unavailable_for_now("postgresql://db/dmarc", exc) == ""
    # PostgreSQL: a server that cannot be reached, or that cannot take us now, may pass; one
    # that refuses us (a password, a missing database) is a configuration to fix
    pg_error = type("OperationalError", (Exception,), {})
    for text, why in (
            ('connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such '
             "file or directory", "the server cannot be reached"),
            ('connection to server at "db" (192.0.2.5), port 5432 failed: timeout expired',
             "the server cannot be reached"),
            ("connection failed: FATAL:  the database system is starting up",
             "the database system is starting up"),
            ('connection failed: FATAL:  database "dmarc" does not exist', ""),
            ('connection failed: FATAL:  password authentication failed for user "x"', "")):
        got = unavailable_for_now("postgresql://db/dmarc", pg_error(text))
        assert got.startswith(why) and bool(got) == bool(why), (text, got)
    # a permission problem on a writable, roomy file system is for the administrator to fix
    assert unavailable_for_now(str(tmp_path / "sub" / "dmarc.db"), PermissionError(13, "no")) == ""
