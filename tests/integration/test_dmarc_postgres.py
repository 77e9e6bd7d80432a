"""The DMARC report store on a real PostgreSQL server, started by this module in a temporary
directory (initdb + pg_ctl, listening only on a unix socket there; as the `postgres` user when
the tests run as root, since initdb refuses root): schema creation and migration, the round
trip, concurrent writers (threads, and two "MTA" processes at once), the report lock, and
reports built and delivered exactly once from it. Skipped only when the server binaries
(Debian: package postgresql) are missing."""

from __future__ import annotations

import datetime as dt
import gzip
import importlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dmarc import backends as store_backends
from mailwarden.dmarc.report import ReportSettings, build_reports
from mailwarden.dmarc.sending import send_reports
from mailwarden.dmarc.store import (
    SCHEMA_VERSION,
    Evaluation,
    LockBusy,
    SchemaError,
    Store,
)

from helpers import make_resolver, open_concurrently

XSD = Path(__file__).parent.parent / "data" / "dmarc-schema" / "dmarc-aggregate-2.0.xsd"
DAY = dt.datetime(2026, 5, 1, tzinfo=dt.UTC).timestamp()


def server_bindir() -> Path | None:
    """Where initdb/pg_ctl/postgres are: Debian's newest /usr/lib/postgresql/N/bin, or PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                        reverse=True)
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


@dataclass
class Server:
    base: Path
    port: int
    counter: itertools.count[int]
    control: Any = None  # pg_ctl, with its arguments: control("stop"), control("start")

    def stop(self) -> None:
        done = self.control("-m", "fast", "-w", "stop")
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        done = self.control("-w", "-t", "60", "start")
        assert done.returncode == 0, done.stdout + done.stderr

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.base}&port={self.port}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        psycopg: Any = importlib.import_module("psycopg")
        name = f"t{next(self.counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    bindir = server_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                    "apt-get install postgresql")
    try:
        importlib.import_module("psycopg")
    except ImportError:
        pytest.fail("psycopg 3 is not installed: .venv/bin/pip install 'psycopg[binary]'")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mailwarden-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.fail("running as root needs the 'postgres' user (Debian's postgresql "
                        "package creates it)")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:  # a free port number, for the socket file's name
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data, log = base / "data", base / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    done = run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
               "-E", "UTF8", "--no-sync")
    assert done.returncode == 0, done.stdout + done.stderr
    options = f"-k {base} -p {port} -c listen_addresses='' -c max_connections=50"
    done = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
               "-o", options, "start")
    assert done.returncode == 0, done.stdout + done.stderr + (
        log.read_text() if log.exists() else "")
    def control(*args: str) -> subprocess.CompletedProcess[str]:
        return run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                   *args)

    try:
        yield Server(base, port, itertools.count(1), control)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def evaluation(marker: str, t: float = DAY + 60, **changes: object) -> Evaluation:
    fields: dict[str, object] = {
        "time": t, "source_ip": "192.0.2.10", "header_from": "example.com",
        "envelope_from": "example.com", "envelope_to": f"{marker}.receiver.example",
        "policy_domain": "example.com", "p": "quarantine", "sp": "", "np": "", "adkim": "s",
        "aspf": "r", "testing": True, "psd": "n", "disposition": "none",
        "dkim_aligned": "pass", "spf_aligned": "fail",
        "dkim": (("example.com", "s1", "pass"),), "spf": (("example.com", "mfrom", "fail"),),
        "overrides": (("policy_test_mode", "t=y"),), "rua": ("mailto:dmarc@example.com",),
    }
    fields.update(changes)
    return Evaluation(**fields)  # type: ignore[arg-type]


def test_schema_is_created_once_by_concurrent_opens_and_migrates(
        pg: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg.new_database()
    ids, errors = open_concurrently(url, 6)
    assert errors == []
    assert len(set(ids)) == 1
    store = Store.open(url)
    assert store.dialect == "postgresql"
    assert store.schema_version() == SCHEMA_VERSION
    store.close()

    extra = (SCHEMA_VERSION + 1, ("CREATE TABLE migration_probe (n INTEGER)",
                                  "INSERT INTO migration_probe VALUES (1)"))
    with monkeypatch.context() as patch:
        patch.setattr(store_backends, "MIGRATIONS",
                      {"postgresql": [*store_backends.MIGRATIONS["postgresql"], extra]})
        for _ in range(2):
            store = Store.open(url)
            assert store.schema_version() == SCHEMA_VERSION + 1
            store.close()
    psycopg: Any = importlib.import_module("psycopg")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT n FROM migration_probe").fetchall() == [(1,)]
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (
            SCHEMA_VERSION + 1,)
    with pytest.raises(SchemaError):
        Store.open(url)


def test_round_trip(pg: Server) -> None:
    store = Store.open(pg.new_database())
    first = evaluation("a", t=DAY + 0.25)
    odd = evaluation("b", t=DAY + 7, envelope_from="", testing=False, dkim=(), spf=(),
                     overrides=(), rua=(), header_from="bücher.example", p="",
                     source_ip="2001:db8::25", policy_domain="other.example")
    for item in (first, odd):
        store.record(item)
    assert store.evaluations() == [first, odd]
    assert store.evaluations(DAY, DAY + 1, "example.com") == [first]
    assert store.policy_domains(DAY, DAY + 86400) == ["example.com", "other.example"]
    assert store.count() == 2
    store.close()


def test_concurrent_threads_lose_nothing(pg: Server) -> None:
    store = Store.open(pg.new_database())
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(100):
                store.record(evaluation(f"t{n}-{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    got = sorted(ev.envelope_to for ev in store.evaluations())
    assert got == sorted(f"t{n}-{i}.receiver.example" for n in range(8) for i in range(100))
    store.close()


MTA = textwrap.dedent("""
    import sys, threading
    from mailwarden.dmarc.store import Evaluation, Store
    url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store.open(url)  # both MTAs create the schema at the same moment
    def run(t):
        for i in range(count):
            store.record(Evaluation(
                time=float(sys.argv[4]) + i, source_ip=f"192.0.2.{t + 1}",
                header_from="example.com", envelope_from="example.com",
                envelope_to=f"{name}-{t}-{i}.example", policy_domain="example.com",
                p="reject", sp="", np="", adkim="r", aspf="r", testing=False, psd="",
                disposition="none", dkim_aligned="pass", spf_aligned="pass",
                dkim=(("example.com", "s", "pass"),), spf=(("example.com", "mfrom", "pass"),),
                rua=("mailto:dmarc@example.com",)))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    store.close()
