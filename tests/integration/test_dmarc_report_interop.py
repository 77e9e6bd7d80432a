"""The aggregate reports mailwarden sends, read by three parsers: our own ingester (the round
trip, through `dmarc ingest`'s store), parsedmarc and dmarc-report. Each report built from a
realistic store must validate against the RFC 9990 schema and read back, in every parser,
field for field as the store holds it: the metadata, the policy published, and every record
with its count, disposition, alignment results, override reasons, identifiers and each DKIM
and SPF result in order.

The store holds what the milter records in practice: bounces (null reverse-path) whose HELO
is an IP address, t=y policies applied one level less strictly, several DKIM signatures on
one message, IPv6 sources, A-label domains, override reasons, subdomain (sp=) and
non-existent subdomain (np=) policies, quarantine and reject dispositions, passing mail.

The expected values are built from the store's evaluations here (identical rows grouped and
counted), following RFC 9990 -- never read back from the XML we wrote. The parsers run
offline: any attempt to open a connection or resolve a name while they parse fails the test."""

from __future__ import annotations

import email
import email.policy
import gzip
import ipaddress
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import parsedmarc
import pytest
from dmarc_report.parser import DMARCParser
from dmarc_report.schema import ReportFormat
from parsedmarc.utils import human_timestamp_to_unix_timestamp
from test_dmarc_reports import DAY, RUA, SETTINGS, evaluation, xmllint

from mailwarden.dmarc.received import read_reports
from mailwarden.dmarc.received_store import store_report
from mailwarden.dmarc.report import Report, build_reports
from mailwarden.dmarc.reportmail import report_mail
from mailwarden.dmarc.store import Evaluation, Store

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
END = DAY + 86400  # the period reported: May 1st

# The policies as the milter found them (one record per policy domain)
EXAMPLE = {"policy_domain": "example.com", "p": "reject", "sp": "quarantine", "np": "reject",
           "adkim": "r", "aspf": "s", "testing": False, "rua": RUA}
BUCHER = {"policy_domain": "xn--bcher-kva.example",  # bücher.example, t=y
          "p": "reject", "sp": "quarantine", "np": "reject", "adkim": "r", "aspf": "r",
          "testing": True, "rua": ("mailto:dmarc@xn--bcher-kva.example",)}
OTHER = {"policy_domain": "other.example", "p": "none", "sp": "", "np": "", "adkim": "s",
         "aspf": "", "testing": False, "rua": ("mailto:dmarc@other.example",)}
FAIL = {"dkim_aligned": "fail", "spf_aligned": "fail"}
MONITOR = ("local_policy", "monitor mode: the policy was not enforced")


