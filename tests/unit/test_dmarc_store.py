"""The DMARC report store on SQLite: schema creation and migration, the round trip of an
evaluation, the ledger, the report lock, and concurrent writers (threads and processes)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from mailwarden.dmarc import backends as store_backends
from mailwarden.dmarc.ledger import LedgerEntry, ledger_entries, ledger_get, ledger_put
from mailwarden.dmarc.store import (
    SCHEMA_VERSION,
    Evaluation,
    LockBusy,
    SchemaError,
    Store,
    StoreError,
)

from helpers import open_concurrently


def make_evaluation(marker: str = "m0", time: float = 1_000_000.0, **changes: object) -> Evaluation:
    fields: dict[str, object] = {
        "time": time, "source_ip": "192.0.2.10", "header_from": f"{marker}.example.com",
        "envelope_from": "bounces.example.com", "envelope_to": "rcpt.example.net",
        "policy_domain": "example.com", "p": "reject", "sp": "quarantine", "np": "",
        "adkim": "r", "aspf": "s", "testing": False, "psd": "", "disposition": "reject",
        "dkim_aligned": "fail", "spf_aligned": "pass",
        "dkim": (("example.com", "sel1", "fail"), ("esp.example", "s2", "pass")),
        "spf": (("bounces.example.com", "mfrom", "pass"), ("mx.example.com", "helo", "none")),
        "overrides": (("local_policy", "allow-listed"),),
        "rua": ("mailto:dmarc@example.com", "mailto:agg@reports.example!10m"),
    }
    fields.update(changes)
    return Evaluation(**fields)  # type: ignore[arg-type]


def table_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_open_creates_the_schema_once_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dmarc.db"  # the directory is created too
    first = Store.open(f"sqlite://{path}")
    instance = first.instance_id
    assert first.schema_version() == SCHEMA_VERSION
    first.record(make_evaluation())
    first.close()
    for _ in range(3):
        again = Store.open(str(path))  # a plain path is SQLite too
        assert again.schema_version() == SCHEMA_VERSION
        assert again.instance_id == instance
        assert again.count() == 1
        again.close()
    versions = table_rows(path, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    tables = {row[0] for row in table_rows(path, "SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}
    assert {"schema_version", "store_meta", "evaluations", "report_ledger"} <= tables
    assert table_rows(path, "PRAGMA journal_mode") == [("wal",)]


def test_a_new_migration_is_applied_once_and_a_newer_schema_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dmarc.db"
    Store.open(str(path)).close()
    extra = (SCHEMA_VERSION + 1,
             ("CREATE TABLE migration_probe (n INTEGER)",
              "INSERT INTO migration_probe VALUES (1)"))
    newer = {"sqlite": [*store_backends.MIGRATIONS["sqlite"], extra]}
    with monkeypatch.context() as patch:
        patch.setattr(store_backends, "MIGRATIONS", newer)
        for _ in range(3):
            store = Store.open(str(path))
            assert store.schema_version() == SCHEMA_VERSION + 1
            store.close()
    # applied exactly once: its INSERT ran once
    assert table_rows(path, "SELECT n FROM migration_probe") == [(1,)]
    # code that only knows the older schema refuses the store instead of misreading it
    with pytest.raises(SchemaError, match="upgrade mailwarden"):
        Store.open(str(path))


def test_concurrent_opens_of_a_new_store_create_it_once(tmp_path: Path) -> None:
    path = tmp_path / "dmarc.db"
    ids, errors = open_concurrently(str(path), 8)
    assert errors == []
    assert len(set(ids)) == 1
    assert table_rows(path, "SELECT count(*) FROM schema_version") == [(SCHEMA_VERSION,)]


def test_record_round_trip_and_queries(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "dmarc.db"))
    first = make_evaluation("a", time=100.5)
    odd = make_evaluation("b", time=200.0, envelope_from="", testing=True, np="none",
                          policy_domain="other.example", dkim=(), spf=(), overrides=(),
                          rua=(), p="", header_from="bücher.example",
                          source_ip="2001:db8::1")
    late = make_evaluation("c", time=300.0)
    for evaluation in (first, odd, late):
        store.record(evaluation)
    assert store.evaluations() == [first, odd, late]  # every field comes back unchanged
    assert store.evaluations(100.5, 300.0) == [first, odd]  # [start, end)
    assert store.evaluations(0, 1000, "example.com") == [first, late]
    assert store.policy_domains(0, 1000) == ["example.com", "other.example"]
    assert store.policy_domains(250, 1000) == ["example.com"]
    assert store.purge(250) == 2
    assert store.evaluations() == [late]
    store.close()
    with pytest.raises(StoreError):
        store.record(first)


def test_ledger_round_trip_and_upsert(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "dmarc.db"))
    assert ledger_get(store, "r1", "mailto:a@example.com") is None
    ledger_put(store, LedgerEntry("r1", "mailto:a@example.com", "committing", "example.com",
                                 "<r1@x>", "sending"))
    ledger_put(store, LedgerEntry("r1", "mailto:a@example.com", "sent", "example.com", "<r1@x>",
                                 "250 ok"))
    ledger_put(store, LedgerEntry("r1", "mailto:b@example.com", "failed", "example.com", "",
                                 "550 no"))
    entry = ledger_get(store, "r1", "mailto:a@example.com")
    assert entry is not None and (entry.state, entry.detail) == ("sent", "250 ok")
    assert entry.updated > 0
    assert [(e.destination, e.state) for e in ledger_entries(store, "r1")] == [
        ("mailto:a@example.com", "sent"), ("mailto:b@example.com", "failed")]
    with pytest.raises(ValueError):
        ledger_put(store, LedgerEntry("r1", "x", "bogus"))
    store.close()


def test_report_lock_is_exclusive(tmp_path: Path) -> None:
    one, two = Store.open(str(tmp_path / "d.db")), Store.open(str(tmp_path / "d.db"))
    with one.report_lock(), pytest.raises(LockBusy), two.report_lock():
        pass
    with two.report_lock():  # released
        pass
    one.close()
    two.close()


def test_bad_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Store.open("mysql://localhost/db")
    with pytest.raises(ValueError):
        Store.open("sqlite://:memory:")


def test_concurrent_threads_lose_nothing(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "dmarc.db"))
    threads_n, per_thread = 8, 150
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(per_thread):
                store.record(make_evaluation(f"t{n}-{i}", time=float(i)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    markers = sorted(ev.header_from for ev in store.evaluations())
    assert markers == sorted(f"t{n}-{i}.example.com" for n in range(threads_n)
                             for i in range(per_thread))
    store.close()


WRITER = textwrap.dedent("""
    import sys, threading
    from mailwarden.dmarc.store import Evaluation, Store
    url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store.open(url)
    def run(t):
        for i in range(count):
            store.record(Evaluation(
                time=float(i), source_ip="192.0.2.1", header_from=f"{name}-{t}-{i}.example",
                envelope_from="", envelope_to="", policy_domain="example.com", p="none", sp="",
                np="", adkim="", aspf="", testing=False, psd="", disposition="none",
                dkim_aligned="fail", spf_aligned="fail"))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    store.close()
""")


def test_two_processes_writing_into_one_store_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'dmarc.db'}"  # created by the writers themselves, at once
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, name, "100"])
             for name in ("mta1", "mta2")]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    store = Store.open(url)
    got = sorted(ev.header_from for ev in store.evaluations())
    store.close()
    assert got == sorted(f"{name}-{t}-{i}.example" for name in ("mta1", "mta2")
                         for t in range(4) for i in range(100))


def test_ledger_commits_are_fsynced_and_evaluations_are_not(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL for evaluations (a daemon crash loses none; see
    test_dmarc_crash), FULL for a ledger entry: losing one after a power cut would send a report
    twice."""
    store = Store.open(str(tmp_path / "dmarc.db"))
    statements: list[str] = []
    store._db.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    store.record(make_evaluation())
    assert not any("synchronous = FULL" in sql for sql in statements)
    statements.clear()
    ledger_put(store, LedgerEntry("r1", "mailto:a@example.com", "sent", "example.com", "<r1@x>",
                                 "250 ok"))
    begin = statements.index("BEGIN IMMEDIATE")
    assert "PRAGMA synchronous = FULL" in statements[:begin]
    assert statements[-1] == "PRAGMA synchronous = NORMAL"
    assert store._db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]