""")


def test_two_mtas_write_concurrently_and_reports_come_from_the_store(
        pg: Server, dns_server: DevDNSServer, tmp_path: Path) -> None:
    url = pg.new_database()
    procs = [subprocess.Popen([sys.executable, "-c", MTA, url, name, "50", str(DAY)])
             for name in ("mta1", "mta2")]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    store = Store.open(url)
    got = sorted(ev.envelope_to for ev in store.evaluations())
    assert got == sorted(f"{name}-{t}-{i}.example" for name in ("mta1", "mta2")
                         for t in range(4) for i in range(50))

    settings = ReportSettings(org_name="Receiver Org", email="dmarc@receiver.example",
                              directory=str(tmp_path / "reports"))
    (report,) = build_reports(store, period_start=DAY, period_end=DAY + 86400,
                              settings=settings)
    assert report.messages == 400
    # every message has its own envelope_to: 400 rows of count 1
    assert report.records == 400
    if shutil.which("xmllint"):
        path = tmp_path / "report.xml"
        path.write_bytes(report.xml)
        done = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    outcomes = send_reports(store, [report], settings, make_resolver(dns_server))
    assert [o.status for o in outcomes] == ["written"]
    written = tmp_path / "reports" / report.filename
    assert gzip.decompress(written.read_bytes()) == report.xml
    again = send_reports(store, [report], settings, make_resolver(dns_server))
    assert [o.status for o in again] == ["already-sent"]
    store.close()


def test_identical_rows_aggregate_and_the_report_lock_is_exclusive(pg: Server) -> None:
    url = pg.new_database()
    one, two = Store.open(url), Store.open(url)
    for _ in range(7):
        one.record(evaluation("same"))
    settings = ReportSettings(org_name="Receiver Org", email="dmarc@receiver.example")
    (report,) = build_reports(two, period_start=DAY, period_end=DAY + 86400, settings=settings)
    assert (report.records, report.messages) == (1, 7)
    assert b"<count>7</count>" in report.xml
    assert b"<type>policy_test_mode</type>" in report.xml
    with one.report_lock(), pytest.raises(LockBusy), two.report_lock():
        pass
    with two.report_lock():
        pass
    one.close()
    two.close()


def test_received_reports_are_stored_once_in_a_shared_store(pg: Server) -> None:
    """Two MTAs of a fleet both receive the same report (two rua= addresses): one row."""
    from mailwarden.dmarc.received import ReceivedRecord, ReceivedReport
    from mailwarden.dmarc.received_store import received_count, store_report

    report = ReceivedReport("acme.com", "dmarc@acme.com", "pg-1", 1, 2, "example.com",
                            {"p": "reject"}, (ReceivedRecord("192.0.2.1", 3, "none", "pass",
                                                             "pass", "example.com"),))
    url = pg.new_database()
    first, second = Store.open(url), Store.open(url)
    try:
        assert store_report(first, report, "mx1", 10.0) is True
        assert store_report(second, report, "mx2", 11.0) is False
        assert received_count(first) == (1, 1)
    finally:
        first.close()
        second.close()


def test_failure_report_rate_limit_holds_across_a_fleet(pg: Server) -> None:
    """Four MTAs of a fleet queue failure reports to one destination at once: the rate limit
    (per destination and hour) counts them together, serialised by a per-destination lock."""
    import dataclasses as dc

    from mailwarden.dmarc import afrf, failures

    failure = afrf.Failure(
        policy_domain="example.com", author_domain="example.com", source_ip="192.0.2.7",
        mail_from="x@evil.example", rcpts=("a@ours.example",), arrival=DAY,
        headers=(("From", " a@example.com"),), authentication_results="mx; dmarc=fail",
        dmarc_failed=True, failed_aligned=(), aligned_passes=(), failed_dkim=None,
        dkim_failures=(), spf_failed=False, spf_domain="", spf_record="", delivery="reject")
    url = pg.new_database()
    stores = [Store.open(url) for _ in range(4)]
    results: list[str] = []
    lock = threading.Lock()

    def mta(store: Store, n: int) -> None:
        for i in range(10):
            done = failures.queue_report(
                store, dc.replace(failure, source_ip=f"192.0.2.{n * 10 + i}"), kind="dmarc",
                ruf=("mailto:f@example.com",), rate_limit=7, redact=True, org_name="Ours",
                now=DAY + n + i / 100)
            with lock:
                results.extend(status for _, status in done)

    threads = [threading.Thread(target=mta, args=(store, n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(results) == ["queued"] * 7 + ["rate-limited"] * 33
        assert stores[0].read("SELECT count(*) FROM failure_reports") == [(7,)]
    finally:
        for store in stores:
            store.close()