def realistic(store: Store) -> None:
    """One day of evaluations as the milter records them (see checks/dmarc.py and
    checks/spf.py: the HELO identity is checked and recorded only for a domain name; for
    the null reverse-path the MAIL FROM identity is postmaster@HELO)."""
    t = iter(range(int(DAY) + 60, int(END), 97))  # distinct times: the latest is clear
    normal_spf = (("mx1.example.com", "helo", "pass"), ("example.com", "mfrom", "pass"))
    evaluations: list[Evaluation] = [
        # the policy changed during the day (aspf=r -> s): the report shows the final one
        evaluation(**{**EXAMPLE, "aspf": "r"}, spf=normal_spf),
        # passing mail: five identical messages make one record
        *[evaluation(**EXAMPLE, spf=normal_spf) for _ in range(5)],
        # through an ESP, over IPv6, with three signatures: ours (aligned), the ESP's, an
        # old one that fails; SPF passes for the ESP's bounce domain, not aligned (aspf=s)
        *[evaluation(**EXAMPLE, source_ip="2001:db8:25::1", envelope_from="bounces.esp.example",
                     spf_aligned="fail",
                     dkim=(("esp.example", "e1", "pass"), ("example.com", "old", "fail"),
                           ("example.com", "s2026", "pass")),
                     spf=(("out.esp.example", "helo", "pass"),
                          ("bounces.esp.example", "mfrom", "pass")))
          for _ in range(2)],
        evaluation(**EXAMPLE, source_ip="2001:db8:25::1", envelope_from="bounces.esp.example",
                   envelope_to="other.receiver.example", spf_aligned="fail",
                   dkim=(("esp.example", "e1", "pass"), ("example.com", "old", "fail"),
                         ("example.com", "s2026", "pass")),
                   spf=(("bounces.esp.example", "mfrom", "pass"),)),
        # a subdomain (sp=quarantine applies) signed by the Organizational Domain: that
        # relaxed-aligned signature comes before the ESP's and the failing one
        evaluation(**EXAMPLE, source_ip="2001:db8:25::2", header_from="news.example.com",
                   envelope_from="bounces.esp.example", spf_aligned="fail",
                   dkim=(("news.example.com", "n1", "fail"), ("esp.example", "e1", "pass"),
                         ("example.com", "s2026", "pass")),
                   spf=(("bounces.esp.example", "mfrom", "pass"),)),
        # spoofing: rejected (p=reject), twice
        *[evaluation(**EXAMPLE, **FAIL, source_ip="203.0.113.66", envelope_from="spoof.example",
                     disposition="reject", dkim=(("example.com", "s1", "fail"),),
                     spf=(("spoof.example", "mfrom", "pass"),)) for _ in range(2)],
        # an existing subdomain failing over IPv6: quarantined (sp=quarantine)
        evaluation(**EXAMPLE, **FAIL, source_ip="2001:db8:bad::1", header_from="shop.example.com",
                   envelope_from="shop.example.com", disposition="quarantine", dkim=(),
                   spf=(("shop.example.com", "mfrom", "softfail"),), policy_tag="sp"),
        # a non-existent subdomain: np=reject
        evaluation(**EXAMPLE, **FAIL, source_ip="203.0.113.66", header_from="ghost.example.com",
                   envelope_from="ghost.example.com", disposition="reject", dkim=(),
                   spf=(("ghost.example.com", "mfrom", "none"),), policy_tag="np"),
        # override reasons: monitor mode (local_policy), a trusted forwarder
        evaluation(**EXAMPLE, **FAIL, source_ip="198.51.100.20", disposition="none",
                   envelope_from="lists.example.org", dkim=(("example.com", "s1", "fail"),),
                   spf=(("lists.example.org", "mfrom", "pass"),), overrides=(MONITOR,)),
        evaluation(**EXAMPLE, **FAIL, source_ip="2001:db8:f::30", disposition="none",
                   envelope_from="forwarder.example", dkim=(("example.com", "s1", "fail"),),
                   spf=(("forwarder.example", "mfrom", "pass"),),
                   overrides=(("trusted_forwarder", "arc=pass, sealed by forwarder.example"),)),
        # bounces whose HELO is an IP address: no SPF domain to report. The one the issue
        # names (a helo result for 198.51.100.150), the form the milter records (the MAIL
        # FROM identity postmaster@198.51.100.151), an IPv6 address literal
        evaluation(**EXAMPLE, source_ip="198.51.100.150", envelope_from="", spf_aligned="fail",
                   spf=(("198.51.100.150", "helo", "none"),)),
        evaluation(**EXAMPLE, **FAIL, source_ip="198.51.100.151", envelope_from="",
                   disposition="reject", dkim=(), spf=(("198.51.100.151", "mfrom", "none"),)),
        evaluation(**EXAMPLE, source_ip="2001:db8::77", envelope_from="", spf_aligned="fail",
                   spf=(("[ipv6:2001:db8::77]", "mfrom", "none"),)),
        # a bounce with a real HELO name: postmaster@mx2.example.com is the SPF identity
        evaluation(**EXAMPLE, source_ip="192.0.2.12", envelope_from="", spf_aligned="fail",
                   spf=(("mx2.example.com", "helo", "pass"), ("mx2.example.com", "mfrom", "pass"))),

        # bücher.example, t=y: passing; failing ones one level less strict than asked
        evaluation(**BUCHER, source_ip="2001:db8:b::1", header_from="xn--bcher-kva.example",
                   envelope_from="xn--bcher-kva.example", envelope_to="xn--mller-kva.example",
                   dkim=(("xn--mnchen-3ya.example", "m1", "pass"),
                         ("xn--bcher-kva.example", "k1", "pass")),
                   spf=(("xn--bcher-kva.example", "mfrom", "pass"),)),
        *[evaluation(**BUCHER, **FAIL, source_ip="203.0.113.99",
                     header_from="xn--bcher-kva.example", envelope_from="xn--bcher-kva.example",
                     disposition="quarantine", dkim=(("xn--bcher-kva.example", "k1", "fail"),),
                     spf=(("xn--bcher-kva.example", "mfrom", "fail"),)) for _ in range(2)],
        evaluation(**BUCHER, **FAIL, source_ip="2001:db8:b::99",
                   header_from="post.xn--bcher-kva.example",
                   envelope_from="post.xn--bcher-kva.example", disposition="none", dkim=(),
                   spf=(("post.xn--bcher-kva.example", "mfrom", "softfail"),)),
        # t=y asked for quarantine, monitor mode applied none: both reasons
        evaluation(**BUCHER, **FAIL, source_ip="203.0.113.98",
                   header_from="xn--bcher-kva.example", envelope_from="xn--bcher-kva.example",
                   disposition="none", dkim=(), overrides=(MONITOR,),
                   spf=(("xn--bcher-kva.example", "mfrom", "fail"),)),

        # p=none, no sp/np/aspf published; no recipient domain recorded
        evaluation(**OTHER, source_ip="192.0.2.30", header_from="other.example",
                   envelope_from="other.example", envelope_to="",
                   dkim=(("other.example", "o1", "pass"),),
                   spf=(("other.example", "mfrom", "pass"),)),
        evaluation(**OTHER, **FAIL, source_ip="2001:db8:0:1::30", header_from="other.example",
                   envelope_from="other.example", dkim=(),
                   spf=(("other.example", "mfrom", "fail"),)),
    ]
    for ev in evaluations:
        store.record(replace(ev, time=float(next(t))))
    # outside the period: in no report
    store.record(evaluation(**EXAMPLE, time=END + 5))


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Meta:
    org_name: str
    email: str
    report_id: str
    begin: int
    end: int


