"""DMARC aggregate reports end to end: build them from recorded evaluations, validate them against
the RFC 9990 schema with xmllint, mail them gzipped through a real SMTP sink on loopback (the
smtpsink.py subprocess), verify external destinations through the loopback DNS server, and
deliver exactly once across reruns, refusals and SIGKILLed runs."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import generate, load_key, public_record, write_private
from mailwarden.dkim.verify import verify_message
from mailwarden.dmarc.ledger import LedgerEntry, ledger_entries, ledger_get
from mailwarden.dmarc.report import ReportSettings, build_reports
from mailwarden.dmarc.sending import parse_period, run_report_command, send_reports
from mailwarden.dmarc.store import Evaluation, Store, StoreError

from helpers import make_resolver

XSD = Path(__file__).parent.parent / "data" / "dmarc-schema" / "dmarc-aggregate-2.0.xsd"
SINK = Path(__file__).with_name("smtpsink.py")
NS = {"d": "urn:ietf:params:xml:ns:dmarc-2.0"}
DAY = dt.datetime(2026, 5, 1, tzinfo=dt.UTC).timestamp()  # the reported period: May 1st
RUA = ("mailto:dmarc@example.com", "mailto:ops@example.com", "mailto:agg@reports.example.net")
ZONE = {
    "_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject; rua=" + ",".join(RUA)}],
    "_dmarc.other.example": [{"TXT": "v=DMARC1; p=none; rua=mailto:dmarc@other.example"}],
    # external destinations (RFC 9990, Verifying External Destinations)
    "example.com._report._dmarc.reports.example.net": [{"TXT": "v=DMARC1"}],
    "example.com._report._dmarc.override.example.net": [
        {"TXT": "v=DMARC1; rua=mailto:new@override.example.net"}],
    "example.com._report._dmarc.evil.example.net": [
        {"TXT": "v=DMARC1; rua=mailto:victim@elsewhere.example"}],
    "example.com._report._dmarc.broken.example.net": ["SERVFAIL"],
    "example.com._report._dmarc.notdmarc.example.net": [{"TXT": "v=spf1 -all"}],
}
SETTINGS = ReportSettings(org_name="Receiver Org", email="dmarc-reports@receiver.example",
                          extra_contact_info="https://receiver.example/dmarc",
                          mail_from="dmarc-reports@receiver.example")


def evaluation(**changes: object) -> Evaluation:
    fields: dict[str, object] = {
        "time": DAY + 3600, "source_ip": "192.0.2.10", "header_from": "example.com",
        "envelope_from": "example.com", "envelope_to": "receiver.example",
        "policy_domain": "example.com", "p": "reject", "sp": "quarantine", "np": "reject",
        "adkim": "r", "aspf": "r", "testing": False, "psd": "", "disposition": "none",
        "dkim_aligned": "pass", "spf_aligned": "pass",
        "dkim": (("example.com", "s1", "pass"),), "spf": (("example.com", "mfrom", "pass"),),
        "overrides": (), "rua": RUA,
    }
    fields.update(changes)
    return Evaluation(**fields)  # type: ignore[arg-type]


def fill(store: Store) -> None:
    """example.com: 5 identical passing messages, 2 failing from another IP (one row), a
    subdomain with a null reverse-path; other.example: one; and one outside the period."""
    for i in range(5):
        store.record(evaluation(time=DAY + i))
    for i in range(2):
        store.record(evaluation(
            time=DAY + 100 + i, source_ip="198.51.100.7", disposition="reject",
            dkim_aligned="fail", spf_aligned="fail", dkim=(("evil.example", "x", "fail"),),
            spf=(("evil.example", "mfrom", "fail"),)))
    store.record(evaluation(
        time=DAY + 200, header_from="news.example.com", envelope_from="",
        disposition="quarantine", dkim_aligned="fail", spf_aligned="fail", dkim=(),
        spf=(("mx.news.example.com", "helo", "softfail"),),
        overrides=(("mailing_list", "list.example"), ("sampled_out", ""))))
    store.record(evaluation(time=DAY + 300, policy_domain="other.example",
                            header_from="other.example", p="none", sp="", np="",
                            rua=("mailto:dmarc@other.example",)))
    store.record(evaluation(time=DAY + 86400))  # the next day


def xmllint(xml: bytes, tmp_path: Path) -> None:
    if shutil.which("xmllint") is None:
        pytest.skip("xmllint is not installed (Debian package libxml2-utils)")
    path = tmp_path / f"report-{time.monotonic_ns()}.xml"
    path.write_bytes(xml)
    done = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- SMTP servers


@dataclass
class Sink:
    port: int
    directory: Path

    def messages(self) -> list[tuple[dict[str, object], email.message.EmailMessage]]:
        found = []
        for eml in sorted(self.directory.glob("*.eml")):
            envelope = json.loads(eml.with_suffix(".json").read_text())
            message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
            assert isinstance(message, email.message.EmailMessage)
            found.append((envelope, message))
        return found

    def recipients(self) -> list[str]:
        return sorted(rcpt for envelope, _ in self.messages()
                      for rcpt in envelope["rcpt_tos"])  # type: ignore[attr-defined]


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    directory, port_file = tmp_path / "sink", tmp_path / "sink.port"
    proc = subprocess.Popen([sys.executable, str(SINK), "--dir", str(directory),
                             "--port-file", str(port_file)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, "smtpsink exited"
            assert time.monotonic() < deadline, "smtpsink did not start"
            time.sleep(0.02)
        yield Sink(int(port_file.read_text()), directory)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Refuser(socketserver.ThreadingTCPServer):
    """A minimal SMTP server that refuses some recipients (550) and accepts the rest."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.accepted: list[str] = []
        super().__init__(("127.0.0.1", 0), _RefuserHandler)