@dataclass(frozen=True)
class Policy:
    """<policy_published>; "" for an element not reported."""

    domain: str
    p: str
    sp: str
    np: str
    adkim: str
    aspf: str
    testing: str


@dataclass(frozen=True)
class Row:
    """One <record>, without its count."""

    source_ip: IPAddress
    disposition: str
    dkim_eval: str
    spf_eval: str
    reasons: tuple[tuple[str, str], ...]  # (type, comment); "" for no comment
    header_from: str
    envelope_from: str | None  # "" for the null reverse-path, None: no element
    envelope_to: str | None  # None: not reported (or not kept by the parser)
    dkim: tuple[tuple[str, str, str], ...]  # (domain, selector, result), in order
    spf: tuple[str, str, str] | None  # (domain, scope, result)


Rows = Counter[tuple[Row, int]]  # (row, count) -> how many such records


@dataclass(frozen=True)
class Expected:
    meta: Meta
    policy: Policy
    rows: Rows


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _is_address(name: str) -> bool:
    """An SMTP address literal ([192.0.2.1], [IPv6:...]) or an address written as a HELO
    name: what RFC 9990 cannot carry as <spf><domain> (a domain, RFC 7208 §2.4)."""
    name = name.strip("[]")
    name = name[5:] if name.lower().startswith("ipv6:") else name
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _organizational(domain: str) -> str:
    """The Organizational Domain of the test's domains (all registrable at two labels)."""
    return ".".join(domain.split(".")[-2:])


def _dkim_order(ev: Evaluation) -> tuple[tuple[str, str, str], ...]:
    """RFC 9990 "DKIM Signatures in Aggregate Reports": passing and strictly aligned with
    the RFC5322.From domain, passing and relaxed-aligned, other passing, the rest. The test's
    signatures never tie within one rank, so the order is the RFC's alone."""
    def rank(sig: tuple[str, str, str]) -> int:
        domain, _, result = sig
        if result != "pass":
            return 3
        if domain == ev.header_from:
            return 0
        return 1 if _organizational(domain) == _organizational(ev.header_from) else 2

    ranks = [rank(sig) for sig in ev.dkim]
    assert len(set(ranks)) == len(ranks), "ambiguous test data: two signatures of one rank"
    return tuple(sorted(ev.dkim, key=rank))


def _spf(ev: Evaluation) -> tuple[str, str, str] | None:
    """The SPF result of the MAIL FROM identity (RFC 9990: only it is used in DMARC; scope
    "mfrom" is the only one the schema has). For the null reverse-path that identity is
    postmaster@HELO (RFC 7208 §2.4): the milter records it as the mfrom result; a helo
    result stands for it when no mfrom one was recorded. A HELO that is an IP address gives
    no domain: no <spf> at all (it is optional in RFC 9990's <auth_results>)."""
    for scope in ("mfrom", "helo"):
        if scope == "helo" and ev.envelope_from:
            break
        for domain, recorded, result in ev.spf:
            if recorded == scope and not _is_address(domain):
                return (domain, "mfrom", result)
    return None


def expected_row(ev: Evaluation) -> Row:
    passed = "pass" in (ev.dkim_aligned, ev.spf_aligned)
    # the policy that applies to the author domain: p for the policy domain itself, sp for
    # its subdomains, np= for a non-existent one: the store says which tag applied (rows older
    # than schema 3 do not, and fall back to p/sp)
    asked = {"p": ev.p, "sp": ev.sp, "np": ev.np}.get(ev.policy_tag) or (
        ev.p if ev.header_from == ev.policy_domain else (ev.sp or ev.p))
    disposition = ev.disposition
    if disposition == "none" and passed and asked in ("quarantine", "reject"):
        disposition = "pass"  # RFC 9990 schema: "No action, passing DMARC w/enforcing policy"
    reasons = list(ev.overrides)
    # RFC 9990 <policy_evaluated>: "If alignment fails and the policy applied does not match
    # the Policy Domain's configured policy, the "reason" element MUST be included"; for t=y
    # that reason is policy_test_mode (its comment is ours to choose: mailwarden says t=y)
    if ev.testing and not passed and disposition != asked:
        reasons.append(("policy_test_mode", "t=y"))
    return Row(source_ip=_ip(ev.source_ip), disposition=disposition,
               dkim_eval=ev.dkim_aligned, spf_eval=ev.spf_aligned, reasons=tuple(reasons),
               header_from=ev.header_from, envelope_from=ev.envelope_from,
               envelope_to=ev.envelope_to or None, dkim=_dkim_order(ev), spf=_spf(ev))


def expected_reports(store: Store) -> dict[str, Expected]:
    """Per policy domain: the report the store's evaluations of the period make."""
    by_domain: dict[str, list[Evaluation]] = {}
    for ev in store.evaluations(DAY, END):
        by_domain.setdefault(ev.policy_domain, []).append(ev)
    expected = {}
    for domain, evaluations in by_domain.items():
        # RFC 9990: "SHOULD note only the final configuration observed during the period"
        latest = max(evaluations, key=lambda ev: ev.time)
        policy = Policy(domain, latest.p, latest.sp, latest.np, latest.adkim, latest.aspf,
                        "y" if latest.testing else "n")
        counts = Counter(expected_row(ev) for ev in evaluations)
        meta = Meta(SETTINGS.org_name, SETTINGS.email, "", int(DAY), int(END) - 1)
        expected[domain] = Expected(meta, policy, Counter(counts.items()))
    return expected