class _RefuserHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, Refuser)

        def reply(text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")

        reply("220 refuser ESMTP")
        rcpts: list[str] = []
        while line := self.rfile.readline():
            command = line.decode().strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                reply("250 refuser")
            elif verb == "MAIL":
                rcpts = []
                reply("250 2.1.0 ok")
            elif verb == "RCPT":
                address = command.split(":", 1)[1].strip().split()[0].strip("<>")
                if address in server.refuse:
                    reply("550 5.7.1 refused by the test")
                else:
                    rcpts.append(address)
                    reply("250 2.1.5 ok")
            elif verb == "DATA":
                reply("354 go ahead")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                server.accepted.extend(rcpts)
                reply("250 2.0.0 queued")
            elif verb == "QUIT":
                reply("221 bye")
                return
            else:
                reply("250 ok")


@pytest.fixture
def refuser() -> Iterator[Refuser]:
    server = Refuser({"ops@example.com"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite://{tmp_path / 'dmarc.db'}")
    fill(opened)
    yield opened
    opened.close()


@pytest.fixture
def dns(dns_server: DevDNSServer) -> DevDNSServer:
    dns_server.load(ZONE)
    return dns_server


def via(sink: Sink) -> ReportSettings:
    return replace(SETTINGS, smarthost=f"127.0.0.1:{sink.port}")


# --------------------------------------------------------------------------- building


def test_reports_aggregate_identical_rows_and_validate(store: Store, tmp_path: Path) -> None:
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    assert [r.policy_domain for r in reports] == ["example.com", "other.example"]
    main = reports[0]
    assert (main.begin, main.end) == (int(DAY), int(DAY) + 86399)
    assert (main.records, main.messages) == (3, 8)
    assert main.rua == RUA
    assert main.filename == (f"receiver.example!example.com!{int(DAY)}!{int(DAY) + 86399}!"
                             f"{main.report_id}.xml.gz")
    assert main.subject == (f"Report Domain: example.com Submitter: receiver.example "
                            f"Report-ID: {main.report_id}")
    assert gzip.decompress(main.gz) == main.xml
    for report in reports:
        xmllint(report.xml, tmp_path)

    root = ET.fromstring(main.xml)
    assert root.findtext("d:report_metadata/d:report_id", namespaces=NS) == main.report_id
    assert root.findtext("d:report_metadata/d:org_name", namespaces=NS) == "Receiver Org"
    assert root.findtext("d:policy_published/d:p", namespaces=NS) == "reject"
    rows = {(r.findtext("d:row/d:source_ip", namespaces=NS),
             r.findtext("d:identifiers/d:header_from", namespaces=NS)):
            r for r in root.findall("d:record", NS)}
    passing = rows[("192.0.2.10", "example.com")]
    assert passing.findtext("d:row/d:count", namespaces=NS) == "5"
    # passing DMARC under p=reject with no action taken: RFC 9990's "pass"
    assert passing.findtext("d:row/d:policy_evaluated/d:disposition", namespaces=NS) == "pass"
    failing = rows[("198.51.100.7", "example.com")]
    assert failing.findtext("d:row/d:count", namespaces=NS) == "2"
    assert failing.findtext("d:row/d:policy_evaluated/d:disposition", namespaces=NS) == "reject"
    assert failing.findtext("d:auth_results/d:dkim/d:domain", namespaces=NS) == "evil.example"
    news = rows[("192.0.2.10", "news.example.com")]
    assert news.findtext("d:row/d:count", namespaces=NS) == "1"
    assert news.find("d:identifiers/d:envelope_from", NS) is not None  # empty: null path
    assert not news.findtext("d:identifiers/d:envelope_from", namespaces=NS)
    # the HELO result stands for the MAIL FROM identity of a null reverse-path
    assert news.findtext("d:auth_results/d:spf/d:domain", namespaces=NS) == "mx.news.example.com"
    assert news.findtext("d:auth_results/d:spf/d:scope", namespaces=NS) == "mfrom"
    reasons = [(r.findtext("d:type", namespaces=NS), r.findtext("d:comment", namespaces=NS))
               for r in news.findall("d:row/d:policy_evaluated/d:reason", NS)]
    assert reasons == [("mailing_list", "list.example"), ("other", "sampled_out")]

    # the same period gives the same ids (what the ledger relies on); they are unique
    again = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    assert [r.report_id for r in again] == [r.report_id for r in reports]
    assert again[0].gz == main.gz  # byte-identical when re-sent
    assert len({r.report_id for r in reports}) == 2
    hour = build_reports(store, period_start=DAY, period_end=DAY + 3600, settings=SETTINGS)
    assert hour[0].report_id not in {r.report_id for r in reports}


def test_a_report_too_large_for_max_size_is_split(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "big.db"))
    for i in range(300):
        store.record(evaluation(time=DAY + i, source_ip=f"203.0.{i // 250}.{i % 250 + 1}"))
    small = replace(SETTINGS, max_size=6_000)
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=small)
    store.close()
    assert len(reports) > 1
    assert sum(r.messages for r in reports) == 300
    assert len({r.report_id for r in reports}) == len(reports)
    assert [(r.part, r.parts) for r in reports] == [(i, len(reports))
                                                    for i in range(1, len(reports) + 1)]
    for report in reports:
        assert len(report.gz) * 4 // 3 < 6_000
        xmllint(report.xml, tmp_path)


# --------------------------------------------------------------------------- sending


def test_mail_through_the_sink_with_the_rfc_subject_and_attachment(
        store: Store, sink: Sink, dns: DevDNSServer, tmp_path: Path) -> None:
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    outcomes = send_reports(store, reports, via(sink), make_resolver(dns))
    assert sorted((o.policy_domain, o.destination, o.status) for o in outcomes) == [
        ("example.com", "mailto:agg@reports.example.net", "sent"),
        ("example.com", "mailto:dmarc@example.com", "sent"),
        ("example.com", "mailto:ops@example.com", "sent"),
        ("other.example", "mailto:dmarc@other.example", "sent"),
    ]
    by_report = {r.policy_domain: r for r in reports}
    messages = sink.messages()
    assert len(messages) == 4
    for envelope, message in messages:
        assert envelope["mail_from"] == "dmarc-reports@receiver.example"
        (rcpt,) = envelope["rcpt_tos"]  # type: ignore[misc]
        domain = "other.example" if rcpt.endswith("other.example") else "example.com"
        report = by_report[domain]
        assert message["To"] == rcpt
        assert message["Subject"] == (f"Report Domain: {domain} Submitter: receiver.example "
                                      f"Report-ID: {report.report_id}")
        assert message["Message-ID"] == f"<{report.report_id}@receiver.example>"
        (attachment,) = list(message.iter_attachments())
        assert attachment.get_content_type() == "application/gzip"
        assert attachment.get_filename() == report.filename
        assert attachment.get_filename().endswith(".xml.gz")
        xml = gzip.decompress(attachment.get_content())
        assert xml == report.xml
        xmllint(xml, tmp_path)
    ledger = ledger_entries(store)
    assert sorted(e.state for e in ledger) == ["sent"] * 4


def test_external_destinations_are_verified_in_the_dns(
        tmp_path: Path, sink: Sink, dns: DevDNSServer) -> None:
    store = Store.open(str(tmp_path / "ext.db"))
    rua = ("mailto:agg@reports.example.net", "mailto:agg@unlisted.example.org",
           "mailto:old@override.example.net", "mailto:x@evil.example.net",
           "mailto:y@broken.example.net", "mailto:z@notdmarc.example.net",
           "mailto:dmarc@example.com!1k", "https://reports.example.net/dmarc")
    store.record(evaluation(time=DAY + 5, rua=rua))
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    outcomes = send_reports(store, reports, via(sink), make_resolver(dns))
    status = {o.destination: (o.status, o.detail) for o in outcomes}
    assert status["mailto:agg@reports.example.net"][0] == "sent"
    assert status["mailto:agg@unlisted.example.org"][0] == "skipped"
    assert "example.com._report._dmarc.unlisted.example.org" in \
        status["mailto:agg@unlisted.example.org"][1]
    # the verification record's rua= on the same host replaces the destination
    assert "mailto:old@override.example.net" not in status
    assert status["mailto:new@override.example.net"][0] == "sent"
    # a rua= pointing at another host: neither destination is used
    assert status["mailto:x@evil.example.net"][0] == "skipped"
    assert status["mailto:y@broken.example.net"][0] == "failed"  # SERVFAIL: retried later
    assert status["mailto:z@notdmarc.example.net"][0] == "skipped"
    assert status["mailto:dmarc@example.com"][0] == "skipped"  # larger than its !1k limit
    assert status["https://reports.example.net/dmarc"][0] == "skipped"
    assert sink.recipients() == ["agg@reports.example.net", "new@override.example.net"]
    queried = {name for name, _, _ in dns.queries}
    assert "example.com._report._dmarc.reports.example.net" in queried
    store.close()


def test_sending_twice_sends_one_mail(store: Store, sink: Sink, dns: DevDNSServer) -> None:
    resolver = make_resolver(dns)
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    first = send_reports(store, reports, via(sink), resolver)
    assert {o.status for o in first} == {"sent"}
    rebuilt = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    second = send_reports(store, rebuilt, via(sink), resolver)
    assert {o.status for o in second} == {"already-sent"}
    assert len(sink.messages()) == 4


def test_a_refused_destination_is_sent_on_the_rerun_and_nothing_twice(
        store: Store, sink: Sink, refuser: Refuser, dns: DevDNSServer) -> None:
    resolver = make_resolver(dns)
    reports = [r for r in build_reports(store, period_start=DAY, period_end=DAY + 86400,
                                        settings=SETTINGS) if r.policy_domain == "example.com"]
    port = refuser.server_address[1]
    first = send_reports(store, reports, replace(SETTINGS, smarthost=f"127.0.0.1:{port}"),
                         resolver)
    assert [(o.destination, o.status) for o in first] == [
        ("mailto:dmarc@example.com", "sent"), ("mailto:ops@example.com", "failed"),
        ("mailto:agg@reports.example.net", "sent")]
    assert "550" in first[1].detail
    assert sorted(refuser.accepted) == ["agg@reports.example.net", "dmarc@example.com"]
    rerun = send_reports(store, reports, via(sink), resolver)
    assert [o.status for o in rerun] == ["already-sent", "sent", "already-sent"]
    assert sink.recipients() == ["ops@example.com"]


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from mailwarden.dmarc import sending, store as store_module
    from mailwarden.dmarc.report import ReportSettings, build_reports
    from mailwarden.dmarc.sending import send_reports
    from mailwarden.dns import Nameserver, Resolver

    url, smtp_port, dns_port, mode, start, end = sys.argv[1:]
    original = sending.ledger_put

    def ledger_put(store, entry):
        if entry.state == "sent" and mode == "before-ledger":
            # the smarthost has answered 250, the ledger still says "committing"
            os.kill(os.getpid(), signal.SIGKILL)
        original(store, entry)
        if entry.state == "sent":
            os.kill(os.getpid(), signal.SIGKILL)  # after the first destination is recorded

    sending.ledger_put = ledger_put
    store = store_module.Store.open(url)
    settings = ReportSettings(org_name="Receiver Org", email="dmarc-reports@receiver.example",
                              smarthost=f"127.0.0.1:{smtp_port}")
    reports = build_reports(store, period_start=float(start), period_end=float(end),
                            settings=settings)
    resolver = Resolver(nameservers=[Nameserver("127.0.0.1", int(dns_port))], timeout=0.25,
                        lifetime=0.6)
    send_reports(store, [r for r in reports if r.policy_domain == "example.com"], settings,
                 resolver)
    sys.exit("not killed")
""")


def crash(tmp_path: Path, sink: Sink, dns: DevDNSServer, mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASHER, f"sqlite://{tmp_path / 'dmarc.db'}", str(sink.port),
         str(dns.port), mode, str(DAY), str(DAY + 86400)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_run_killed_after_the_first_destination_is_finished_by_the_rerun(
        store: Store, sink: Sink, dns: DevDNSServer, tmp_path: Path) -> None:
    crash(tmp_path, sink, dns, "after-ledger")
    assert sink.recipients() == ["dmarc@example.com"]
    reports = [r for r in build_reports(store, period_start=DAY, period_end=DAY + 86400,
                                        settings=SETTINGS) if r.policy_domain == "example.com"]
    rerun = send_reports(store, reports, via(sink), make_resolver(dns))
    assert [o.status for o in rerun] == ["already-sent", "sent", "sent"]
    assert sink.recipients() == ["agg@reports.example.net", "dmarc@example.com",
                                 "ops@example.com"]


def test_a_run_killed_between_acceptance_and_the_ledger_never_duplicates(
        store: Store, sink: Sink, dns: DevDNSServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    crash(tmp_path, sink, dns, "before-ledger")
    assert sink.recipients() == ["dmarc@example.com"]  # accepted, but not in the ledger
    (report,) = [r for r in build_reports(store, period_start=DAY, period_end=DAY + 86400,
                                          settings=SETTINGS) if r.policy_domain == "example.com"]
    entry = ledger_get(store, report.report_id, "mailto:dmarc@example.com")
    assert entry is not None and entry.state == "committing"
    code = run_report_command(store_url=f"sqlite://{tmp_path / 'dmarc.db'}",
                              settings=via(sink), dns=make_resolver(dns),
                              period="2026-05-01..2026-05-02", dry_run=False)
    out = capsys.readouterr().out
    assert code == 1  # the uncertain destination needs an operator
    assert f"uncertain example.com report {report.report_id} -> mailto:dmarc@example.com" in out
    assert sink.recipients() == ["agg@reports.example.net", "dmarc@example.com",
                                 "dmarc@other.example", "ops@example.com"]
    # the operator checked the smarthost's log and asks for it again: sent once more
    again = send_reports(store, [report], via(sink), make_resolver(dns), resend_uncertain=True)
    assert [o.status for o in again] == ["sent", "already-sent", "already-sent"]


def test_a_failed_ledger_write_abandons_the_message(
        store: Store, sink: Sink, dns: DevDNSServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(store: Store, entry: LedgerEntry) -> None:
        raise StoreError("disk full")

    reports = [r for r in build_reports(store, period_start=DAY, period_end=DAY + 86400,
                                        settings=SETTINGS) if r.policy_domain == "other.example"]
    monkeypatch.setattr("mailwarden.dmarc.sending.ledger_put", broken)
    start = time.monotonic()
    outcomes = send_reports(store, reports, via(sink), make_resolver(dns))
    assert [o.status for o in outcomes] == ["failed"]
    assert "message not sent" in outcomes[0].detail
    assert time.monotonic() - start < 10  # no QUIT sent as message text, no timeout
    time.sleep(0.2)
    assert sink.messages() == []  # the connection closed before the final "."


def test_dry_run_sends_nothing_and_writes_no_ledger(
        store: Store, sink: Sink, dns: DevDNSServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{tmp_path / 'dmarc.db'}"
    now = DAY + 86400 + 600  # ten minutes into May 2nd: "yesterday" is May 1st
    code = run_report_command(store_url=url, settings=via(sink), dns=make_resolver(dns),
                              period="yesterday", dry_run=True, now=now)
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("would-send ") == 4
    assert out.count("\nreport ") + out.startswith("report ") == 2
    assert sink.messages() == []
    assert ledger_entries(store) == []
    # the real run afterwards sends everything
    assert run_report_command(store_url=url, settings=via(sink), dns=make_resolver(dns),
                              period="yesterday", dry_run=False, now=now) == 0
    assert capsys.readouterr().out.count("\nsent ") == 4
    assert len(sink.messages()) == 4
    assert len(ledger_entries(store)) == 4


def test_directory_mode_writes_files_once(store: Store, tmp_path: Path,
                                          dns: DevDNSServer) -> None:
    folder = tmp_path / "out"
    settings = replace(SETTINGS, directory=str(folder), smarthost="127.0.0.1:9")
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=settings)
    outcomes = send_reports(store, reports, settings, make_resolver(dns))
    assert [o.status for o in outcomes] == ["written", "written"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(r.filename for r in reports)
    for report in reports:
        assert gzip.decompress((folder / report.filename).read_bytes()) == report.xml
    again = send_reports(store, reports, settings, make_resolver(dns))
    assert [o.status for o in again] == ["already-sent", "already-sent"]


def test_periods_and_bad_input(tmp_path: Path, dns: DevDNSServer,
                               capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime(2026, 5, 2, 13, 45, tzinfo=dt.UTC).timestamp()
    assert parse_period("yesterday", now) == (DAY, DAY + 86400)
    assert parse_period("", now) == (DAY, DAY + 86400)
    assert parse_period("last-hour", now) == (DAY + 86400 + 12 * 3600, DAY + 86400 + 13 * 3600)
    assert parse_period("2026-05-01..2026-05-02", now) == (DAY, DAY + 86400)
    assert parse_period("2026-05-01T02:00Z..2026-05-01T04:00:00+00:00", now) == (
        DAY + 7200, DAY + 14400)
    for bad in ("tomorrow", "2026-05-02..2026-05-01", "x..y"):
        with pytest.raises(ValueError):
            parse_period(bad, now)
    url = f"sqlite://{tmp_path / 'empty.db'}"
    assert run_report_command(store_url=url, settings=SETTINGS, dns=make_resolver(dns),
                              period="bogus", dry_run=True, now=now) == 1
    assert "bogus" in capsys.readouterr().err
    assert run_report_command(store_url=url, settings=SETTINGS, dns=make_resolver(dns),
                              period="yesterday", dry_run=False, now=now) == 0
    assert "no report" in capsys.readouterr().out


def test_a_second_concurrent_run_is_refused(store: Store, sink: Sink,
                                            dns: DevDNSServer) -> None:
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    with store.report_lock():
        outcomes = send_reports(store, reports, via(sink), make_resolver(dns))
    assert {o.status for o in outcomes} == {"failed"}
    assert "another report run" in outcomes[0].detail
    assert sink.messages() == []
    assert os.path.exists(str(store.url).removeprefix("sqlite://") + ".report-lock")


def test_internal_sources_stay_out_of_reports_unless_asked(tmp_path: Path) -> None:
    """Private-use sources and our host groups' networks are nobody else's business: left out
    by default, reported with include_internal_sources. Nothing reported names a host group."""
    store = Store.open(str(tmp_path / "internal.db"))
    sources = ["10.1.2.3", "192.168.7.7", "100.64.0.9", "fd00::25", "::ffff:172.16.0.1",
               "203.0.113.25",  # in the `internal` host group's network below
               "198.51.100.7"]  # outside: the only one reported by default
    for n, source in enumerate(sources):
        store.record(evaluation(time=DAY + n, source_ip=source, overrides=(
            ("local_policy", "the client is one of the receiver's own hosts"),)))
    ours = replace(SETTINGS, internal_networks=("203.0.113.0/24",))
    default = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=ours)
    asked = build_reports(store, period_start=DAY, period_end=DAY + 86400,
                          settings=replace(ours, include_internal_sources=True))
    store.close()

    def reported(reports: list[Any]) -> set[str]:
        return {ip for r in reports for ip in re.findall(rb"<source_ip>([^<]+)</source_ip>",
                                                        r.xml)}

    assert reported(default) == {b"198.51.100.7"}
    assert len(reported(asked)) == len(sources)


def test_the_report_mail_is_dkim_signed_and_verifies(store: Store, sink: Sink,
                                                     dns: DevDNSServer, tmp_path: Path) -> None:
    """Signed with our key for the reporting address's domain, a report passes DMARC at the
    receiver (issue 17 #4); the receiver verifies it through DNS as any other mail."""
    private = generate("rsa", 2048)
    key_path = tmp_path / "receiver.pem"
    write_private(private, str(key_path))
    dns.load({**ZONE, "r1._domainkey.receiver.example": [{"TXT": public_record(private)}]})
    settings = replace(via(sink), signing_keys=(load_key("receiver.example", "r1",
                                                         str(key_path)),))
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=settings)
    send_reports(store, reports, settings, make_resolver(dns))
    raws = [eml.read_bytes() for eml in sorted(sink.directory.glob("*.eml"))]
    assert len(raws) == 4
    for raw in raws:
        results = verify_message(raw, make_resolver(dns))
        assert [(r.domain, r.result) for r in results] == [("receiver.example", "pass")]