# --------------------------------------------------------------------------- the three readers


def ours(mail: bytes, tmp_path: Path) -> Expected:
    """Our ingester: the report mail read (read_reports, as `dmarc ingest` and the
    dmarc_reports rule do) and stored, then read back from the store's tables."""
    reports, refused = read_reports(mail)
    assert refused == [] and len(reports) == 1, refused
    store = Store.open(str(tmp_path / f"ingest-{reports[0].report_id}.db"))
    try:
        assert store_report(store, reports[0], "interop", 0.0)
        ((key, org, mail_from, report_id, domain, begin, end, policy),) = store.read(
            "SELECT id, reporter, reporter_email, report_id, policy_domain, period_begin, "
            "period_end, policy FROM received_reports")
        records = store.read("SELECT source_ip, count, disposition, dkim_eval, spf_eval, "
                             "header_from, envelope_from, dkim, spf, reasons "
                             "FROM received_records WHERE report = ?", (key,))
    finally:
        store.close()
    published = json.loads(policy)
    rows: Rows = Counter()
    for ip, count, disposition, dkim_eval, spf_eval, header_from, envelope_from, dkim, spf, \
            reasons in records:
        spf_results = [tuple(result) for result in json.loads(spf)]
        assert len(spf_results) <= 1
        rows[(Row(_ip(ip), disposition, dkim_eval, spf_eval,
                  tuple(tuple(reason) for reason in json.loads(reasons)), header_from,
                  envelope_from, None, tuple(tuple(sig) for sig in json.loads(dkim)),
                  spf_results[0] if spf_results else None), int(count))] += 1
    return Expected(
        Meta(org, mail_from, report_id, int(begin), int(end)),
        Policy(domain, *(published.get(tag, "") for tag in
                         ("p", "sp", "np", "adkim", "aspf", "testing"))),
        rows)


def by_parsedmarc(mail: bytes) -> Expected:
    """parsedmarc, given the whole report mail, offline (no reverse DNS, no downloads: the
    bundled IP database and maps)."""
    parsed = parsedmarc.parse_report_email(mail, offline=True, always_use_local_files=True)
    assert parsed["report_type"] == "aggregate"
    report: Any = parsed["report"]
    meta = report["report_metadata"]
    assert meta["timespan_requires_normalization"] is False  # counts left as they are
    published = report["policy_published"]
    rows: Rows = Counter()
    for record in report["records"]:
        evaluated, identifiers = record["policy_evaluated"], record["identifiers"]
        spf = [(s["domain"], s["scope"], s["result"]) for s in record["auth_results"]["spf"]]
        assert len(spf) <= 1
        rows[(Row(
            _ip(record["source"]["ip_address"]), evaluated["disposition"], evaluated["dkim"],
            evaluated["spf"],
            tuple((r["type"], r["comment"] or "") for r in evaluated["policy_override_reasons"]),
            identifiers["header_from"], identifiers["envelope_from"], identifiers["envelope_to"],
            tuple((d["domain"], d["selector"], d["result"])
                  for d in record["auth_results"]["dkim"]),
            spf[0] if spf else None), record["count"])] += 1
    return Expected(
        # parsedmarc writes <date_range> as local wall-clock time (datetime.fromtimestamp);
        # its own inverse gives the seconds back
        Meta(meta["org_name"], meta["org_email"], meta["report_id"],
             human_timestamp_to_unix_timestamp(meta["begin_date"]),
             human_timestamp_to_unix_timestamp(meta["end_date"])),
        Policy(*(published[tag] or "" for tag in
                 ("domain", "p", "sp", "np", "adkim", "aspf", "testing"))),
        rows)


def by_dmarc_report(attachment: bytes) -> Expected:
    """dmarc-report, given the gzip attachment (it reads files, not mail)."""
    report = DMARCParser.parse_bytes(attachment)
    assert report.format is ReportFormat.RFC_9990 and report.version == "1.0"
    assert report.warnings == []  # nothing it had to tolerate
    meta, published = report.report_metadata, report.policy_published
    rows: Rows = Counter()
    for record in report.records:
        evaluated, identifiers, auth = (record.policy_evaluated, record.identifiers,
                                        record.auth_results)
        spf = [(s.domain, s.scope.value if s.scope else "", s.result.value) for s in auth.spf]
        assert len(spf) <= 1
        rows[(Row(
            _ip(record.source_ip), evaluated.disposition.value, evaluated.dkim.value,
            evaluated.spf.value, tuple((r.type.value, r.comment or "") for r in evaluated.reasons),
            identifiers.header_from, identifiers.envelope_from, identifiers.envelope_to,
            tuple((d.domain, d.selector or "", d.result.value) for d in auth.dkim),
            spf[0] if spf else None), record.count)] += 1
    return Expected(
        Meta(meta.org_name, meta.email, meta.report_id, meta.date_range.begin,
             meta.date_range.end),
        Policy(published.domain, published.p.value,
               *(value.value if value is not None else "" for value in
                 (published.sp, published.np, published.adkim, published.aspf,
                  published.testing))),
        rows)


def agree(parser: str, got: Expected, want: Expected) -> None:
    assert got.meta == want.meta, parser
    assert got.policy == want.policy, parser
    missing, extra = want.rows - got.rows, got.rows - want.rows
    assert not missing and not extra, (
        f"{parser} does not read the records as stored:\n"
        f"  stored, not read: {sorted(map(repr, missing))}\n"
        f"  read, not stored: {sorted(map(repr, extra))}")


def rows_with(rows: Rows, **changes: Any) -> Rows:
    """`rows` as a parser that presents some fields its own way reads them."""
    changed: Rows = Counter()
    for (row, count), times in rows.items():
        fields = {name: change(row) if callable(change) else change
                  for name, change in changes.items()}
        changed[(replace(row, **fields), count)] += times
    return changed


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """No network while the parsers run: every attempt is refused (as on a host without
    one) and remembered, and the test fails if there was any."""
    attempts: list[str] = []

    def refuse(name: str, where: slice) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name} {args[where]}")  # the destination, not the data
            raise OSError(f"{name}: no network in this test")
        return refused

    for method in ("connect", "connect_ex", "sendto", "sendmsg"):
        monkeypatch.setattr(socket.socket, method, refuse(method, slice(-1, None)))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo", slice(0, 2)))
    yield attempts
    assert attempts == [], f"a parser tried the network: {sorted(set(attempts))[:5]}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(str(tmp_path / "dmarc.db"))
    realistic(opened)
    yield opened
    opened.close()


def received(report: Report) -> tuple[bytes, bytes]:
    """The report mail as the domain owner's mailbox gets it (SMTP dot-stuffing undone,
    RFC 5321 §4.5.2), and its gzip attachment."""
    mail = re.sub(rb"(?m)^\.\.", b".", report_mail(report, SETTINGS, "dmarc@example.com"))
    message = email.message_from_bytes(mail, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/gzip"
    assert attachment.get_filename() == report.filename
    data = attachment.get_content()
    assert isinstance(data, bytes) and gzip.decompress(data) == report.xml
    return mail, data


# --------------------------------------------------------------------------- the tests


def test_three_parsers_read_our_reports_as_the_store_holds_them(
        store: Store, tmp_path: Path, offline: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    expected = expected_reports(store)
    reports = build_reports(store, period_start=DAY, period_end=END, settings=SETTINGS)
    assert sorted(r.policy_domain for r in reports) == sorted(expected) == [
        "example.com", "other.example", "xn--bcher-kva.example"]
    assert all(r.parts == 1 for r in reports)
    # the data is what the test says it is: every case above is in a report
    rows = [row for e in expected.values() for row, _ in e.rows]
    assert {r.disposition for r in rows} == {"pass", "none", "quarantine", "reject"}
    assert any(r.spf is None and r.envelope_from == "" for r in rows)  # IP HELO bounces
    assert any(r.source_ip.version == 6 for r in rows)
    assert {kind for r in rows for kind, _ in r.reasons} == {
        "local_policy", "trusted_forwarder", "policy_test_mode"}
    assert max(len(r.dkim) for r in rows) == 3

    caplog.set_level(logging.WARNING)
    for report in reports:
        xmllint(report.xml, tmp_path)
        mail, attachment = received(report)
        want = expected[report.policy_domain]
        want = replace(want, meta=replace(want.meta, report_id=report.report_id))
        assert sum(count * times for (_, count), times in want.rows.items()) == report.messages

        # our ingester keeps no envelope_to (ReceivedRecord has none): not compared there
        agree("mailwarden", ours(mail, tmp_path),
              replace(want, rows=rows_with(want.rows, envelope_to=None)))

        # parsedmarc fills in what a report leaves out with the defaults (sp = p, adkim and
        # aspf r, RFC 9989); an empty <envelope_from> (the null reverse-path, RFC 9990
        # "MAY be existing but empty") it reads as absent and backfills from the SPF
        # result's domain, as its source says, else leaves it None; a missing envelope_to
        # it gives as None
        policy = want.policy
        agree("parsedmarc", by_parsedmarc(mail), replace(
            want,
            policy=replace(policy, sp=policy.sp or policy.p, adkim=policy.adkim or "r",
                           aspf=policy.aspf or "r"),
            rows=rows_with(want.rows, envelope_from=lambda r: r.envelope_from or (
                r.spf[0] if r.spf else None))))

        # dmarc-report keeps absent as None and empty as "": the report as written
        agree("dmarc-report", by_dmarc_report(attachment), want)
        agree("dmarc-report (plain XML)", by_dmarc_report(report.xml), want)

    # parsedmarc logs what it could not parse (a record it drops, an unknown reason type, a
    # missing selector) as warnings; the age of its bundled IP database is no concern here
    complaints = [r.getMessage() for r in caplog.records if r.name.startswith("parsedmarc")
                  and r.levelno >= logging.WARNING and "IP database" not in r.getMessage()]
    assert complaints == []


def test_t_y_on_a_non_existent_subdomain_says_policy_test_mode(
        tmp_path: Path, offline: list[str]) -> None:
    """t=y, np=reject, sp=quarantine, a non-existent subdomain failing: the milter applies
    quarantine (np= one level less strict, evaluate.py) and records no override. The
    disposition differs from the policy configured for that domain (np=reject): RFC 9990
    requires a reason, policy_test_mode."""
    store = Store.open(str(tmp_path / "np.db"))
    store.record(evaluation(**{**EXAMPLE, "testing": True}, **FAIL, source_ip="203.0.113.66",
                            header_from="ghost.example.com", envelope_from="ghost.example.com",
                            disposition="quarantine", dkim=(), policy_tag="np",
                            spf=(("ghost.example.com", "mfrom", "none"),)))
    (report,) = build_reports(store, period_start=DAY, period_end=END, settings=SETTINGS)
    store.close()
    xmllint(report.xml, tmp_path)
    (record,) = DMARCParser.parse_bytes(report.gz).records
    assert record.policy_evaluated.disposition.value == "quarantine"
    assert [r.type.value for r in record.policy_evaluated.reasons] == ["policy_test_mode"]
